"""pretrain.sh end to end on CPU: the real DeepSpeed launcher and ZeRO-2, the real Qwen tokenizer, real Chinese text,
swanlab in offline mode, and checkpoints reloaded by stock transformers."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BLOCK,
    ENDOFTEXT,
    NARROW,
    PLOTS,
    REPO,
    SECTIONS,
    TINY_RUN,
    assert_valid_pngs,
    pretrain_command,
    pretrain_flags,
    pretrain_sh,
    refusal,
    swanlab_records,
    swanlab_runs,
    trainer_state,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainingArguments,
    pipeline,
)

from seqlm.data.token_cache import BlockDataset, TokenCache
from seqlm.model import load_config, parameter_count
from seqlm.outputs import read_samples
from seqlm.training.memory import MASTER_AND_MOMENTS

# Evaluated at steps 0 and 20, not at the last: the closing evaluation is a pass of its own (the last step's would be
# reused), which a rerun of the finished run repeats on the plain model.
TRAINED = [*TINY_RUN, "--max_steps", "30", "--eval_on_start", "true", "--eval_steps", "20", "--save_steps", "15",
           "--max_eval_samples", "16", "--peak_tflops", "1"]  # a CPU has no known peak: give one, so MFU is logged


@pytest.fixture(scope="module")
def trained(data, module_tmp):
    out = module_tmp("run") / "out"
    log = pretrain_sh(data, out, *TRAINED)
    return out, log


def test_a_finished_run_killed_before_its_closing_evaluation_completes_it(data, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    for name in ("eval_results.json", "all_results.json", "report.md"):
        (out / name).unlink()
    weights = (out / "model.safetensors").read_bytes()
    log = pretrain_sh(data, out, *TRAINED)
    assert "nothing is trained again" in log
    ours, theirs = (json.loads((d / "eval_results.json").read_text()) for d in (out, trained[0]))
    assert set(theirs) <= set(ours)  # and the Trainer's eval_model_preparation_time: it prepared the plain model
    for key in ("eval_loss", "eval_bits_per_char", "eval_bits_per_byte", "eval_perplexity"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key  # the same weights, without DeepSpeed's engine
    assert (out / "model.safetensors").read_bytes() == weights and (out / "report.md").is_file()


def test_training_lowers_held_out_loss(trained):
    out, log = trained
    evals = [h["eval_loss"] for h in trainer_state(out)["log_history"] if "eval_loss" in h]
    assert abs(evals[0] - math.log(151936)) < 0.5  # random init: uniform over the vocabulary
    assert evals[-1] < evals[0] - 2.0
    assert "tokens_per_second" in log and "eval_perplexity" in log
    train_logs = [h for h in trainer_state(out)["log_history"] if "loss" in h]
    # MFU = achieved FLOP/s over the 1 TFLOP/s peak given, with the PaLM count (appendix B) written out here:
    # 6 x parameters (the tied embedding once) + 12 x layers x heads x head_dim x sequence length, per token.
    config = load_config("tiny")
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    per_token = 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * BLOCK
    for h in train_logs[1:]:
        assert h["mfu"] == pytest.approx(h["tokens_per_second_per_device"] * per_token / 1e12, abs=1e-4)
    assert all(0 <= h["data_wait_percent"] < 50 and h["peak_memory_gb"] > 0.1 for h in train_logs[1:])


def test_one_swanlab_run_written_offline(trained):
    out, _ = trained
    runs = swanlab_runs(out)
    assert len(runs) == 1
    scalars, texts = swanlab_records(runs[0])
    history = trainer_state(out)["log_history"]
    assert scalars["train/loss"] == {h["step"]: pytest.approx(h["loss"]) for h in history if "loss" in h}
    assert scalars["eval/bits_per_char"] == {h["step"]: pytest.approx(h["eval_bits_per_char"])
                                             for h in history if "eval_bits_per_char" in h}
    assert set(scalars["train/tokens_per_second"]) == {h["step"] for h in history if "tokens_per_second" in h}
    last = read_samples(out)[-1]["samples"]
    assert [s["prompt"] + s["greedy"] for s in last] == texts["samples/greedy"][-len(last):]


def test_pretrain_sh_ends_with_a_report(trained):
    out, log = trained
    report = (out / "report.md").read_text(encoding="utf-8")
    assert [line for line in report.splitlines() if line.startswith("## ")] == SECTIONS
    assert_valid_pngs(out, PLOTS)
    assert "samples at step 20:" in log and "eval_bits_per_char" in log
    assert [r["step"] for r in read_samples(out)] == [0, 20, 30]  # every --eval_steps, and at the end
    assert "pretrain.py" in json.loads((out / "run_info.json").read_text())["command"]


def test_checkpoint_reloads_in_stock_transformers(trained):
    out, _ = trained
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # Documents ended with <|endoftext|>, so must generation: not the chat tokenizer's <|im_end|>.
    assert model.config.eos_token_id == ENDOFTEXT and tokenizer.eos_token == "<|endoftext|>"
    generated = pipeline("text-generation", model=model, tokenizer=tokenizer)("中国", max_new_tokens=8, do_sample=False)
    assert len(tokenizer(generated[0]["generated_text"])["input_ids"]) > len(tokenizer("中国")["input_ids"])


def test_saved_model_is_what_stock_save_pretrained_saves(trained, tmp_path):
    """No second copy of the tied embedding as lm_head.weight, and a config that generates with the KV cache."""
    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path)
    for folder in (out, out / "checkpoint-30"):
        with safe_open(folder / "model.safetensors", "pt") as ours, safe_open(tmp_path / "model.safetensors", "pt") as stock:
            assert set(ours.keys()) == set(stock.keys()) and "lm_head.weight" not in ours.keys()
            assert all(torch.equal(ours.get_tensor(k), stock.get_tensor(k)) for k in ours.keys())
        assert abs((folder / "model.safetensors").stat().st_size - (tmp_path / "model.safetensors").stat().st_size) < 4096
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied again on load


def test_deepspeeds_zero_to_fp32_gives_the_saved_weights(trained, tmp_path):
    """The recipe of docs/pretraining.md for optimizer-free fp32 weights, step by step."""
    checkpoint, fp32 = trained[0] / "checkpoint-30", tmp_path / "pretrain-fp32"
    result = subprocess.run([sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(fp32)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, fp32)
    model = AutoModelForCausalLM.from_pretrained(fp32)
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())  # fp32 on CPU: the same numbers


def assert_optimizer_shards(out, ranks: int) -> None:
    """ZeRO splits the fp32 master weights and AdamW moments over the ranks, as the memory planner assumes."""
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shards = sorted(last.glob("global_step*/*optim_states.pt"))
    assert len(shards) == ranks
    expected = MASTER_AND_MOMENTS * parameter_count(AutoConfig.from_pretrained(out)) / ranks
    assert all(abs(shard.stat().st_size / expected - 1) < 0.01 for shard in shards)


def test_zero_optimizer_state_is_what_the_planner_counts(trained):
    assert_optimizer_shards(trained[0], ranks=1)


def test_rerun_resumes_from_the_last_checkpoint(trained, data, tmp_path):
    # What a preempted run leaves, copied: the module's other tests read the run as it ended, in any order.
    out = tmp_path / "out"
    shutil.copytree(trained[0] / "checkpoint-30", out / "checkpoint-30")
    shutil.copytree(trained[0] / "swanlog", out / "swanlog")
    shutil.copyfile(trained[0] / "swanlab_run.json", out / "swanlab_run.json")
    log = pretrain_sh(data, out, *TINY_RUN, "--max_steps", "40", "--eval_steps", "15", "--save_steps", "15",
                      "--max_eval_samples", "16", "--sample_steps", "0")
    assert f"resuming from {out}/checkpoint-30" in log
    history = trainer_state(out)["log_history"]
    train_steps = [h["step"] for h in history if "loss" in h]
    assert train_steps == [5, 10, 15, 20, 25, 30, 35, 40]  # continued, not restarted
    assert trainer_state(out)["global_step"] == 40


@pytest.fixture(scope="module")
def epoch(data, module_tmp):
    """One epoch of the small corpus on two ranks, as `bash pretrain.sh args.yaml --save_strategy epoch`: the file's
    values, a flag after it winning over the file's (no saves), and the environment's (PRESET, TRAIN_FILE, ...) as
    usual. (output dir, the run's MASTER_PORT)."""
    root = module_tmp("epoch")
    args_file = root / "args.yaml"
    args_file.write_text(f"block_size: {BLOCK}\nlearning_rate: 3e-3\nwarmup_steps: 5\nper_device_train_batch_size: 4\n"
                         "gradient_accumulation_steps: 1\nactivation_checkpointing: false\nnum_train_epochs: 1\n"
                         f"config_overrides: {NARROW}\n"
                         "eval_strategy: 'no'\nsave_strategy: 'no'\nsample_steps: 0\ndisable_tqdm: true\n",
                         encoding="utf-8")
    command, env = pretrain_command(data, root / "out", train=data["small"], ranks=2)
    [bash, script, *cache_flags] = command
    result = subprocess.run([bash, script, str(args_file), "--save_strategy", "epoch", *cache_flags], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "out", env["MASTER_PORT"]


def test_two_ranks_see_each_block_once_per_epoch(data, epoch):
    out, port = epoch
    cache = next(p for p in data["cache"].iterdir() if p.name.startswith("small.jsonl-"))
    blocks = len(BlockDataset(cache, BLOCK))
    per_step = 2 * 4
    state = trainer_state(out)
    assert state["global_step"] == math.ceil(blocks / per_step)  # one rank alone would take twice the steps
    seen = max(h.get("num_input_tokens_seen", 0) for h in state["log_history"])
    # Every block once; the distributed sampler may repeat a few to make the last global batch whole.
    assert blocks * BLOCK <= seen < (blocks + per_step) * BLOCK
    assert len(swanlab_runs(out)) == 1
    assert_optimizer_shards(out, ranks=2)
    # DeepSpeed's CPU all-reduce buffers (69 MB of RAM each) are gone with the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.slow  # 0.5B parameters in fp32 on a CPU: 12 GB of RAM and a minute
def test_real_qwen25_05b_takes_a_step(data, tmp_path):
    out = tmp_path / "out"
    log = pretrain_sh(data, out, "--block_size", "128", "--per_device_train_batch_size", "1",
                      "--gradient_accumulation_steps", "1", "--max_steps", "1", "--eval_strategy", "no",
                      "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                      "--sample_steps", "0", preset="qwen2.5-0.5b", train=data["val"],
                      # glibc's default thresholds (the launcher's CPU tuning pays off for small models, not this one):
                      # peak RSS 12.2 GB instead of 16.1 GB, measured
                      MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    assert "494,032,768 parameters" in log
    loss = next(h["train_loss"] for h in trainer_state(out)["log_history"] if "train_loss" in h)
    assert abs(loss - math.log(151936)) < 1.0
    assert (out / "model.safetensors").stat().st_size > 494_032_768 * 4 * 0.99


def test_ds_config_autos_are_filled_from_training_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(REPO / "ds_config_zero2.json"), use_cpu=True,
                             per_device_train_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.5)
    config = args.hf_deepspeed_config.config
    assert config["zero_optimization"]["stage"] == 2
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 5, 15, 0.5)
    assert "optimizer" not in config and "scheduler" not in config  # HF's AdamW + cosine; no FusedAdam JIT build


def test_missing_corpus_names_the_commands_that_make_it(tmp_path, monkeypatch, caplog):
    line = refusal(monkeypatch, caplog, "pretrain", "--train_files", str(tmp_path / "nope.jsonl"), "--output_dir",
                   str(tmp_path / "o"))
    assert "make_subset.py" in line and "nope.jsonl" in line


def test_block_size_beyond_the_model_is_refused(data, tmp_path, monkeypatch, caplog):
    line = refusal(monkeypatch, caplog, "pretrain", "--config_name", "tiny", "--tokenizer_name", str(data["tokenizer"]),
                   "--train_files", str(data["train"]), "--validation_files", str(data["val"]), "--block_size", "4096",
                   "--output_dir", str(tmp_path / "o"))
    assert "max_position_embeddings 2048" in line


def test_config_overrides_with_weights_to_continue_from_are_refused(data, tmp_path, monkeypatch, caplog):
    line = refusal(monkeypatch, caplog, "pretrain", *pretrain_flags(data, tmp_path / "o", "--model_name_or_path",
                                                                    str(tmp_path / "some_checkpoint"),
                                                                    "--config_overrides", "hidden_size=32"))
    assert line == ("--config_overrides changes the architecture, which the weights of --model_name_or_path fix: leave "
                    "one of them out")


def test_a_yaml_file_of_arguments_through_pretrain_sh_with_a_flag_after_it(data, epoch):
    """YAML reads 3e-3 as a string: it arrives as the number."""
    out, _ = epoch
    arguments = json.loads((out / "run_info.json").read_text())["arguments"]
    assert (arguments["block_size"], arguments["learning_rate"], arguments["per_device_train_batch_size"]) == \
        (BLOCK, 0.003, 4)
    assert arguments["save_strategy"] == "epoch" and list(out.glob("checkpoint-*")), "the flag after the file wins"
    assert arguments["train_files"] == [str(data["small"])]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32  # the narrow model (helpers.NARROW)


def test_an_unknown_key_in_a_file_of_arguments_is_one_line(tmp_path, monkeypatch, caplog):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"learning_rate": 3e-4, "learnig_rate": 1e-3}))
    line = refusal(monkeypatch, caplog, "pretrain", str(args_file))
    assert line == f"{args_file}: unknown argument learnig_rate (`python pretrain.py --help` lists them)"


def test_one_file_written_as_a_string_in_a_yaml_file_is_that_file(tmp_path, monkeypatch, caplog):
    """`train_files: FILE`, as one writes a single file, is the list of that file, not of its letters."""
    args_file = tmp_path / "args.yaml"
    args_file.write_text(f"train_files: {tmp_path / 'nope.jsonl'}\noutput_dir: {tmp_path / 'o'}\n", encoding="utf-8")
    line = refusal(monkeypatch, caplog, "pretrain", str(args_file))
    assert line.startswith(f"no corpus file {tmp_path / 'nope.jsonl'}: ")


def test_token_cache_is_shared_by_runs(trained, data):
    # The training run built one cache per file; the rerun and the evaluation reused them.
    names = sorted(p.name.split("-")[0] for p in data["cache"].iterdir() if (p / "manifest.json").is_file())
    assert names.count("train.jsonl") == 1 and names.count("val.jsonl") == 1
    cache = TokenCache(next(p for p in data["cache"].iterdir() if p.name.startswith("train.jsonl-")))
    assert cache.manifest["separator_id"] == ENDOFTEXT


def test_swanlab_cloud_without_a_key_fails_before_training(data, tmp_path, monkeypatch, caplog):
    # Without this check swanlab would prompt for a key on rank 0 while the other ranks time out.
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_MODE", "cloud")
    monkeypatch.setenv("HOME", str(tmp_path))  # no `swanlab login` saved either
    monkeypatch.chdir(tmp_path)
    line = refusal(monkeypatch, caplog, "pretrain", "--config_name", "tiny", "--tokenizer_name", str(data["tokenizer"]),
                   "--train_files", str(data["train"]), "--validation_files", str(data["val"]), "--output_dir",
                   str(tmp_path / "o"))
    assert line.startswith("SWANLAB_MODE=cloud needs SWANLAB_API_KEY")
