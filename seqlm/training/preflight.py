"""Checks that run before any heavy work. Each failure is a ValueError of one line: what is wrong, and the fix."""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PretrainedConfig

from seqlm.fileio import check_disk_space
from seqlm.model import parameter_count
from seqlm.training.checkpoints import checkpoints

BATCH_KEYS = {"train_micro_batch_size_per_gpu": "per_device_train_batch_size",
              "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm"}
MODEL_BYTES_PER_PARAMETER = 4  # model.safetensors in fp32 at most
# At most: fp32 weights (4) + ZeRO's fp32 master copy and Adam moments (12) + DeepSpeed's copy of the module's
# weights in the training precision (2 in bf16, 4 in fp32)
CHECKPOINT_BYTES_PER_PARAMETER = 20


def check_readable(files: list[str], hint: str) -> None:
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"no corpus file {f}: {hint}")
        if not os.access(f, os.R_OK):
            raise ValueError(f"cannot read {f}: check its permissions")


def check_ds_config(training_args, benchmarking: bool = False) -> None:
    """A number or a precision in the ds config that contradicts a Trainer flag or the precision chosen for the device
    would only fail, or silently train otherwise, after the model is built; so would benchmarks during training
    (`benchmarking`) under ZeRO-3, which scores on the first rank alone: its forward pass would wait forever for
    the parameters the other ranks hold."""
    if not training_args.deepspeed:
        return
    config = training_args.deepspeed
    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    for ds_key, flag in BATCH_KEYS.items():
        value = config.get(ds_key, "auto")
        if value != "auto" and value != getattr(training_args, flag):
            raise ValueError(f"the DeepSpeed config sets {ds_key}={value} but --{flag} is "
                             f"{getattr(training_args, flag)}: set it to \"auto\" in the ds config")
    chosen = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    for precision in "bf16", "fp16":
        enabled = config.get(precision, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (chosen == precision):
            raise ValueError(f"the DeepSpeed config sets {precision} enabled={str(enabled).lower()} but this run "
                             f"trains in {chosen} (the line above says why): set \"enabled\": \"auto\" in its "
                             f"\"{precision}\" block, or pass --{precision} {str(bool(enabled)).lower()}")
    if benchmarking and int(config.get("zero_optimization", {}).get("stage", 0)) == 3:
        raise ValueError("--benchmark_suite scores on the first rank alone, which ZeRO-3 cannot (each rank holds a "
                         "part of the weights): train without it and score the saved model with benchmark.py, or use "
                         "ZeRO-2 (ds_config_zero2.json)")
    loss_scale = config.get("fp16", {}).get("loss_scale", 0)
    if chosen == "fp16" and loss_scale != 0:
        raise ValueError(f"the DeepSpeed config sets a static fp16 loss_scale of {loss_scale}, but fp16 here relies on "
                         "dynamic loss scaling (a static scale overflows or underflows unseen): set \"loss_scale\": 0")


def check_disk(config: PretrainedConfig, corpora: list[str], token_cache_dir: str, output_dir: str,
               save_total_limit: int | None, save_strategy: str = "steps") -> None:
    """Room to tokenize the corpora not cached yet (a cache is about the size of its JSON Lines source) and for what
    the run still writes: --save_total_limit checkpoints are kept, and the next one is written before the oldest
    goes (so limit + 1 at the peak, fewer those already there); without a limit, at least the next one. The final
    model is written after the last rotation and is smaller than a checkpoint, so it only counts when no
    checkpoint is saved at all."""
    uncached = [Path(f) for f in corpora
                if Path(f).is_file() and not any(Path(token_cache_dir).glob(f"{Path(f).name}-*/manifest.json"))]
    check_disk_space(token_cache_dir, sum(f.stat().st_size for f in uncached), "the token cache")
    if save_strategy == "no":
        check_disk_space(output_dir, MODEL_BYTES_PER_PARAMETER * parameter_count(config),
                         "the final model (--save_strategy no: no checkpoints)")
        return
    peak = save_total_limit + 1 if save_total_limit else 1
    coming = max(1, peak - len(checkpoints(output_dir)))
    what = f"{'the next checkpoint' if coming == 1 else f'{coming} more checkpoints'} (--save_total_limit " \
           f"{save_total_limit}: {peak} at the peak)" if save_total_limit else "the next checkpoint"
    check_disk_space(output_dir, coming * CHECKPOINT_BYTES_PER_PARAMETER * parameter_count(config), what)
