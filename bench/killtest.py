"""Fault injection: kill -9 a tiny CPU pretraining run at random moments, many times (about half of them while a
checkpoint is being written), rerun the same `bash pretrain.sh` after each kill, and compare the finished run with an
uninterrupted one: every logged loss and every final weight must be equal.

With --damage, after a share of the kills 8 bytes of a random file of the newest complete checkpoint are changed as
well (its size kept): the rerun must skip that checkpoint, naming the file, and resume from the one before.

    python -m bench.killtest --kills 20 --out output/killtest     # ≈ 10 minutes on 2 CPU cores
    python -m bench.killtest --kills 20 --damage 0.3
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from seqlm.checkpoints import latest_complete_checkpoint
from seqlm.demo import (
    DEMO_TRAINING,
    copy_offline_tokenizer,
    demo_documents,
    free_port,
    pretrain_command,
    write_demo_corpus,
)
from seqlm.outputs import COMPLETE_MARKER
from seqlm.paths import REPO

# One port for every run: a killed run cannot remove DeepSpeed's shared-memory buffer, named by the port, so the
# next run reuses it instead of adding one.
PORT = free_port()


def start(data, out: Path, args: list[str]) -> subprocess.Popen:
    """The run, its output added to OUT.log."""
    command, env = pretrain_command(data, out, *args, MASTER_PORT=str(PORT))
    with open(out.with_suffix(".log"), "a") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, condition) -> bool:
    """kill -9 the whole process tree once condition() holds; False if the run ended first."""
    while proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    return False


def saving(out: Path):
    """A condition: a checkpoint folder has appeared that is not complete yet."""
    before = {p.name for p in out.glob("checkpoint-*")}
    return lambda: any(p.name not in before and not (p / COMPLETE_MARKER).exists() for p in out.glob("checkpoint-*"))


def after(seconds: float):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def damage_newest_checkpoint(out: Path, rng: random.Random) -> str | None:
    """Change 8 bytes in the middle of a random file of the newest complete checkpoint; its path, or None if none."""
    newest = latest_complete_checkpoint(out, quiet=True)
    if newest is None:
        return None
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER and p.stat().st_size >= 16)
    target = rng.choice(files)
    with open(target, "r+b") as f:
        f.seek(target.stat().st_size // 2)
        chunk = f.read(8)
        f.seek(target.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return str(target.relative_to(out))


def losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=300, help="long enough that the run outlives every kill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damage", type=float, default=0.0, help="share of the kills after which the newest complete "
                   "checkpoint is damaged too")
    p.add_argument("--out", type=Path, default=REPO / "output" / "killtest")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "train.jsonl"
    write_demo_corpus(corpus, documents=list(demo_documents())[:300])
    data = dict(tokenizer=root / "tokenizer", cache=root / "token_cache", train=corpus, val=corpus)
    if not data["tokenizer"].is_dir():
        copy_offline_tokenizer(data["tokenizer"])
    run = [*DEMO_TRAINING, "--block_size", "128", "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "4", "--report_to", "none",
           "--max_steps", str(args.steps)]

    reference = root / "reference"
    if not (reference / "model.safetensors").exists():
        start(data, reference, run).wait()
    interrupted = root / "interrupted"
    shutil.rmtree(interrupted, ignore_errors=True)
    interrupted.with_suffix(".log").unlink(missing_ok=True)
    kills, damaged, skipped = [], [], 0
    while len(kills) < args.kills:
        proc = start(data, interrupted, run)
        # Half the kills land while a checkpoint is being written; the others at any moment, startup included.
        how = "during a save" if rng.random() < 0.5 else "at a random moment"
        if not kill_when(proc, saving(interrupted) if how == "during a save" else after(rng.uniform(2, 40))):
            break  # the run finished before this kill: --steps is too small for --kills
        kills.append(how)
        if rng.random() < args.damage and (changed := damage_newest_checkpoint(interrupted, rng)):
            damaged.append(changed)
            how += f", then {changed} changed"
        print(f"kill {len(kills)}: {how}; resumes from {latest_complete_checkpoint(interrupted)}", flush=True)
    finished = start(data, interrupted, run).wait() == 0
    skipped = interrupted.with_suffix(".log").read_text().count("has changed since it was saved (its digest differs)")

    ours, theirs = load_file(interrupted / "model.safetensors"), load_file(reference / "model.safetensors")
    same_weights = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    same_losses = losses(interrupted) == losses(reference)
    result = dict(kills=len(kills), during_save=sum(k.startswith("during a save") for k in kills), finished=finished,
                  steps=args.steps, damaged=len(damaged), damaged_checkpoints_skipped=skipped,
                  same_losses=same_losses, same_weights=same_weights)
    print(json.dumps(result))
    return 0 if finished and same_losses and same_weights and skipped >= len(damaged) else 1


if __name__ == "__main__":
    sys.exit(main())
