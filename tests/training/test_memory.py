"""The memory planner against what the model really keeps: every tensor autograd saves in a bf16 forward pass of
transformers' Qwen2, counted once per storage, at several shapes (the real 0.5B widths included)."""
import logging
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from transformers import AutoModelForCausalLM, HfArgumentParser, Qwen2Config

from seqlm.device import Device
from seqlm.model import SDPA_REPEATED_KV, load_config, parameter_count
from seqlm.training.arguments import ModelArguments, PretrainingArguments
from seqlm.training.fit import choose_batch_shape, fit_to_device
from seqlm.training.memory import GB, logged_plan, logits_bytes, plan_memory, saved_activation_bytes

BATCH, SEQ = 2, 64


def shaped(preset: str, **sizes) -> Qwen2Config:
    config = load_config(preset).to_dict()
    config.pop("layer_types", None)  # derived from the number of layers
    return Qwen2Config(**{**config, **sizes})


def saved_bytes(config: Qwen2Config, checkpointing: bool, attention: str = "sdpa") -> int:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.bfloat16)
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 1000, (BATCH, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(size for ptr, size in storages.items() if ptr not in weights)


GQA_4 = shaped("tiny", num_hidden_layers=3, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
               head_dim=64)
REAL_WIDTHS = shaped("qwen2.5-0.5b", num_hidden_layers=2)  # the real widths, two of its 24 layers


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("config, attention", [
    pytest.param(shaped("tiny"), "sdpa", id="sdpa-tiny"),
    pytest.param(shaped("tiny"), SDPA_REPEATED_KV, id="sdpa_repeated_kv-tiny"),
    pytest.param(GQA_4, "sdpa", id="sdpa-gqa-4"),
    pytest.param(GQA_4, SDPA_REPEATED_KV, id="sdpa_repeated_kv-gqa-4"),
    pytest.param(REAL_WIDTHS, "sdpa", id="sdpa-qwen2.5-0.5b-widths"),
    pytest.param(REAL_WIDTHS, SDPA_REPEATED_KV, id="sdpa_repeated_kv-qwen2.5-0.5b-widths",
                 marks=pytest.mark.slow),  # 8 s a case; the repeated k/v at grouped widths is gqa-4's
])
def test_saved_activations_match_the_formula(config, checkpointing, attention):
    tokens = BATCH * SEQ
    log_softmax = 4 * config.vocab_size * tokens  # the loss keeps its fp32 log-softmax: counted with the logits
    measured = saved_bytes(config, checkpointing, attention) - log_softmax
    repeated = attention == SDPA_REPEATED_KV
    assert saved_activation_bytes(config, tokens, checkpointing, repeated) == pytest.approx(measured, rel=0.01)


def test_repeated_kv_is_counted_for_cards_before_compute_capability_8():
    """k and v saved as wide as q: 4 bytes a token for each of the 12 heads' 64 values they did not have, 24 layers."""
    config = load_config("qwen2.5-0.5b")
    grouped, repeated = (plan_memory(config, parameter_count(config), 2, 2048, checkpointing=False,
                                     repeated_kv=r).activations for r in (False, True))
    assert repeated - grouped == 2 * 2048 * 24 * 4 * (14 - 2) * 64
    shape = choose_batch_shape(config, 2048, Device("Tesla V100-SXM2-32GB", 32768 * 2**20, (7, 0)), 64)
    assert shape.plan.activations == plan_memory(config, parameter_count(config), shape.micro_batch, 2048,
                                                 checkpointing=shape.checkpointing, repeated_kv=True).activations


def test_plan_grows_with_the_batch_and_shrinks_with_zero():
    config = load_config("qwen2.5-0.5b")
    n = parameter_count(config)
    one, two, eight = (plan_memory(config, n, b, 2048).total for b in (1, 2, 8))
    assert eight - one == pytest.approx(7 * (two - one))  # weights and optimizer are paid once, tokens per sequence
    single, sharded = (plan_memory(config, n, 4, 2048, world_size=w, zero_stage=2) for w in (1, 8))
    assert sharded.optimizer == pytest.approx(single.optimizer / 8)
    assert plan_memory(config, n, 8, 2048, fused_cross_entropy=True).total < plan_memory(config, n, 8, 2048).total


def parse(*flags: str) -> PretrainingArguments:
    return HfArgumentParser(PretrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--report_to", "none", *flags])[0]


@pytest.mark.parametrize("flags, value", [
    ([], "auto"),
    (["--activation_checkpointing", "false"], False),
    (["--activation_checkpointing", "true"], True),
    (["--activation_checkpointing", "False"], False),
    (["--gradient_checkpointing", "false"], False),  # the tutorial's flag still wins
    (["--gradient_checkpointing", "true"], True),
])
def test_activation_checkpointing_flags(flags, value):
    assert parse(*flags).activation_checkpointing == value


@pytest.mark.parametrize("flags", [[], ["--activation_checkpointing", "true"]])
def test_checkpointing_on_a_cpu_is_on_unless_turned_off(flags):
    args = fit_to_device(load_config("tiny"), 128, parse(*flags), ModelArguments(), Device("CPU"))
    assert args.activation_checkpointing is True


def test_activation_checkpointing_rejects_other_values():
    with pytest.raises(ValueError, match="use auto, true or false"):
        parse("--activation_checkpointing", "sometimes")
    result = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "--activation_checkpointing", "sometimes"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "--activation_checkpointing sometimes: use auto, true or false"


def gpu(gb: float) -> Device:
    return Device("NVIDIA H200", gb * GB, (9, 0))


@pytest.mark.parametrize("gpu_gb, on", [(141, False), (36, True)])
def test_auto_checkpointing_turns_off_only_when_the_run_fits(gpu_gb, on, caplog):
    args = parse("--per_device_train_batch_size", "4", "--deepspeed", str(REPO / "ds_config_zero2.json"),
                 "--use_cpu", "true")  # so that the Trainer's own check lets bf16 pass on a machine without the GPU
    config = load_config("qwen2.5-0.5b")
    with caplog.at_level(logging.INFO):
        args = fit_to_device(config, 2048, args, ModelArguments(), gpu(gpu_gb))
    assert args.activation_checkpointing is on
    assert f"{'neither' if not on else 'activation checkpointing'}" in caplog.text
    assert "run out of GPU memory" not in caplog.text  # with checkpointing, 4 x 2048 fits 36 GB


def test_the_logged_plan_reads_back(caplog):
    """bench/train.py puts the plan of each run beside its measured peak, from the run's log."""
    args = parse("--per_device_train_batch_size", "4", "--deepspeed", str(REPO / "ds_config_zero2.json"),
                 "--use_cpu", "true")  # so that the Trainer's own check lets bf16 pass on a machine without the GPU
    config = load_config("qwen2.5-0.5b")
    with caplog.at_level(logging.INFO):
        args = fit_to_device(config, 2048, args, ModelArguments(), gpu(141))  # 141 GB: checkpointing off
    tensors, total = logged_plan(caplog.text)
    plan = plan_memory(config, parameter_count(config), 4, 2048, zero_stage=2, checkpointing=False)
    assert total == pytest.approx(plan.total / GB, abs=0.05)
    parts = plan.weights_and_gradients + plan.optimizer + plan.activations + plan.logits
    assert tensors == pytest.approx(parts / GB, abs=0.2)  # four parts, each rounded to 0.1 GB
    assert logged_plan("no plan on a CPU run") is None


MARGIN = 0.9  # docs/gpus.md: the automatic choice fills at most 90% of the GPU; a given micro-batch past it is warned about


def given_run(micro: int, accumulation: int) -> PretrainingArguments:
    return parse("--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accumulation),
                 "--activation_checkpointing", "false", "--deepspeed", str(REPO / "ds_config_zero2.json"),
                 "--use_cpu", "true")  # so that the Trainer's own check lets bf16 pass on a machine without the GPU


def test_a_run_that_cannot_fit_is_warned_with_flags_that_fit(caplog):
    config = load_config("qwen2.5-0.5b")
    with caplog.at_level(logging.INFO):
        fit_to_device(config, 2048, given_run(16, 4), ModelArguments(), gpu(24))
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "run out of GPU memory" in warning
    flags = warning.split("use ")[1].split()
    micro, accumulation = int(flags[1]), int(flags[3])
    assert micro * accumulation == 16 * 4  # the same global batch, one rank
    plan = plan_memory(config, parameter_count(config), micro, 2048, zero_stage=2, checkpointing=False)
    assert plan.total <= MARGIN * 24 * GB  # the flags given fit, by the planner's estimate
    assert plan_memory(config, parameter_count(config), micro * 2, 2048, zero_stage=2,
                       checkpointing=False).total > MARGIN * 24 * GB  # and are the largest that do


@pytest.mark.parametrize("share, warned", [(0.85, False), (0.95, True), (1.05, True)])
def test_one_margin_for_the_warning_and_the_choice(share, warned, caplog):
    """A given micro-batch whose plan fills 95% of the card is past the margin the automatic choice keeps: warned."""
    config = load_config("qwen2.5-0.5b")
    plan = plan_memory(config, parameter_count(config), 4, 2048, zero_stage=2, checkpointing=False)
    with caplog.at_level(logging.INFO):
        fit_to_device(config, 2048, given_run(4, 16), ModelArguments(), gpu(plan.total / share / GB))
    assert ("run out of GPU memory" in caplog.text) is warned
    assert ("more than 90%" in caplog.text) is warned


def test_the_planner_command_line_uses_the_same_rule():
    config = load_config("qwen2.5-0.5b")
    plan = plan_memory(config, parameter_count(config), 16, 2048, zero_stage=2, checkpointing=True)
    gpu_gib = plan.total / 0.95 / 2**30  # the plan fills 95%: over the margin (the flag is nvidia-smi's MiB / 1024)
    result = subprocess.run([sys.executable, "-m", "seqlm.training.fit", "--per_device_train_batch_size", "16",
                             "--gpu_memory_gb", str(gpu_gib)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "with activation checkpointing (auto: without it" in result.stdout
    assert f"≈ {plan.total / GB:.1f} GB per GPU" in result.stdout
    assert "more than 90% of the GPU" in result.stdout
    choice = result.stdout.split("automatic choice: micro-batch ")[1].split()
    micro, accumulation = int(choice[0]), int(choice[2])
    assert micro * accumulation == 64 and micro < 16


def test_the_loss_term_is_its_measured_peak():
    """What transformers' loss holds at once over the logits of 64 tokens of the real vocabulary, forward and backward,
    by MemTracker on CPU tensors: the fp32 log-softmax, its gradient and its input's gradient, 12 bytes a token and
    vocabulary entry (the 16-bit logits themselves are gone when the backward pass reaches them)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers.loss.loss_utils import ForCausalLMLoss

    config, tokens = load_config("qwen2.5-0.5b"), 64
    hidden = torch.randn(1, tokens, 16, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(16, config.vocab_size, dtype=torch.bfloat16)
    labels = torch.randint(0, config.vocab_size, (1, tokens))
    tracker = MemTracker()
    with tracker:
        ForCausalLMLoss(hidden @ head, labels, config.vocab_size).backward()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert logits_bytes(config, tokens, fused_cross_entropy=False) == pytest.approx(measured, rel=0.01)
    assert measured == pytest.approx(12 * tokens * config.vocab_size, rel=0.01)


def test_gradients_and_buckets_as_the_shipped_ds_config_keeps_them():
    """ZeRO-2 with data_types.grad_accum_dtype fp32: an fp32 gradient buffer of the rank's partition (no 16-bit copy,
    no fp32 copy made for the step), and two 16-bit buckets of 50M elements (overlap_comm)."""
    config = load_config("qwen2.5-0.5b")
    n = parameter_count(config)
    for world in 1, 8:
        plan = plan_memory(config, n, 1, 2048, world_size=world, zero_stage=2)
        assert plan.weights_and_gradients == 2 * n + 4 * n / world + 2 * 50_000_000 * 2
        assert plan.optimizer == 12 * n / world
