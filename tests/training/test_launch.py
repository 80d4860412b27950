"""The launcher (seqlm/training/launch.py) on the machines users share and spread over: the GPUs torch sees and
CUDA_VISIBLE_DEVICES names, flags checked before any rank starts, a failure's last line, and the environment a run needs
on every node. The GPU choice is planned in this process with torch's device count stood in for (this torch is a CPU
build) and a stand-in `nvidia-smi`, then read from what DeepSpeed's own runner resolves (its launcher logs the world it
was given, and the CUDA_VISIBLE_DEVICES it sets for the ranks); the ranks stop at --help, as this machine has no GPU."""
import getpass
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import NARROW_RUN, REPO, free_port, pretrain_command, pretrain_sh, rank_environments, trainer_state

from seqlm.training import launch
from seqlm.training.launch import LaunchError, plan

FOUR_GPUS = "\n".join(f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i}{i}{i}{i}{i}{i}{i}{i}-aaaa-bbbb-cccc-dddddddddddd)"
                      for i in range(4))
# One A100 split in two MIG slices, as `nvidia-smi -L` prints it: three lines, one GPU a process can use.
MIG = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5f2d3c1e-0000-1111-2222-333344445555)
  MIG 3g.20gb     Device  0: (UUID: MIG-1c7e6a3e-aaaa-5bbb-8ccc-0123456789ab)
  MIG 3g.20gb     Device  1: (UUID: MIG-2d8f7b4f-aaaa-5bbb-8ccc-0123456789ab)"""


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """machine(listing, torch_sees) -> the environment of a machine whose `nvidia-smi -L` prints `listing` (None: no
    nvidia-smi) and whose torch counts `torch_sees` GPUs, for plan() and main() in this process."""
    def make(listing: str | None, torch_sees: int) -> dict[str, str]:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        if listing is not None:
            (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\n[ "$1" = -L ] || exit 9\ncat <<EOF\n{listing}\nEOF\n')
            (bin_dir / "nvidia-smi").chmod(0o755)
        monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), "/usr/bin",
                                                    "/bin"]))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: torch_sees)
        for name in "NUM_GPUS", "HOSTFILE", "NODE_RANK", "CUDA_VISIBLE_DEVICES", "DEVICE", "MASTER_PORT", \
                "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_NUM_NODES", "DS_ACCELERATOR", "OMP_NUM_THREADS":
            monkeypatch.delenv(name, raising=False)
        return dict(os.environ)
    return make


@pytest.mark.parametrize("script, visible, num_gpus, used", [
    ("finetune.py", "3,1,2", "1", [3]),  # NUM_GPUS counts within CUDA_VISIBLE_DEVICES, in its order
])
def test_the_gpus_cuda_visible_devices_names_are_the_ones_deepspeed_launches_on(machine, script, visible, num_gpus,
                                                                               used):
    env = {**machine(FOUR_GPUS, 4), "CUDA_VISIBLE_DEVICES": visible, **({"NUM_GPUS": num_gpus} if num_gpus else {})}
    planned = plan(env)
    assert planned.notes == [f"training on GPU {gpu}: NVIDIA A100-SXM4-80GB" for gpu in used]
    # LOCAL_SIZE: DeepSpeed's own device count for its CPU accelerator, which the runner asks in place of CUDA's.
    result = subprocess.run([*planned.command, script, "--help"], env={**planned.env, "LOCAL_SIZE": "4"}, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert f"WORLD INFO DICT: {{'localhost': {used}}}" in out  # DeepSpeed's launcher, from its runner
    assert f"Setting CUDA_VISIBLE_DEVICES={','.join(map(str, used))}" in out
    assert "ignoring it" not in out


def test_gpus_are_counted_as_torch_sees_them_not_as_nvidia_smi_lines(machine):
    planned = plan(machine(MIG, 1))  # a MIG slice: one GPU to torch, three lines of nvidia-smi -L
    assert planned.command[1:3] == ["--num_gpus", "1"]
    assert planned.notes == ["training on GPU 0: NVIDIA A100-SXM4-40GB"]


def test_gpus_without_nvidia_smi_train_and_the_log_says_why_they_are_unnamed(machine):
    planned = plan(machine(None, 2))
    assert planned.command[1:3] == ["--num_gpus", "2"]
    assert "DS_ACCELERATOR" not in planned.env
    assert planned.notes == ["training on 2 GPU(s) as torch counts them (0,1); nvidia-smi is not installed or fails, "
                             "so the log cannot name them"]


def test_gpus_that_torch_cannot_see_stop_the_launch_unless_cpu_ranks_are_asked_for(machine):
    env = machine(FOUR_GPUS, 0)  # a CPU build of torch on a GPU machine
    with pytest.raises(LaunchError, match=re.escape(f"nvidia-smi lists 4 GPU(s) but torch {torch.__version__} sees "
                                                    "none (a CPU build of torch")):
        plan(env)
    planned = plan({**env, "DEVICE": "cpu"})
    assert planned.command[1:3] == ["--num_gpus", "1"] and planned.env["DS_ACCELERATOR"] == "cpu"


@pytest.mark.parametrize("listing, torch_sees, flags", [
    ("GPU 0: Tesla T4 (UUID: GPU-0)", 1, []),  # pre-Ampere: no --bf16, the script chooses fp16
    ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", 1, []),
    (None, 0, ["--use_cpu", "true"]),  # no GPU: CPU ranks
])
def test_the_launch_passes_no_precision_flag(machine, capfd, listing, torch_sees, flags):
    """A stand-in for DeepSpeed's runner (the first `deepspeed` on PATH) prints what it was given."""
    env = machine(listing, torch_sees)
    runner = Path(env["PATH"].split(os.pathsep)[0]) / "deepspeed"
    runner.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    runner.chmod(0o755)
    assert launch.main(["pretrain.py", "--learning_rate", "1e-4"]) == 0
    given = capfd.readouterr().out.splitlines()
    script = given.index("pretrain.py")
    assert given[script + 1:] == [*flags, "--learning_rate", "1e-4"]


@pytest.mark.parametrize("visible, num_gpus, says", [
    ("2,3", "3", "NUM_GPUS=3 but CUDA_VISIBLE_DEVICES=2,3 names 2 GPU(s): NUM_GPUS counts within them"),
    ("GPU-2222", None, "CUDA_VISIBLE_DEVICES=GPU-2222: DeepSpeed's launcher takes GPU indices only"),
])
def test_a_gpu_choice_deepspeed_cannot_honour_stops_in_one_line_before_launching(machine, capfd, monkeypatch, visible,
                                                                                 num_gpus, says):
    machine(FOUR_GPUS, 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if num_gpus:
        monkeypatch.setenv("NUM_GPUS", num_gpus)
    assert launch.main(["pretrain.py", "--help"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize("script, args, says", [
    ("pretrain.py", ["--learnig_rate", "3e-4"],
     "error: pretrain.py has no flag --learnig_rate: did you mean --learning_rate? (`python pretrain.py --help` lists "
     "them)\n"),
    ("finetune.py", ["--gradient_acumulation_steps=4"],
     "error: finetune.py has no flag --gradient_acumulation_steps: did you mean --gradient_accumulation_steps? "
     "(`python finetune.py --help` lists them)\n"),
])
def test_a_misspelt_flag_is_refused_before_any_rank_starts(machine, capfd, script, args, says):
    machine(None, 0)
    assert launch.main([script, *args]) == 2
    assert capfd.readouterr() == ("", says)


def test_flags_argparse_takes_pass_the_check(machine, tmp_path, capfd):
    """Every flag the scripts know, a unique prefix of one (argparse takes it) and a file of arguments."""
    env = machine(None, 0)
    runner = Path(env["PATH"].split(os.pathsep)[0]) / "deepspeed"
    runner.write_text("#!/bin/sh\n")
    runner.chmod(0o755)
    args_file = tmp_path / "args.yaml"
    args_file.write_text("learning_rate: 3.0e-4\n")
    assert launch.main(["finetune.py", str(args_file), "--system_prompt", "你好", "--learning_rat", "1e-5",
                        "--output_dir=x"]) == 0
    assert launch.main(["pretrain.py", "--config_overrides", "hidden_size=32", "--hub_model_id", "me/m"]) == 0
    assert "error" not in capfd.readouterr().err


def test_a_slurm_job_of_several_nodes_outside_srun_is_refused(machine):
    env = {**machine(None, 0), "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"}
    with pytest.raises(LaunchError, match="this Slurm job has 2 nodes but runs outside srun"):
        plan(env)
    assert plan({**env, "SLURM_JOB_NUM_NODES": "1"}).command[1:3] == ["--num_gpus", "1"]  # a one-node job: as here


# ---------------------------------------------------------------- two nodes over ssh

@pytest.fixture
def ssh_to_this_machine(tmp_path):
    """Debian's sshd on 127.0.0.1 (a fresh port, its own host key) letting this user in with a key of its own, and an
    `ssh` on PATH that reaches it under the names `localhost` and `127.0.0.1`: what pdsh, DeepSpeed's ssh check and
    the launcher call. Yields the folder of that `ssh`; stops the sshd it started."""
    if not (Path("/usr/sbin/sshd").is_file() and shutil.which("pdsh")):
        pytest.skip("needs Debian's openssh-server and pdsh (apt-get install openssh-server pdsh)")
    folder = tmp_path / "ssh"
    folder.mkdir()
    for key in "host_key", "user_key":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    user, port = getpass.getuser(), free_port()
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        f"PidFile {folder / 'sshd.pid'}\nAllowUsers {user}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n")
    (folder / "ssh_config").write_text(
        f"Host localhost 127.0.0.1\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {folder / 'user_key'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile {folder / 'known_hosts'}\n  LogLevel ERROR\n")
    (folder / "bin").mkdir()
    (folder / "bin" / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {folder / "ssh_config"} "$@"\n')
    (folder / "bin" / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder, which Debian makes at boot
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config"), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(folder / "bin" / "ssh"), "-o", "BatchMode=yes", "127.0.0.1", "true"],
                             capture_output=True).returncode != 0:
            assert sshd.poll() is None and time.monotonic() < deadline, sshd.stderr.read() if sshd.poll() else ""
            time.sleep(0.2)
        yield folder / "bin"
    finally:
        sshd.terminate()
        sshd.wait(timeout=30)


def losses(output_dir: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer_state(output_dir)["log_history"] if "loss" in h}


@pytest.mark.slow
def test_two_nodes_over_ssh_train_as_two_ranks_on_one_node_with_the_run_environment(data, tmp_path,
                                                                                     ssh_to_this_machine):
    run = [*NARROW_RUN, "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "4", "--max_steps", "4",
           "--per_device_train_batch_size", "2"]
    pretrain_sh(data, tmp_path / "two_ranks", *run, ranks=2)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    token = "hf_" + secrets.token_hex(12)
    command, env = pretrain_command(data, tmp_path / "two_nodes", *run)
    env.update(PATH=f"{ssh_to_this_machine}{os.pathsep}{env['PATH']}", HOSTFILE=str(hostfile),
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", HF_TOKEN=token, HF_ENDPOINT="http://127.0.0.1:9",
               NCCL_DEBUG="WARN")
    env.pop("NUM_GPUS")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout))
    reader.start()
    environments, exposed = rank_environments(proc, int(env["MASTER_PORT"]), token)
    reader.join()
    log = "".join(output)
    assert proc.returncode == 0, log[-3000:]
    assert "pdsh" in log and "Running on the following workers: localhost,127.0.0.1" in log

    assert losses(tmp_path / "two_nodes") == losses(tmp_path / "two_ranks") and len(losses(tmp_path / "two_ranks")) == 4
    second = environments[1]  # the rank pdsh started on the second node, through sshd
    assert second["SSH_CONNECTION"].startswith("127.0.0.1 ")
    for name in "HF_TOKEN", "HF_ENDPOINT", "SWANLAB_MODE", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", \
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "NCCL_DEBUG":
        assert name in second, name
    assert (second["HF_TOKEN"], second["HF_ENDPOINT"], second["SWANLAB_MODE"], second["OMP_NUM_THREADS"]) == \
        (token, "http://127.0.0.1:9", "offline", "1")
    assert second["TORCH_EXTENSIONS_DIR"] == f"{sys.prefix}/torch_extensions"
    assert second["secrets file mode"] == "0o600"
    assert exposed == [], "the token was in a command line"
    assert token not in log
    assert not list((Path.home() / ".cache" / "seqlm").glob("secrets-*")), "the nodes' copies are removed"
