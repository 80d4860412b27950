"""export.py end to end: tiny checkpoints trained through pretrain.sh and finetune.sh (real Qwen tokenizer, People's
Daily text), converted by llama.cpp's own converter, loaded by llama-cpp-python (built from its source package by
`make gguf-setup`), and their greedy tokens compared with those of stock transformers on the original checkpoint.

Slow (a pretraining and a fine-tuning run, four conversions), and it needs `make gguf-setup`."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENDOFTEXT, IM_END, REPO, TINY_RUN, TINY_SFT, finetune_sh, pretrain_sh
from transformers import AutoModelForCausalLM, AutoTokenizer

from seqlm.data.demo import copy_offline_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="the GGUF export's test needs `make gguf-setup`")
pytestmark = pytest.mark.slow

SYSTEM = "你是一个乐于助人的助手。"
QUESTIONS = ["请介绍一下长城。", "请续写这段新闻：中国人民决心继承邓小平同志的遗志。", "今天天气怎么样？"]
TEXTS = ["中国的首都是", "新华社北京一月一日电", "在新的一年里，我们要"]
NEW_TOKENS = 20


def export(model: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "export.py"), "--model_path", str(model), *args],
                          capture_output=True, text=True, timeout=900, cwd=REPO)


def exported(model: Path, *args: str) -> Path:
    result = export(model, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return model.with_name(f"{model.name}-gguf")


@pytest.fixture(scope="module")
def sft(sft_data):
    """A fine-tuned checkpoint with a default system prompt (the template is then not llama-cpp-python's built-in
    ChatML), exported to f16 and q8_0."""
    out = sft_data / "sft"
    finetune_sh(sft_data, out, *TINY_SFT, "--max_steps", "12", "--system_prompt", SYSTEM)
    exported(out)
    return out, exported(out, "--outtype", "q8_0")


@pytest.fixture(scope="module")
def pretrained(data, module_tmp):
    out = module_tmp("pretrain") / "pretrain"
    pretrain_sh(data, out, *TINY_RUN, "--max_steps", "30")
    return out, exported(out)


def load_gguf(path: Path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, seed=0, verbose=False)


def transformers_greedy(model, ids: list[int], stops: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0, eos_token_id=stops)
    return out[0, len(ids):].tolist()


def llama_greedy(llm, ids: list[int], stops: list[int]) -> list[int]:
    """llama.cpp's greedy tokens after `ids`, up to NEW_TOKENS or the first stop token, as transformers stops."""
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if token in stops or len(tokens) == NEW_TOKENS:
            return tokens
    return tokens


def agreement(llm, model, tokenizer, prompts: list[str], chat: bool) -> tuple[int, int, list]:
    """(tokens equal in place, tokens compared, the pairs) over the prompts' greedy continuations."""
    eos = model.generation_config.eos_token_id
    stops = eos if isinstance(eos, list) else [eos]
    equal = total = 0
    pairs = []
    for prompt in prompts:
        ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] if chat else tokenizer(prompt)["input_ids"])
        assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
        ours, theirs = transformers_greedy(model, ids, stops), llama_greedy(llm, ids, stops)
        pairs.append((ours, theirs))
        equal += sum(a == b for a, b in zip(ours, theirs))
        total += max(len(ours), len(theirs))
    return equal, total, pairs


def test_sft_checkpoint_exports_with_its_template_stops_and_modelfile(sft):
    out, folder = sft
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    llm = load_gguf(folder / "model-f16.gguf")
    assert llm.metadata["general.architecture"] == "qwen2"
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == IM_END
    assert llm.token_eos() == IM_END
    # llama.cpp ends generation at either: the end of a turn, or of a document (what pretraining taught)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, IM_END) and llama_cpp.llama_vocab_is_eog(vocab, ENDOFTEXT)
    modelfile = (folder / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")  # the latest export
    assert f'SYSTEM """{SYSTEM}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in modelfile


def test_f16_greedy_tokens_equal_transformers(sft):
    out, folder = sft
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    equal, total, pairs = agreement(load_gguf(folder / "model-f16.gguf"), model, tokenizer, QUESTIONS, chat=True)
    assert equal == total, pairs
    assert total >= len(QUESTIONS) * 5, pairs  # answers, not empty ones


def test_q8_0_is_half_the_size_and_agrees_on_most_tokens(sft):
    out, folder = sft
    f16, q8 = (folder / f"model-{t}.gguf" for t in ("f16", "q8_0"))
    assert q8.stat().st_size < 0.6 * f16.stat().st_size
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    equal, total, pairs = agreement(load_gguf(q8), model, tokenizer, QUESTIONS, chat=True)
    print(f"q8_0: {equal} of {total} greedy tokens equal to transformers'")
    assert equal >= 0.8 * total, pairs
    assert all(ours[:3] == theirs[:3] for ours, theirs in pairs), pairs


def test_a_chat_through_llama_cpp_uses_the_template_from_the_gguf(sft):
    out, folder = sft
    llm = load_gguf(folder / "model-f16.gguf")
    assert llm.chat_format == "chat_template.default"  # not one of its built-in formats
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        reply = llm.create_chat_completion(messages, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                           max_tokens=NEW_TOKENS)
        # transformers: the checkpoint's template puts the default system prompt first
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert tokenizer.decode(ids[:3]) == "<|im_start|>system\n"
        answer = tokenizer.decode(transformers_greedy(model, ids, model.generation_config.eos_token_id),
                                  skip_special_tokens=True)
        assert reply["choices"][0]["message"]["content"] == answer


def test_a_pretrained_checkpoint_exports_as_a_text_model_that_continues_the_same_way(pretrained):
    out, folder = pretrained
    llm = load_gguf(folder / "model-f16.gguf")
    assert "tokenizer.chat_template" not in llm.metadata
    assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == ENDOFTEXT
    modelfile = (folder / "Modelfile").read_text(encoding="utf-8")
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile and "<|im_start|>" not in modelfile
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    equal, total, pairs = agreement(llm, model, tokenizer, TEXTS, chat=False)
    assert equal == total == len(TEXTS) * NEW_TOKENS, pairs


# ---------------------------------------------------------------- bad input: one line, before any work


def assert_refused(result: subprocess.CompletedProcess, output_dir: Path, *words: str) -> None:
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert not output_dir.exists()


def model_folder(folder: Path, config: dict, weights: dict[str, list[int]]) -> Path:
    """A model folder with the real tokenizer, `config` and a safetensors header declaring `weights` (no data:
    nothing may read it)."""
    copy_offline_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(config))
    header = json.dumps({name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
                         for name, shape in weights.items()}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    assert_refused(export(tmp_path / "notes"), tmp_path / "notes-gguf", "has no config.json")
    assert_refused(export(tmp_path / "missing"), tmp_path / "missing-gguf", "no model folder")


def test_an_architecture_the_converter_does_not_know_is_refused(tmp_path):
    config = {"architectures": ["BioGptForCausalLM"], "model_type": "biogpt"}  # a transformers causal LM
    folder = model_folder(tmp_path / "biogpt", config, {"w": [4]})
    assert_refused(export(folder), tmp_path / "biogpt-gguf", "BioGptForCausalLM", "cannot convert")


def test_an_export_that_does_not_fit_on_the_disk_is_refused(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    config = json.loads((REPO / "configs" / "tiny.json").read_text())
    # Twice the free space in f16: tests beside this one write and delete gigabytes, so the free space moves.
    folder = model_folder(tmp_path / "huge", config, {"model.embed_tokens.weight": [free // 128 + 1, 128]})
    assert_refused(export(folder, "--output_dir", str(tmp_path / "out")), tmp_path / "out",
                   "needs about", "GB are free")


def test_a_type_the_converter_does_not_write_names_llama_quantize(tmp_path):
    result = export(tmp_path / "sft", "--outtype", "q4_k_m")
    assert_refused(result, tmp_path / "sft-gguf", "q4_k_m", "llama-quantize")


def test_a_failed_conversion_leaves_no_file_that_looks_complete(sft, tmp_path):
    out, _ = sft
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("checkpoint-*", "swanlog"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # cut mid-tensor, header intact
    result = export(broken, "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1 and "llama.cpp's converter failed" in result.stderr.splitlines()[-1]
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []
