"""Held-out bits per character and per byte (seqlm.evaluation, evaluate.py), checked against numbers computed here
independently: the text measured with Python, the tokens counted with the tokenizer, and the loss summed token by
token from the model's own log-probabilities. A tiny random Qwen2 model, the real offline Qwen tokenizer, People's
Daily text."""
import json
import math
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from torch.utils.data import ConcatDataset, Subset
from transformers import (
    AutoModelForCausalLM,
    TrainingArguments,
    default_data_collator,
)

from seqlm.evaluation import BitsPerCharCallback, TextSize, mean_loss, text_size
from seqlm.model import load_config
from seqlm.token_cache import BlockDataset, TokenCache, build_token_cache
from seqlm.trainer import SafeTrainer

REPO = Path(__file__).resolve().parent.parent
ENDOFTEXT = 151643
BLOCK = 64


def measured(tokenizer, texts: list[str]) -> TextSize:
    """The size of the text, independently of the token cache: each document's tokens and its separator."""
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    return TextSize(tokens, sum(map(len, texts)), sum(len(t.encode("utf-8")) for t in texts))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, offline_qwen_tokenizer, peoples_daily_texts):
    """Two small held-out files, tokenized, and a tiny random model saved as an HF checkpoint with the tokenizer."""
    root = tmp_path_factory.mktemp("eval")
    texts = {"a": peoples_daily_texts[:4], "b": peoples_daily_texts[4:7]}
    files = {name: write_jsonl(root / f"{name}.jsonl", t) for name, t in texts.items()}
    folders = {name: build_token_cache(f, offline_qwen_tokenizer, ENDOFTEXT, root / "cache")
               for name, f in files.items()}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny"))
    model.save_pretrained(root / "model")
    offline_qwen_tokenizer.save_pretrained(root / "model")
    return dict(root=root, texts=texts, files=files, folders=folders, model=model.eval())


def test_manifest_counts_the_characters_and_bytes_of_the_text(corpus, offline_qwen_tokenizer):
    for name, folder in corpus["folders"].items():
        m = TokenCache(folder).manifest
        expected = measured(offline_qwen_tokenizer, corpus["texts"][name])
        assert (m["num_tokens"], m["num_chars"], m["num_bytes"]) == (expected.tokens, expected.chars, expected.bytes)
        assert expected.bytes > 2.5 * expected.chars  # Chinese: about 3 UTF-8 bytes a character


def test_a_cache_built_before_the_counts_is_measured_from_its_source(corpus, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(corpus["folders"]["a"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items()
                                                   if k not in ("num_chars", "num_bytes")}))
    assert text_size(TokenCache(old)) == text_size(TokenCache(corpus["folders"]["a"]))


def test_bits_are_the_loss_in_bits_spread_over_the_text():
    size = TextSize(tokens=2, chars=3, bytes=9)
    bits = size.bits(math.log(2) * 6, prefix="eval_")  # 6 bits a token, 12 bits in all
    assert bits == pytest.approx({"eval_bits_per_char": 4.0, "eval_bits_per_byte": 12 / 9})
    assert size + size == TextSize(4, 6, 18)


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
        loss, count = reference_loss(corpus["model"], BlockDataset(corpus["folders"][name], BLOCK), 5)
        size = measured(offline_qwen_tokenizer, corpus["texts"][name])  # the whole file's ratio, not the 5 blocks'
        assert (s["blocks"], s["predicted_tokens"]) == (5, count)
        assert s["loss"] == pytest.approx(loss, rel=1e-5)
        assert s["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert s["bits_per_char"] == pytest.approx(loss / math.log(2) * size.tokens / size.chars, rel=1e-5)
        assert s["bits_per_byte"] == pytest.approx(loss / math.log(2) * size.tokens / size.bytes, rel=1e-5)
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
    trainer.add_callback(BitsPerCharCallback.from_dataset(eval_dataset))
    metrics = trainer.evaluate()
    # The ratio of both whole files, whichever blocks were evaluated.
    size = text_size(blocks[0].cache) + text_size(blocks[1].cache)
    assert metrics["eval_bits_per_char"] == pytest.approx(metrics["eval_loss"] / math.log(2) * size.tokens / size.chars)
    assert metrics["eval_bits_per_byte"] == pytest.approx(metrics["eval_loss"] / math.log(2) * size.tokens / size.bytes)
    assert metrics["eval_loss"] == pytest.approx(mean_loss(corpus["model"], blocks[0], 3, 6)[0], rel=1e-5)
