"""The run report: report.md in a training output dir, readable on its own (no swanlab needed), with PNG plots in
plots/ beside it, from what the run wrote (seqlm.outputs): the Trainer's state and final metrics, the samples, and
run_info.json, which RunRecordCallback writes at the start of training.
`python report.py OUTPUT_DIR` writes it again at any time, even for a run that is still going or was cut short."""
from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from transformers import AutoConfig, TrainerCallback

from seqlm import outputs
from seqlm.evaluation.provenance import git_commit, hardware, library_versions
from seqlm.fileio import atomic_output
from seqlm.model import parameter_count

# ---------------------------------------------------------------- recording, during training


class RunRecordCallback(TrainerCallback):
    """Keeps what the report needs and the Trainer does not, in run_info.json at the start of training: what the run
    trains (outputs.PRETRAINING or FINE_TUNING), every argument, the command, the git commit, the library versions
    and the hardware of the machine that trains (whichever one writes the report later), and which part of the
    held-out set is evaluated."""

    def __init__(self, kind: str, argument_groups: tuple, held_out: str | None = None):
        self.kind, self.argument_groups, self.held_out = kind, argument_groups, held_out

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            arguments = {k: v for group in self.argument_groups for k, v in asdict(group).items()}
            arguments.update(json.loads(args.to_json_string()))  # tokens masked, enums as strings
            info = dict(kind=self.kind, started=datetime.datetime.now().isoformat(timespec="seconds"),
                        command=shlex.join(sys.argv), git_commit=git_commit(), versions=library_versions(),
                        hardware=hardware(args.world_size), held_out=self.held_out, arguments=arguments)
            with atomic_output(Path(args.output_dir) / outputs.RUN_INFO_FILE) as tmp:
                tmp.write_text(json.dumps(info, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- reading a run


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


def logged_throughput(history: list[dict]) -> float | None:
    """Tokens/s over all the logged intervals together (what the throughput plot shows, averaged by time): each
    interval's tokens are the growth of num_input_tokens_seen, its seconds those tokens / its tokens_per_second."""
    tokens = seconds = 0.0
    previous = None
    for h in history:
        if "num_input_tokens_seen" not in h:
            continue
        seen = h["num_input_tokens_seen"]
        if previous is not None and h.get("tokens_per_second") and seen > previous:
            tokens += seen - previous
            seconds += (seen - previous) / h["tokens_per_second"]
        previous = seen
    return tokens / seconds if seconds else None


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


def summary_rows(state: dict, results: dict, config, info: dict | None) -> list[tuple[str, str]]:
    history = state["log_history"]
    fine_tuning = info is not None and info.get("kind") == outputs.FINE_TUNING
    tokens, seconds = state.get("num_input_tokens_seen") or 0, wall_seconds(history)
    params = parameter_count(config)
    embedding = config.vocab_size * config.hidden_size
    interval, per_device, mfu = (last(history, k) for k in ("tokens_per_second", "tokens_per_second_per_device", "mfu"))
    average = logged_throughput(history)
    final_eval = results if "eval_loss" in results else next((h for h in reversed(history) if "eval_loss" in h), {})
    rows = [
        ("model", f"{config.model_type}: {params:,} parameters ({embedding:,} in the embedding), "
                  f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size:,}"),
        ("steps", f"{state['global_step']:,} of {state.get('max_steps', 0):,} ({number(state.get('epoch'))} epochs)"),
        ("tokens seen" + (" (padding excluded)" if fine_tuning else ""), f"{tokens:,}"),
        ("wall time (training, with evaluation, samples and saves)", duration(seconds) if seconds else "—"),
    ]
    if average is not None:
        rows.append(("throughput", f"{average:,.0f} tokens/s over the logged intervals (the throughput plot; "
                                   "evaluation excluded)"))
    if interval is not None:
        rows.append(("throughput, last interval", f"{interval:,} tokens/s ({per_device:,} per device)"))
    rows.append(("MFU, last interval", "— (not logged: needs a GPU of known peak)" if mfu is None else f"{mfu:.1%}"))
    rows.append(("training loss (last logged)", number(last(history, "loss"))))
    if final_eval:
        loss = final_eval["eval_loss"]
        what = "held-out loss on the answers" if fine_tuning else "held-out loss"
        rows.append((what, f"{loss:.3f}, perplexity {math.exp(min(loss, 50)):,.1f}"))
        if "eval_bits_per_char" in final_eval:
            rows.append(("held-out bits per character", number(final_eval["eval_bits_per_char"])))
            rows.append(("held-out bits per UTF-8 byte", number(final_eval["eval_bits_per_byte"])))
        if info is not None and info.get("held_out"):
            rows.append(("held-out text evaluated", info["held_out"]))
    return rows


def plots_section(output_dir: Path, history: list[dict]) -> list[str]:
    charts = [
        ("loss", "Loss", "nats per token", {"training": series(history, "loss"),
                                            "held-out": series(history, "eval_loss")}),
        # Two charts, not one: about 7 bits per character and 2.5 per byte would flatten each other on one axis.
        ("bits_per_char", "Held-out bits per character", "bits per character",
         {"held-out": series(history, "eval_bits_per_char")}),
        ("bits_per_byte", "Held-out bits per UTF-8 byte", "bits per byte",
         {"held-out": series(history, "eval_bits_per_byte")}),
        ("learning_rate", "Learning rate", "learning rate", {"learning rate": series(history, "learning_rate")}),
        ("throughput", "Training throughput, each logged interval", "tokens/s",
         {"all devices": series(history, "tokens_per_second")}),
    ]
    lines = []
    for name, title, ylabel, curves in charts:
        if plot(output_dir / outputs.PLOTS_DIR / f"{name}.png", title, ylabel, curves):
            lines += [f"![{title}]({outputs.PLOTS_DIR}/{name}.png)", ""]
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
            if plot(output_dir / outputs.PLOTS_DIR / f"{name}.png", title, ylabel, curves):
                lines += [f"![{title}]({outputs.PLOTS_DIR}/{name}.png)", ""]
    return lines


def samples_section(samples: list[dict], fine_tuning: bool) -> list[str]:
    if not samples:
        return ["No samples recorded (`--sample_steps 0`, or a run without the samples callback).", ""]
    latest = samples[-1]
    what = "answer to each prompt (a user turn)" if fine_tuning else "continuation of each prompt"
    lines = [f"At step {latest['step']:,}, the greedy and the sampled (fixed seed) {what}:", "", "```text"]
    for s in latest["samples"]:
        lines += [s["prompt"], f"  greedy:  {one_line(s['greedy'])}", f"  sampled: {one_line(s['sampled'])}"]
    lines += ["```", "", f"The greedy {'answer' if fine_tuning else 'continuation'} of the first prompt over the run:",
              "", f"| step | {one_line(latest['samples'][0]['prompt'])}… |", "|---:|---|"]
    lines += [f"| {r['step']:,} | {one_line(r['samples'][0]['greedy'])} |" for r in samples]
    return lines + [""]


def configuration_section(info: dict | None) -> list[str]:
    if info is None:
        return [f"Not recorded: {outputs.RUN_INFO_FILE} is missing (a run without RunRecordCallback).", ""]
    return [f"Command: `{info['command']}` (started {info['started']})", "", "<details><summary>All arguments"
            "</summary>", "", "```json", json.dumps(info["arguments"], indent=1, ensure_ascii=False), "```", "",
            "</details>", ""]


def environment_section(info: dict | None) -> list[str]:
    if info is None:
        info = dict(git_commit=git_commit(), versions=library_versions(), hardware=hardware(1))
        note = [f"{outputs.RUN_INFO_FILE} is missing: this is the machine that wrote the report, not necessarily the "
                "one that trained.", ""]
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
    source, state = outputs.newest_state(output_dir)
    # The final metrics belong to the output dir's own state; a further-along checkpoint is a newer, unfinished run.
    results = outputs.final_results(output_dir) if source == output_dir else {}
    info = outputs.run_info(output_dir)
    fine_tuning = info is not None and info.get("kind") == outputs.FINE_TUNING
    config = AutoConfig.from_pretrained(source)
    title = f"Run report ({info['kind']})" if info and info.get("kind") else "Run report"
    lines = [f"# {title}: {output_dir}", "",
             f"Written {datetime.datetime.now():%Y-%m-%d %H:%M} from `{source / outputs.TRAINER_STATE_FILE}`; "
             f"`python report.py {output_dir}` writes it again.", "",
             "## Summary", "", *table(summary_rows(state, results, config, info)),
             "## Curves", "", *plots_section(output_dir, state["log_history"]),
             *benchmarks_section(output_dir, state["log_history"]),
             "## Samples", "", *samples_section(outputs.read_samples(output_dir), fine_tuning),
             "## Configuration", "", *configuration_section(info),
             "## Environment", "", *environment_section(info)]
    path = output_dir / outputs.REPORT_FILE
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return path
