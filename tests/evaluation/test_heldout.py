"""Held-out bits per character and per byte (seqlm.evaluation.heldout, evaluate.py), checked against numbers computed here
independently: the text measured with Python, the tokens counted with the tokenizer, and the loss summed token by
token from the model's own log-probabilities. A tiny random Qwen2 model, the real offline Qwen tokenizer, People's
Daily text."""
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENDOFTEXT, REPO, write_jsonl
from torch.utils.data import ConcatDataset, Subset
from transformers import (
    AutoModelForCausalLM,
    TrainingArguments,
    default_data_collator,
)

from seqlm.data.token_cache import BlockDataset, TokenCache, build_token_cache
from seqlm.evaluation.heldout import BitsPerCharCallback, EvaluatedText, TokenTextSizes, mean_loss
from seqlm.model import load_config
from seqlm.training.trainer import SafeTrainer

BLOCK = 64


def brute_force_text(blocks: list[BlockDataset], n: int, sizes: TokenTextSizes) -> tuple[int, int]:
    """(characters, bytes) of the tokens the first n blocks predict, one token at a time."""
    chars = byte_count = 0
    for blocks_of_file in blocks:
        for i in range(min(n, len(blocks_of_file))):
            for token in blocks_of_file[i]["input_ids"][1:].tolist():
                chars, byte_count = chars + int(sizes.chars[token]), byte_count + int(sizes.bytes[token])
        n -= min(n, len(blocks_of_file))
    return chars, byte_count


@pytest.fixture(scope="module")
def corpus(module_tmp, offline_qwen_tokenizer, peoples_daily_texts):
    """Two small held-out files, tokenized, and a tiny random model saved as an HF checkpoint with the tokenizer."""
    root = module_tmp("eval")
    texts = {"a": peoples_daily_texts[:4], "b": peoples_daily_texts[4:7]}
    files = {name: write_jsonl(root / f"{name}.jsonl", t) for name, t in texts.items()}
    folders = {name: build_token_cache(f, offline_qwen_tokenizer, ENDOFTEXT, root / "cache")
               for name, f in files.items()}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny"))
    model.save_pretrained(root / "model")
    offline_qwen_tokenizer.save_pretrained(root / "model")
    return dict(root=root, texts=texts, files=files, folders=folders, model=model.eval(),
                tokenizer=offline_qwen_tokenizer)


def test_manifest_counts_the_characters_and_bytes_of_the_text(corpus, offline_qwen_tokenizer):
    for name, folder in corpus["folders"].items():
        m = TokenCache(folder).manifest
        texts = corpus["texts"][name]
        tokens = sum(len(offline_qwen_tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
        assert (m["num_tokens"], m["num_chars"], m["num_bytes"]) == (
            tokens, sum(map(len, texts)), sum(len(t.encode("utf-8")) for t in texts))


def test_each_documents_tokens_hold_exactly_its_text(corpus, offline_qwen_tokenizer):
    """The per-token sizes against Python's own count of each document's characters and UTF-8 bytes."""
    sizes = TokenTextSizes(offline_qwen_tokenizer, ENDOFTEXT)
    assert sizes.exact
    documents = [d for folder in corpus["folders"].values() for d in TokenCache(folder).documents()]
    texts = [t for name in corpus["folders"] for t in corpus["texts"][name]]
    for doc, text in zip(documents, texts, strict=True):
        assert doc[-1] == ENDOFTEXT and sizes.of(doc[-1:]) == (0, 0)  # the separator holds no text
        assert sizes.of(doc) == (len(text), len(text.encode("utf-8")))
    assert sum(map(len, texts)) * 2.5 < sum(len(t.encode("utf-8")) for t in texts)  # Chinese: ≈ 3 bytes a character


def test_a_special_token_written_in_a_document_counts_as_its_text(offline_qwen_tokenizer):
    text = "前<|im_start|>后"
    ids = np.array(offline_qwen_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert offline_qwen_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert TokenTextSizes(offline_qwen_tokenizer, ENDOFTEXT).of(ids) == (len(text), len(text.encode()))


def test_evaluated_text_is_exactly_the_predicted_tokens_of_the_first_blocks(corpus, offline_qwen_tokenizer):
    blocks = [BlockDataset(corpus["folders"][name], BLOCK) for name in ("a", "b")]
    sizes = TokenTextSizes(offline_qwen_tokenizer, ENDOFTEXT)
    for n in (1, len(blocks[0]), len(blocks[0]) + 2, len(blocks[0]) + len(blocks[1])):  # one file, then both
        text = EvaluatedText.of(Subset(ConcatDataset(blocks), range(n)), offline_qwen_tokenizer, ENDOFTEXT)
        assert (text.blocks, text.total_blocks, text.predictions) == (n, len(blocks[0]) + len(blocks[1]),
                                                                      n * (BLOCK - 1))
        assert (text.chars, text.bytes) == brute_force_text(blocks, n, sizes)
    with pytest.raises(ValueError, match="first blocks"):
        EvaluatedText.of(Subset(blocks[0], [2, 3]), offline_qwen_tokenizer, ENDOFTEXT)


def test_bits_are_the_loss_in_bits_spread_over_the_text():
    text = EvaluatedText(blocks=1, total_blocks=4, block_size=3, predictions=2, chars=3, bytes=9)
    bits = text.bits(math.log(2) * 6, prefix="eval_")  # 6 bits a token, 12 bits in all
    assert bits == pytest.approx({"eval_bits_per_char": 4.0, "eval_bits_per_byte": 12 / 9})
    assert text.describe() == ("the first 1 of 4 blocks of 3 tokens: 2 predicted tokens, 3 characters, "
                               "9 UTF-8 bytes")


def reference_loss(model, blocks: BlockDataset, n: int) -> tuple[float, int]:
    """Mean negative log-likelihood per predicted token, summed one prediction at a time in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            ids = blocks[i]["input_ids"]
            log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), dim=-1)
            for t in range(1, len(ids)):  # position t is predicted from the tokens before it
                total -= log_probs[t - 1, ids[t]].item()
                count += 1
    return total / count, count


def test_mean_loss_is_the_per_token_negative_log_likelihood(corpus):
    blocks = BlockDataset(corpus["folders"]["a"], BLOCK)
    loss, count = mean_loss(corpus["model"], blocks, batch_size=3, max_blocks=7)  # a last, partial batch
    expected, expected_count = reference_loss(corpus["model"], blocks, 7)
    assert count == expected_count == 7 * (BLOCK - 1)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(loss - math.log(151936)) < 0.5  # a random model: about uniform over the vocabulary


def run_evaluate(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """evaluate.py as from the command line (in this process: no second start-up of torch); exit code, stdout,
    stderr."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(REPO / "evaluate.py"), run_name="__main__")
    out = capsys.readouterr()
    return exit.value.code, out.out, out.err


def test_evaluate_py_scores_a_checkpoint(corpus, offline_qwen_tokenizer, monkeypatch, capsys):
    out = corpus["root"] / "scores.json"
    code, stdout, stderr = run_evaluate(
        monkeypatch, capsys, "--model_path", str(corpus["root"] / "model"), "--files", str(corpus["files"]["a"]),
        str(corpus["files"]["b"]), "--block_size", str(BLOCK), "--batch_size", "4", "--max_blocks", "5",
        "--token_cache_dir", str(corpus["root"] / "cache"), "--output_json", str(out))
    assert code == 0, stderr[-3000:]
    scores = json.loads(out.read_text())
    assert scores["block_size"] == BLOCK and [Path(s["file"]).stem for s in scores["files"]] == ["a", "b"]
    for s in scores["files"]:
        name = Path(s["file"]).stem
        blocks = BlockDataset(corpus["folders"][name], BLOCK)
        loss, count = reference_loss(corpus["model"], blocks, 5)
        chars, byte_count = brute_force_text([blocks], 5, TokenTextSizes(offline_qwen_tokenizer, ENDOFTEXT))
        assert (s["blocks"], s["total_blocks"], s["predicted_tokens"]) == (5, len(blocks), count)
        assert (s["chars"], s["bytes"]) == (chars, byte_count)  # the text of the 5 blocks, not the whole file's
        assert s["loss"] == pytest.approx(loss, rel=1e-5)
        assert s["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert s["bits_per_char"] == pytest.approx(loss / math.log(2) * count / chars, rel=1e-5)
        assert s["bits_per_byte"] == pytest.approx(loss / math.log(2) * count / byte_count, rel=1e-5)
        assert f"{s['bits_per_char']:.4f}" in stdout  # the table
    # The cache pretrain.py built is reused: same tokenizer, same separator (the model's eos_token_id).
    assert len(list((corpus["root"] / "cache").glob("a.jsonl-*"))) == 1


@pytest.mark.parametrize("what", ["checkpoint", "file"])
def test_evaluate_py_says_what_is_missing_in_one_line(corpus, tmp_path, what, monkeypatch, capsys):
    model = tmp_path / "nope" if what == "checkpoint" else corpus["root"] / "model"
    files = tmp_path / "nope.jsonl" if what == "file" else corpus["files"]["a"]
    code, _, stderr = run_evaluate(monkeypatch, capsys, "--model_path", str(model), "--files", str(files))
    assert code == 1
    assert stderr.startswith("error: ") and stderr.strip().count("\n") == 0 and "nope" in stderr


def test_callback_adds_bits_per_char_to_the_trainers_evaluation(corpus, tmp_path):
    blocks = [BlockDataset(corpus["folders"][name], BLOCK) for name in ("a", "b")]
    eval_dataset = Subset(ConcatDataset(blocks), range(6))  # as pretrain.py builds it with --max_eval_samples
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=3)
    trainer = SafeTrainer(model=corpus["model"], args=args, eval_dataset=eval_dataset,
                          data_collator=default_data_collator)
    trainer.add_callback(BitsPerCharCallback(EvaluatedText.of(eval_dataset, corpus["tokenizer"], ENDOFTEXT)))
    metrics = trainer.evaluate()
    chars, byte_count = brute_force_text(blocks, 6, TokenTextSizes(corpus["tokenizer"], ENDOFTEXT))
    bits = metrics["eval_loss"] / math.log(2) * 6 * (BLOCK - 1)
    assert metrics["eval_bits_per_char"] == pytest.approx(bits / chars)
    assert metrics["eval_bits_per_byte"] == pytest.approx(bits / byte_count)
    assert metrics["eval_loss"] == pytest.approx(mean_loss(corpus["model"], blocks[0], 3, 6)[0], rel=1e-5)
