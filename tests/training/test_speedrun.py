"""speedrun.sh rehearsed on CPU: every step but the download, on the offline demo data and the tiny preset, through
the real scripts (make_subset.py, tokenize_corpus.py, pretrain.sh and finetune.sh under DeepSpeed, benchmark.py); then
run again, when every step finds its output complete and is skipped."""
import os
import subprocess
import sys

import pytest
from helpers import REPO, TINY_SFT, free_port, trainer_state

PRETRAIN = ["--block_size", "128", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--learning_rate", "3e-3", "--warmup_steps", "2", "--activation_checkpointing", "false",
            "--eval_steps", "4", "--save_steps", "4", "--max_eval_samples", "16", "--sample_steps", "0",
            "--report_to", "none", "--disable_tqdm", "true"]
STEPS = ["1. data", "2. pretraining subset", "3. tokenize", "4. pretrain", "5. SFT subset", "6. fine-tune",
         "7. benchmark", "7. benchmark"]


def speedrun(tmp_path) -> str:
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "SPEEDRUN_DATA": "demo", "PRESET": "tiny", "DATA_DIR": str(tmp_path / "data"),
           "OUTPUT_ROOT": str(tmp_path / "output"), "PRETRAIN_LINES": "300", "SFT_LINES": "400",
           "PRETRAIN_STEPS": "8", "SFT_STEPS": "6", "PRETRAIN_ARGS": " ".join(PRETRAIN),
           "SFT_ARGS": " ".join([*TINY_SFT, "--report_to", "none", "--sample_steps", "0"]),
           "BENCHMARK_ARGS": "--limit 4", "NUM_GPUS": "1", "MASTER_PORT": str(free_port())}
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(["bash", str(REPO / "speedrun.sh")], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def step_logs(log: str) -> list[tuple[str, str]]:
    """(title, what it printed) of each step, in order."""
    parts = log.split("\n== ")[1:-1]  # the last part is the summary
    return [(p.splitlines()[0], p) for p in parts]


@pytest.mark.slow
def test_speedrun_runs_every_step_then_skips_every_step(tmp_path):
    first = speedrun(tmp_path)
    steps = step_logs(first)
    assert len(steps) == len(STEPS) and all(title.startswith(t) for (title, _), t in zip(steps, STEPS))
    assert not any("done, skipped" in text for _, text in steps)
    pretrained, finetuned = tmp_path / "output" / "pretrain", tmp_path / "output" / "sft"
    assert trainer_state(pretrained)["global_step"] == 8 and trainer_state(finetuned)["global_step"] == 6
    for model in (pretrained, finetuned):
        assert (model / "report.md").is_file() and (model / "benchmarks" / "benchmarks.json").is_file()
    assert sum(1 for _ in open(tmp_path / "data" / "demo" / "train.jsonl")) == 300
    assert f"python serve.py --model_path {finetuned}" in first
    weights = {m: (m / "model.safetensors").stat().st_mtime_ns for m in (pretrained, finetuned)}

    second = speedrun(tmp_path)
    steps = step_logs(second)
    assert len(steps) == len(STEPS) and all("done, skipped" in text and "to do" not in text for _, text in steps)
    assert "deepspeed" not in second and "tokenized" not in second
    assert weights == {m: (m / "model.safetensors").stat().st_mtime_ns for m in (pretrained, finetuned)}
    times = second.split("== time per step")[1].splitlines()[1:9]
    assert [line.split(" s  ", 1)[1] for line in times] == [title for title, _ in steps]
