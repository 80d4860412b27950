"""launch.sh on the machines users share and spread over: the GPUs CUDA_VISIBLE_DEVICES names, and the environment
a run needs on every node. The GPU choice is read from what DeepSpeed's own runner resolves (its launcher logs the
world it was given, and the CUDA_VISIBLE_DEVICES it sets for the ranks), with a stand-in `nvidia-smi` that lists
four GPUs; the ranks then stop at --help, as this machine has no GPU to train on."""
import getpass
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import NARROW_RUN, REPO, free_port, pretrain_command, pretrain_sh, trainer_state

FOUR_GPUS = """#!/bin/sh
[ "$1" = -L ] || exit 9
for i in 0 1 2 3; do echo "GPU $i: NVIDIA A100-SXM4-80GB (UUID: GPU-$i$i$i$i$i$i$i$i-aaaa-bbbb-cccc-dddddddddddd)"; done
"""


@pytest.fixture
def four_gpu_machine(tmp_path):
    """An environment whose `nvidia-smi -L` lists four GPUs; LOCAL_SIZE is DeepSpeed's own device count for its CPU
    accelerator, which the runner asks in place of CUDA's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FOUR_GPUS)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LOCAL_SIZE": "4"}
    for name in "NUM_GPUS", "HOSTFILE", "NODE_RANK", "CUDA_VISIBLE_DEVICES":
        env.pop(name, None)
    return env


def launch(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), "--help"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, visible, num_gpus, used", [
    ("pretrain.sh", "2,3", None, [2, 3]),
    ("finetune.sh", "3,1,2", "1", [3]),  # NUM_GPUS counts within CUDA_VISIBLE_DEVICES, in its order
])
def test_the_gpus_cuda_visible_devices_names_are_the_ones_deepspeed_launches_on(four_gpu_machine, script, visible,
                                                                               num_gpus, used):
    env = {**four_gpu_machine, "CUDA_VISIBLE_DEVICES": visible, **({"NUM_GPUS": num_gpus} if num_gpus else {})}
    result = launch(script, env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert f"WORLD INFO DICT: {{'localhost': {used}}}" in out  # DeepSpeed's launcher, from its runner
    assert f"Setting CUDA_VISIBLE_DEVICES={','.join(map(str, used))}" in out
    assert "ignoring it" not in out
    assert [line for line in out.splitlines() if line.startswith("training on GPU")] == \
        [f"training on GPU {gpu}: NVIDIA A100-SXM4-80GB" for gpu in used]


@pytest.mark.parametrize("visible, num_gpus, says", [
    ("2,3", "3", "NUM_GPUS=3 but CUDA_VISIBLE_DEVICES=2,3 names 2 GPU(s): NUM_GPUS counts within it"),
    ("GPU-2222", None, "CUDA_VISIBLE_DEVICES=GPU-2222: DeepSpeed's launcher takes GPU indices only"),
])
def test_a_gpu_choice_deepspeed_cannot_honour_stops_in_one_line_before_launching(four_gpu_machine, visible, num_gpus,
                                                                                 says):
    env = {**four_gpu_machine, "CUDA_VISIBLE_DEVICES": visible, **({"NUM_GPUS": num_gpus} if num_gpus else {})}
    result = launch("pretrain.sh", env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert "deepspeed" not in result.stdout + result.stderr.split("error:")[0]


# ---------------------------------------------------------------- two nodes over ssh

@pytest.fixture
def ssh_to_this_machine(tmp_path):
    """Debian's sshd on 127.0.0.1 (a fresh port, its own host key) letting this user in with a key of its own, and an
    `ssh` on PATH that reaches it under the names `localhost` and `127.0.0.1`: what pdsh, DeepSpeed's ssh check and
    launch.sh call. Yields the folder of that `ssh`; stops the sshd it started."""
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


def rank_environments(proc: subprocess.Popen, port: int, token: str) -> tuple[dict[int, dict[str, str]], list[str]]:
    """While `proc` runs: the environment of each rank of the run on `port` (from /proc, as the rank started, with
    the secrets launch.sh copied to its node, as it reads them, and that file's mode), and the command lines of every
    process that holds `token` in its arguments."""
    environments, exposed = {}, []
    while proc.poll() is None:
        for pid in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (pid / "cmdline").read_bytes().decode(errors="replace")
                environ = dict(item.split("=", 1) for item in (pid / "environ").read_bytes().decode(
                    errors="replace").split("\0") if "=" in item)
            except OSError:  # ended meanwhile
                continue
            if token in cmdline:
                exposed.append(cmdline.replace("\0", " "))
            if environ.get("MASTER_PORT") == str(port) and "RANK" in environ and "pretrain.py" in cmdline:
                environments[int(environ["RANK"])] = environ
                secrets_file = Path(environ.get("SEQLM_SECRETS_FILE", "/nonexistent")).expanduser()
                if secrets_file.is_file():  # what the rank reads into its environment (seqlm.training.run)
                    environ["secrets file mode"] = oct(secrets_file.stat().st_mode & 0o777)
                    environ.update(line.split("=", 1) for line in secrets_file.read_text().splitlines())
        time.sleep(0.2)
    return environments, exposed


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
