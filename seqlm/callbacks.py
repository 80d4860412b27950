"""Trainer callbacks that add what a pretraining run is judged by to every log line."""
from __future__ import annotations

import math
import time

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s (over the last logging interval, all devices and per device) to training logs, and
    perplexity to evaluation logs. Must be first in the callback list so printers and loggers see its keys."""

    def __init__(self):
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs and self._last is not None:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            seconds = now - self._last[0]
            if seconds > 0 and tokens > self._last[1]:
                logs["tokens_per_second"] = round((tokens - self._last[1]) / seconds)
                logs["tokens_per_second_per_device"] = round(logs["tokens_per_second"] / args.world_size)
            self._last = (now, tokens)

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation time is not training throughput: restart the interval after it.
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
