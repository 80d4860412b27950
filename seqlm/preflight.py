"""Checks that run before any heavy work. Each failure is a ValueError of one line: what is wrong, and the fix."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import PretrainedConfig

from . import outputs
from .checkpoints import checkpoints
from .model import parameter_count

# What a checkpoint's meaning depends on: resuming with any of these changed would silently mix two runs.
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
BATCH_KEYS = {"train_micro_batch_size_per_gpu": "per_device_train_batch_size",
              "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm"}
# What a run's global batch is made of; any of them may change on a resume if their product does not.
GLOBAL_BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
MODEL_BYTES_PER_PARAMETER = 4  # model.safetensors in fp32 at most
CHECKPOINT_BYTES_PER_PARAMETER = 20  # fp32 weights (4) + ZeRO's fp32 master copy and Adam moments (12) + 16-bit copy


def check_readable(files: list[str], hint: str) -> None:
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"no corpus file {f}: {hint}")
        if not os.access(f, os.R_OK):
            raise ValueError(f"cannot read {f}: check its permissions")


def check_ds_config(training_args) -> None:
    """A number in the ds config that contradicts a Trainer flag would only fail after the model is built."""
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


def run_settings(config: PretrainedConfig, data_args, training_args) -> dict:
    """What a pretraining checkpoint's meaning depends on: a rerun that resumes must have the same."""
    return {"architecture": {k: getattr(config, k, None) for k in ARCHITECTURE_KEYS},
            "train_files": [str(Path(f).resolve()) for f in data_args.train_files],
            "block_size": data_args.block_size,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "world_size": training_args.world_size, "seed": training_args.seed}


def sft_run_settings(model_path: str, data_args, training_args) -> dict:
    """The same for fine-tuning."""
    local = Path(model_path).exists()
    return {"model": str(Path(model_path).resolve()) if local else model_path,
            "train_files": [str(Path(f).resolve()) for f in data_args.train_files],
            "max_length": data_args.max_length, "system_prompt": data_args.system_prompt,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "world_size": training_args.world_size, "seed": training_args.seed}


def ranks(count: int) -> str:
    return f"{count} rank{'s' if count != 1 else ''}"


def global_batch(settings: dict) -> int:
    """Sequences per optimizer step, over all ranks."""
    return settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] * settings["world_size"]


def flags_keeping(sequences: int, world_size: int, per_device: int) -> str:
    """The flags that give a global batch of `sequences` on `world_size` ranks: the per-device batch asked for if it
    divides, else the largest smaller one that does, with the accumulation to match."""
    if sequences % world_size:
        return f"its global batch of {sequences} sequences cannot be split over {ranks(world_size)}: use a " \
               f"number of ranks that divides {sequences}"
    per_rank = sequences // world_size
    per_device = max(d for d in range(1, min(per_device, per_rank) + 1) if per_rank % d == 0)
    return f"to keep its global batch of {sequences} sequences on {ranks(world_size)}, pass " \
           f"--per_device_train_batch_size {per_device} --gradient_accumulation_steps {per_rank // per_device}"


def check_same_run(checkpoint: Path, settings: dict) -> None:
    """Refuse to resume `checkpoint` with settings that change what it means. The per-device batch, accumulation and
    number of ranks may change as long as the global batch does not: the steps stay the same (seqlm.elastic)."""
    before = outputs.run_settings(checkpoint)
    if before is None:
        return
    changed = [k for k in settings if before.get(k) != settings[k]]
    batch_only = set(changed) <= set(GLOBAL_BATCH_KEYS)
    if not changed or (batch_only and global_batch(before) == global_batch(settings)):
        return
    fix = "use another --output_dir, or the same settings to resume"
    if batch_only:
        fix = flags_keeping(global_batch(before), settings["world_size"], settings["per_device_train_batch_size"])
    differences = "; ".join(f"{k}: {before.get(k)} then, {settings[k]} now" for k in changed)
    raise ValueError(f"{checkpoint} was written by a run with other settings ({differences}): {fix}")


def check_disk_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    folder = Path(folder)
    while not folder.exists():  # the output dir may not exist yet: measure the disk it will be on
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"{what} needs about {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free on "
                         f"{folder}: free some space or choose another location")


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
