"""Trainer callbacks that add what a pretraining run is judged by to every log line."""
from __future__ import annotations

import math
import time

from transformers import TrainerCallback

from .flops import device_peak_tflops, flops_per_token


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s (over the last logging interval, all devices and per device) and MFU to training logs, and
    perplexity to evaluation logs, through `add_to` (called by SafeTrainer.log). MFU needs the sequence length and a peak
    (given, or known for the GPU: seqlm.flops)."""

    def __init__(self, seq_len: int | None = None, peak_tflops: float | None = None):
        self.seq_len, self.peak_tflops = seq_len, peak_tflops or device_peak_tflops()
        self._last: tuple[float, int] | None = None
        self._flops_per_token: float | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
        if model is not None and self.seq_len and self.peak_tflops:
            self._flops_per_token = flops_per_token(model, self.seq_len)

    def add_to(self, logs: dict, state, args) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs and self._last is not None:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            seconds = now - self._last[0]
            if seconds > 0 and tokens > self._last[1]:
                logs["tokens_per_second"] = round((tokens - self._last[1]) / seconds)
                logs["tokens_per_second_per_device"] = round(logs["tokens_per_second"] / args.world_size)
                if self._flops_per_token:
                    logs["mfu"] = round(logs["tokens_per_second_per_device"] * self._flops_per_token
                                        / (self.peak_tflops * 1e12), 4)
            self._last = (now, tokens)

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation time is not training throughput: restart the interval after it.
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
