"""The benchmarks stay runnable: each runs here at its smallest size (their numbers are in docs/benchmarks.md)."""
import json
import re
import subprocess
import sys

import pytest
from helpers import REPO, free_port

pytestmark = pytest.mark.slow  # each bench runs its smallest real size: minutes, not seconds


def bench(script: str, *args: str) -> str:
    """`python -m bench.NAME ARGS`, from the repository, as the README runs them."""
    result = subprocess.run([sys.executable, "-m", f"bench.{script.removesuffix('.py')}", *args], capture_output=True,
                            text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_train_bench_smoke_runs_variants_with_matching_losses(data, tmp_path):
    out = bench("train.py", "--smoke", "--steps", "4", "--out", str(tmp_path / "out"),
                "--workdir", str(tmp_path / "work"),
                "--train_file", str(data["train"]), "--tokenizer", str(data["tokenizer"]),
                "--master_port", str(free_port()), "--variants", "no activation checkpointing,ZeRO stage 0")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["variant"] for r in results] == ["tutorial", "no activation checkpointing", "ZeRO stage 0"]
    assert all(len(r["losses"]) == 4 and r["tokens_per_second"] > 0 for r in results)
    # fp32 on CPU: recomputing activations or dropping ZeRO changes no arithmetic that matters
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 3 and all(row.endswith("| yes |") for row in rows), out


def test_data_bench_compares_the_paths(tmp_path):
    out = bench("data.py", "--docs", "1500", "--workdir", str(tmp_path))
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"raw", "raw_ids", "encoder", "ours", "tutorial"} <= rows.keys()
    tokens = {name: int(rows[name].split("|")[4].replace(",", "")) for name in ("raw", "encoder", "ours")}
    assert tokens["ours"] == tokens["encoder"] == tokens["raw"]  # every document and its separator, nothing dropped


def test_subset_bench_compares_with_head(tmp_path):
    out = bench("subset.py", "--docs", "3000", "--lines", "2000", "--workdir", str(tmp_path), "--repeat", "1")
    assert "\n| head -n | " in out and "\n| make_subset.py | " in out
    assert [p.name for p in tmp_path.iterdir()] == ["corpus-3000.jsonl"]  # the outputs were compared and removed


def test_serve_bench_compares_the_server_with_generate(tmp_path):
    out = bench("serve.py", "--preset", "tiny", "--max_tokens", "4", "--streams", "1", "2", "--repeat", "1",
                "--workdir", str(tmp_path), "--port", str(free_port()))
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"model.generate, one answer", "serve.py, one streamed answer",
            "serve.py, 2 concurrent streams"} <= rows.keys()
    assert rows["serve.py, 2 concurrent streams"].split("|")[2].strip() == "8"  # both answers, 4 tokens each


def test_recipe_bench_smoke_swaps_in_the_tutorials_choices_at_equal_tokens(tmp_path):
    bench("recipe.py", "--smoke", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
          "--variants", "all of the tutorial's,SFT: our loss mask (seed 42),SFT: tutorial labels")
    results = {r["variant"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert list(results) == ["defaults (seed 42)", "all of the tutorial's", "SFT: our loss mask (seed 42)",
                             "SFT: tutorial labels"]
    assert not any("error" in r for r in results.values()), results
    defaults, tutorial = results["defaults (seed 42)"], results["all of the tutorial's"]
    assert defaults["tokens"] == tutorial["tokens"] == 3 * 8 * 256  # --smoke: 3 steps of 8 blocks of 256
    assert defaults["last_learning_rate"] < tutorial["last_learning_rate"] == pytest.approx(3e-3)  # WarmupLR: no decay
    # The tutorial's blocks were trained on: fewer of them (no separators, a tail dropped per map batch)
    blocks = [int(n.replace(",", "")) for n in re.findall(r"training on ([\d,]+) blocks",
                                                              (tmp_path / "out" / "runs.log").read_text())]
    assert len(blocks) == 2 and blocks[1] < blocks[0]
    # The same conversations in the same order: the labels differ, not the data
    assert results["SFT: our loss mask (seed 42)"]["tokens"] == results["SFT: tutorial labels"]["tokens"] > 0
    assert all(r["eval_loss"] > 0 for r in results.values())
