"""Resuming on another number of ranks (GPUs × nodes), as preemptible machines come back in other counts.

The global batch (sequences per optimizer step: per-device batch × accumulation × ranks) is what a run is: the Trainer
deals each global batch out in sampler order, whatever its split over ranks and accumulation steps, so as long as it
stays the same, every optimizer step sees the same samples and the learning-rate schedule the same steps. What does
depend on the number of ranks is ZeRO-2's optimizer state, split into one shard per rank: a checkpoint written by
another number of ranks is converted once, by DeepSpeed's own `ds_to_universal`, into a universal checkpoint (every
parameter's fp32 weights and Adam moments whole), which any number of ranks loads. The conversion goes beside the
original, which it never touches: OUTPUT_DIR/universal/checkpoint-N, written under a temporary name and renamed
when complete, reused by a rerun, and removed once a newer checkpoint is complete.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from seqlm import outputs
from seqlm.fileio import atomic_output, check_disk_space, stale_partials
from seqlm.training.checkpoints import incomplete_reason, mark_complete
from seqlm.training.settings import ranks

log = logging.getLogger(__name__)
# What the Trainer reads from a checkpoint besides DeepSpeed's own folder (the weights and the optimizer): its step and
# log history, the learning-rate schedule (the Trainer's own, unless the DeepSpeed config sets one), and the settings
# it was written with.
TRAINER_FILES = (outputs.TRAINER_STATE_FILE, "scheduler.pt", outputs.RUN_SETTINGS_FILE, "training_args.bin")


def universal_checkpoint(checkpoint: Path, training_args) -> Path:
    """The universal conversion of `checkpoint` (made now by the first process if it is missing or damaged, while
    the others wait), with the DeepSpeed config set to load it."""
    target = checkpoint.parent / outputs.UNIVERSAL_DIR / checkpoint.name
    with training_args.main_process_first(local=False, desc="converting a checkpoint"):
        if training_args.process_index == 0:
            reason = incomplete_reason(target)
            if reason is not None:
                if target.exists():
                    log.warning("%s is not usable (%s): converting again", target, reason)
                convert(checkpoint, target, training_args.world_size)
        elif incomplete_reason(target, check_content=False) is not None:
            raise ValueError(f"the first process could not convert {checkpoint} (its lines say why)")
    training_args.hf_deepspeed_config.config["checkpoint"] = {"load_universal": True}
    return target


def convert(checkpoint: Path, target: Path, world_size: int) -> None:
    for stale in stale_partials(target):  # a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    step_folder = checkpoint / (checkpoint / "latest").read_text().strip()
    # Its peak, measured: the optimizer state twice (ds_to_universal's temporary per-parameter slices, then their merge,
    # before the slices go) plus the model states (558.7 MB for a 319.1 MB step folder of the tiny preset on 2 ranks:
    # 2 x 239.3 + 79.8, to 0.1%).
    files = list(step_folder.iterdir())
    peak = sum(f.stat().st_size for f in files) + sum(f.stat().st_size for f in files if f.name.endswith("optim_states.pt"))
    check_disk_space(target.parent, peak, f"converting {checkpoint} for {ranks(world_size)}")
    log.info("converting %s into a universal checkpoint for %s: %s", checkpoint, ranks(world_size), target)
    with atomic_output(target) as tmp:
        tmp.mkdir()
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_folder),
                   "--output_folder", str(tmp / f"{step_folder.name}_universal"), "--inject_missing_state"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise ValueError(f"DeepSpeed could not convert {checkpoint} into a universal checkpoint ({last}): rerun "
                             "on the number of ranks that wrote it to resume it as it is")
        for name in TRAINER_FILES:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, tmp / name)
        copy_random_states(checkpoint, tmp, world_size)
        mark_complete(tmp)


def copy_random_states(checkpoint: Path, target: Path, world_size: int) -> None:
    """The Trainer restores rank r's random state from rng_state_r.pth (rng_state.pth on one rank): rank r gets that
    of the rank r that saved, or of rank 0 where there was none (the Qwen models draw no random numbers in training:
    no dropout; the order of the data comes from the seed)."""
    saved = sorted(checkpoint.glob("rng_state*.pth"))
    if not saved:
        return
    by_rank = {int(p.stem.rsplit("_", 1)[1]) if p.stem != "rng_state" else 0: p for p in saved}
    for rank in range(world_size):
        name = f"rng_state_{rank}.pth" if world_size > 1 else "rng_state.pth"
        shutil.copyfile(by_rank.get(rank, by_rank[0]), target / name)
