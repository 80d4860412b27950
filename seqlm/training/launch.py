"""Start a training script (pretrain.py, finetune.py) through DeepSpeed's launcher, one rank per GPU: on this machine,
on the nodes of a hostfile (over ssh, or started on each node), on the nodes of a Slurm job step, or on CPU ranks.
`python -m seqlm.training.launch SCRIPT.py ARGS...`; pretrain.sh and finetune.sh call it, pretrain.slurm and
finetune.slurm through srun. Every way of launching is one function from the environment to a command; main() checks
the flags, runs the command, and ends a failure in one line.

  NUM_GPUS      ranks on this machine (default: every GPU torch sees, within CUDA_VISIBLE_DEVICES; else 1 CPU rank)
  CUDA_VISIBLE_DEVICES  the GPUs of this machine to train on (e.g. 2,3 on a shared server): honoured, and named
  DEVICE=cpu    CPU ranks even where there are GPUs (demo.sh)
  HOSTFILE      DeepSpeed hostfile for several nodes ("node1 slots=8" lines): started from the first node over ssh
  NODE_RANK     with HOSTFILE, no ssh: run this on every node, each with its place in the hostfile (0, 1, ...)
  MASTER_ADDR   with NODE_RANK: the first node's address, which every node reaches (Slurm: found by itself)
  MASTER_PORT   rendezvous port (default: a free one on a single node; 29500 with a hostfile; Slurm: from the job id)
"""
from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from seqlm import paths

HOSTFILE_PORT = 29500  # every node of a hostfile must agree on the port without talking: DeepSpeed's default
SLURM_PORTS = (20000, 20000)  # a Slurm job's port: the first + job id modulo the second, the same on every node
# The run's settings that DeepSpeed's ssh launch does not carry to the other nodes by itself (it takes PYTHON*, NCCL_*
# and what a .deepspeed_env file names), and which of them are secrets, never to be written on a command line.
FORWARDED = re.compile(r"^(HF_|HUGGING_FACE_|SWANLAB_|TRANSFORMERS_|TOKENIZERS_|TORCH_|PYTORCH_|OMP_|MALLOC_|NCCL_)")
SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD")
REFUSAL = 2  # the exit code of a script that refused its input (seqlm.training.run.fail): its own line says why
# DeepSpeed's per-node launcher names the first rank it found ended: its command (that of the node's last rank,
# whichever died: DeepSpeed 0.19) and its exit code.
DIED = re.compile(r"--local_rank=\d+'.* exits with return code = (-?\d+)")
# The last line a rank wrote to say why it stopped: our logging's error lines, or argparse's.
RANK_ERROR = re.compile(r" ERROR [\w.]+: (.*)|^\S+\.py: error: (.*)")


class LaunchError(Exception):
    """A launch that cannot work, found before any rank starts: one line, what and how to fix."""


@dataclass
class Launch:
    command: list[str]
    env: dict[str, str]
    port: int  # the rendezvous port
    notes: list[str] = field(default_factory=list)  # printed before the launch: which cards, which node
    ssh_hosts: list[str] = field(default_factory=list)  # nodes given a secrets file to remove afterwards
    secrets_file: str | None = None  # its path in the home folder of each of them
    temporary: list[str] = field(default_factory=list)  # local files to remove afterwards

    @property
    def on_cpu(self) -> bool:
        return self.env.get("DS_ACCELERATOR") == "cpu"


# ---------------------------------------------------------------- the devices of this machine

def gpus_torch_sees() -> int:
    """The GPUs this process may use, as torch counts them (through NVML where it can, making no CUDA context), within
    CUDA_VISIBLE_DEVICES: a MIG slice is one, and a CPU build of torch sees none."""
    import torch

    return torch.cuda.device_count()


def gpu_names() -> dict[int, str] | None:
    """{index: name} of the GPUs `nvidia-smi -L` lists, its MIG lines left out; None without a working nvidia-smi."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listing.returncode != 0:
        return None
    found = (re.match(r"GPU (\d+): (.*?)(?: \(UUID: .*)?$", line) for line in listing.stdout.splitlines())
    return {int(m[1]): m[2] for m in found if m}


def cpu_cores(env: dict[str, str]) -> int:
    """The cores this process may run on, at most OMP_THREAD_LIMIT (as nproc counts them): a share of the machine."""
    cores = len(os.sched_getaffinity(0))
    return min(cores, int(env["OMP_THREAD_LIMIT"])) if env.get("OMP_THREAD_LIMIT", "").isdigit() else cores


def device_setup(env: dict[str, str]) -> tuple[list[int] | None, list[str]]:
    """(the GPUs of this machine the ranks train on, by CUDA index, or None for CPU ranks; notes for the log). CPU
    ranks get their settings in `env`. Precision, like the batch shape, is chosen by the training script from the
    card (seqlm/training/fit.py): bf16 is not on every GPU."""
    names = gpu_names() if env.get("DEVICE") != "cpu" else None
    count = gpus_torch_sees() if env.get("DEVICE") != "cpu" else 0
    if count:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible:
            ids = visible.split(",")
            if not all(i.isdigit() for i in ids):
                raise LaunchError(f"CUDA_VISIBLE_DEVICES={visible}: DeepSpeed's launcher takes GPU indices only (as "
                                  "`nvidia-smi -L` numbers them, e.g. CUDA_VISIBLE_DEVICES=2,3)")
            gpus = [int(i) for i in ids]
        else:
            gpus = list(range(count))
        wanted = env.get("NUM_GPUS") or str(len(gpus))
        if not wanted.isdigit() or not 0 < int(wanted) <= len(gpus):
            within = f"CUDA_VISIBLE_DEVICES={visible} names" if visible else "torch sees"
            raise LaunchError(f"NUM_GPUS={wanted} but {within} {len(gpus)} GPU(s): NUM_GPUS counts within them; set "
                              f"it to at most {len(gpus)}, or leave it unset")
        gpus = gpus[:int(wanted)]
        if names is None:
            notes = [f"training on {len(gpus)} GPU(s) as torch counts them ({','.join(map(str, gpus))}); nvidia-smi "
                     "is not installed or fails, so the log cannot name them"]
        else:
            notes = [f"training on GPU {i}: {names.get(i, 'not listed by nvidia-smi')}" for i in gpus]
        return gpus, notes
    if names and env.get("DEVICE") != "cpu":
        import torch

        raise LaunchError(f"nvidia-smi lists {len(names)} GPU(s) but torch {torch.__version__} sees none (a CPU build "
                          "of torch, or a CUDA_VISIBLE_DEVICES that hides them): install the CUDA build (`rm -rf .venv && "
                          "make setup`, without TORCH_INDEX_URL: the package index's torch for Linux is the CUDA "
                          "build), or set DEVICE=cpu to train on CPU ranks")
    ranks = env.get("NUM_GPUS") or "1"
    if not ranks.isdigit() or int(ranks) < 1:
        raise LaunchError(f"NUM_GPUS={ranks}: give the number of ranks, 1 or more")
    # The launcher leaves OMP_NUM_THREADS unset: share the cores out among the ranks.
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores(env) // int(ranks))))
    # Every step allocates and frees logits of block x 151,936 floats; by default glibc hands such blocks back to the
    # kernel each time, and re-faulting their pages costs more than the math (measured 2.5x per step for the tiny
    # preset). For the 0.5B preset on CPU it costs memory instead (peak 16.1 vs 12.2 GB): set both to 131072.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "4294967296")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "4294967296")
    env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would take CUDA wherever torch sees a GPU
    return None, [f"training on {ranks} CPU rank(s)" + ("" if env.get("DEVICE") == "cpu" else " (torch sees no GPU)")]


# ---------------------------------------------------------------- the port

def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def checked_port(env: dict[str, str], default: int | None) -> int:
    """MASTER_PORT, or `default`, or any free port (one node: two jobs on one machine never collide on a default),
    refused when in use here, where the first rank listens."""
    given = env.get("MASTER_PORT")
    if not given and default is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    port = int(given) if given else default
    if not port_is_free(port):
        raise LaunchError(f"MASTER_PORT={port} is in use (another job?): set another MASTER_PORT, or leave it unset to "
                          "take a free one")
    return port


# ---------------------------------------------------------------- the ways of launching

def deepspeed_runner(*flags: str) -> list[str]:
    return ["deepspeed", *flags]  # the environment's, as `python` is pretrain.sh's: the first on PATH


def single_node(env: dict[str, str]) -> Launch:
    gpus, notes = device_setup(env)
    port = checked_port(env, None)
    if gpus is not None and env.get("CUDA_VISIBLE_DEVICES"):
        # DeepSpeed's runner honours CUDA_VISIBLE_DEVICES only when no --num_gpus is given (it deletes it otherwise,
        # and the job lands on every card of a shared server, counted from GPU 0): it gets the list back instead,
        # which it turns into --include localhost:LIST.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        return Launch(deepspeed_runner("--master_port", str(port)), env, port, notes)
    ranks = len(gpus) if gpus is not None else int(env.get("NUM_GPUS") or 1)
    return Launch(deepspeed_runner("--num_gpus", str(ranks), "--master_port", str(port)), env, port, notes)


def hostfile_hosts(hostfile: str) -> list[str]:
    try:
        lines = Path(hostfile).read_text().splitlines()
    except OSError as e:
        raise LaunchError(f"HOSTFILE={hostfile}: {e.strerror}: give a DeepSpeed hostfile (\"node0 slots=8\" lines)")
    return [line.split("#")[0].split()[0] for line in lines if line.split("#")[0].strip()]


def hostfile_without_ssh(env: dict[str, str]) -> Launch:
    """Started on every node by the user, each with its NODE_RANK: DeepSpeed's runner with --no_ssh."""
    if not env.get("MASTER_ADDR"):
        raise LaunchError("with NODE_RANK, set MASTER_ADDR to the address of the first node")
    gpus, notes = device_setup(env)
    port = checked_port(env, HOSTFILE_PORT) if env["NODE_RANK"] == "0" else int(env.get("MASTER_PORT") or HOSTFILE_PORT)
    return Launch(deepspeed_runner("--hostfile", env["HOSTFILE"], "--no_ssh", "--node_rank", env["NODE_RANK"],
                                   "--master_addr", env["MASTER_ADDR"], "--master_port", str(port)), env, port, notes)


def hostfile_over_ssh(env: dict[str, str]) -> Launch:
    """Started from the first node: DeepSpeed's runner reaches the others with pdsh. It carries only the variables it
    knows and those of a .deepspeed_env file, written into the ssh command line, which `ps` shows to every user of
    both machines: the run's settings go that way, in a file of that format given as DS_ENV_FILE (the user's own
    .deepspeed_env first); secrets (tokens, keys) never: they go over ssh's standard input into a file only the user
    can read on every node (SEQLM_SECRETS_FILE, which the ranks read: seqlm.training.run), removed afterwards."""
    gpus, notes = device_setup(env)
    port = checked_port(env, HOSTFILE_PORT)
    hosts = hostfile_hosts(env["HOSTFILE"])
    settings, secrets = [], []
    for folder in Path.home(), Path.cwd():
        user_file = folder / env.get("DS_ENV_FILE", ".deepspeed_env")
        if user_file.is_file():
            settings += user_file.read_text().splitlines()
    for name, value in sorted(env.items()):
        if FORWARDED.match(name) and "\n" not in value:  # one line a variable, in DeepSpeed's format
            (secrets if SECRET.search(name) else settings).append(f"{name}={value}")
    launch = Launch(deepspeed_runner("--hostfile", env["HOSTFILE"], "--master_port", str(port),
                                     *(["--master_addr", env["MASTER_ADDR"]] if env.get("MASTER_ADDR") else [])),
                    env, port, notes)
    if secrets:
        launch.secrets_file = f".cache/seqlm/secrets-{socket.gethostname()}-{os.getpid()}.env"
        for host in hosts:
            launch.ssh_hosts.append(host)
            copied = subprocess.run([*ssh_command(env), host, "umask 077 && mkdir -p .cache/seqlm && cat > "
                                     f"{launch.secrets_file}"], input="\n".join(secrets) + "\n", text=True,
                                    capture_output=True)
            if copied.returncode != 0:
                raise LaunchError(f"cannot reach {host} over ssh (from {env['HOSTFILE']}) to give it the run's tokens: "
                                  "set up passwordless ssh to every node of the hostfile")
        settings.append(f"SEQLM_SECRETS_FILE=~/{launch.secrets_file}")
    env["DS_ENV_FILE"] = private_file("\n".join(settings) + "\n", launch)
    return launch


def ssh_command(env: dict[str, str]) -> list[str]:
    # PDSH_SSH_ARGS_APPEND holds several options, split as pdsh splits them.
    return ["ssh", "-o", "BatchMode=yes", *shlex.split(env.get("PDSH_SSH_ARGS_APPEND", ""))]


def private_file(text: str, launch: Launch) -> str:
    descriptor, path = tempfile.mkstemp(prefix="seqlm-launch-")  # mode 600
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
    launch.temporary.append(path)
    return path


def slurm_nodes(env: dict[str, str]) -> list[str]:
    listing = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True,
                             text=True, check=True)
    return listing.stdout.split()


def slurm_node_address(node: str) -> str:
    """The address Slurm reaches the node at (NodeAddr): a node's name need not resolve from the others."""
    shown = subprocess.run(["scontrol", "show", "node", "--oneliner", node], capture_output=True, text=True,
                           check=True).stdout
    return re.search(r"\bNodeAddr=(\S+)", shown)[1]


def slurm_step(env: dict[str, str]) -> Launch:
    """One task of a Slurm job step (`srun bash pretrain.sh`, one task a node): this node's place and the first node's
    address from the step, the port from the job id; DeepSpeed's per-node launcher starts this node's ranks. srun gives
    every node the environment of the job (its --export=ALL default)."""
    nodes = slurm_nodes(env)
    if env["SLURM_STEP_NUM_TASKS"] != env["SLURM_STEP_NUM_NODES"]:
        raise LaunchError(f"srun started {env['SLURM_STEP_NUM_TASKS']} tasks on {len(nodes)} node(s): the launcher "
                          "starts every rank of its node, so run one task a node (srun --ntasks-per-node=1, as "
                          "pretrain.slurm does)")
    node_rank = nodes.index(env["SLURMD_NODENAME"])
    gpus, notes = device_setup(env)
    job_port = SLURM_PORTS[0] + int(env["SLURM_JOB_ID"]) % SLURM_PORTS[1]
    port = checked_port(env, job_port) if node_rank == 0 else int(env.get("MASTER_PORT") or job_port)
    master = env.get("MASTER_ADDR") or slurm_node_address(nodes[0])
    ranks = gpus if gpus is not None else list(range(int(env.get("NUM_GPUS") or 1)))
    # Every node's launcher counts the world from this map, so every node gets this node's number of ranks (Slurm's
    # --gres=gpu:N is per node); the indices are this node's own, which its ranks are given as CUDA_VISIBLE_DEVICES.
    world = {node: ranks if node == nodes[node_rank] else list(range(len(ranks))) for node in nodes}
    world_info = base64.urlsafe_b64encode(json.dumps(world).encode()).decode()
    notes.append(f"Slurm job {env['SLURM_JOB_ID']}: {nodes[node_rank]} is node rank {node_rank} of {len(nodes)} nodes, "
                 f"{len(ranks)} rank(s) a node, the first node at {master}:{port}")
    return Launch([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                   f"--node_rank={node_rank}", f"--master_addr={master}", f"--master_port={port}"], env, port, notes)


def plan(env: dict[str, str]) -> Launch:
    """How to launch, from the environment (changed in place for the ranks)."""
    # DeepSpeed compiles its ops on first use into TORCH_EXTENSIONS_DIR (default: one folder in ~/.cache for every
    # Python environment, so two environments rebuild each other's ops, and wait on each other's build lock): keep
    # them with the environment that built them.
    env.setdefault("TORCH_EXTENSIONS_DIR", f"{sys.prefix}/torch_extensions")
    if env.get("HOSTFILE") and env.get("NODE_RANK"):
        return hostfile_without_ssh(env)
    if env.get("HOSTFILE"):
        return hostfile_over_ssh(env)
    if "SLURM_STEP_ID" in env:
        return slurm_step(env)
    if int(env.get("SLURM_JOB_NUM_NODES") or 1) > 1:
        raise LaunchError(f"this Slurm job has {env['SLURM_JOB_NUM_NODES']} nodes but runs outside srun, on one of "
                          "them: start the training script as `srun bash pretrain.sh` (one task a node), as "
                          "pretrain.slurm does")
    return single_node(env)


# ---------------------------------------------------------------- the flags, checked before any rank starts

def script_arguments(script: str) -> tuple[type, ...]:
    from seqlm.training import arguments

    return arguments.FINETUNING_ARGUMENTS if Path(script).name == "finetune.py" else arguments.PRETRAINING_ARGUMENTS


def check_flags(script: str, args: list[str]) -> None:
    """An unknown flag (a typo) would cost every rank's start-up before HfArgumentParser refuses it: refuse it here,
    with the closest known flag, as argparse reads flags (a unique prefix of one counts)."""
    from transformers import HfArgumentParser

    known = [flag for flag in HfArgumentParser(script_arguments(script))._option_string_actions
             if flag.startswith("--")]
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        flag = arg.split("=", 1)[0]
        if flag in known or sum(k.startswith(flag) for k in known) == 1:
            continue
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise LaunchError(f"{Path(script).name} has no flag {flag}: {hint}(`python {Path(script).name} --help` lists "
                          "them)")


def output_dir(script: str, args: list[str]) -> str:
    """Where the run writes its checkpoints: --output_dir, else the file of arguments' output_dir, else the default."""
    from seqlm.training.run import ARGS_FILE_SUFFIXES, read_args_file

    default = str(paths.SFT_OUTPUT if Path(script).name == "finetune.py" else paths.PRETRAIN_OUTPUT)
    for flag, value in zip(args, args[1:]):
        if flag == "--output_dir":
            return value
    for arg in args:
        if arg.startswith("--output_dir="):
            return arg.split("=", 1)[1]
    for arg in args:
        if not arg.startswith("-") and arg.endswith(ARGS_FILE_SUFFIXES) and Path(arg).is_file():
            names = {f.name for arguments in script_arguments(script) for f in dataclasses.fields(arguments)}
            try:
                return read_args_file(arg, names).get("output_dir") or default
            except ValueError:
                break
    return default


# ---------------------------------------------------------------- running it

def hide_hub_token(args: list[str], env: dict[str, str]) -> list[str]:
    """A token among the arguments would be printed by the launcher and visible in `ps` for the whole run, here and on
    every node: huggingface_hub reads it from the environment instead."""
    kept, i = [], 0
    while i < len(args):
        if args[i] == "--hub_token" and i + 1 < len(args):
            env["HF_TOKEN"], i = args[i + 1], i + 2
            continue
        if args[i].startswith("--hub_token="):
            env["HF_TOKEN"] = args[i].split("=", 1)[1]
        else:
            kept.append(args[i])
        i += 1
    return kept


def final_line(log: list[str], code: int, script: str, args: list[str]) -> str | None:
    """The one line that ends a failed run: a refusal's own line repeated (what it names is what to fix), or the
    dead rank's exit code with what to do, which DeepSpeed's launcher prints amid the other ranks' lines."""
    from seqlm.training.checkpoints import latest_complete_checkpoint

    died = next((m for m in map(DIED.search, log) if m), None)
    if code == 0 or died is None:
        return None
    died_code = int(died[1])
    if died_code == REFUSAL:
        said = [m[1] or m[2] for m in map(RANK_ERROR.search, log) if m]
        return f"error: {said[-1]}" if said else None
    why = "killed: out of memory, or kill -9" if died_code == -signal.SIGKILL else "see its lines above"
    resume = latest_complete_checkpoint(output_dir(script, args), quiet=True) or "the start (no complete checkpoint yet)"
    return (f"error: a rank on {socket.gethostname()} died (exit code {died_code}, {why}) and the launcher stopped "
            f"the others: rerunning the same command resumes from {resume}")


def clean_up(launch: Launch) -> None:
    for path in launch.temporary:
        Path(path).unlink(missing_ok=True)
    for host in launch.ssh_hosts:
        subprocess.run([*ssh_command(launch.env), "-n", host, "rm", "-f", launch.secrets_file], capture_output=True)
    if launch.on_cpu:
        # DeepSpeed's CPU all-reduce leaves a 69 MB shared-memory buffer per rank and port in /dev/shm, which is RAM:
        # dozens of runs filled 11 GB of a 24 GB machine: those of this run's port that no process still maps go.
        mapped = set()
        for maps in Path("/proc").glob("[0-9]*/maps"):
            try:
                mapped |= {line.split()[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line}
            except OSError:  # ended meanwhile, or another user's
                pass
        for buffer in map(str, Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{launch.port}_*")):
            if buffer not in mapped:
                Path(buffer).unlink(missing_ok=True)


def run(launch: Launch, script: str, args: list[str]) -> int:
    """Run the launch with its output passed through; stopped (scancel, Ctrl-C), the launcher is told and waited for."""
    device_flags = ["--use_cpu", "true"] if launch.on_cpu else []
    command = [*launch.command, script, *device_flags, *args]  # device flags first: the caller's win
    for note in launch.notes:
        print(note, flush=True)
    print("+ " + shlex.join(command), flush=True)
    proc = subprocess.Popen(command, env=launch.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")

    stopped = []

    def pass_on(signum, frame):
        stopped.append(signum)
        proc.send_signal(signum)

    for signum in signal.SIGTERM, signal.SIGINT, signal.SIGHUP:
        signal.signal(signum, pass_on)
    log = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.append(line)
        del log[:-2000]  # the end is what names the failure
    code = proc.wait()
    # Stopped from outside (scancel, srun ending the job for another node's dead rank, Ctrl-C): the ranks that it
    # stopped did not die of their own.
    last = None if stopped else final_line(log, code, script, args)
    if last:
        print(last, file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        print("usage: python -m seqlm.training.launch SCRIPT.py [ARGS...]", file=sys.stderr)
        return REFUSAL
    script, args = argv[0], argv[1:]
    env = dict(os.environ)
    kept = hide_hub_token(args, env)
    if kept != args:  # start again without the token in this process's command line
        os.execve(sys.executable, [sys.executable, "-m", "seqlm.training.launch", script, *kept], env)
    launch = None
    try:
        if "--help" not in args and "-h" not in args:
            check_flags(script, args)
        launch = plan(env)
        return run(launch, script, args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return REFUSAL
    finally:
        if launch is not None:
            clean_up(launch)


if __name__ == "__main__":
    sys.exit(main())
