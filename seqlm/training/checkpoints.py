"""Crash-safe checkpoints: a `checkpoint-N` folder counts only once every rank has written all of it, and is loaded
only while every byte is as it was written.

The Trainer writes checkpoint folders in place and, left alone, resumes from the newest folder even when a crash cut
it short, and rotates old checkpoints away before the new one is known to be whole. Here:
- after every save, all ranks meet, and the first writes the run's settings into `checkpoint-N/run_settings.json` (and
  the output dir's), then `checkpoint-N/complete.json` listing every file with its size and an xxh3-128 digest of
  its content; it hashes in a thread while training goes on (about 1 s per GB here), so
  the marker comes a few seconds after the save;
- resuming takes the newest checkpoint whose files still have those sizes and digests; an unfinished or damaged one
  is reported in one line naming the file, never loaded and never deleted: a damaged one is moved aside
  (checkpoint-N.damaged), out of the way of the save that replaces it;
- `save_total_limit` is applied here, after the marker, to complete checkpoints only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from seqlm.fileio import atomic_output, file_listing, listing_difference
from seqlm.outputs import COMPLETE_MARKER, RUN_SETTINGS_FILE, UNIVERSAL_DIR

log = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER]


def mark_complete(folder: Path) -> None:
    files = file_listing(folder, _files(folder))
    with atomic_output(folder / COMPLETE_MARKER) as tmp:
        tmp.write_text(json.dumps({"files": files}, indent=1))


def save_run_settings(folder: Path, settings: dict) -> None:
    with atomic_output(folder / RUN_SETTINGS_FILE) as tmp:
        tmp.write_text(json.dumps(settings, indent=1) + "\n")


def incomplete_reason(folder: Path, check_content: bool = True) -> str | None:
    """None for a complete checkpoint, else why it is not. Without check_content, only the sizes are compared (a
    cheap check, for rotation)."""
    try:
        listed = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
        total = sum(entry["bytes"] for entry in listed.values())
    except FileNotFoundError:
        return "it was never finished (no complete.json)"
    except (ValueError, KeyError, TypeError):
        return "its complete.json is unreadable, or from an older version (file sizes only)"
    start = time.perf_counter()
    reason = listing_difference(folder, listed, "has changed since it was saved (its digest differs): it is damaged",
                                check_content)
    if reason is None and check_content:
        log.info("checked %s: %d files, %.2f GB, as saved (%.1f s)", folder, len(listed), total / 1e9,
                 time.perf_counter() - start)
    return reason


# What a checkpoint holds only to resume training (DeepSpeed's shards, schedule and random state, its tools); the
# rest is the Hugging Face model folder the Trainer saves, and the trainer state.
RESUME_ONLY = re.compile(r"^(global_step\d+|latest|rng_state.*\.pth|scheduler\.pt|optimizer\.pt|zero_to_\w+\.py|"
                         + re.escape(COMPLETE_MARKER) + ")$")


def export_model(checkpoint: Path, output_dir: Path) -> None:
    """Copy a checkpoint's model folder (weights, config, tokenizer, trainer state) into the output dir: what
    save_model and save_state would have written at that step."""
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and not RESUME_ONLY.match(path.name):
            with atomic_output(output_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def latest_complete_checkpoint(output_dir: str | os.PathLike, quiet: bool = False,
                               set_aside: bool = False) -> Path | None:
    """The newest complete checkpoint-N; each newer one that is not is reported (unless quiet). Quiet, only the sizes
    are compared: for a message, not for loading. With set_aside (the run that resumes, which would save over them), a
    damaged one is renamed to checkpoint-N.damaged, a name no run writes; an unfinished one holds nothing to inspect,
    and is saved over."""
    for folder in reversed(checkpoints(output_dir)):
        reason = incomplete_reason(folder, check_content=not quiet)
        if reason is None:
            return folder
        if quiet:
            continue
        if not (folder / COMPLETE_MARKER).exists():
            log.warning("skipping %s: %s; the run saves over it when it reaches that step again", folder, reason)
        elif set_aside:
            kept = damaged_name(folder)
            folder.rename(kept)
            log.warning("skipping %s: %s; moved to %s for you to inspect or delete", folder, reason, kept)
        else:
            log.warning("skipping %s: %s", folder, reason)
    return None


def damaged_name(folder: Path) -> Path:
    """checkpoint-N.damaged, or .damaged-2, ... when the same step was damaged before."""
    kept, count = folder.with_name(f"{folder.name}.damaged"), 1
    while kept.exists():
        count += 1
        kept = folder.with_name(f"{folder.name}.damaged-{count}")
    return kept


def agreed_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """latest_complete_checkpoint, decided once for every rank: each rank says which checkpoint it sees complete
    (sizes only: cheap), and unless all see the same, every rank raises the same ValueError, in one line naming what
    each saw (an output dir on a node-local disk, or a read error on one node); then the first rank alone checks the
    content (GBs read once, not once per rank) and tells the others what to resume from. Resuming different steps
    would hang the ranks at their first collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return latest_complete_checkpoint(output_dir, set_aside=True)
    try:
        newest = latest_complete_checkpoint(output_dir, quiet=True)
        seen = newest.name if newest else "none"
    except OSError as e:
        seen = f"an error ({e})"
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), seen))
    if len({view for _, view in views}) > 1:
        raise ValueError(f"the ranks see different checkpoints in {output_dir} ("
                         + ", ".join(f"rank {rank} on {host}: {view}" for rank, (host, view) in enumerate(views))
                         + "): put --output_dir on a disk every node shares, or copy the newest checkpoint to each")
    decision = [None]
    if dist.get_rank() == 0:
        try:
            decision = [(str(latest_complete_checkpoint(output_dir, set_aside=True) or ""), None)]
        except OSError as e:
            decision = [(None, f"cannot check the newest checkpoint in {output_dir} on {socket.gethostname()}: {e}")]
    dist.broadcast_object_list(decision, src=0)
    chosen, error = decision[0]
    if error:
        raise ValueError(error)
    return Path(chosen) if chosen else None


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once all ranks saved it, with the run's `settings` in it, then keeps at most
    `keep` complete ones. The marking runs in a thread, so that training goes on while the checkpoint is hashed; the
    next save, and the end of training, wait for it."""

    def __init__(self, keep: int | None, settings: dict | None):
        self.keep, self.settings = keep, settings
        self._marking: threading.Thread | None = None

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its optimizer shard and RNG state
        if not state.is_world_process_zero:
            return
        self.wait()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.settings is not None:
            for where in folder, folder.parent:
                save_run_settings(where, self.settings)
        # Not a daemon: a run that ends normally still finishes the marker; a killed one leaves no marker, and the
        # checkpoint counts as unfinished.
        self._marking = threading.Thread(target=self._mark_and_rotate, args=(folder,), name="mark-checkpoint")
        self._marking.start()

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()

    def wait(self) -> None:
        if self._marking is not None:
            self._marking.join()
            self._marking = None

    def _mark_and_rotate(self, folder: Path) -> None:
        mark_complete(folder)
        shutil.rmtree(folder.parent / UNIVERSAL_DIR, ignore_errors=True)  # conversions of older checkpoints
        if self.keep:
            complete = [c for c in checkpoints(folder.parent) if incomplete_reason(c, check_content=False) is None]
            for old in complete[:-self.keep]:
                shutil.rmtree(old)


def make_checkpoints_crash_safe(trainer: Trainer, settings: dict | None) -> None:
    """Take checkpoint rotation over from the Trainer (which would count unfinished folders) and mark saves."""
    keep, trainer.args.save_total_limit = trainer.args.save_total_limit, None
    trainer.add_callback(CompleteCheckpoints(keep, settings))

