"""The throughput callback: tokens/s, MFU, data wait and peak memory in every training log line."""
from __future__ import annotations

import math
import resource
import time

import torch
from transformers import TrainerCallback

from seqlm.training.flops import device_peak_tflops, flops_per_token


def peak_memory_gb() -> float:
    """The most memory this process has held: on a GPU what PyTorch allocated (what seqlm.training.memory estimates),
    on CPU the peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class ThroughputCallback(TrainerCallback):
    """Adds to training logs, through `add_to` (called by SafeTrainer.log): tokens/s over the last logging interval
    (all devices and per device), MFU, the share of that interval spent waiting for batches (`data_wait_seconds` is
    fed by SafeTrainer) and peak memory; perplexity to evaluation logs. MFU needs the sequence length and a peak
    (given, or known for the GPU: seqlm.training.flops)."""

    def __init__(self, seq_len: int | None = None, peak_tflops: float | None = None):
        self.seq_len, self.peak_tflops = seq_len, peak_tflops or device_peak_tflops()
        self.data_wait_seconds = 0.0
        self._last: tuple[float, int, float] | None = None  # time, tokens seen, data wait at the last log
        self._flops_per_token: float | None = None
        self._save_started: float | None = None

    def _restart_interval(self, state) -> None:
        self._last = (time.perf_counter(), state.num_input_tokens_seen, self.data_wait_seconds)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._restart_interval(state)
        if model is not None and self.seq_len and self.peak_tflops:
            self._flops_per_token = flops_per_token(model, self.seq_len)

    def add_to(self, logs: dict, state, args) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs and self._last is not None:
            then, tokens_then, wait_then = self._last
            seconds, tokens = time.perf_counter() - then, state.num_input_tokens_seen - tokens_then
            if seconds > 0 and tokens > 0:
                logs["tokens_per_second"] = round(tokens / seconds)
                logs["tokens_per_second_per_device"] = round(logs["tokens_per_second"] / args.world_size)
                if self._flops_per_token:
                    logs["mfu"] = round(logs["tokens_per_second_per_device"] * self._flops_per_token
                                        / (self.peak_tflops * 1e12), 4)
                # Above a few percent, the GPU idles for data: more --dataloader_num_workers, or a faster disk.
                logs["data_wait_percent"] = round(100 * (self.data_wait_seconds - wait_then) / seconds, 2)
            logs["peak_memory_gb"] = round(peak_memory_gb(), 2)
            self._restart_interval(state)

    def saving(self) -> None:
        """A checkpoint save starts (SafeTrainer._save_checkpoint): on_save leaves it out of the interval."""
        self._save_started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        # Added after the checkpoint-marking callback, so its part of the save (waiting for the other ranks) counts too.
        if self._save_started is not None:
            self.exclude(time.perf_counter() - self._save_started)
            self._save_started = None

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a benchmark suite, samples, a save) out of the current interval: none is
        training."""
        if self._last is not None:
            then, tokens, wait = self._last
            self._last = (then + seconds, tokens, wait)
