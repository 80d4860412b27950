"""Resuming on another number of ranks, several nodes simulated on one machine, and fine-tuning killed with -9 and
rerun, through pretrain.sh and finetune.sh on CPU ranks (pretraining's kill -9 tests: test_reliability.py).

Every run takes a global batch of 4 sequences (8 for fine-tuning) a step, split differently. A run preempted after a
checkpoint is the output dir holding that checkpoint and the run's swanlab files only: what a machine that was taken
away leaves on shared disk.

Tolerance: 1 rank and 2 ranks do not add a step's loss and gradients in the same order, so two uninterrupted runs that
differ only in their number of ranks already differ in the last bits (losses by a float32 ulp, final weights by 2e-6
here). A resume on another number of ranks is held to the same: the history it carries over is exactly the run's it
came from; its own steps are within that difference, the first one included (its loss, computed from the converted
checkpoint alone, is a mean over another split, and came out one ulp off)."""
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import (
    NARROW_RUN,
    TINY_SFT,
    finetune_command,
    finetune_sh,
    pretrain_command,
    pretrain_flags,
    pretrain_sh,
    refusal,
    run_until,
    swanlab_runs,
    trainer_state,
)
from safetensors.torch import load_file

from seqlm.fileio import file_listing
from seqlm.outputs import COMPLETE_MARKER
from seqlm.training.checkpoints import incomplete_reason, mark_complete

# No samples (test_samples): they cost a quarter of a run this size.
RUN = [*NARROW_RUN, "--sample_steps", "0", "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "3",
       "--max_steps", "6"]
SFT = [*TINY_SFT, "--sample_steps", "0", "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "3",
       "--max_steps", "6"]
ONE_RANK, TWO_RANKS = ("--per_device_train_batch_size", "4"), ("--per_device_train_batch_size", "2")
LOSS_TOLERANCE = 2e-6  # relative: a float32 ulp at a loss of 11 is 9.5e-7
WEIGHT_TOLERANCE = 5e-5  # absolute; measured: 5e-7 to 2.3e-6 (3e-6 to 9e-6 at the tiny preset's full width)


def two_nodes(data, out: Path | tuple[Path, Path], tmp_path: Path, *args: str, expect_ok=True) -> list[str]:
    """pretrain.sh started once per node, as docs/multi-gpu.md says for nodes without ssh: here both on this machine, with
    one rank each; `out` is a pair for nodes with an output dir each (node-local disks). The nodes' outputs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    outs = out if isinstance(out, tuple) else (out, out)
    command, env = pretrain_command(data, outs[0], *args)
    env.update(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(command, env={**env, "NODE_RANK": str(rank), "OUTPUT_DIR": str(outs[rank])},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert (node.returncode == 0) == expect_ok, output[-3000:]
    return outputs


@pytest.fixture(scope="module")
def pretrained(data, module_tmp):
    """Uninterrupted runs on 1 rank, on 2 ranks of one node, and on two nodes of one rank."""
    root = module_tmp("elastic")
    pretrain_sh(data, root / "one_rank", *RUN, *ONE_RANK)
    pretrain_sh(data, root / "two_ranks", *RUN, *TWO_RANKS, ranks=2)
    two_nodes(data, root / "two_nodes", root, *RUN, *TWO_RANKS)
    return root


def preempted(run: Path, step: int, out: Path) -> Path:
    shutil.copytree(run / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copytree(run / "swanlog", out / "swanlog")
    shutil.copyfile(run / "swanlab_run.json", out / "swanlab_run.json")
    return out


def history(out: Path, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer_state(out)["log_history"] if key in h}


def weights_difference(a: Path, b: Path) -> float:
    ours, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours)


def assert_same_run(resumed: Path, source: Path, other_split: Path, resumed_at: int, log: str) -> None:
    """`resumed` continued `source` at step `resumed_at` with another split of the same global batch; `other_split`
    ran uninterrupted with the resumed run's split."""
    assert f"resuming from {resumed / f'checkpoint-{resumed_at}'}, written by" in log
    assert "converting" in log
    lr = history(resumed, "learning_rate")
    assert lr == history(source, "learning_rate") == history(other_split, "learning_rate")  # the same schedule
    losses, expected = history(resumed, "loss"), history(source, "loss")
    assert sorted(losses) == sorted(expected)
    assert all(losses[s] == expected[s] for s in losses if s <= resumed_at), (losses, expected)
    for reference in expected, history(other_split, "loss"):
        assert losses == pytest.approx(reference, rel=LOSS_TOLERANCE, abs=0)
    assert weights_difference(resumed, source) < WEIGHT_TOLERANCE
    assert weights_difference(resumed, other_split) < WEIGHT_TOLERANCE
    assert len({p.name.rsplit("-", 1)[1] for p in swanlab_runs(resumed)}) == 1, "one swanlab run, continued"
    assert not (resumed / "universal").exists(), "the conversion is removed once a newer checkpoint is complete"


def test_two_nodes_on_one_machine_train_as_two_ranks_on_one_node(pretrained):
    two_nodes, two_ranks = pretrained / "two_nodes", pretrained / "two_ranks"
    assert history(two_nodes, "loss") == history(two_ranks, "loss") and len(history(two_nodes, "loss")) == 6
    assert weights_difference(two_nodes, two_ranks) == 0
    settings = json.loads((two_nodes / "checkpoint-6" / "run_settings.json").read_text())
    assert settings["world_size"] == 2


def test_nodes_that_see_different_checkpoints_stop_in_one_line_saying_so(data, tmp_path):
    """Node 0's output dir holds a complete checkpoint, node 1's (another disk) none: resuming step 3 on one and
    starting afresh on the other would hang at the first collective."""
    node_disks = (tmp_path / "node0", tmp_path / "node1")
    checkpoint = node_disks[0] / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    mark_complete(checkpoint)
    outputs = two_nodes(data, node_disks, tmp_path, *RUN, *TWO_RANKS, expect_ok=False)
    host = socket.gethostname()
    for output in outputs:
        assert f"(rank 0 on {host}: checkpoint-3, rank 1 on {host}: none): put --output_dir on a disk every node " \
               "shares, or copy the newest checkpoint to each" in output, output[-3000:]
        assert "Traceback" not in output
    assert not (node_disks[1] / "checkpoint-3").exists()


def test_a_run_of_two_nodes_resumes_on_one_rank(data, pretrained, tmp_path):
    out = preempted(pretrained / "two_nodes", 3, tmp_path / "out")
    original = file_listing(out / "checkpoint-3", [str(p.relative_to(out / "checkpoint-3"))
                                                   for p in (out / "checkpoint-3").rglob("*") if p.is_file()])
    # A conversion killed midway left its temporary folder, and a rerun before it an unfinished result:
    (out / "universal" / f".checkpoint-3.{socket.gethostname()}.999999999.partial").mkdir(parents=True)
    (out / "universal" / "checkpoint-3").mkdir()
    log = pretrain_sh(data, out, *RUN, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert "universal/checkpoint-3 is not usable (it was never finished (no complete.json)): converting again" in log
    assert_same_run(out, pretrained / "two_nodes", pretrained / "one_rank", 3, log)
    kept = file_listing(out / "checkpoint-3", list(original))
    assert kept == original and incomplete_reason(out / "checkpoint-3") is None, "the original is never touched"


def test_a_run_of_one_rank_resumes_on_two(data, pretrained, tmp_path):
    out = preempted(pretrained / "one_rank", 3, tmp_path / "out")
    log = pretrain_sh(data, out, *RUN, *TWO_RANKS, ranks=2)
    assert_same_run(out, pretrained / "one_rank", pretrained / "two_ranks", 3, log)


def test_another_global_batch_is_refused_naming_every_change_and_the_flags_that_keep_it(data, pretrained, tmp_path,
                                                                                        monkeypatch, caplog):
    out = preempted(pretrained / "two_ranks", 3, tmp_path / "out")
    before = sorted((p.relative_to(out), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*"))
    # One rank: pretrain.py in this process (helpers.refusal), the check being the same with the launcher.
    line = refusal(monkeypatch, caplog, "pretrain", *pretrain_flags(data, out, *RUN, "--per_device_train_batch_size",
                                                                    "3", "--seed", "7"))
    assert line.startswith(f"{out / 'checkpoint-3'} was written by a run with other settings (per_device_train_batch_"
                           "size: 2 then, 3 now; world_size: 2 then, 1 now; seed: 42 then, 7 now): use another "
                           "--output_dir")
    caplog.clear()
    line = refusal(monkeypatch, caplog, "pretrain", *pretrain_flags(data, out, *RUN, "--per_device_train_batch_size",
                                                                    "3"))
    assert line.endswith("(per_device_train_batch_size: 2 then, 3 now; world_size: 2 then, 1 now): to keep its "
                         "global batch of 4 sequences on 1 rank, pass --per_device_train_batch_size 2 "
                         "--gradient_accumulation_steps 2")
    assert sorted((p.relative_to(out), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


@pytest.fixture(scope="module")
def finetuned(narrow_sft_data):
    """Uninterrupted fine-tuning runs on 1 rank and on 2."""
    finetune_sh(narrow_sft_data, narrow_sft_data / "one_rank", *SFT)
    finetune_sh(narrow_sft_data, narrow_sft_data / "two_ranks", *SFT, "--per_device_train_batch_size", "4", ranks=2)
    return narrow_sft_data


@pytest.mark.parametrize("source, target, split", [
    ("two_ranks", "one_rank", ("--per_device_train_batch_size", "8")),
    ("one_rank", "two_ranks", ("--per_device_train_batch_size", "4"))])
def test_fine_tuning_resumes_on_another_number_of_ranks(finetuned, tmp_path, source, target, split):
    out = preempted(finetuned / source, 3, tmp_path / "out")
    log = finetune_sh(finetuned, out, *SFT, *split, ranks=1 if target == "one_rank" else 2)
    assert_same_run(out, finetuned / source, finetuned / target, 3, log)


def test_fine_tuning_killed_during_a_save_and_rerun_gives_the_uninterrupted_result(finetuned, tmp_path):
    out = tmp_path / "out"
    run_until(*finetune_command(finetuned, out, *SFT), out / "checkpoint-3")  # most likely while writing it
    run_until(*finetune_command(finetuned, out, *SFT), out / "checkpoint-3" / COMPLETE_MARKER)
    log = finetune_sh(finetuned, out, *SFT)
    assert f"resuming from {out / 'checkpoint-3'}" in log
    assert history(out, "loss") == history(finetuned / "one_rank", "loss") and len(history(out, "loss")) == 6
    assert weights_difference(out, finetuned / "one_rank") == 0
