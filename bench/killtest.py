"""Fault injection: kill -9 a tiny CPU pretraining run at random moments, many times (about half of them while a
checkpoint is being written), rerun the same `bash pretrain.sh` after each kill, and compare the finished run with an
uninterrupted one: every logged loss and every final weight must be equal. The finished command is then run once
more: it must train nothing and leave the final weights byte for byte.

With --damage P, after a share P of the kills 8 bytes are changed as well (sizes kept), half the time in a random file
of the checkpoint a rerun would load (the rerun must skip it, naming the file, and resume from the one before), half
the time in the token cache (the rerun must stop in one line telling to delete the cache folder; done, and rerun).
With --ranks 2, half of the kills hit one rank only: DeepSpeed's launcher must stop the other, and ours say so in one
line naming the checkpoint a rerun resumes from.

    python -m bench.killtest --kills 20 --out output/killtest     # 33 min on 2 CPU cores shared with other work
    python -m bench.killtest --kills 20 --damage 0.4 --ranks 2 --out output/killtest-2
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from seqlm.data.demo import (
    DEMO_TRAINING,
    copy_offline_tokenizer,
    demo_documents,
    free_port,
    pretrain_command,
    write_demo_corpus,
)
from seqlm.outputs import COMPLETE_MARKER
from seqlm.paths import REPO
from seqlm.training.checkpoints import checkpoints, incomplete_reason, latest_complete_checkpoint

# One port for every run: a killed run cannot remove DeepSpeed's shared-memory buffer, named by the port, so the
# next run reuses it instead of adding one.
PORT = free_port()


def wait_for_port(port: int, seconds: float = 60) -> None:
    """Until the ranks of a killed run are gone from `port` (the launcher refuses a MASTER_PORT in use)."""
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.1)


def start(data, out: Path, args: list[str], ranks: int = 1) -> subprocess.Popen:
    """The run, its output added to OUT.log."""
    wait_for_port(PORT)
    command, env = pretrain_command(data, out, *args, ranks=ranks, MASTER_PORT=str(PORT))
    with open(out.with_suffix(".log"), "a") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, condition, out: Path, rank: int | None = None) -> bool:
    """kill -9 the whole process tree once condition() holds, or only the process of `rank` (the launcher then stops
    the others); False if the run ended first."""
    while proc.poll() is None:
        if condition():
            if rank is None:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                for pid in rank_pids(out, rank):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    return False


def rank_pids(out: Path, rank: int) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes()
        except OSError:
            continue
        if f"--local_rank={rank}".encode() in args and str(out).encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def saving(out: Path):
    """A condition: a checkpoint folder has appeared that is not complete yet."""
    before = {p.name for p in out.glob("checkpoint-*")}
    return lambda: any(p.name not in before and not (p / COMPLETE_MARKER).exists() for p in out.glob("checkpoint-*"))


def after(seconds: float):
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline


def damage_newest_checkpoint(out: Path, rng: random.Random) -> str | None:
    """Change 8 bytes in the middle of a random file of the checkpoint a rerun would resume from (the newest whose
    digests match); its path, or None if none."""
    newest = next((folder for folder in reversed(checkpoints(out)) if incomplete_reason(folder) is None), None)
    if newest is None:
        return None
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER and p.stat().st_size >= 16)
    target = rng.choice(files)
    change_bytes(target)
    return str(target.relative_to(out))


def change_bytes(path: Path) -> None:
    """Invert 8 bytes in the middle of `path`, its size kept."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        chunk = f.read(8)
        f.seek(path.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def damage_token_cache(cache: Path) -> Path:
    """Change 8 bytes in the middle of the token cache's tokens.bin; the cache folder."""
    tokens = next(cache.glob("*/tokens.bin"))
    change_bytes(tokens)
    return tokens.parent


def losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=300, help="long enough that the run outlives every kill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damage", type=float, default=0.0, help="share of the kills after which a checkpoint or the "
                   "token cache is damaged too")
    p.add_argument("--ranks", type=int, default=1, help="CPU ranks; with 2, half of the kills hit one rank only")
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

    reference = root / f"reference-{args.ranks}"
    if not (reference / "model.safetensors").exists():
        start(data, reference, run, args.ranks).wait()
    interrupted = root / "interrupted"
    shutil.rmtree(interrupted, ignore_errors=True)
    log = interrupted.with_suffix(".log")
    log.unlink(missing_ok=True)
    kills, damaged, caches_caught = [], [], 0
    while len(kills) < args.kills:
        proc = start(data, interrupted, run, args.ranks)
        # Half the kills land while a checkpoint is being written; the others at any moment, startup included.
        how = "during a save" if rng.random() < 0.5 else "at a random moment"
        rank = rng.randrange(args.ranks) if args.ranks > 1 and rng.random() < 0.5 else None
        condition = saving(interrupted) if how == "during a save" else after(rng.uniform(2, 40))
        if not kill_when(proc, condition, interrupted, rank):
            print(f"the run ended (exit code {proc.returncode}) before kill {len(kills) + 1}: see {log}, or raise "
                  "--steps", flush=True)
            break
        how += f", rank {rank} only" if rank is not None else ""
        kills.append(how)
        if rng.random() < args.damage / 2 and (changed := damage_newest_checkpoint(interrupted, rng)):
            damaged.append(changed)
            how += f", then {changed} changed"
        elif rng.random() < args.damage / 2 and any(data["cache"].glob("*/tokens.bin")):
            folder = damage_token_cache(data["cache"])
            damaged.append(str(folder))
            before = log.read_text()
            # The rerun must refuse the cache in one line, before training; the operator deletes it, as told.
            stopped = start(data, interrupted, run, args.ranks).wait() == 2
            caches_caught += stopped and f"{folder} is damaged" in log.read_text()[len(before):]
            shutil.rmtree(folder)
            how += f", then {folder.name}/tokens.bin changed"
        print(f"kill {len(kills)}: {how}; resumes from {latest_complete_checkpoint(interrupted)}", flush=True)
    finished = start(data, interrupted, run, args.ranks).wait() == 0
    # The same command once more, as after a kill between the final save and the end: it must train nothing.
    weights = (interrupted / "model.safetensors").read_bytes() if finished else None
    before = log.read_text()
    rerun_trains_nothing = start(data, interrupted, run, args.ranks).wait() == 0 \
        and "nothing is trained again" in log.read_text()[len(before):] \
        and (interrupted / "model.safetensors").read_bytes() == weights
    output = log.read_text()
    # Each damaged checkpoint must have been skipped, by name (a rerun names every one it skips, so count folders).
    skipped = set(re.findall(r"skipping (\S+/checkpoint-\d+): \S+ has changed since it was saved", output))
    dead_rank_lines = output.count(" died (exit code -9, killed: out of memory, or kill -9) and the launcher stopped "
                                   "the others: rerunning the same command resumes from ")

    ours, theirs = load_file(interrupted / "model.safetensors"), load_file(reference / "model.safetensors")
    same_weights = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    same_losses = losses(interrupted) == losses(reference)
    rank_kills = sum("only" in k for k in kills)
    damaged_checkpoints = {str(interrupted / d.split("/")[0]) for d in damaged if not d.startswith(str(data["cache"]))}
    result = dict(ranks=args.ranks, kills=len(kills), during_save=sum(k.startswith("during a save") for k in kills),
                  one_rank_killed=rank_kills, dead_rank_lines=dead_rank_lines, finished=finished, steps=args.steps,
                  damaged_checkpoints=len(damaged_checkpoints), damaged_checkpoints_skipped=len(skipped),
                  damaged_caches=len(damaged) - len(damaged_checkpoints), damaged_caches_caught=caches_caught,
                  rerun_trains_nothing=rerun_trains_nothing, same_losses=same_losses, same_weights=same_weights)
    print(json.dumps(result))
    caught = skipped == damaged_checkpoints and caches_caught == len(damaged) - len(damaged_checkpoints) \
        and dead_rank_lines >= rank_kills
    return 0 if len(kills) == args.kills and finished and rerun_trains_nothing and same_losses and same_weights \
        and caught else 1


if __name__ == "__main__":
    sys.exit(main())
