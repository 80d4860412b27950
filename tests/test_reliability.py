"""Crash safety end to end, through pretrain.sh on CPU: kill -9 and resume to the same result, incomplete checkpoints,
a non-finite loss, secrets kept out of every file, and the checks that run before any heavy work."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_RUN, pretrain_command, pretrain_sh, swanlab_runs, trainer_state
from safetensors.torch import load_file

from seqlm.checkpoints import latest_complete_checkpoint
from seqlm.model import load_config
from seqlm.outputs import COMPLETE_MARKER as MARKER
from seqlm.preflight import check_disk, check_disk_space

RUN = [*TINY_RUN, "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "4", "--max_steps", "16"]


def run_until(data, out: Path, appears: Path, *args: str) -> None:
    """Start pretrain.sh and kill -9 its whole process tree as soon as `appears` exists."""
    command, env = pretrain_command(data, out, *args)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not appears.exists():
        assert proc.poll() is None, f"the run ended before {appears} appeared"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def losses(out: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer_state(out)["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    pretrain_sh(data, out, *RUN)
    return out


def test_kill_9_twice_then_rerun_gives_the_uninterrupted_result(data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    run_until(data, out, out / "checkpoint-8", *RUN)  # most likely in the middle of writing checkpoint-8
    run_until(data, out, out / "checkpoint-12" / MARKER, *RUN)  # just after a complete save
    log = pretrain_sh(data, out, *RUN)
    assert "resuming from" in log and "checkpoint-12" in log
    assert losses(out) == losses(uninterrupted) and len(losses(out)) == 16
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
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    resumed = latest_complete_checkpoint(out)
    assert resumed is not None and resumed != newest
    log = pretrain_sh(data, out, *RUN[:-1], "20")
    assert f"skipping {newest}" in log and f"resuming from {resumed}" in log
    assert trainer_state(out)["global_step"] == 20


def test_save_total_limit_keeps_only_complete_checkpoints(uninterrupted):
    # The run kept 3 (save_total_limit's default) of its 4 checkpoints, each marked complete.
    kept = sorted(int(p.name.split("-")[1]) for p in uninterrupted.glob("checkpoint-*"))
    assert kept == [8, 12, 16]
    assert all((uninterrupted / f"checkpoint-{n}" / MARKER).is_file() for n in kept)


def test_non_finite_loss_stops_the_run_and_saves_nothing(data, tmp_path):
    out = tmp_path / "out"
    log = pretrain_sh(data, out, *TINY_RUN, "--learning_rate", "1e30", "--warmup_steps", "0", "--max_steps", "20",
                      "--save_steps", "1", "--eval_strategy", "no", "--report_to", "none", expect_ok=False)
    assert "the loss is" in log and "stopping" in log
    step = int(log.split("the loss is")[1].split("at step ")[1].split(":")[0])
    assert step < 20
    assert not (out / "model.safetensors").exists()  # no final model from poisoned weights
    assert latest_complete_checkpoint(out) == out / f"checkpoint-{step - 1}"


def test_secrets_never_reach_logs_or_files(data, tmp_path):
    secrets = {"HF_TOKEN": "hf_envSecret4711", "SWANLAB_API_KEY": "swanSecret0815"}
    out = tmp_path / "out"
    log = pretrain_sh(data, out, *TINY_RUN, "--max_steps", "2", "--save_steps", "2", "--eval_strategy", "no",
                      "--hub_token", "hf_flagSecret2342", **secrets)
    for secret in [*secrets.values(), "hf_flagSecret2342"]:
        assert secret not in log
        leaks = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret} written to {leaks}"
    assert swanlab_runs(out), "the run must have logged to swanlab for this test to mean anything"


def pretrain_py(data, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pretrain.py"), "--config_name", "tiny", "--tokenizer_name",
                           str(data["tokenizer"]), "--train_files", str(data["train"]), "--validation_files",
                           str(data["val"]), "--report_to", "none", "--use_cpu", "true", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_ds_config_contradicting_the_flags_fails_first(data, tmp_path):
    config = json.loads((REPO / "ds_config_zero2.json").read_text())
    config["gradient_accumulation_steps"] = 8
    (tmp_path / "ds.json").write_text(json.dumps(config))
    result = pretrain_py(data, tmp_path, "--deepspeed", str(tmp_path / "ds.json"), "--gradient_accumulation_steps",
                         "2", "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "gradient_accumulation_steps=8 but --gradient_accumulation_steps is 2" in result.stdout


def test_resuming_with_other_settings_is_refused(data, uninterrupted, tmp_path):
    result = pretrain_py(data, tmp_path, "--output_dir", str(uninterrupted), "--block_size", "64")
    assert result.returncode == 2
    assert "holds checkpoints of a run with other settings (block_size: 128 then, 64 now)" in result.stdout


def test_tokenizer_larger_than_the_vocabulary_is_refused(data, tmp_path):
    config = json.loads((REPO / "configs" / "tiny.json").read_text())
    config["vocab_size"] = 1000
    (tmp_path / "small_vocab.json").write_text(json.dumps(config))
    result = pretrain_py(data, tmp_path, "--config_name", str(tmp_path / "small_vocab.json"), "--output_dir",
                         str(tmp_path / "o"))
    assert result.returncode == 2
    assert "the tokenizer has 151,669 tokens but the model's vocab_size is 1,000" in result.stdout


def test_too_little_disk_is_refused_before_work(data, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ValueError, match="needs about .* GB but only .* GB are free"):
        check_disk_space(tmp_path / "not" / "yet", free + 10**9, "the token cache")
    check_disk(load_config("qwen2.5-0.5b"), [str(data["train"])], str(tmp_path / "cache"), str(tmp_path / "out"))
