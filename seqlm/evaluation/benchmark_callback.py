"""Standard benchmarks during training: a suite of seqlm.evaluation.benchmarks scored on the model being trained, its scores
logged with the step's other metrics. Apart from seqlm.evaluation.benchmarks so that the downloader, which reads the suites'
table, does not load transformers and torch."""
from __future__ import annotations

import logging
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from transformers import TrainerCallback

from seqlm.data.conversation import is_chat_model
from seqlm.evaluation.benchmarks import Benchmark, log_keys, markdown, resolve, run_suite, write_task_files

log = logging.getLogger(__name__)


@contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global random generators as they were before: lm-eval's simple_evaluate seeds
    all three (its defaults), and training draws from them after the suite (dropout; the random state a checkpoint
    saves), so a run that scores benchmarks trains exactly as one that does not."""
    python, numpy = random.getstate(), np.random.get_state()
    # This rank's GPU only: asking another's state would open a CUDA context on it.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


class BenchmarkCallback(TrainerCallback):
    """Scores a suite on the model being trained, at the last step and every `steps` steps, on the first process.
    The scores join that step's log entry through `add_to` (called by SafeTrainer.log), so they reach the console,
    swanlab, trainer_state.json and report.md like every other metric. The other processes wait meanwhile."""

    def __init__(self, benchmarks: list[Benchmark], task_dir: tempfile.TemporaryDirectory, tokenizer, *, chat: bool,
                 steps: int, limit: int | None, batch_size: int, max_length: int, separator_id: int):
        self.benchmarks, self.task_dir, self.tokenizer, self.chat = benchmarks, task_dir, tokenizer, chat
        self.steps, self.limit, self.batch_size = steps, limit, batch_size
        self.max_length, self.separator_id = max_length, separator_id
        self.pending: dict[str, float] = {}
        self.throughput = None  # the trainer's ThroughputCallback, told to leave the suite's time out of tokens/s

    @classmethod
    def from_args(cls, args, tokenizer, *, max_length: int, separator_id: int,
                  heldout_file: str | None = None) -> BenchmarkCallback | None:
        """None without --benchmark_suite; BenchmarkError (one line) for an unknown task or missing data."""
        if not args.benchmark_suite:
            return None
        suite = resolve(args.benchmark_suite)
        task_dir = tempfile.TemporaryDirectory(prefix="benchmark-tasks-")  # one per process: no race between them
        heldout = args.benchmark_heldout_file or heldout_file
        write_task_files(suite, Path(task_dir.name), Path(args.benchmark_data_dir), Path(heldout) if heldout else None)
        return cls(suite, task_dir, tokenizer, chat=is_chat_model(tokenizer), steps=args.benchmark_steps,
                   limit=args.benchmark_limit, batch_size=args.benchmark_batch_size, max_length=max_length,
                   separator_id=separator_id)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step != state.max_steps and not (self.steps and step % self.steps == 0):
            return
        control.should_log = True  # on every process: the log entry gathers the loss from all of them
        if state.is_world_process_zero:
            start = time.perf_counter()
            with random_state_kept():
                rows = run_suite(model, self.tokenizer, self.benchmarks, Path(self.task_dir.name), chat=self.chat,
                                 batch_size=self.batch_size, max_length=self.max_length,
                                 prefix_token_id=self.separator_id, limit=self.limit)
            self.pending = log_keys(rows)
            seconds = time.perf_counter() - start
            if self.throughput is not None:
                self.throughput.exclude(seconds)
            log.info("benchmarks at step %d (%.0f s):\n%s", step, seconds, "\n".join(markdown(rows)))

    def add_to(self, logs: dict, state, args) -> None:
        if self.pending and "loss" in logs:  # the training log entry of that step, not an evaluation's
            logs.update(self.pending)
            self.pending = {}
