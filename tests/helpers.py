"""Helpers shared by tests: running the training scripts through the real DeepSpeed launcher on CPU ranks, and
variants of the real Qwen tokenizer."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
BLOCK = 128
TINY_RUN = ["--block_size", str(BLOCK), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--learning_rate", "3e-3", "--warmup_steps", "5", "--activation_checkpointing", "false",
            "--logging_steps", "5", "--disable_tqdm", "true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def pretrain_command(data, output_dir: Path, *args: str, preset="tiny", train=None, ranks=1, swanlab="offline",
                     **extra_env: str) -> tuple[list[str], dict]:
    """The pretrain.sh command line and environment for a run on `data` (the conftest fixture)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PRESET": preset, "TOKENIZER": str(data["tokenizer"]), "TRAIN_FILE": str(train or data["train"]),
           "VALIDATION_FILE": str(data["val"]), "OUTPUT_DIR": str(output_dir), "NUM_GPUS": str(ranks),
           "MASTER_PORT": str(free_port()), "SWANLAB_MODE": swanlab, **extra_env}
    env.pop("OMP_NUM_THREADS", None)
    return ["bash", str(REPO / "pretrain.sh"), "--token_cache_dir", str(data["cache"]), *args], env


def pretrain_sh(data, output_dir: Path, *args: str, expect_ok=True, **kwargs) -> str:
    """Run pretrain.sh to the end; returns its output (stdout + stderr)."""
    command, env = pretrain_command(data, output_dir, *args, **kwargs)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def trainer_state(output_dir: Path) -> dict:
    return json.loads((output_dir / "trainer_state.json").read_text())


def swanlab_runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "swanlog").glob("run-*"))


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
