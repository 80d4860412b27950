"""Helpers shared by tests: running the training scripts through the real DeepSpeed launcher on CPU ranks, and
variants of the real Qwen tokenizer."""
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from seqlm.data import demo
from seqlm.data.demo import DEMO_TRAINING, write_demo_corpus

REPO = Path(__file__).resolve().parent.parent
ENDOFTEXT = 151643  # <|endoftext|>: the Qwen2.5 base model's eos_token_id, the document separator
IM_END = 151645  # <|im_end|>: the end of a chat turn
BLOCK = 64  # tokens a training sequence: a step's cost is mostly the 151,936-way output layer over its tokens
SAMPLE_TOKENS = 8  # a round of samples (greedy and sampled): 0.7 s, against 2.8 s at the default 32 (one thread)
TINY_RUN = [*DEMO_TRAINING, "--block_size", str(BLOCK), "--logging_steps", "5", "--sample_max_new_tokens",
            str(SAMPLE_TOKENS)]
# The tiny preset at a quarter of its width, for the runs that are compared with each other, killed, resumed or refused
# (what a model learns is test_pretrain's and test_sft's to check): a step and a checkpoint of the tiny preset are
# mostly its 151,936 x 128 embedding. At 32 wide a checkpoint is 100 MB instead of 400, and writing files was a third of a
# short run's time on this machine, which hands freed memory back to its host (docs/benchmarks.md).
NARROW = "hidden_size=32,intermediate_size=128"
NARROW_RUN = [*TINY_RUN, "--config_overrides", NARROW]


def tiny_parameters(hidden: int, intermediate: int, layers: int) -> int:
    """The tiny preset's parameters at another width and depth, counted by hand (its 4 heads and 2 key-value heads): a
    layer has q (hidden x hidden + bias), k and v (hidden x kv + bias each, kv = 2 heads of hidden / 4), o (hidden x
    hidden), the MLP's three hidden x intermediate matrices and two norms; then the tied embedding and the last norm."""
    kv = hidden // 2
    layer = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 151936 * hidden + layers * layer + hidden
TINY_SFT = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3",
            "--warmup_steps", "2", "--activation_checkpointing", "false", "--logging_steps", "3", "--eval_steps", "6",
            "--save_steps", "6", "--max_eval_samples", "16", "--max_length", "96", "--disable_tqdm", "true",
            "--sample_max_new_tokens", str(SAMPLE_TOKENS)]


PORTS: set[str] = set()  # the ports this process gave its runs: conftest removes their leftover shared memory


def free_port() -> int:
    port = demo.free_port()
    PORTS.add(str(port))
    return port


def pretrain_command(data, output_dir: Path, *args: str, **kwargs) -> tuple[list[str], dict]:
    """seqlm.data.demo.pretrain_command, its port noted in PORTS."""
    command, env = demo.pretrain_command(data, output_dir, *args, **kwargs)
    PORTS.add(env["MASTER_PORT"])
    return command, env


SECTIONS = ["## Summary", "## Curves", "## Samples", "## Configuration", "## Environment"]  # of a run's report.md
PLOTS = ["loss.png", "bits_per_char.png", "bits_per_byte.png", "learning_rate.png", "throughput.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_pngs(folder: Path, names: list[str]) -> None:
    """The report's plots in `folder`/plots: PNG files that decode to images that are not blank."""
    from matplotlib.image import imread

    for name in names:
        path = folder / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        pixels = imread(path)  # decodes the whole image
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, name
        assert pixels.std() > 0, f"{name} is blank"


def assert_rate_is_true(build_output: str) -> None:
    """A cache build's summary line states its time and a rate that is its tokens over that time (a build of a tiny
    file takes milliseconds: the rate must still be a real one)."""
    match = re.search(r" ([\d,]+) tokens(?: \(\w+\))?,?.* in ([\d.e+-]+) s \(([\d,]+) tokens/s\)", build_output)
    assert match, build_output
    tokens, seconds, rate = int(match[1].replace(",", "")), float(match[2]), int(match[3].replace(",", ""))
    assert seconds > 0 and rate == pytest.approx(tokens / seconds, rel=0.01, abs=0.5) and rate < 1e9


def write_jsonl(path: Path, texts) -> Path:
    write_demo_corpus(path, documents=texts)
    return path


def pretrain_sh(data, output_dir: Path, *args: str, expect_ok=True, **kwargs) -> str:
    """Run pretrain.sh to the end; returns its output (stdout + stderr)."""
    command, env = pretrain_command(data, output_dir, *args, **kwargs)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def finetune_command(data: Path, output_dir: Path, *args: str, ranks: int = 1) -> tuple[list[str], dict]:
    """The `bash finetune.sh` command line and environment of a CPU run on `data` (conftest's sft_data)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MODEL": str(data / "pretrained"), "TRAIN_FILE": str(data / "train.jsonl"),
           "VALIDATION_FILE": str(data / "val.jsonl"), "OUTPUT_DIR": str(output_dir), "NUM_GPUS": str(ranks),
           "MASTER_PORT": str(free_port()), "SWANLAB_MODE": "offline"}
    env.pop("OMP_NUM_THREADS", None)
    return ["bash", str(REPO / "finetune.sh"), "--token_cache_dir", str(data / "token_cache"), *args], env


def finetune_sh(data: Path, output_dir: Path, *args: str, ranks: int = 1) -> str:
    """Run finetune.sh to the end; returns its output (stdout + stderr)."""
    command, env = finetune_command(data, output_dir, *args, ranks=ranks)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def pretrain_flags(data, output_dir: Path, *args: str) -> list[str]:
    """pretrain.py's flags for a run of the tiny preset on `data`: what pretrain_command's pretrain.sh passes it."""
    return ["--config_name", "tiny", "--tokenizer_name", str(data["tokenizer"]), "--train_files", str(data["train"]),
            "--validation_files", str(data["val"]), "--output_dir", str(output_dir), "--token_cache_dir",
            str(data["cache"]), *args]


def refusal(monkeypatch, caplog, script: str, *args: str) -> str:
    """SCRIPT.py's main() run in this process on `args`, to stop on bad input before any work with exit status 2: the
    one line it says. For the checks themselves, which the launcher does not change (tests that go through it:
    test_launch, test_reliability, test_pretrain's missing corpus, test_memory's exact stderr)."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return line


def run_until(command: list[str], env: dict, appears: Path) -> None:
    """Start a training command and kill -9 its whole process tree as soon as `appears` exists."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not appears.exists():
        assert proc.poll() is None, f"the run ended before {appears} appeared"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def trainer_state(output_dir: Path) -> dict:
    return json.loads((output_dir / "trainer_state.json").read_text())


def swanlab_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "swanlog").glob("run-*"))


def swanlab_records(run_folder: Path) -> tuple[dict[str, dict[int, float]], dict[str, list[str]]]:
    """What an offline swanlab run folder holds, read with swanlab's own record reader: {metric key: {step: value}}
    and {text key: the texts logged}."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, list[str]] = {}
    reader = DataStoreReader()
    reader.open(next(run_folder.glob("*.swanlab")))
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "scalar":
            scalars.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
        elif kind == "media":
            texts.setdefault(record.media.key, []).extend(
                (run_folder / "media" / "text" / item.filename).read_text(encoding="utf-8")
                for item in record.media.value.items)
    reader.close()
    return scalars, texts


def reshaped(tokenizer, change) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` after `change(spec)` edits its tokenizer.json."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    change(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def add_a_prefix_token(spec):
    """Two more added tokens, one a prefix of the other, neither in any text the tests tokenize."""
    last = max(t["id"] for t in spec["added_tokens"])
    spec["added_tokens"] += [dict(spec["added_tokens"][0], id=last + 1, content="<zz>"),
                             dict(spec["added_tokens"][0], id=last + 2, content="<zz>x")]


def rank_environments(proc: subprocess.Popen, port: int, token: str) -> tuple[dict[int, dict[str, str]], list[str]]:
    """While `proc` runs: the environment of each rank of the run on `port` (from /proc, as the rank started, with
    the secrets the launcher copied to its node, as it reads them, and that file's mode), and the command lines of every
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
