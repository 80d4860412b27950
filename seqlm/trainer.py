"""The HF Trainer with what a long run on rented GPUs needs: checkpoints that count only when complete, and a stop
at the first non-finite loss instead of hours of training on garbage."""
from __future__ import annotations

import torch
from transformers import Trainer

from .callbacks import ThroughputCallback
from .resume import make_checkpoints_crash_safe


class NonFiniteLoss(FloatingPointError):
    pass


class SafeTrainer(Trainer):
    def __init__(self, *args, seq_len: int | None = None, **kwargs):
        """seq_len: tokens per training sequence, for the MFU estimate."""
        super().__init__(*args, **kwargs)
        make_checkpoints_crash_safe(self)
        self.throughput = ThroughputCallback(seq_len, self.args.peak_tflops)
        self.add_callback(self.throughput)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.throughput.add_to(logs, self.state, self.args)  # before the history, the printers and the loggers
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer would average a NaN away (logging_nan_inf_filter) and train on; the weights are already
        # poisoned by then. Stop, before anything is saved: the last complete checkpoint stays the newest.
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the loss is {loss.item()} at step {self.state.global_step + 1}: stopping. The last "
                                f"complete checkpoint in {self.args.output_dir} is intact; lower --learning_rate or "
                                "check the data, then rerun to resume from it")
        return loss
