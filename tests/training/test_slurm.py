"""pretrain.slurm on a real Slurm cluster of two nodes on this machine: Debian's slurm-wlm, slurmctld and two slurmd
(n1, n2: both 127.0.0.1, each on its own port), auth/none, its state in this module's temporary folder. Jobs are
submitted as users submit them, `sbatch pretrain.slurm FLAGS` from the repository, with the #SBATCH defaults a GPU
cluster needs replaced on the command line (no GPUs here: --gres=none; one core a node). Each node's launcher starts one
CPU rank. Slow: a job is a training run and its start-up."""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import NARROW_RUN, REPO, TINY_SFT, finetune_command, free_port, pretrain_command, trainer_state

from seqlm.outputs import COMPLETE_MARKER
from seqlm.training.checkpoints import checkpoints, incomplete_reason, latest_complete_checkpoint

pytestmark = pytest.mark.slow

# 4 sequences a step, whatever the number of nodes: a micro-batch of 2, and the accumulation that makes 4 on 1 or 2
# ranks (the same command, requeued on fewer nodes, keeps its global batch).
SPLIT = NARROW_RUN.index("--gradient_accumulation_steps")
RUN = [*NARROW_RUN[:SPLIT], *NARROW_RUN[SPLIT + 2:], "--per_device_train_batch_size", "2", "--global_batch_size", "4",
       "--sample_steps", "0", "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "2"]
JOB_OPTIONS = ["--gres=none", "--cpus-per-task=1"]  # instead of the file's GPU defaults
SLURM_CONF = """ClusterName=seqlm-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1
PartitionName=test Nodes=n1,n2 Default=YES OverSubscribe=YES State=UP
"""


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def slurm_says(env: dict, *command: str) -> str:
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def slurm(module_tmp):
    """The cluster's environment (SLURM_CONF) once both nodes are idle. Afterwards every job is cancelled and waited
    for, then each daemon is stopped by its pid (stopped first, they would leave slurmstepd and the ranks running)."""
    if not shutil.which("slurmctld"):
        pytest.skip("needs Debian's slurm-wlm (apt-get install slurm-wlm)")
    folder = module_tmp("slurm")
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    (folder / "slurm.conf").write_text(SLURM_CONF.format(folder=folder, ctld_port=free_port(), n1_port=free_port(),
                                                         n2_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    pid_files = [folder / "slurmctld.pid", folder / "slurmd-n1.pid", folder / "slurmd-n2.pid"]
    try:
        for daemon in (["slurmctld", "-i"], ["slurmd", "-N", "n1"], ["slurmd", "-N", "n2"]):
            subprocess.run(daemon, env=env, check=True)  # each forks, and writes its pid file
        wait_until(lambda: slurm_says(env, "sinfo", "-h", "-t", "idle", "-o", "%D").strip() == "2", 60,
                   "the two nodes never became idle")
        yield env
    finally:
        if shutil.which("scancel") and (folder / "slurmctld.pid").exists():
            subprocess.run(["scancel", "--user", str(os.getuid())], env=env, capture_output=True)
            wait_until(lambda: not slurm_says(env, "squeue", "-h").strip(), 120, "jobs still running")
        for proc in SUBMITTED:
            proc.kill()
        for pid_file in pid_files:
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        for pid_file in pid_files:
            wait_until(lambda: not pid_file.exists() or not Path(f"/proc/{pid_file.read_text().strip()}").exists(), 60,
                       f"{pid_file.name}: still running")


SUBMITTED: list[subprocess.Popen] = []  # sbatch --wait processes, stopped with the cluster if a test left one


def job(slurm, data, out: Path, log: Path, *options: str, steps: int, wait=True, **extra_env):
    """`sbatch [options] pretrain.slurm FLAGS` from the repository: the finished job's exit code, or (wait=False) the
    sbatch process that waits for it."""
    command, env = pretrain_command(data, out, *RUN, "--max_steps", str(steps), **extra_env)
    env = {**env, "SLURM_CONF": slurm["SLURM_CONF"], "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT")  # the job's own, from its id
    sbatch = ["sbatch", "--wait", *JOB_OPTIONS, f"--output={log}", *options, "pretrain.slurm", *command[2:]]
    proc = subprocess.Popen(sbatch, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    SUBMITTED.append(proc)
    return proc.wait(timeout=900) if wait else proc


def ranks_of(out: Path) -> dict[int, tuple[int, dict[str, str]]]:
    """{rank: (pid, environment)} of the running ranks that write to `out`."""
    found = {}
    for pid in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (pid / "cmdline").read_bytes()
            environ = dict(item.split("=", 1) for item in (pid / "environ").read_bytes().decode(
                errors="replace").split("\0") if "=" in item)
        except OSError:  # ended meanwhile
            continue
        if b"pretrain.py" in cmdline and str(out).encode() in cmdline and "RANK" in environ:
            found[int(environ["RANK"])] = int(pid.name), environ
    return found


def losses(out: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer_state(out)["log_history"] if "loss" in h}


def test_a_two_node_job_trains_with_the_run_environment_on_every_node(slurm, data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = job(slurm, data, out, log, "--nodes=2", steps=4, wait=False, HF_ENDPOINT="http://127.0.0.1:9")
    environments = {}
    while proc.poll() is None:
        environments.update({rank: environ for rank, (_, environ) in ranks_of(out).items()})
        time.sleep(0.2)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    job_id = re.search(r"Slurm job (\d+): n1 is node rank 0 of 2 nodes", text)[1]
    assert f"Slurm job {job_id}: n2 is node rank 1 of 2 nodes, 1 rank(s) a node, the first node at 127.0.0.1:" \
           f"{20000 + int(job_id) % 20000}" in text  # n1's NodeAddr, and the port from the job id
    assert "| processes | 2 |" in (out / "report.md").read_text()
    assert len(losses(out)) == 4
    second = environments[1]  # the rank srun's task started on n2
    assert second["SLURMD_NODENAME"] == "n2"
    assert (second["HF_ENDPOINT"], second["SWANLAB_MODE"], second["OMP_NUM_THREADS"], second["SLURM_CONF"]) == \
        ("http://127.0.0.1:9", "offline", "1", slurm["SLURM_CONF"])


def test_a_cancelled_job_damages_nothing_and_resubmitted_on_one_node_resumes(slurm, data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = job(slurm, data, out, log, "--nodes=2", steps=10, wait=False)
    wait_until(lambda: (out / "checkpoint-4" / COMPLETE_MARKER).exists() or proc.poll() is not None, 600,
               "no checkpoint-4")
    subprocess.run(["scancel", "--user", str(os.getuid())], env=slurm, check=True)
    assert proc.wait(timeout=300) != 0
    wait_until(lambda: not ranks_of(out), 120, "ranks left running")
    assert all(incomplete_reason(c) is None or not (c / COMPLETE_MARKER).exists() for c in checkpoints(out)), \
        "a checkpoint marked complete was damaged"
    resumed_at = latest_complete_checkpoint(out)
    assert resumed_at is not None and incomplete_reason(resumed_at) is None
    step = int(resumed_at.name.split("-")[1])
    before = {s: loss for s, loss in losses_in(resumed_at).items()}

    # Requeued on what is free: one node, inside an allocation (salloc, then srun, as docs/multi-gpu.md shows).
    command, env = pretrain_command(data, out, *RUN, "--max_steps", "10")
    env = {**env, "SLURM_CONF": slurm["SLURM_CONF"], "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT")
    result = subprocess.run(["salloc", "--nodes=1", *JOB_OPTIONS, "srun", "bash", "pretrain.sh", *command[2:]],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert f"resuming from {resumed_at}, written by 2 ranks" in text
    assert "the same global batch of 4 sequences a step" in text
    assert "| processes | 1 |" in (out / "report.md").read_text()
    after = losses(out)
    assert sorted(after) == list(range(1, 11))
    assert all(after[s] == before[s] for s in before), "the history before the cancel is kept"
    assert step >= 4


def test_a_requeued_job_resumes_on_the_nodes_it_gets(slurm, data, tmp_path):
    """A two-node job requeued (as Slurm does on preemption or a node failure) and given one node: Slurm starts the same
    job again, and it resumes with the same global batch; its log goes on in the same file."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = job(slurm, data, out, log, "--nodes=2", steps=8, wait=False)
    wait_until(lambda: (out / "checkpoint-4" / COMPLETE_MARKER).exists() or proc.poll() is not None, 600,
               "no checkpoint-4")
    job_id = re.search(r"Slurm job (\d+): n1 is node rank 0 of 2 nodes", log.read_text())[1]
    subprocess.run(["scontrol", "requeue", job_id], env=slurm, check=True)
    wait_until(lambda: slurm_says(slurm, "squeue", "-h", "-j", job_id, "-o", "%T").strip() == "PENDING", 120,
               "the requeued job never came back to the queue")
    # Back in the queue: one node is what it gets now; Slurm holds a requeued job back for a while (its BeginTime).
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1", "StartTime=now"], env=slurm, check=True)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"Slurm job {job_id}: n1 is node rank 0 of 1 nodes" in text
    assert re.search(rf"resuming from {out}/checkpoint-\d+, written by 2 ranks", text), text[-3000:]
    assert "the same global batch of 4 sequences a step" in text
    assert "| processes | 1 |" in (out / "report.md").read_text()
    assert sorted(losses(out)) == list(range(1, 9))


def losses_in(checkpoint: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer_state(checkpoint)["log_history"] if "loss" in h}


def test_a_rank_that_dies_ends_the_job_in_one_line(slurm, data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = job(slurm, data, out, log, "--nodes=2", steps=200, wait=False)
    wait_until(lambda: (out / "checkpoint-2" / COMPLETE_MARKER).exists() or proc.poll() is not None, 600,
               "no checkpoint-2")
    os.kill(ranks_of(out)[0][0], signal.SIGKILL)  # rank 0, on n1
    assert proc.wait(timeout=300) != 0
    text = log.read_text()
    newest = latest_complete_checkpoint(out)
    ours = [line for line in text.splitlines() if line.startswith("error:")]
    assert ours == [f"error: a rank on {os.uname().nodename} died (exit code -9, killed: out of memory, or kill -9) "
                    f"and the launcher stopped the others: rerunning the same command resumes from {newest}"], \
        text[-3000:]
    wait_until(lambda: not ranks_of(out), 120, "ranks left running")


def test_finetune_slurm_fine_tunes_on_two_nodes(slurm, narrow_sft_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    command, env = finetune_command(narrow_sft_data, out, *TINY_SFT, "--sample_steps", "0", "--max_steps", "4")
    env = {**env, "SLURM_CONF": slurm["SLURM_CONF"], "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["sbatch", "--wait", *JOB_OPTIONS, f"--output={log}", "--nodes=2", "finetune.slurm",
                             *command[2:]], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, log.read_text()[-3000:]
    assert "Slurm job" in log.read_text() and "n2 is node rank 1 of 2 nodes" in log.read_text()
    assert "| processes | 2 |" in (out / "report.md").read_text()
    assert trainer_state(out)["global_step"] == 4
