"""Crash safety end to end, through pretrain.sh on CPU: kill -9 and resume to the same result, incomplete checkpoints,
a non-finite loss, secrets kept out of every file, and the checks that run before any heavy work."""
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
import xxhash
from helpers import (
    NARROW,
    NARROW_RUN,
    REPO,
    TINY_RUN,
    free_port,
    pretrain_command,
    pretrain_flags,
    pretrain_sh,
    refusal,
    run_until,
    swanlab_runs,
    trainer_state,
)
from safetensors.torch import load_file

from seqlm.fileio import check_disk_space
from seqlm.model import load_config
from seqlm.outputs import COMPLETE_MARKER as MARKER
from seqlm.training import run
from seqlm.training.checkpoints import agreed_checkpoint, incomplete_reason, latest_complete_checkpoint, mark_complete
from seqlm.training.preflight import check_disk
from seqlm.training.run import one_line_on_failure
from seqlm.training.universal import convert

# A ZeRO-2 checkpoint a parameter, at most: fp32 weights in model.safetensors (4), the fp32 master copy and Adam's
# two moments (12), and DeepSpeed's own copy of the module's weights in the training precision (2 in bf16, 4 in fp32).
BYTES_PER_PARAMETER = 20

# No samples (test_samples): they cost a quarter of a run this size.
RUN = [*NARROW_RUN, "--sample_steps", "0", "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "2",
       "--max_steps", "8"]


def losses(out: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer_state(out)["log_history"] if "loss" in h}


SECRETS = {"HF_TOKEN": "hf_envSecret4711", "SWANLAB_API_KEY": "swanSecret0815"}  # as a user's environment has them
FLAG_SECRET = "hf_flagSecret2342"  # given as --hub_token


@pytest.fixture(scope="module")
def reference(data, module_tmp):
    """The run the kill, damage and resume tests compare with, given tokens as users give them: (its output dir,
    its log, the command lines `ps` showed with the flag's token while it trained)."""
    out = module_tmp("straight") / "out"
    command, env = pretrain_command(data, out, *RUN, "--hub_token", FLAG_SECRET, **SECRETS)
    with open(out.parent / "log.txt", "w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    shown_while_training = set()
    while proc.poll() is None:
        lines = command_lines()
        if any("--num_gpus" in line and str(out) in line for line in lines):  # our DeepSpeed launcher has started
            shown_while_training |= {line for line in lines if FLAG_SECRET in line}
        time.sleep(0.2)
    log = (out.parent / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    return out, log, shown_while_training


@pytest.fixture(scope="module")
def uninterrupted(reference) -> Path:
    return reference[0]


def test_kill_9_twice_then_rerun_gives_the_uninterrupted_result(data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_until(*pretrain_command(data, out, *RUN), out / "checkpoint-4")  # most likely while writing checkpoint-4
    run_until(*pretrain_command(data, out, *RUN), out / "checkpoint-6" / MARKER)  # just after a complete save
    log = pretrain_sh(data, out, *RUN)
    assert "resuming from" in log and "checkpoint-6" in log
    assert losses(out) == losses(uninterrupted) and len(losses(out)) == 8
    ours, theirs = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "final weights differ from the uninterrupted run"
    ids = {p.name.rsplit("-", 1)[1] for p in swanlab_runs(out)}
    assert len(ids) == 1, f"a resumed run must continue the same swanlab run, got ids {ids}"


def test_a_truncated_checkpoint_is_skipped_and_kept(data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = newest / "model.safetensors"
    half = weights.stat().st_size // 2
    with open(weights, "r+b") as f:
        f.truncate(half)
    resumed = latest_complete_checkpoint(out)
    assert resumed is not None and resumed != newest
    log = pretrain_sh(data, out, *RUN[:-1], "10")
    assert f"skipping {newest}" in log and f"resuming from {resumed}" in log
    assert (out / f"{newest.name}.damaged" / "model.safetensors").stat().st_size == half  # out of the run's way
    assert trainer_state(out)["global_step"] == 10


def flip_bytes(path: Path, at: int, count: int = 8) -> None:
    """Change `count` bytes in place, the size unchanged: what a bad disk or a bad copy does."""
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(count)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("shard", ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_checkpoint_with_changed_bytes_is_skipped_naming_the_file(uninterrupted, tmp_path, shard, caplog):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    newest = out / "checkpoint-8"
    target = next((newest / "global_step8").glob(shard.replace("bf16_", "*")))
    flip_bytes(target, target.stat().st_size // 2)
    assert latest_complete_checkpoint(out) == out / "checkpoint-6"
    assert (f"skipping {newest}: global_step8/{target.name} has changed since it was saved (its digest differs): it "
            "is damaged\n") in caplog.text + "\n"


def test_the_run_that_resumes_moves_a_damaged_checkpoint_aside_and_saves_over_an_unfinished_one(tmp_path, caplog):
    """The save of the same step would write into the damaged folder: it is renamed to a name no run writes, its bytes
    as they were. An unfinished one (no complete.json) holds nothing to inspect."""
    out = tmp_path / "out"
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * step)
        if step < 6:
            mark_complete(folder)
    flip_bytes(out / "checkpoint-4" / "model.safetensors", 100)
    damaged = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    caplog.set_level(logging.WARNING)
    assert agreed_checkpoint(out) == out / "checkpoint-2"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4.damaged", "checkpoint-6"]
    assert (out / "checkpoint-4.damaged" / "model.safetensors").read_bytes() == damaged
    assert caplog.messages == [
        f"skipping {out / 'checkpoint-6'}: it was never finished (no complete.json); the run saves over it when it "
        "reaches that step again",
        f"skipping {out / 'checkpoint-4'}: model.safetensors has changed since it was saved (its digest differs): it is "
        f"damaged; moved to {out / 'checkpoint-4.damaged'} for you to inspect or delete"]
    # Damaged again at the same step, in a later run: kept beside the first.
    (out / "checkpoint-4").mkdir()
    shutil.copyfile(out / "checkpoint-4.damaged" / "model.safetensors", out / "checkpoint-4" / "model.safetensors")
    shutil.copyfile(out / "checkpoint-2" / MARKER, out / "checkpoint-4" / MARKER)
    assert agreed_checkpoint(out) == out / "checkpoint-2" and (out / "checkpoint-4.damaged-2").is_dir()


def test_a_checkpoint_is_marked_with_the_size_and_digest_of_every_file(uninterrupted):
    listed = json.loads((uninterrupted / "checkpoint-8" / MARKER).read_text())["files"]
    on_disk = {str(p.relative_to(uninterrupted / "checkpoint-8")): p for p in (uninterrupted / "checkpoint-8").rglob("*")
               if p.is_file() and p.name != MARKER}
    assert set(listed) == set(on_disk) and "model.safetensors" in listed
    for name, path in on_disk.items():
        assert listed[name]["bytes"] == path.stat().st_size
        assert listed[name]["xxh3_128"] == xxhash.xxh3_128(path.read_bytes()).hexdigest()


def test_rerunning_a_finished_run_trains_no_further(data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    # Killed after its final checkpoint, before the final model and results were written:
    for name in ("model.safetensors", "trainer_state.json", "train_results.json", "all_results.json", "report.md"):
        (out / name).unlink()
    log = pretrain_sh(data, out, *RUN)
    assert f"training finished at step 8 ({out / 'checkpoint-8'}): nothing is trained again" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert trainer_state(out)["global_step"] == 8 and losses(out) == losses(uninterrupted)
    ours, theirs = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "report.md").is_file()
    # Finished and complete: a further rerun changes no weight either.
    before = (out / "model.safetensors").read_bytes()
    log = pretrain_sh(data, out, *RUN)
    assert "nothing is trained again" in log and (out / "model.safetensors").read_bytes() == before
    assert trainer_state(out)["global_step"] == 8


def test_a_nan_right_after_a_resume_names_the_checkpoint(data, uninterrupted, tmp_path):
    """A checkpoint saved with a non-finite weight: its digests match, so it is loaded; the stop names it."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    checkpoint = out / "checkpoint-8"
    # ZeRO-2 resumes the weights from the fp32 master copy in the optimizer shard
    [states] = (checkpoint / "global_step8").glob("*optim_states.pt")
    saved = torch.load(states, weights_only=False)
    with torch.no_grad():
        saved["optimizer_state_dict"]["single_partition_of_fp32_groups"][1][0] = float("nan")  # a norm's weight
    torch.save(saved, states)
    marker = json.loads((checkpoint / MARKER).read_text())
    name = str(states.relative_to(checkpoint))
    marker["files"][name] = {"bytes": states.stat().st_size, "xxh3_128": xxhash.xxh3_128(states.read_bytes()).hexdigest()}
    (checkpoint / MARKER).write_text(json.dumps(marker))
    log = pretrain_sh(data, out, *RUN[:-1], "10", expect_ok=False)
    # The rank's refusal (exit code 2) is the launcher's last line too: not the resume line of a rank that died.
    last = log.splitlines()[-1]
    assert last.startswith("error: ") and f"after resuming from {checkpoint}: stopping. That checkpoint is" in last
    assert "died" not in log


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A file system of `size` (mount's -o size=, e.g. 600m) at `mount`, for as long as the block runs."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("needs to mount a tmpfs (root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB file system (tmpfs): room for one checkpoint of the narrow model (≈ 100 MB), not for two."""
    with tmpfs(tmp_path / "small", "150m") as mount:
        yield mount


@pytest.mark.slow
def test_a_universal_conversion_needs_room_for_its_peak_and_no_more(data, tmp_path):
    """DeepSpeed's ds_to_universal writes the optimizer state twice over (per-parameter slices, then their merge)
    beside the model states: a disk that holds the step folder but not that peak is refused before anything is
    written; one just above the peak converts."""
    out = tmp_path / "out"
    pretrain_sh(data, out, *TINY_RUN, "--eval_strategy", "no", "--max_steps", "2", "--save_steps", "2",
                "--per_device_train_batch_size", "2", ranks=2)
    step = out / "checkpoint-2" / "global_step2"
    everything = sum(f.stat().st_size for f in step.iterdir())
    optimizer = sum(f.stat().st_size for f in step.glob("*optim_states.pt"))
    with tmpfs(tmp_path / "short", f"{(everything + optimizer // 2) >> 10}k") as disk:
        with pytest.raises(ValueError, match=r"^converting .*checkpoint-2 for 1 rank needs about 0\.\d GB but only "
                                             r"0\.\d GB are free on "):
            convert(out / "checkpoint-2", disk / "universal" / "checkpoint-2", 1)
        assert list(disk.iterdir()) == []
    with tmpfs(tmp_path / "enough", f"{(everything + optimizer) * 21 // 20 >> 10}k") as disk:
        convert(out / "checkpoint-2", disk / "universal" / "checkpoint-2", 1)
        assert incomplete_reason(disk / "universal" / "checkpoint-2") is None


def test_a_full_disk_during_a_save_is_one_line(data, small_disk):
    out = small_disk / "out"
    log = pretrain_sh(data, out, *NARROW_RUN, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "0",
                      "--eval_strategy", "no", "--report_to", "none", expect_ok=False)
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors and all(line == errors[0] for line in errors), log[-3000:]
    assert re.search(rf"the disk of {re.escape(str(out))} is full \(0\.\d\d GB free; the error: .+\): free some space "
                     rf"or point --output_dir elsewhere; rerunning the same command resumes from "
                     rf"{re.escape(str(out / 'checkpoint-2'))}$", errors[0]), errors[0]
    assert latest_complete_checkpoint(out) == out / "checkpoint-2"


FAILURE_ARGS = dict(process_index=0, world_size=2, per_device_train_batch_size=8, global_batch_size=64)


def failure_line(output_dir: Path, code: str, caplog) -> str:
    """What one_line_on_failure says when `code` (which sees the output dir as `out`) fails inside it, on a disk of
    `output_dir`: its one line, or `Type: message` of an error it lets through."""
    args = SimpleNamespace(output_dir=str(output_dir), **FAILURE_ARGS)
    caplog.clear()
    try:
        with caplog.at_level(logging.ERROR), one_line_on_failure(args):
            exec(code, {"os": os, "torch": torch, "out": str(output_dir)})
    except SystemExit as stop:
        assert stop.code == 2
        [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        return line
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{code!r} did not fail")


def test_failures_on_a_nearly_full_disk_are_told_by_their_type_and_errno(small_disk, caplog):
    out = small_disk / "out"
    out.mkdir()  # a 150 MB disk: less than 1 GB free all along
    line = failure_line(out, "open(os.path.join(out, 'big'), 'wb').write(bytes(200 << 20))", caplog)
    assert line.startswith(f"the disk of {out} is full (0.") and "No space left on device" in line, line
    (out / "big").unlink()
    line = failure_line(out, "raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')", caplog)
    assert line == ("rank 0 ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB) with a micro-batch of "
                    "8 (the log's memory plan line says where it goes): rerun with --per_device_train_batch_size 4 "
                    "--global_batch_size 64 (the same global batch, more accumulation steps; a micro-batch alone would "
                    "make it micro-batch x 16 x GPUs), or --activation_checkpointing true, or "
                    "--per_device_train_batch_size auto; rerunning the same command resumes from the start (no "
                    "complete checkpoint yet)")
    line = failure_line(out, "raise RuntimeError('Connection closed by peer: the words, not a peer')", caplog)
    assert line == "RuntimeError: Connection closed by peer: the words, not a peer"  # neither full disk nor peer


RANK = """
import json, logging, sys, types
import torch, torch.distributed as dist
from seqlm.training import run
from seqlm.training.run import one_line_on_failure
logging.basicConfig(format="%(message)s")
with one_line_on_failure(types.SimpleNamespace(output_dir=sys.argv[1], **json.loads(sys.argv[3]))):
    exec(sys.argv[2])
"""


def rank_failure_line(output_dir: Path, code: str) -> str:
    """failure_line in a process of its own, for code that joins a process group: the last line it prints."""
    result = subprocess.run([sys.executable, "-c", RANK, str(output_dir), code, json.dumps(FAILURE_ARGS)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    return result.stderr.strip().splitlines()[-1]


def test_a_peer_lost_in_a_collective_is_told_by_where_it_was_raised(tmp_path):
    """Two gloo ranks; the second leaves after one all-reduce, the first fails in the next."""
    port = free_port()
    join = (f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=RANK, world_size=2); "
            "dist.all_reduce(torch.ones(4))")
    peer = subprocess.Popen([sys.executable, "-c", f"import torch, torch.distributed as dist, os; RANK = 1; {join}; "
                             "os._exit(0)"], cwd=REPO)
    line = rank_failure_line(tmp_path, f"RANK = 0; {join}; import time; time.sleep(2); dist.all_reduce(torch.ones(4))")
    peer.wait(timeout=60)
    assert line == ("rank 0 of 2 lost contact with another rank, which stopped (its own lines above say why): "
                    "rerunning the same command resumes from the start (no complete checkpoint yet)")


@pytest.mark.parametrize("launched, grace", [(True, 1), (False, 60)])
def test_a_rank_that_loses_a_peer_leaves_the_stop_to_its_launcher(tmp_path, caplog, monkeypatch, launched, grace):
    """Under a launcher (LOCAL_RANK set), it says so and waits to be stopped, at most LAUNCHER_GRACE: exiting first, it
    would be the rank the launcher reports (test_a_rank_that_dies_is_one_line_on_the_others). Alone, it exits."""
    monkeypatch.setattr(run, "LAUNCHER_GRACE", grace)
    if launched:
        monkeypatch.setenv("LOCAL_RANK", "0")
    else:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    start = time.monotonic()
    line = failure_line(tmp_path, "raise torch.distributed.DistNetworkError('Connection closed by peer')", caplog)
    waited = time.monotonic() - start
    assert line.startswith("rank 0 of 2 lost contact with another rank, which stopped")
    assert waited >= grace if launched else waited < grace


def test_a_master_port_in_use_is_one_line_before_anything_starts(data, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command, env = pretrain_command(data, tmp_path / "out", MASTER_PORT=str(port))
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: MASTER_PORT={port} is in use (another job?): set another MASTER_PORT, or leave "
                             "it unset to take a free one\n")


def test_a_rank_that_dies_is_one_line_on_the_others(data, tmp_path):
    out = tmp_path / "out"
    command, env = pretrain_command(data, out, *RUN[:-1], "200", ranks=2)
    with open(tmp_path / "log.txt", "w") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "checkpoint-2" / MARKER).exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.05)
    # Rank 0: DeepSpeed's own line shows the last rank's command whichever died.
    [rank_0] = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                if b"--local_rank=0" in p.read_bytes() and str(out).encode() in p.read_bytes()]
    os.kill(rank_0, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    log = (tmp_path / "log.txt").read_text()
    newest = max((p.parent for p in out.glob(f"checkpoint-*/{MARKER}")), key=lambda p: int(p.name.split("-")[1]))
    # The dead rank's exit code, never that of the rank that lost it (which waits for the launcher to stop it).
    assert log.splitlines()[-1] == (
        f"error: a rank on {socket.gethostname()} died (exit code -9, killed: out of memory, or kill -9) and the "
        f"launcher stopped the others: rerunning the same command resumes from {newest}"), log[-3000:]


def test_save_total_limit_keeps_only_complete_checkpoints(uninterrupted):
    # The run kept 3 (save_total_limit's default) of its 4 checkpoints, each marked complete.
    kept = sorted(int(p.name.split("-")[1]) for p in uninterrupted.glob("checkpoint-*"))
    assert kept == [4, 6, 8]
    assert all((uninterrupted / f"checkpoint-{n}" / MARKER).is_file() for n in kept)


def test_non_finite_loss_stops_the_run_and_saves_nothing(data, tmp_path):
    out = tmp_path / "out"
    log = pretrain_sh(data, out, *NARROW_RUN, "--learning_rate", "1e30", "--warmup_steps", "0", "--max_steps", "20",
                      "--save_steps", "1", "--eval_strategy", "no", "--report_to", "none", expect_ok=False)
    assert "the loss is" in log and "stopping" in log
    step = int(log.split("the loss is")[1].split("at step ")[1].split(":")[0])
    assert step < 20
    assert not (out / "model.safetensors").exists()  # no final model from poisoned weights
    assert latest_complete_checkpoint(out) == out / f"checkpoint-{step - 1}"


def command_lines() -> list[str]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            pass
    return lines


def test_secrets_never_reach_logs_or_files(reference):
    out, log, shown_while_training = reference
    assert not shown_while_training  # a token given as a flag stays in no command line (`ps`) once the launcher runs
    secrets = [*SECRETS.values(), FLAG_SECRET]
    assert not [s for s in secrets if s in log]
    for path in (p for p in out.rglob("*") if p.is_file()):
        content = path.read_bytes()
        assert not [s for s in secrets if s.encode() in content], f"a secret written to {path}"
    assert swanlab_runs(out), "the run must have logged to swanlab for this test to mean anything"


def pretrain_py(data, tmp_path, monkeypatch, caplog, *args: str) -> str:
    """pretrain.py's one line refusing `args` on the test data (run in this process: helpers.refusal)."""
    monkeypatch.chdir(tmp_path)
    return refusal(monkeypatch, caplog, "pretrain", *pretrain_flags(data, tmp_path / "o", "--report_to", "none",
                                                                     "--use_cpu", "true", *args))


def test_a_damaged_token_cache_stops_the_run_in_one_line(data, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, str(REPO / "tokenize_corpus.py"), "--config_name", "tiny", "--tokenizer_name",
                    str(data["tokenizer"]), "--train_files", str(data["train"]), "--validation_files", str(data["val"]),
                    "--token_cache_dir", str(cache)], check=True, capture_output=True, timeout=300)
    [folder] = [p for p in cache.iterdir() if p.name.startswith("train.jsonl-")]
    flip_bytes(folder / "tokens.bin", 100)
    line = pretrain_py(data, tmp_path, monkeypatch, caplog, "--token_cache_dir", str(cache))
    assert line == (f"the cache {folder} is damaged: tokens.bin has changed since it was written. Delete that folder "
                    "and rerun to rebuild it")


def test_ds_config_contradicting_the_flags_fails_first(data, tmp_path, monkeypatch, caplog):
    config = json.loads((REPO / "ds_config_zero2.json").read_text())
    config["gradient_accumulation_steps"] = 8
    (tmp_path / "ds.json").write_text(json.dumps(config))
    line = pretrain_py(data, tmp_path, monkeypatch, caplog, "--deepspeed", str(tmp_path / "ds.json"),
                       "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2")
    assert "gradient_accumulation_steps=8 but --gradient_accumulation_steps is 2" in line


def test_resuming_with_other_settings_is_refused(data, uninterrupted, tmp_path, monkeypatch, caplog):
    line = pretrain_py(data, tmp_path, monkeypatch, caplog, "--output_dir", str(uninterrupted), "--block_size", "32",
                       "--config_overrides", NARROW, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
                       "1")
    assert line == (f"{uninterrupted / 'checkpoint-8'} was written by a run with other settings (block_size: 64 "
                    "then, 32 now): use another --output_dir, or the same settings to resume")
    caplog.clear()  # the width the run was given by --config_overrides is part of what it is
    line = pretrain_py(data, tmp_path, monkeypatch, caplog, "--output_dir", str(uninterrupted), "--block_size", "64",
                       "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1")
    assert line == (f"{uninterrupted / 'checkpoint-8'} was written by a run with other settings (hidden_size: 32 "
                    "then, 128 now; intermediate_size: 128 then, 512 now): use another --output_dir, or the same "
                    "settings to resume")


def test_tokenizer_larger_than_the_vocabulary_is_refused(data, tmp_path, monkeypatch, caplog):
    config = json.loads((REPO / "configs" / "tiny.json").read_text())
    config["vocab_size"] = 1000
    (tmp_path / "small_vocab.json").write_text(json.dumps(config))
    line = pretrain_py(data, tmp_path, monkeypatch, caplog, "--config_name", str(tmp_path / "small_vocab.json"))
    assert "the tokenizer has 151,669 tokens but the model's vocab_size is 1,000" in line


def test_too_little_disk_is_refused_before_work(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ValueError, match="needs about .* GB but only .* GB are free"):
        check_disk_space(tmp_path / "not" / "yet", free + 10**9, "the token cache")


def test_the_disk_check_counts_every_checkpoint_kept_and_the_next(data, tmp_path):
    """A model whose checkpoint takes 40% of the free space: one fits, the four of --save_total_limit 3 do not."""
    config = load_config("tiny")
    config.vocab_size = int(0.4 * shutil.disk_usage(tmp_path).free / BYTES_PER_PARAMETER / config.hidden_size)
    args = (config, [str(data["train"])], str(tmp_path / "cache"), str(tmp_path / "out"))
    check_disk(*args, None)
    check_disk(*args, 1)  # two at the peak: 80%
    with pytest.raises(ValueError, match=r"^4 more checkpoints \(--save_total_limit 3: 4 at the peak\) needs about"):
        check_disk(*args, 3)
    check_disk(*args, 3, "no")  # no checkpoints: only the final model, 4 of a checkpoint's 20 bytes a parameter
    config.vocab_size *= 6  # a final model of 2.4 x 4 / 20 = 48% of the free space: fits; 6 x 48% does not
    check_disk(*args, 3, "no")
    config.vocab_size *= 6
    with pytest.raises(ValueError, match=r"^the final model \(--save_strategy no: no checkpoints\) needs about"):
        check_disk(*args, 3, "no")
