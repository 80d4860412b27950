"""Crash-safe checkpoints: a `checkpoint-N` folder counts only once every rank has written all of it.

The Trainer writes checkpoint folders in place and, left alone, resumes from the newest folder even when a crash cut
it short, and rotates old checkpoints away before the new one is known to be whole. Here:
- after every save, all ranks meet, and the first writes `checkpoint-N/complete.json` listing every file and its size;
- resuming takes the newest checkpoint whose list still matches the disk; incomplete ones are reported, never
  loaded and never deleted;
- `save_total_limit` is applied here, after the marker, to complete checkpoints only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from .fileio import atomic_output
from .outputs import COMPLETE_MARKER

log = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER}


def mark_complete(folder: Path) -> None:
    with atomic_output(folder / COMPLETE_MARKER) as tmp:
        tmp.write_text(json.dumps({"files": _files(folder)}, indent=1))


def incomplete_reason(folder: Path) -> str | None:
    """None for a complete checkpoint, else why it is not."""
    try:
        listed = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    except FileNotFoundError:
        return "it was never finished (no complete.json)"
    except (ValueError, KeyError):
        return "its complete.json is unreadable"
    on_disk = _files(folder)
    for name, size in listed.items():
        if on_disk.get(name) != size:
            return f"{name} is {'missing' if name not in on_disk else f'{on_disk[name]} bytes, not {size}'}"
    return None


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    for folder in reversed(checkpoints(output_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        log.warning("skipping %s: %s; it is left on disk for you to inspect or delete", folder, reason)
    return None


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once all ranks saved it, then keeps at most `keep` complete ones."""

    def __init__(self, keep: int | None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its optimizer shard and RNG state
        if not state.is_world_process_zero:
            return
        mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if self.keep:
            complete = [c for c in checkpoints(args.output_dir) if incomplete_reason(c) is None]
            for old in complete[:-self.keep]:
                shutil.rmtree(old)


def make_checkpoints_crash_safe(trainer: Trainer) -> None:
    """Take checkpoint rotation over from the Trainer (which would count unfinished folders) and mark saves."""
    keep, trainer.args.save_total_limit = trainer.args.save_total_limit, None
    trainer.add_callback(CompleteCheckpoints(keep))
