"""Samples during training: every N steps, the greedy and a sampled continuation of a fixed set of prompts, to the
console, to swanlab as text, and to samples.jsonl in the output dir (one record per step; the report shows them).
Watching the same prompts over a run shows the model go from noise to words to sentences."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from seqlm import outputs, paths
from seqlm.fileio import atomic_output

log = logging.getLogger(__name__)
DEFAULT_PROMPTS = paths.REPO / "prompts" / "zh.txt"
SAMPLING = dict(temperature=0.8, top_p=0.95)


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts of a file, one per non-blank line (default: prompts/zh.txt)."""
    path = Path(path or DEFAULT_PROMPTS)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {path}: write one prompt per line, or pass --sample_steps 0")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt: write one per line")
    return prompts


def _write_samples(path: Path, records: list[dict], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@torch.no_grad()
def continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  max_new_tokens: int, seed: int | None = None) -> list[str]:
    """Greedy continuations (seed None), or sampled ones from `seed`, of all prompts in one left-padded batch."""
    # Padded here, not by the tokenizer: padding=True would stay switched on in the shared fast tokenizer and pad
    # whatever it encodes in batches next (the token cache).
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_id
    input_ids = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=model.device)
    options = dict(do_sample=False) if seed is None else dict(do_sample=True, **SAMPLING)
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the training's random state is left as it was
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, use_cache=True, **options)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


class SamplesCallback(TrainerCallback):
    """Writes samples at the start of training, every `every` steps (None: every eval_steps; 0: never) and at the
    end. Only the first process generates, alone: ZeRO-2 keeps the full weights on every rank, and it calls no
    collective, so the other ranks simply wait for it at the next step. With `chat`, each prompt is a user turn in
    the tokenizer's chat template (for a fine-tuned model)."""

    def __init__(self, prompts: list[str], tokenizer: PreTrainedTokenizerBase, every: int | None = None,
                 max_new_tokens: int = 32, seed: int = 0, chat: bool = False):
        self.prompts, self.tokenizer, self.every = prompts, tokenizer, every
        self.max_new_tokens, self.seed, self.chat = max_new_tokens, seed, chat
        self._interval: int | None = None
        self._last_step: int | None = None
        self.throughput = None  # the trainer's ThroughputCallback, told to leave the samples' time out of tokens/s

    @classmethod
    def from_args(cls, sample_args, tokenizer: PreTrainedTokenizerBase, chat: bool = False) -> SamplesCallback:
        """From SampleArguments; reads the prompts now, so that a missing file stops the run before training."""
        return cls(load_prompts(sample_args.sample_prompts_file) if sample_args.sample_steps != 0 else [], tokenizer,
                   sample_args.sample_steps, sample_args.sample_max_new_tokens, sample_args.sample_seed, chat)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._interval = self.every if self.every is not None else state.eval_steps
        if self.every != 0 and state.is_world_process_zero:
            # A fresh run starts the file anew; a resumed one drops what the interrupted run wrote after the
            # checkpoint it resumes from (it samples that step again now).
            kept = [r for r in outputs.read_samples(args.output_dir) if r["step"] < state.global_step]
            with atomic_output(Path(args.output_dir) / outputs.SAMPLES_FILE) as tmp:
                _write_samples(tmp, kept, "w")
            self._sample(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._interval and state.global_step % self._interval == 0 and state.is_world_process_zero:
            self._sample(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.every != 0 and self._last_step != state.global_step and state.is_world_process_zero:
            self._sample(args, state, model)

    def _sample(self, args, state, model: PreTrainedModel) -> None:
        start = time.perf_counter()
        was_training = model.training
        model.eval()  # no dropout, and no activation checkpointing (it turns the KV cache off)
        prompts = self.prompts
        if self.chat:
            prompts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                          add_generation_prompt=True) for p in prompts]
        greedy = continuations(model, self.tokenizer, prompts, self.max_new_tokens)
        sampled = continuations(model, self.tokenizer, prompts, self.max_new_tokens, seed=self.seed)
        model.train(was_training)
        self._last_step = state.global_step
        samples = zip(self.prompts, greedy, sampled, strict=True)
        record = {"step": state.global_step, "samples": [dict(prompt=p, greedy=g, sampled=s) for p, g, s in samples]}
        _write_samples(Path(args.output_dir) / outputs.SAMPLES_FILE, [record], "a")
        log.info("samples at step %d:\n%s", state.global_step, "\n".join(
            f"  {s['prompt']}\n    greedy:  {s['greedy']!r}\n    sampled: {s['sampled']!r}" for s in record["samples"]))
        _log_to_swanlab(record)
        if self.throughput is not None:
            self.throughput.exclude(time.perf_counter() - start)


def _log_to_swanlab(record: dict) -> None:
    import swanlab

    if swanlab.has_run():  # the run pretrain.py started on this process; none with --report_to none
        swanlab.log({f"samples/{kind}": [swanlab.Text(s["prompt"] + s[kind], caption=s["prompt"])
                                         for s in record["samples"]] for kind in ("greedy", "sampled")},
                    step=record["step"])
