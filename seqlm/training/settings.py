"""What a run is: the settings a checkpoint's meaning depends on, the check that a rerun is the same run, and the
global batch (sequences per optimizer step, all ranks together), the one number a rerun on another number of ranks
must keep. Every other module asks this one for that arithmetic.

    global batch = per-device micro-batch x gradient accumulation steps x ranks
"""
from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

from seqlm import outputs

# What a checkpoint's meaning depends on: resuming with any of these changed would silently mix two runs.
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
# What a run's global batch is made of; any of them may change on a resume if their product does not.
GLOBAL_BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
DEFAULT_GLOBAL_BATCH_SIZE = 64  # sequences: 4 x 16 on one GPU, with --per_device_train_batch_size auto
DEFAULT_ACCUMULATION = 16  # with a micro-batch given and no --global_batch_size


def ranks(count: int) -> str:
    return f"{count} rank{'s' if count != 1 else ''}"


def global_batch(per_device_train_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    return per_device_train_batch_size * gradient_accumulation_steps * world_size


def settings_global_batch(settings: dict) -> int:
    """The global batch of a run's settings (pretraining_settings, fine_tuning_settings, run_settings.json)."""
    return global_batch(*(settings[k] for k in GLOBAL_BATCH_KEYS))


def requested_global_batch(training_args) -> int:
    """The global batch a run asks for: --global_batch_size, or what the given batch shape makes (the accumulation
    defaulting to DEFAULT_ACCUMULATION), or DEFAULT_GLOBAL_BATCH_SIZE with an automatic micro-batch."""
    micro, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    world_size = training_args.world_size
    if training_args.global_batch_size:
        if "auto" not in (micro, accumulation) and global_batch(micro, accumulation, world_size) \
                != training_args.global_batch_size:
            raise ValueError(f"--global_batch_size {training_args.global_batch_size} is not --per_device_train_batch_"
                             f"size {micro} x --gradient_accumulation_steps {accumulation} x {ranks(world_size)}: "
                             "leave out one of them")
        return training_args.global_batch_size
    if micro == "auto":
        return DEFAULT_GLOBAL_BATCH_SIZE
    return global_batch(micro, DEFAULT_ACCUMULATION if accumulation == "auto" else accumulation, world_size)


def per_rank_batch(global_batch_size: int, world_size: int) -> int:
    """Sequences per rank and optimizer step; ValueError in one line when the global batch does not split."""
    if global_batch_size % world_size:
        lower = global_batch_size // world_size * world_size
        raise ValueError(f"a global batch of {global_batch_size} sequences does not split over {ranks(world_size)}: "
                         f"pass --global_batch_size {lower + world_size}" + (f" or {lower}" if lower else "")
                         + f" (a multiple of {world_size})")
    return global_batch_size // world_size


def flags_keeping(global_batch_size: int, world_size: int, per_device: int) -> str:
    """The flags that give a global batch of `global_batch_size` on `world_size` ranks: the per-device batch asked for
    if it divides, else the largest smaller one that does, with the accumulation to match."""
    try:
        per_rank = per_rank_batch(global_batch_size, world_size)
    except ValueError:
        return f"its global batch of {global_batch_size} sequences cannot be split over {ranks(world_size)}: use a " \
               f"number of ranks that divides {global_batch_size}"
    per_device = max(d for d in range(1, min(per_device, per_rank) + 1) if per_rank % d == 0)
    return f"to keep its global batch of {global_batch_size} sequences on {ranks(world_size)}, pass " \
           f"--per_device_train_batch_size {per_device} --gradient_accumulation_steps {per_rank // per_device}"


def batch_split(settings: dict) -> str:
    return f"{settings['per_device_train_batch_size']} sequences × {settings['gradient_accumulation_steps']} " \
           "accumulation steps each"


def _batch_and_seed(training_args) -> dict:
    return {k: getattr(training_args, k) for k in (*GLOBAL_BATCH_KEYS, "seed")}


def pretraining_settings(config: PretrainedConfig, data_args, training_args) -> dict:
    """What a pretraining checkpoint's meaning depends on: a rerun that resumes must have the same."""
    return {"architecture": {k: getattr(config, k, None) for k in ARCHITECTURE_KEYS},
            "train_files": [str(Path(f).resolve()) for f in data_args.train_files],
            "block_size": data_args.block_size, **_batch_and_seed(training_args)}


def fine_tuning_settings(model_path: str, data_args, training_args) -> dict:
    """The same for fine-tuning."""
    local = Path(model_path).exists()
    return {"model": str(Path(model_path).resolve()) if local else model_path,
            "train_files": [str(Path(f).resolve()) for f in data_args.train_files],
            "max_length": data_args.max_length, "system_prompt": data_args.system_prompt,
            **_batch_and_seed(training_args)}


def check_same_run(checkpoint: Path, settings: dict) -> None:
    """Refuse to resume `checkpoint` with settings that change what it means. The per-device batch, accumulation and
    number of ranks may change as long as the global batch does not: the steps stay the same
    (seqlm.training.universal converts the checkpoint)."""
    before = outputs.read_run_settings(checkpoint)
    if before is None:
        return
    changed = [k for k in settings if before.get(k) != settings[k]]
    batch_only = set(changed) <= set(GLOBAL_BATCH_KEYS)
    if not changed or (batch_only and settings_global_batch(before) == settings_global_batch(settings)):
        return
    fix = "use another --output_dir, or the same settings to resume"
    if batch_only:
        fix = flags_keeping(settings_global_batch(before), settings["world_size"],
                            settings["per_device_train_batch_size"])
    differences = "; ".join(difference(k, before.get(k), settings[k]) for k in changed)
    raise ValueError(f"{checkpoint} was written by a run with other settings ({differences}): {fix}")


def difference(key: str, then, now) -> str:
    """`key: THEN then, NOW now`; of the architecture, only the numbers that changed."""
    if isinstance(then, dict) and isinstance(now, dict):
        return "; ".join(difference(k, then.get(k), now[k]) for k in now if then.get(k) != now[k])
    return f"{key}: {then} then, {now} now"
