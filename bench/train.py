"""Training speed, one change at a time, in one run: the tutorial's stack first, then each setting that may make it
faster, each on top of the previous (a few as alternatives). Every variant is a real `python -m seqlm.training.launch
pretrain.py` run on the same data with the same seed and global batch; a variant counts only if its losses match the
tutorial's.

    python -m bench.train --out $OUT          # GPU: Qwen2.5-0.5B, block 2048, bf16; prints the table
    python -m bench.train --smoke             # CPU: the tiny preset, a few steps (tests/test_bench.py runs this)

--out receives results.md and results.json (rewritten after every variant, so a run stopped by a time limit keeps
what it finished) and train.log (every run's output); runs write under --workdir and are deleted after, their logs
kept.

Needs a corpus and the tokenizer: by default those of `make demo` (data/demo/corpus.jsonl, data/demo/tokenizer).
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from seqlm.data.demo import copy_offline_tokenizer, write_demo_corpus
from seqlm.evaluation.provenance import provenance
from seqlm.paths import REPO
from seqlm.training.memory import logged_plan

LOSS_TOLERANCE = 0.02  # largest relative difference from the tutorial's loss, at any step, that still "matches"


@dataclass
class Variant:
    name: str
    flags: list[str]
    needs: str | None = None  # a module that must be importable, or "cuda"
    alternative: bool = False  # measured on top of the ladder so far, without joining it


def ladder(micro_batch: int, accumulation: int, zero0_config: Path) -> list[Variant]:
    bigger = micro_batch * accumulation  # the whole global batch in one micro-step: same data, same step
    return [
        # transformers 4's defaults, which the tutorial ran with: unfused AdamW, sdpa attention, checkpointing on
        Variant("tutorial", ["--optim", "adamw_torch", "--attn_implementation", "sdpa",
                             "--activation_checkpointing", "true"]),
        Variant("fused AdamW", ["--optim", "adamw_torch_fused"]),
        Variant("flash-attention 2", ["--attn_implementation", "flash_attention_2"], needs="flash_attn"),
        Variant("Liger kernels", ["--use_liger_kernel", "true"], needs="liger_kernel"),
        Variant("no activation checkpointing", ["--activation_checkpointing", "false"]),
        Variant(f"micro-batch {bigger}", ["--per_device_train_batch_size", str(bigger),
                                          "--gradient_accumulation_steps", "1"]),
        Variant("ZeRO stage 0", ["--deepspeed", str(zero0_config)]),
        Variant("plain DDP, no DeepSpeed", ["--deepspeed", ""], alternative=True),
        Variant("torch.compile", ["--torch_compile", "true"], needs="cuda", alternative=True),
    ]


def available(needs: str | None, cuda: bool) -> bool:
    if needs == "cuda":
        return cuda
    return needs is None or (cuda and importlib.util.find_spec(needs) is not None)


def run(variant: Variant, flags: list[str], args) -> dict:
    folder = args.workdir / "run"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run each time, never a resume
    command = [sys.executable, "-m", "seqlm.training.launch", "pretrain.py", "--deepspeed", str(REPO / "ds_config_zero2.json"),
               "--config_name", args.preset, "--tokenizer_name", str(args.tokenizer),
               "--train_files", str(args.train_file), "--token_cache_dir", str(args.workdir / "token_cache"),
               "--output_dir", str(folder), "--block_size", str(args.block_size),
               "--per_device_train_batch_size", str(args.micro_batch),
               "--gradient_accumulation_steps", str(args.accumulation), "--max_steps", str(args.steps),
               "--warmup_steps", str(args.steps // 4), "--learning_rate", "3e-4", "--logging_steps", "1",
               "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--sample_steps", "0",
               "--disable_tqdm", "true", "--seed", "42", *flags]
    env = {**os.environ, "MASTER_PORT": str(args.master_port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the launcher of this Python
    start = time.perf_counter()
    with open(args.out / "train.log", "a+b") as log:
        log.write(f"\n===== {variant.name}: {' '.join(command)}\n".encode())
        log.flush()
        offset = log.tell()
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        log.seek(offset)
        plan = logged_plan(log.read().decode(errors="replace"))  # pretrain.py logs it on a GPU
    if code != 0:
        return dict(error=f"exit code {code} (train.log)")
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    shutil.rmtree(folder)
    steps = [h for h in history if "loss" in h]
    timed = steps[args.skip:] or steps  # the first steps warm up kernels, the allocator, compilation
    return dict(seconds=round(time.perf_counter() - start, 1), losses=[h["loss"] for h in steps],
                tokens_per_second=statistics.median(h["tokens_per_second"] for h in timed if "tokens_per_second" in h),
                mfu=statistics.median(h["mfu"] for h in timed) if all("mfu" in h for h in timed) else None,
                data_wait_percent=statistics.median(h.get("data_wait_percent", 0) for h in timed),
                peak_memory_gb=max(h.get("peak_memory_gb", 0) for h in steps), planned_memory_gb=plan)


def loss_gap(losses: list[float], reference: list[float]) -> float:
    """The largest relative difference between two loss curves, step by step."""
    return max(abs(a - b) / b for a, b in zip(losses, reference, strict=True))


def table(results: list[tuple[Variant, dict]]) -> str:
    baseline = results[0][1]
    rows = ["| variant | tokens/s | vs tutorial | MFU | peak memory GB | planned GB: tensors, total | data wait % | "
            "loss gap | loss matches |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for variant, r in results:
        name = variant.name + (" (alternative)" if variant.alternative else "")
        if "error" in r or "skipped" in r:
            rows.append(f"| {name} | {r.get('error') or r['skipped']} | | | | | | | |")
            continue
        gap = loss_gap(r["losses"], baseline["losses"])
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else ""
        plan = "{:.1f}, {:.1f}".format(*r["planned_memory_gb"]) if r["planned_memory_gb"] else ""
        rows.append(f"| {name} | {r['tokens_per_second']:,.0f} | "
                    f"{r['tokens_per_second'] / baseline['tokens_per_second']:.2f}× | {mfu} | "
                    f"{r['peak_memory_gb']:.1f} | {plan} | {r['data_wait_percent']:.1f} | {gap:.2%} | "
                    f"{'yes' if gap <= LOSS_TOLERANCE else 'NO'} |")
    return "\n".join(rows)


def save(results: list[tuple], header: str, rendered: str, out: Path) -> str:
    """Write the results so far (each (variant, result), and their table rendered): a bench cut short keeps the runs
    it finished."""
    text = f"{header}\n\n{rendered}\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps([dict(r, variant=v.name) for v, r in results], indent=1))
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny preset, block 64, 8 steps: runs on CPU in minutes")
    p.add_argument("--out", type=Path, default=REPO / "output" / "bench-train", help="results and train.log")
    p.add_argument("--workdir", type=Path, default=REPO / "output" / "bench-train-work")
    p.add_argument("--train_file", type=Path, default=REPO / "data" / "demo" / "corpus.jsonl")
    p.add_argument("--tokenizer", type=Path, default=REPO / "data" / "demo" / "tokenizer")
    p.add_argument("--variants", help="comma-separated names to run (default: all); the tutorial always runs")
    p.add_argument("--steps", type=int, help="optimizer steps per variant (default: 30; smoke 8)")
    p.add_argument("--master_port", type=int, default=29511)
    args = p.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    args.preset, args.block_size, args.micro_batch, args.accumulation = \
        ("tiny", 64, 2, 4) if args.smoke else ("qwen2.5-0.5b", 2048, 4, 4)
    args.steps = args.steps or (8 if args.smoke else 30)
    args.skip = args.steps // 3
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for name in ("train.log", "results.md", "results.json"):
        (args.out / name).unlink(missing_ok=True)
    if not args.train_file.is_file():
        write_demo_corpus(args.train_file)
    if not args.tokenizer.is_dir():
        copy_offline_tokenizer(args.tokenizer)
    zero0 = args.workdir / "ds_config_zero0.json"
    config = json.loads((REPO / "ds_config_zero2.json").read_text())
    zero0.write_text(json.dumps({**config, "zero_optimization": {"stage": 0}}, indent=2))

    header = (f"{provenance()}\n{args.preset}, block {args.block_size}, global batch "
              f"{args.micro_batch * args.accumulation} sequences, {args.steps} steps (timing: the last "
              f"{args.steps - args.skip})")
    wanted = set(args.variants.split(",")) if args.variants else None
    flags: list[str] = []
    results = []
    for i, variant in enumerate(ladder(args.micro_batch, args.accumulation, zero0)):
        if i and wanted is not None and variant.name not in wanted:
            continue
        if not available(variant.needs, cuda):
            needs = "a GPU" if variant.needs == "cuda" else variant.needs + ("" if cuda else " and a GPU")
            results.append((variant, dict(skipped=f"skipped: needs {needs}")))
            continue
        result = run(variant, flags + variant.flags, args)
        print(f"{variant.name}: {result.get('error') or str(result['tokens_per_second']) + ' tokens/s'}",
              file=sys.stderr, flush=True)
        results.append((variant, result))
        save(results, header, table(results), args.out)
        if "error" in result and i == 0:
            break
        if not variant.alternative and "error" not in result:
            flags += variant.flags

    print(save(results, header, table(results), args.out))
    return 1 if any("error" in r for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
