"""Samples during training (seqlm.training.samples), driven by a real Trainer: a tiny random Qwen2 model, the real offline
Qwen tokenizer, blocks of People's Daily text."""
import logging

import pytest
import torch
from helpers import ENDOFTEXT, write_jsonl
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)

from seqlm.data.token_cache import BlockDataset, build_token_cache
from seqlm.evaluation.tracking import start_swanlab
from seqlm.model import load_config
from seqlm.outputs import read_samples
from seqlm.training import samples as samples_module
from seqlm.training.arguments import SampleArguments
from seqlm.training.samples import SamplesCallback, continuations, load_prompts


@pytest.fixture(scope="module")
def tokenizer(offline_qwen_tokenizer):
    return offline_qwen_tokenizer


@pytest.fixture(scope="module")
def blocks(module_tmp, tokenizer, peoples_daily_texts):
    root = module_tmp("samples")
    corpus = write_jsonl(root / "train.jsonl", peoples_daily_texts[:10])
    return BlockDataset(build_token_cache(corpus, tokenizer, ENDOFTEXT, root / "cache"), 64)


def tiny_model():
    torch.manual_seed(0)
    config = load_config("tiny")
    config.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1))
    return AutoModelForCausalLM.from_config(config)


class TrainingModes(TrainerCallback):
    """Whether the model is in training mode at each step: sampling must hand it back as it found it."""

    def __init__(self):
        self.modes = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.modes.append(model.training)


def train(model, blocks, tokenizer, output_dir, samples: SamplesCallback, resume=None, **overrides):
    args = TrainingArguments(**{**dict(output_dir=str(output_dir), use_cpu=True, report_to="none", max_steps=4,
                                       per_device_train_batch_size=2, learning_rate=3e-3, logging_steps=2,
                                       eval_steps=2, save_steps=2, disable_tqdm=True), **overrides})
    trainer = Trainer(model=model, args=args, train_dataset=blocks, processing_class=tokenizer,
                      data_collator=default_data_collator, callbacks=[samples, modes := TrainingModes()])
    trainer.train(resume_from_checkpoint=resume)
    return modes.modes


def records(output_dir) -> list[dict]:
    return read_samples(output_dir)


def test_default_prompts_are_chinese_openings():
    prompts = load_prompts()
    assert 4 <= len(prompts) <= 10
    assert all(any("\u4e00" <= c <= "\u9fff" for c in p) for p in prompts)


def test_prompts_file_one_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("你好\n\n  今天  \n", encoding="utf-8")
    assert load_prompts(path) == ["你好", "今天"]
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompt"):
        load_prompts(path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    # Samples turned off never read the file.
    off = SampleArguments(sample_steps=0, sample_prompts_file="nope.txt")
    assert SamplesCallback.from_args(off, None).prompts == []


def test_continuations_batched_seeded_and_leave_the_random_state_alone(tokenizer):
    model = tiny_model().eval()
    prompts = load_prompts()[:3]
    greedy = continuations(model, tokenizer, prompts, max_new_tokens=6)
    # One left-padded batch gives what each prompt gives alone.
    assert greedy == [continuations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    sampled = continuations(model, tokenizer, prompts, max_new_tokens=6, seed=7)
    assert torch.equal(torch.rand(4), expected_next)  # training's random stream is not consumed
    assert continuations(model, tokenizer, prompts, max_new_tokens=6, seed=7) == sampled  # same seed, same text
    assert continuations(model, tokenizer, prompts, max_new_tokens=6, seed=8) != sampled
    assert all(s.strip() for s in greedy + sampled)
    assert tokenizer.backend_tokenizer.padding is None  # the shared tokenizer would pad the token cache's batches


def test_samples_every_eval_steps_and_again_after_a_resume(tmp_path, blocks, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="seqlm.training.samples")
    out = tmp_path / "out"
    prompts = ["中国的首都是", "今天天气"]
    modes = train(tiny_model(), blocks, tokenizer, out, SamplesCallback(prompts, tokenizer, max_new_tokens=5))
    assert all(modes)  # back in training mode after each sampling
    first = records(out)
    assert [r["step"] for r in first] == [0, 2, 4]  # the start, every eval_steps (2); the end is step 4
    for r in first:
        assert [s["prompt"] for s in r["samples"]] == prompts
        assert all(isinstance(s["greedy"], str) and isinstance(s["sampled"], str) for s in r["samples"])
    assert first[0]["samples"] != first[2]["samples"]  # three optimizer steps at 3e-3 change a random model
    assert "samples at step 2:" in caplog.text and "中国的首都是" in caplog.text

    # A rerun resuming from checkpoint-2 drops the records after it and writes them again.
    train(tiny_model(), blocks, tokenizer, out, SamplesCallback(prompts, tokenizer, max_new_tokens=5),
          resume=str(out / "checkpoint-2"))
    again = records(out)
    assert [r["step"] for r in again] == [0, 2, 4]
    assert again[0] == first[0]
    assert again[1]["samples"] == first[1]["samples"]  # the same weights: the same greedy and seeded samples


def test_samples_reach_swanlab_as_text(tmp_path, blocks, tokenizer, monkeypatch):
    import swanlab

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    start_swanlab(str(out), None, config={}, mode="offline")
    try:
        for every in (0, 1):
            samples = SamplesCallback(["中国的首都是"], tokenizer, every=every, max_new_tokens=3)
            train(tiny_model(), blocks, tokenizer, out, samples, max_steps=1, save_strategy="no")
    finally:
        swanlab.finish()
    (run,) = (out / "swanlog").glob("run-*")
    written = records(out)
    assert [r["step"] for r in written] == [0, 1]  # every=0 wrote nothing
    texts = sorted(p.read_bytes().decode("utf-8") for p in run.glob("media/text/*.txt"))  # as written, \r and all
    kinds = ("greedy", "sampled")
    assert texts == sorted(s["prompt"] + s[kind] for r in written for s in r["samples"] for kind in kinds)


def test_chat_samples_put_each_prompt_in_a_user_turn(tmp_path, tokenizer, monkeypatch):
    """For a fine-tuned model: the prompt is rendered by the tokenizer's chat template, the record keeps it plain."""
    seen = []

    def fake_continuations(model, tokenizer, prompts, max_new_tokens, seed=None):
        seen.append(prompts)
        return [f"答{i}\u2028\r" for i in range(len(prompts))]  # line breaks a text can hold

    monkeypatch.setattr(samples_module, "continuations", fake_continuations)
    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    SamplesCallback(["你好"], tokenizer, every=1, chat=True).on_train_begin(args, TrainerState(), TrainerControl(),
                                                                             model=model)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                             add_generation_prompt=True)
    assert seen == [[expected], [expected]] and expected.endswith("<|im_start|>assistant\n")
    answer = "答0\u2028\r"
    assert records(tmp_path) == [{"step": 0, "samples": [{"prompt": "你好", "greedy": answer, "sampled": answer}]}]
    assert model.training
