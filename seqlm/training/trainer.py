"""The HF Trainer with what a long run on rented GPUs needs: checkpoints that count only when complete and unchanged,
a stop at the first non-finite loss instead of hours of training on garbage (or, asked for, a skipped batch), saved
models as stock save_pretrained saves them, and throughput in every log line."""
from __future__ import annotations

import logging
import time
from typing import Iterator

import torch
from transformers import Trainer

from seqlm.training.checkpoints import make_checkpoints_crash_safe
from seqlm.training.throughput import ThroughputCallback

log = logging.getLogger(__name__)
# A non-finite loss this soon after a resume points at the checkpoint it resumed from rather than at the data.
SUSPECT_STEPS = 20


class NonFiniteLoss(FloatingPointError):
    pass


class SafeTrainer(Trainer):
    def __init__(self, *args, run_settings: dict | None = None, seq_len: int | None = None, **kwargs):
        """run_settings: what a rerun must match to resume (seqlm.training.settings); seq_len: tokens per training sequence,
        for the MFU estimate."""
        super().__init__(*args, **kwargs)
        make_checkpoints_crash_safe(self, run_settings)
        self.resumed_from: tuple[str, int] | None = None  # the checkpoint and its step
        self.nan_skips = self.nan_skips_in_a_row = 0
        self.throughput = ThroughputCallback(seq_len, getattr(self.args, "peak_tflops", None))
        self.add_callback(self.throughput)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        # Only the fetching is timed: the rest of this step (counting label tokens across ranks) waits on the other
        # ranks, not on data.
        return super().get_batch_samples(_Timed(epoch_iterator, self.throughput), num_batches, device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Callbacks that derive keys from a log entry (tokens/s, MFU, bits per character) add them here: in their
        # on_log it would be too late for the Trainer's history, which stores its copy before calling them.
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "add_to"):
                callback.add_to(logs, self.state, self.args)
        if self.nan_skips and "loss" in logs:
            logs["nan_batches_skipped"] = self.nan_skips
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Save what stock save_pretrained saves. DeepSpeed hands over a state dict of cloned tensors, in which the tied
        # output layer no longer shares memory with the embedding: save_pretrained would store it twice (136M more
        # parameters for the 0.5B model). And training switches the KV cache off in the config; a saved model generates.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict is not None:
            tied = getattr(model, "all_tied_weights_keys", None) or {}
            state_dict = {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}
        use_cache, model.config.use_cache = model.config.use_cache, True
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.config.use_cache = use_cache

    def _save_checkpoint(self, model, trial) -> None:
        self.throughput.saving()
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        if resume_from_checkpoint:
            step = int(str(resume_from_checkpoint).rstrip("/").rsplit("-", 1)[-1])
            self.resumed_from = (str(resume_from_checkpoint), step)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        start = time.perf_counter()
        # Before any training (the closing evaluation of a finished run, --do_train false), the Trainer would start
        # DeepSpeed's inference engine, which only ZeRO-3 has: the model evaluates as it is, each rank its share, as it
        # does after training.
        without_engine = self.is_deepspeed_enabled and self.deepspeed is None
        if without_engine:
            # The config the engine would start from (deepspeed_init reads it there).
            cast_as_the_engine(self.model, self.accelerator.state.deepspeed_plugin.hf_ds_config.dtype())
        self.is_deepspeed_enabled &= not without_engine
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.is_deepspeed_enabled |= without_engine
            self.throughput.exclude(time.perf_counter() - start)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if getattr(self.args, "nan_policy", "stop") != "skip":
            return result
        loss = result[0] if return_outputs else result
        if torch.isfinite(loss):
            self.nan_skips_in_a_row = 0
            return result
        # Skip this batch: a loss of exactly zero that still reaches every trainable weight, so that backward and
        # ZeRO's gradient reduction run as usual, with gradients of 0 from this batch.
        self.nan_skips_in_a_row += 1
        self.nan_skips += 1
        step = self.state.global_step + 1
        if self.nan_skips_in_a_row > self.args.max_nan_skips:
            raise NonFiniteLoss(f"{self.nan_skips_in_a_row} non-finite losses in a row at step {step} "
                                f"(--max_nan_skips {self.args.max_nan_skips}): stopping; the weights themselves are "
                                "probably no longer finite. Lower --learning_rate, or check the data")
        log.warning("the loss is %s at step %d: this batch is skipped (%d so far; --nan_policy skip)", loss.item(),
                    step, self.nan_skips)
        zero = sum(p.sum() * 0 for p in model.parameters() if p.requires_grad)
        return (zero, result[1]) if return_outputs else zero

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer would average a NaN away (logging_nan_inf_filter) and train on; the weights are already
        # poisoned by then. Stop, before anything is saved: the last complete checkpoint stays the newest.
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            if self.resumed_from and step - self.resumed_from[1] <= SUSPECT_STEPS:
                checkpoint = self.resumed_from[0]
                raise NonFiniteLoss(f"the loss is {loss.item()} at step {step}, {step - self.resumed_from[1]} steps "
                                    f"after resuming from {checkpoint}: stopping. That checkpoint is the suspect "
                                    f"(its files match their digests, so it was saved so): move it away, and a rerun "
                                    "resumes from the one before")
            raise NonFiniteLoss(f"the loss is {loss.item()} at step {step}: stopping, before anything is saved. The "
                                f"newest complete checkpoint in {self.args.output_dir} stays the newest; lower "
                                "--learning_rate or check the data, then rerun to resume from it")
        return loss


def cast_as_the_engine(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters to the run's precision as DeepSpeed's engine does when it starts
    (engine._cast_module_mixed_precision): parameters only, buffers (RoPE's inv_freq) stay fp32. The model is loaded in
    fp32 and nothing autocasts it under DeepSpeed (accelerate leaves autocast to the engine): evaluated as loaded,
    flash-attention 2 refuses it, and sdpa gives other numbers than the evaluations during training. For good, as the
    Trainer's --bf16_full_eval casts: casting back would not give fp32 weights back."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


class _Timed:
    """An iterator that adds the time each item took to `clock.data_wait_seconds`."""

    def __init__(self, items: Iterator, clock: ThroughputCallback):
        self.items, self.clock = items, clock

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.clock.data_wait_seconds += time.perf_counter() - start
