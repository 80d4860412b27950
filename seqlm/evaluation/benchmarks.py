"""Standard benchmarks, scored by EleutherAI's lm-evaluation-harness (lm-eval 0.4): which tasks make a suite, where
their data lie on disk, and how a run's scores are reported. lm-eval does all the scoring; this module chooses the
tasks, points them at local files so that a run needs no network, and sets each accuracy against chance:

    centered accuracy = (acc − chance) / (1 − chance)      0 = guessing, 1 = always right

and the suite's average of those, as nanochat's CORE does. A model of 0.5B parameters trained on ≈ 0.5B Chinese
tokens is near chance on C-Eval and CMMLU; the cloze tasks (story endings, causes and effects, pronouns, HellaSwag)
and the held-out bits per byte move earlier.

Task data come once from the hub (download_dataset.py --eval, seqlm.data.download.fetch_benchmark_data) into
data/eval/<repo>/: for the built-in tasks, the hub's Parquet export of each dataset (the branch refs/convert/parquet),
which `datasets` 5 reads whether or not the dataset itself still needs a loading script (those no longer load).
At run time each task is lm-eval's own YAML, included unchanged, with only its dataset path replaced by those files.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from seqlm.fileio import atomic_output

PARQUET_REVISION = "refs/convert/parquet"  # the hub's Parquet export of every public dataset
HELLASWAG_ZH_FILE = "data/zh/val.jsonl"  # in alexandrainst/m_hellaswag (main branch: its zh split has no export)
HELDOUT = "heldout_bpb"
BENCHMARKS_FILE = "benchmarks.json"  # a run's scores, in its output folder
CROSS_CHECK_TOLERANCE = 0.02  # a larger gap between lm-eval's bits per byte and ours gets explained in the report


class BenchmarkError(ValueError):
    """Bad input for a benchmark run (unknown task, missing data or checkpoint); the message is one line."""


@dataclass(frozen=True)
class Benchmark:
    name: str  # the lm-eval task or group it runs, and its key in logs and tables
    metric: str  # the lm-eval metric quoted
    chance: float | None  # accuracy of a uniform guess among the choices; None: not an accuracy
    choices: int | None = None
    repo: str | None = None  # hub dataset repo of its data
    builtin: str | None = None  # lm-eval's task (or group) YAML, relative to lm_eval/tasks
    config: str | None = None  # the repo's subset a single task reads (groups: each member's dataset_name)
    chat: bool = False  # a question put to the model: a fine-tuned checkpoint gets it through its chat template
    group: bool = False  # an lm-eval group: one task per subject, averaged by lm-eval (weighted by size)
    revision: str = PARQUET_REVISION  # the branch of `repo` to download
    data_file: str | None = None  # the one file to download from it (default: the Parquet export of `config`)

    @property
    def data_patterns(self) -> list[str]:
        """What download_dataset.py --eval fetches of `repo`, as glob patterns inside its folder."""
        return [self.data_file or f"{self.config or '*'}/*/*.parquet"]


BENCHMARKS = {b.name: b for b in [
    Benchmark(HELDOUT, "bits_per_byte", None),
    Benchmark("xstorycloze_zh", "acc", 1 / 2, 2, "juletxara/xstory_cloze", "xstorycloze/default_zh.yaml", "zh"),
    Benchmark("xcopa_zh", "acc", 1 / 2, 2, "cambridgeltl/xcopa", "xcopa/default_zh.yaml", "zh"),
    Benchmark("xwinograd_zh", "acc", 1 / 2, 2, "Muennighoff/xwinograd", "xwinograd/xwinograd_zh.yaml", "zh"),
    # lm-eval 0.4.13 has no Chinese HellaSwag: its okapi tasks skip zh because one document of the file holds four
    # endings as {"zh": ..., "en": ...} objects, which pyarrow refuses. We repair those and run okapi's own YAML.
    # acc_norm (length-normalised) is the HellaSwag number usually quoted.
    Benchmark("hellaswag_zh", "acc_norm", 1 / 4, 4, "alexandrainst/m_hellaswag",
              "okapi/hellaswag_multilingual/_hellaswag_yaml", revision="main", data_file=HELLASWAG_ZH_FILE),
    Benchmark("ceval-valid", "acc", 1 / 4, 4, "ceval/ceval-exam", "ceval/_ceval-valid.yaml", chat=True, group=True),
    Benchmark("cmmlu", "acc", 1 / 4, 4, "haonan-li/cmmlu", "cmmlu/_cmmlu.yaml", chat=True, group=True),
]}
SUITES = {
    "default": list(BENCHMARKS),
    "cloze": [HELDOUT, "xstorycloze_zh", "xcopa_zh", "xwinograd_zh", "hellaswag_zh"],  # tasks that move early
    "local": [HELDOUT],  # needs no download: the held-out corpus only
}


def resolve(spec: str) -> list[Benchmark]:
    """A suite name or a comma-separated list of benchmark names."""
    names = SUITES.get(spec) or [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise BenchmarkError(f"unknown benchmark {', '.join(unknown) or repr(spec)}: choose a suite "
                             f"({', '.join(SUITES)}) or names from {', '.join(BENCHMARKS)}")
    return [BENCHMARKS[n] for n in names]


def centered(accuracy: float, chance: float) -> float:
    return (accuracy - chance) / (1 - chance)


# ---------------------------------------------------------------------------------------------------------------------
# Task files: lm-eval's YAML, pointed at local data


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def data_folder(benchmark: Benchmark, data_dir: Path) -> Path:
    return Path(data_dir) / benchmark.repo


def parquet_files(folder: Path, config: str) -> dict[str, list[str]]:
    """The Parquet export's files of one subset by split: <config>/<split>/0000.parquet ... (a split too large to
    convert whole is exported as partial-<split>)."""
    splits: dict[str, list[str]] = {}
    for file in sorted(folder.glob(f"{config}/*/*.parquet")):
        splits.setdefault(file.parent.name.removeprefix("partial-"), []).append(str(file.resolve()))
    return splits


def _missing(benchmark: Benchmark, folder: Path) -> BenchmarkError:
    return BenchmarkError(f"no data for {benchmark.name} in {folder}/: run `python download_dataset.py --eval` "
                          "(or copy data/eval/ from a machine that did)")


def _local_task(builtin: Path, task: str, config: str, folder: Path, benchmark: Benchmark) -> dict:
    files = parquet_files(folder, config)
    if not files:
        raise _missing(benchmark, folder)
    return {"include": str(builtin), "task": task, "dataset_path": "parquet", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}}


def repair_hellaswag(source: Path, dest: Path) -> None:
    """The zh file of m_hellaswag with every ending a string: a few were written as {"zh": ..., "en": ...}."""
    with open(source, encoding="utf-8") as f, open(dest, "w", encoding="utf-8") as out:
        for line in f:
            if line.strip():
                doc = json.loads(line)
                doc["endings"] = [e["zh"] if isinstance(e, dict) else e for e in doc["endings"]]
                out.write(json.dumps(doc, ensure_ascii=False) + "\n")


def write_task_files(benchmarks: list[Benchmark], task_dir: Path, data_dir: Path, heldout_file: Path | None) -> None:
    """lm-eval task YAMLs for these benchmarks in task_dir, each reading local files only."""
    task_dir.mkdir(parents=True, exist_ok=True)
    tasks = lm_eval_tasks_dir()
    # The held-out file last: offline, the task data download_dataset.py --eval fetches is what a first run lacks.
    for b in sorted(benchmarks, key=lambda b: b.name == HELDOUT):
        configs: dict[str, dict] = {}
        if b.name == HELDOUT:
            if heldout_file is None or not Path(heldout_file).is_file():
                raise BenchmarkError(f"{HELDOUT} needs a held-out file of {{\"text\": ...}} lines, not "
                                     f"{heldout_file}: pass --heldout_file (benchmark.py) or "
                                     "--benchmark_heldout_file (training)")
            # Each document scored whole, from the document separator as prefix (see run_suite): bits per UTF-8 byte.
            # No word perplexity: lm-eval splits words at spaces, and Chinese has none.
            configs[HELDOUT] = {
                "task": HELDOUT, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(Path(heldout_file).resolve())}},
                "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in
                                [("byte_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte")]]}
        elif b.name == "hellaswag_zh":
            source = data_folder(b, data_dir) / b.data_file
            if not source.is_file():
                raise _missing(b, data_folder(b, data_dir))
            repaired = task_dir / "hellaswag_zh.jsonl"
            repair_hellaswag(source, repaired)
            configs[b.name] = {"include": str(tasks / b.builtin), "task": b.name, "dataset_path": "json",
                               "dataset_name": None, "validation_split": "validation",
                               "dataset_kwargs": {"data_files": {"validation": str(repaired.resolve())}}}
        elif b.group:
            group = yaml.safe_load((tasks / b.builtin).read_text(encoding="utf-8"))
            configs[b.name] = group  # the group itself (its members and how they are averaged), unchanged
            for member in group["task"]:
                builtin = tasks / Path(b.builtin).parent / f"{member}.yaml"
                subset = yaml.safe_load(builtin.read_text(encoding="utf-8"))["dataset_name"]
                configs[member] = _local_task(builtin, member, subset, data_folder(b, data_dir), b)
        else:
            configs[b.name] = _local_task(tasks / b.builtin, b.name, b.config, data_folder(b, data_dir), b)
        for name, config in configs.items():
            (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                                   encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Running a suite


def run_suite(model, tokenizer, benchmarks: list[Benchmark], task_dir: Path, *, chat: bool, batch_size: int,
              max_length: int, prefix_token_id: int, limit: int | None = None) -> list[dict]:
    """Score a loaded model on these benchmarks (their YAMLs already in task_dir); one row per benchmark.

    chat: ask the questions of the `chat` benchmarks through the tokenizer's chat template (a fine-tuned model).
    prefix_token_id: what every document is predicted after when nothing precedes it: the model's document
    separator (lm-eval would take the tokenizer's eos token, <|im_end|> for Qwen's tokenizer files, which the
    pretrained model never saw before a document).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              prefix_token_id=prefix_token_id)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # only ours: no scan of ~10k YAMLs
    rows = []
    for templated in (False, True):
        chosen = [b for b in benchmarks if (b.chat and chat) == templated]
        if not chosen:
            continue
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[b.name for b in chosen], task_manager=manager, limit=limit,
                                      apply_chat_template=templated, log_samples=False, bootstrap_iters=1000)
        seconds = (time.perf_counter() - start) / len(chosen)  # one call runs them together: its time, shared
        for b in chosen:
            rows.append(_row(b, out, templated, seconds))
    return rows


def _row(b: Benchmark, out: dict, templated: bool, seconds: float) -> dict:
    result = out["results"][b.name]
    members = out.get("group_subtasks", {}).get(b.name, [b.name])
    docs = sum(out["n-samples"][m]["effective"] for m in members if m in out["n-samples"])
    value = result[f"{b.metric},none"]
    stderr = result.get(f"{b.metric}_stderr,none")
    row = dict(name=b.name, metric=b.metric, value=value,
               stderr=stderr if isinstance(stderr, float) and math.isfinite(stderr) else None,
               chance=b.chance, centered=centered(value, b.chance) if b.chance is not None else None,
               documents=docs, chat_template=templated, seconds=round(seconds, 1))
    if b.name == HELDOUT:
        row["byte_perplexity"] = result.get("byte_perplexity,none")
    return row


def average_centered(rows: list[dict]) -> float | None:
    """The suite's score: the mean centered accuracy of its accuracy tasks (CORE's way)."""
    values = [r["centered"] for r in rows if r["centered"] is not None]
    return sum(values) / len(values) if values else None


def log_keys(rows: list[dict]) -> dict[str, float]:
    """The scores as flat log keys, for swanlab, trainer_state.json and the report."""
    logs = {}
    for r in rows:
        logs[f"bench_{r['name']}_{r['metric']}"] = r["value"]
        if r["centered"] is not None:
            logs[f"bench_{r['name']}_centered"] = r["centered"]
    if (average := average_centered(rows)) is not None:
        logs["bench_average_centered"] = average
    return logs


# ---------------------------------------------------------------------------------------------------------------------
# The cross-check and the tables


def cross_check(lm_eval_bpb: float, ours_bpb: float) -> dict:
    """lm-eval's bits per byte on the held-out file beside ours (eval_bits_per_byte), and why they may differ."""
    gap = lm_eval_bpb / ours_bpb - 1
    note = None
    if abs(gap) > CROSS_CHECK_TOLERANCE:
        note = ("they count differently: lm-eval scores each document on its own, from the separator token, and "
                "does not predict the separator; ours packs documents into blocks, so a prediction can see the end "
                "of the previous document, the separator after each document is predicted and counted, and the "
                "first token of each block is not predicted (docs/evaluation.md, Two bits per byte).")
    return dict(lm_eval_bits_per_byte=lm_eval_bpb, eval_bits_per_byte=ours_bpb, relative_gap=gap, note=note)


def markdown(rows: list[dict], check: dict | None = None) -> list[str]:
    lines = ["| benchmark | metric | score | ± | chance | centered | documents | chat template | seconds |",
             "|---|---|---:|---:|---:|---:|---:|:-:|---:|"]
    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    for r in rows:
        lines.append(f"| {r['name']} | {r['metric']} | {r['value']:.4f} | {fmt(r['stderr'])} | {fmt(r['chance'])} | "
                     f"{fmt(r['centered'])} | {r['documents']:,} | {'yes' if r['chat_template'] else 'no'} | "
                     f"{r['seconds']:.1f} |")
    if (average := average_centered(rows)) is not None:
        lines.append(f"| **average centered accuracy** | | | | | **{average:.4f}** | | | |")
    lines.append("")
    if check:
        lines += [f"Held-out bits per byte: lm-eval {check['lm_eval_bits_per_byte']:.4f}, ours (`eval_bits_per_byte`) "
                  f"{check['eval_bits_per_byte']:.4f}, gap {check['relative_gap']:+.1%}."
                  + (f" Over {CROSS_CHECK_TOLERANCE:.0%}: {check['note']}" if check["note"] else ""), ""]
    return lines


def write_results(output_dir: Path, result: dict) -> tuple[Path, Path]:
    """benchmarks.json and benchmarks.md in output_dir."""
    from seqlm.evaluation.provenance import provenance

    json_path, md_path = output_dir / BENCHMARKS_FILE, output_dir / "benchmarks.md"
    md = [f"# Benchmarks: {result['model_path']}", "",
          f"lm-eval {result['lm_eval_version']}, {result['seconds']:.0f} s; {provenance()}", "",
          *markdown(result["rows"], result.get("cross_check"))]
    with atomic_output(md_path) as tmp:
        tmp.write_text("\n".join(md), encoding="utf-8")
    with atomic_output(json_path) as tmp:  # last: a run whose benchmarks.json is there is complete
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return json_path, md_path


