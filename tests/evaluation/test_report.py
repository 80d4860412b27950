"""The run report (seqlm.evaluation.report, report.py): for a tiny run of the real Trainer with every callback of the pipeline,
and for an output dir that holds only a checkpoint (the report at the end of `bash pretrain.sh`: test_pretrain.py)."""
import json
import re
import runpy
import shutil
import sys

import pytest
import torch
from helpers import ENDOFTEXT, PLOTS, REPO, SECTIONS, assert_valid_pngs, write_jsonl
from torch.utils.data import Subset
from transformers import (
    AutoModelForCausalLM,
    TrainingArguments,
    default_data_collator,
)

from seqlm.data.token_cache import BlockDataset, build_token_cache
from seqlm.evaluation.heldout import BitsPerCharCallback, EvaluatedText
from seqlm.evaluation.report import RunRecordCallback, logged_throughput, one_line, wall_seconds, write_report
from seqlm.model import load_config
from seqlm.outputs import PRETRAINING, read_samples
from seqlm.training.arguments import DataTrainingArguments, ModelArguments, SampleArguments
from seqlm.training.samples import SamplesCallback
from seqlm.training.trainer import SafeTrainer


def test_throughput_is_the_logged_intervals_tokens_over_their_seconds():
    history = [{"num_input_tokens_seen": 0, "loss": 9.0},  # the first log of a run has no interval yet
               {"num_input_tokens_seen": 1000, "tokens_per_second": 100, "loss": 8.0},  # 10 s
               {"num_input_tokens_seen": 1000, "eval_loss": 8.5},  # evaluation: no tokens, no interval
               {"num_input_tokens_seen": 4000, "tokens_per_second": 300, "loss": 7.0}]  # 10 s
    assert logged_throughput(history) == 200.0  # 4,000 tokens in 20 s, not the mean of 100 and 300
    assert logged_throughput([{"num_input_tokens_seen": 0, "loss": 9.0}]) is None


def test_wall_time_adds_up_the_sessions_of_a_resumed_run():
    history = [{"train_runtime": 10.0}, {"eval_loss": 1.0}, {"train_runtime": 20.0},  # stopped at a checkpoint
               {"train_runtime": 5.0}, {"train_runtime": 12.5}]  # resumed: the clock starts again
    assert wall_seconds(history) == 32.5


@pytest.fixture(scope="module")
def tiny_run(module_tmp, offline_qwen_tokenizer, peoples_daily_texts):
    """4 steps of the plain Trainer with the callbacks this adds to pretrain.py, saved as pretrain.py saves."""
    root = module_tmp("report")
    out = root / "out"
    model_args, sample_args = ModelArguments(config_name="tiny"), SampleArguments(sample_steps=2,
                                                                                  sample_max_new_tokens=6)
    data_args = DataTrainingArguments(block_size=64, max_eval_samples=4)
    folders = {name: build_token_cache(write_jsonl(root / f"{name}.jsonl", texts), offline_qwen_tokenizer, ENDOFTEXT,
                                       root / "cache")
               for name, texts in (("train", peoples_daily_texts[:10]), ("val", peoples_daily_texts[10:13]))}
    eval_dataset = Subset(BlockDataset(folders["val"], 64), range(4))
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=4, logging_steps=1,
                             per_device_train_batch_size=2, per_device_eval_batch_size=4, learning_rate=3e-3,
                             eval_strategy="steps", eval_steps=2, eval_on_start=True, save_steps=4,
                             include_num_input_tokens_seen=True, disable_tqdm=True)
    config = load_config("tiny")
    config.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1))  # faster
    trainer = SafeTrainer(model=AutoModelForCausalLM.from_config(config), args=args,
                          train_dataset=BlockDataset(folders["train"], 64), eval_dataset=eval_dataset,
                          processing_class=offline_qwen_tokenizer, data_collator=default_data_collator)
    held_out = EvaluatedText.of(eval_dataset, offline_qwen_tokenizer, ENDOFTEXT)
    trainer.add_callback(BitsPerCharCallback(held_out))
    trainer.add_callback(SamplesCallback.from_args(sample_args, offline_qwen_tokenizer))
    trainer.add_callback(RunRecordCallback(PRETRAINING, (model_args, data_args, sample_args), held_out.describe()))
    result = trainer.train()
    trainer.save_model()
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.save_metrics("eval", trainer.evaluate())
    return out, write_report(out)


def test_report_of_a_tiny_run_holds_every_section_and_valid_plots(tiny_run):
    out, path = tiny_run
    assert path == out / "report.md"
    report = path.read_text(encoding="utf-8")
    assert [line for line in report.splitlines() if line.startswith("## ")] == SECTIONS
    assert_valid_pngs(out, PLOTS)
    for name in PLOTS:
        assert f"](plots/{name})" in report
    results = json.loads((out / "all_results.json").read_text())
    assert f"| held-out bits per character | {results['eval_bits_per_char']:,.3f} |" in report
    assert f"| tokens seen | {4 * 2 * 64:,} |" in report
    assert "| steps | 4 of 4 " in report
    assert report.startswith("# Run report (pretraining): ")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    plotted = [h["tokens_per_second"] for h in history if "tokens_per_second" in h]
    average = float(re.search(r"\| throughput \| ([\d,]+) tokens/s over the logged intervals", report)[1].replace(",", ""))
    assert min(plotted) - 1 <= average <= max(plotted) + 1  # an average of what the plot shows
    blocks = len(BlockDataset(next(out.parent.glob("cache/val.jsonl-*")), 64))
    assert (f"| held-out text evaluated | the first 4 of {blocks} blocks of 64 tokens: {4 * 63} predicted tokens, "
            in report)
    assert f"{AutoModelForCausalLM.from_pretrained(out).num_parameters():,} parameters" in report
    last = read_samples(out)[-1]
    assert last["step"] == 4 and f"greedy:  {one_line(last['samples'][0]['greedy'])}" in report
    assert '"block_size": 64' in report and '"sample_steps": 2' in report and '"learning_rate": 0.003' in report
    assert "torch " in report and "transformers " in report and "| CPU |" in report


def test_trainer_state_keeps_what_the_callbacks_add(tiny_run):
    out, _ = tiny_run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    for h in evals:  # added by BitsPerCharCallback after the Trainer had stored the entry
        assert h["eval_bits_per_char"] > h["eval_bits_per_byte"] > 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["kind"] == "pretraining" and info["held_out"].startswith("the first 4 of ")
    arguments = info["arguments"]
    assert (arguments["config_name"], arguments["block_size"], arguments["sample_steps"],
            arguments["learning_rate"]) == ("tiny", 64, 2, 0.003)
    assert info["hardware"]["cpu_cores"] >= 1 and info["versions"]["transformers"]


def test_report_from_an_output_dir_holding_only_a_checkpoint(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copied"
    shutil.copytree(out / "checkpoint-4", copy / "checkpoint-4")
    report = write_report(copy).read_text(encoding="utf-8")
    assert [line for line in report.splitlines() if line.startswith("## ")] == SECTIONS
    assert "checkpoint-4/trainer_state.json" in report and "| steps | 4 of 4 " in report
    assert "run_info.json is missing" in report and "No samples recorded" in report
    assert_valid_pngs(copy, ["loss.png", "learning_rate.png"])


def test_report_py_on_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(REPO / "report.py"), run_name="__main__")
    assert exit.value.code == 1
    assert "no trainer_state.json" in capsys.readouterr().err
