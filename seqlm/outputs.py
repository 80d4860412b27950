"""What a training run writes in its output dir, under which name, and how to read it back. Every other module asks
this one for a file's name or content; none spells a file name of its own.

    OUTPUT_DIR/
      config.json, model.safetensors, tokenizer files   the final model (the Trainer's save_model)
      trainer_state.json, all_results.json               the Trainer's log history and final metrics
      run_settings.json    the settings of the newest checkpoint, which a rerun must match to resume (seqlm.training.settings)
      run_info.json        every argument, the command, git commit, libraries, hardware, the held-out set evaluated
      swanlab_run.json     the swanlab run id, so a rerun continues the same run (seqlm.evaluation.tracking)
      samples.jsonl        one record per sampling step (seqlm.training.samples)
      report.md, plots/    the run report (seqlm.evaluation.report)
      checkpoint-N/        DeepSpeed + HF checkpoints and their run_settings.json; complete.json once every rank
                           wrote all of it (seqlm.training.checkpoints)
      universal/checkpoint-N/   a checkpoint converted for another number of ranks (seqlm.training.universal)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers.trainer_utils import sort_checkpoints

RUN_SETTINGS_FILE = "run_settings.json"
RUN_INFO_FILE = "run_info.json"
SWANLAB_RUN_FILE = "swanlab_run.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
COMPLETE_MARKER = "complete.json"
TRAINER_STATE_FILE = "trainer_state.json"
RESULTS_FILE = "all_results.json"
EVAL_RESULTS_FILE = "eval_results.json"
UNIVERSAL_DIR = "universal"

# run_info.json "kind": what the run trained
PRETRAINING, FINE_TUNING = "pretraining", "fine-tuning"


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON file's content, or None if there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_info(output_dir: str | os.PathLike) -> dict | None:
    return read_json(Path(output_dir) / RUN_INFO_FILE)


def read_run_settings(folder: str | os.PathLike) -> dict | None:
    """The settings a checkpoint-N folder was written with; those of the newest checkpoint for an output dir. A
    checkpoint of an older version has none of its own: the output dir's are its run's."""
    folder = Path(folder)
    return read_json(folder / RUN_SETTINGS_FILE) or (read_json(folder.parent / RUN_SETTINGS_FILE)
                                                    if folder.name.startswith("checkpoint-") else None)


def swanlab_run(output_dir: str | os.PathLike) -> dict | None:
    return read_json(Path(output_dir) / SWANLAB_RUN_FILE)


def read_samples(output_dir: str | os.PathLike) -> list[dict]:
    """The records of an output dir's samples.jsonl, oldest first. Split on "\\n" only, as file iteration does: a
    generated text may hold other line breaks (U+2028, ...) that json.dumps leaves unescaped."""
    path = Path(output_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def trained_block_size(model_path: str | os.PathLike) -> int | None:
    """The block size of the pretraining run that wrote this model folder (its output dir, or one of its
    checkpoint-N), if recorded."""
    for folder in (Path(model_path), Path(model_path).parent):
        info = run_info(folder)
        if info is not None:
            return info["arguments"].get("block_size")
    return None


def newest_state(output_dir: str | os.PathLike) -> tuple[Path, dict]:
    """The folder whose trainer_state.json is furthest along (ties: the output dir, which holds the final summary),
    and that state. FileNotFoundError if there is none."""
    output_dir = Path(output_dir)
    folders = [output_dir, *map(Path, reversed(sort_checkpoints(str(output_dir))))]
    states = [(folder, read_json(folder / TRAINER_STATE_FILE)) for folder in folders]
    states = [(folder, state) for folder, state in states if state is not None]
    if not states:
        raise FileNotFoundError(f"{output_dir}: no {TRAINER_STATE_FILE} in it or in a checkpoint-N folder: not the "
                                "output dir of a training run")
    return max(states, key=lambda fs: fs[1]["global_step"])


def final_results(output_dir: str | os.PathLike) -> dict:
    return read_json(Path(output_dir) / RESULTS_FILE) or {}
