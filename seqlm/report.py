"""The run report: report.md in a training output dir, readable on its own (no swanlab needed), with PNG plots in
plots/ beside it. What it reads, all written by the run:
    trainer_state.json   the log history (the output dir's, or its newest checkpoint's if that is further along)
    all_results.json     the final training and evaluation metrics (save_metrics)
    samples.jsonl        what SamplesCallback wrote
    run_info.json        what RunRecordCallback wrote: all arguments, the command, git commit, libraries, hardware
    config.json          the architecture
`python report.py OUTPUT_DIR` writes it again at any time, even for a run that is still going or was cut short."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoConfig, TrainerCallback
from transformers.trainer_utils import sort_checkpoints

from .fileio import atomic_output
from .preflight import parameter_count
from .samples import read_samples

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
RUN_INFO_FILE = "run_info.json"
LIBRARIES = ("torch", "transformers", "accelerate", "deepspeed", "tokenizers", "swanlab", "numpy")
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- recording, during training


class RunRecordCallback(TrainerCallback):
    """Keeps what the report needs and the Trainer does not: in run_info.json, at the start of training, every
    argument, the command, the git commit, the library versions and the hardware: of the machine that trains,
    whichever one writes the report later."""

    def __init__(self, *argument_groups):
        self.argument_groups = argument_groups  # the dataclasses parsed besides TrainingArguments

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            arguments = {type(g).__name__: asdict(g) for g in self.argument_groups}
            arguments["TrainingArguments"] = json.loads(args.to_json_string())  # tokens masked, enums as strings
            info = dict(started=datetime.datetime.now().isoformat(timespec="seconds"), command=shlex.join(sys.argv),
                        git_commit=git_commit(), versions=library_versions(),
                        hardware=hardware(args.world_size), arguments=arguments)
            with atomic_output(Path(args.output_dir) / RUN_INFO_FILE) as tmp:
                tmp.write_text(json.dumps(info, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def git_commit() -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (e.g. an unpacked release)
        return None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> str:
    """One line for a benchmark's output: the hardware, the date and the exact code."""
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu_name()} ({os.cpu_count()} cores); {datetime.date.today()}; "
            f"commit {git_commit() or 'unknown'}")


def hardware(world_size: int) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return dict(cpu=cpu_name(), cpu_cores=os.cpu_count(), gpus=gpus, processes=world_size,
                platform=platform.platform())


# ---------------------------------------------------------------- reading a run


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def newest_state(output_dir: Path) -> tuple[Path, dict]:
    """The folder whose trainer_state.json is furthest along (ties: the output dir, which holds the final summary),
    and that state."""
    states = [(folder, _read_json(folder / "trainer_state.json"))
              for folder in [output_dir, *map(Path, reversed(sort_checkpoints(str(output_dir))))]]
    states = [(folder, state) for folder, state in states if state is not None]
    if not states:
        raise FileNotFoundError(f"{output_dir}: no trainer_state.json in it or in a checkpoint-N folder: not the "
                                "output dir of a training run")
    return max(states, key=lambda fs: fs[1]["global_step"])


def trained_block_size(model_path: str | os.PathLike) -> int | None:
    """The block size of the run that wrote this checkpoint (run_info.json of the output dir), if recorded."""
    for folder in (Path(model_path), Path(model_path).parent):  # the output dir, or one of its checkpoint-N
        if (info := _read_json(folder / RUN_INFO_FILE)) is not None:
            return info["arguments"].get("DataTrainingArguments", {}).get("block_size")
    return None


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h]
    return [s for s, _ in points], [v for _, v in points]


def last(history: list[dict], key: str):
    return next((h[key] for h in reversed(history) if key in h), None)


def wall_seconds(history: list[dict]) -> float:
    """Training time over all sessions: train_runtime grows within a session and starts again on a resume."""
    total, previous = 0.0, 0.0
    for runtime in (h["train_runtime"] for h in history if "train_runtime" in h):
        if runtime < previous:
            total += previous
        previous = runtime
    return total + previous


# ---------------------------------------------------------------- writing the report


def plot(path: Path, title: str, ylabel: str, curves: dict[str, tuple[list, list]]) -> bool:
    """A PNG of the curves that have points; False (nothing written) when none has."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no GUI backend, no global state; imported only when needed
    )

    curves = {label: xy for label, xy in curves.items() if xy[0]}
    if not curves:
        return False
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, marker="o" if len(x) <= 30 else None, markersize=3)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True


def number(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def duration(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m} min" if h else f"{m} min {s} s" if m else f"{s} s"


def one_line(text: str) -> str:
    """A sample in a table cell: on one line (whatever its line breaks), without the cell separator."""
    return "⏎".join(text.splitlines()).replace("|", "\\|")


def summary_rows(state: dict, results: dict, config) -> list[tuple[str, str]]:
    history = state["log_history"]
    tokens, seconds = state.get("num_input_tokens_seen") or 0, wall_seconds(history)
    params = parameter_count(config)
    embedding = config.vocab_size * config.hidden_size
    interval, per_device, mfu = (last(history, k) for k in ("tokens_per_second", "tokens_per_second_per_device", "mfu"))
    final_eval = results if "eval_loss" in results else next((h for h in reversed(history) if "eval_loss" in h), {})
    rows = [
        ("model", f"{config.model_type}: {params:,} parameters ({embedding:,} in the embedding), "
                  f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size:,}"),
        ("steps", f"{state['global_step']:,} of {state.get('max_steps', 0):,} ({number(state.get('epoch'))} epochs)"),
        ("tokens seen", f"{tokens:,}"),
        ("wall time (training)", duration(seconds) if seconds else "—"),
        ("throughput", f"{tokens / seconds:,.0f} tokens/s on average" if seconds else "—"),
    ]
    if interval is not None:
        rows.append(("throughput, last interval", f"{interval:,} tokens/s ({per_device:,} per device)"))
    rows.append(("MFU, last interval", "— (not logged: needs a GPU of known peak)" if mfu is None else f"{mfu:.1%}"))
    rows.append(("training loss (last logged)", number(last(history, "loss"))))
    if final_eval:
        loss = final_eval["eval_loss"]
        rows.append(("held-out loss", f"{loss:.3f}, perplexity {math.exp(min(loss, 50)):,.1f}"))
        rows.append(("held-out bits per character", number(final_eval.get("eval_bits_per_char"))))
        rows.append(("held-out bits per UTF-8 byte", number(final_eval.get("eval_bits_per_byte"))))
    return rows


def plots_section(output_dir: Path, history: list[dict]) -> list[str]:
    charts = [
        ("loss", "Loss", "nats per token", {"training": series(history, "loss"),
                                            "held-out": series(history, "eval_loss")}),
        ("bits_per_char", "Held-out bits per character and per byte", "bits",
         {"per character": series(history, "eval_bits_per_char"),
          "per UTF-8 byte": series(history, "eval_bits_per_byte")}),
        ("learning_rate", "Learning rate", "learning rate", {"learning rate": series(history, "learning_rate")}),
        ("throughput", "Training throughput", "tokens/s",
         {"last interval": series(history, "tokens_per_second"),
          "session average": series(history, "train_tokens_per_second")}),
    ]
    lines = []
    for name, title, ylabel, curves in charts:
        if plot(output_dir / PLOTS_DIR / f"{name}.png", title, ylabel, curves):
            lines += [f"![{title}]({PLOTS_DIR}/{name}.png)", ""]
    return lines or ["No curve: the run logged nothing yet.", ""]


def benchmarks_section(output_dir: Path, history: list[dict]) -> list[str]:
    """The standard benchmarks scored during training (BenchmarkCallback): a table, and a plot once there are
    several points. Nothing for a run without them."""
    points = [h for h in history if any(k.startswith("bench_") for k in h)]
    if not points:
        return []
    columns = sorted({k for h in points for k in h if k.startswith("bench_")})
    lines = ["## Benchmarks", "", "Scored by lm-evaluation-harness (`--benchmark_suite`); centered accuracy is "
             "(accuracy − chance) / (1 − chance): 0 is guessing.", "",
             "| step | " + " | ".join(k.removeprefix("bench_") for k in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    lines += [f"| {h['step']:,} | " + " | ".join(number(h.get(k), 4) for k in columns) + " |" for h in points]
    lines.append("")
    if len(points) > 1:
        centered = {k.removeprefix("bench_").removesuffix("_centered"): series(history, k)
                    for k in columns if k.endswith("_centered")}
        bits = {k.removeprefix("bench_"): series(history, k) for k in columns if k.endswith("_bits_per_byte")}
        for name, title, ylabel, curves in [("benchmarks", "Centered accuracy (0 = chance)", "centered accuracy",
                                             centered),
                                            ("benchmark_bits_per_byte", "Held-out bits per byte (lm-eval)", "bits",
                                             bits)]:
            if plot(output_dir / PLOTS_DIR / f"{name}.png", title, ylabel, curves):
                lines += [f"![{title}]({PLOTS_DIR}/{name}.png)", ""]
    return lines


def samples_section(samples: list[dict]) -> list[str]:
    if not samples:
        return ["No samples recorded (`--sample_steps 0`, or a run without the samples callback).", ""]
    latest = samples[-1]
    lines = [f"At step {latest['step']:,}, the greedy and the sampled (fixed seed) continuation of each prompt:", "",
             "```text"]
    for s in latest["samples"]:
        lines += [s["prompt"], f"  greedy:  {one_line(s['greedy'])}", f"  sampled: {one_line(s['sampled'])}"]
    lines += ["```", "", "The greedy continuation of the first prompt over the run:", "",
              f"| step | {one_line(latest['samples'][0]['prompt'])}… |", "|---:|---|"]
    lines += [f"| {r['step']:,} | {one_line(r['samples'][0]['greedy'])} |" for r in samples]
    return lines + [""]


def configuration_section(info: dict | None) -> list[str]:
    if info is None:
        return [f"Not recorded: {RUN_INFO_FILE} is missing (a run without RunRecordCallback).", ""]
    return [f"Command: `{info['command']}` (started {info['started']})", "", "<details><summary>All arguments"
            "</summary>", "", "```json", json.dumps(info["arguments"], indent=1, ensure_ascii=False), "```", "",
            "</details>", ""]


def environment_section(info: dict | None) -> list[str]:
    if info is None:
        info = dict(git_commit=git_commit(), versions=library_versions(), hardware=hardware(1))
        note = [f"{RUN_INFO_FILE} is missing: this is the machine that wrote the report, not necessarily the one "
                "that trained.", ""]
    else:
        note = []
    hw = info["hardware"]
    rows = [("git commit", info["git_commit"] or "unknown (not a git checkout)"),
            ("libraries", ", ".join(f"{k} {v}" for k, v in info["versions"].items())),
            ("CPU", f"{hw['cpu']}, {hw['cpu_cores']} cores"),
            ("GPUs", ", ".join(hw["gpus"]) or "none"),
            ("processes", str(hw["processes"])), ("platform", hw["platform"])]
    return note + table(rows)


def table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def write_report(output_dir: str | os.PathLike) -> Path:
    """Write OUTPUT_DIR/report.md and its plots; returns the report's path. FileNotFoundError if OUTPUT_DIR holds no
    trainer state."""
    output_dir = Path(output_dir)
    source, state = newest_state(output_dir)
    # The final metrics belong to the output dir's own state; a further-along checkpoint is a newer, unfinished run.
    results = (_read_json(output_dir / "all_results.json") or {}) if source == output_dir else {}
    info = _read_json(output_dir / RUN_INFO_FILE)
    config = AutoConfig.from_pretrained(source)
    lines = [f"# Run report: {output_dir}", "",
             f"Written {datetime.datetime.now():%Y-%m-%d %H:%M} from `{source / 'trainer_state.json'}`; "
             f"`python report.py {output_dir}` writes it again.", "",
             "## Summary", "", *table(summary_rows(state, results, config)),
             "## Curves", "", *plots_section(output_dir, state["log_history"]),
             *benchmarks_section(output_dir, state["log_history"]),
             "## Samples", "", *samples_section(read_samples(output_dir)),
             "## Configuration", "", *configuration_section(info),
             "## Environment", "", *environment_section(info)]
    path = output_dir / REPORT_FILE
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path
