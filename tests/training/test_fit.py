"""Fitting a run to the GPU: precision, attention and the batch shape chosen from a card's properties (memory, compute
capability) by the real planner, and the global batch kept in every case."""
import json
import logging
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, refusal, tiny_parameters
from torch.overrides import TorchFunctionMode
from transformers import HfArgumentParser

from seqlm.device import Device
from seqlm.model import build_model, load_config, parameter_count
from seqlm.training import fit
from seqlm.training.arguments import ModelArguments, PretrainingArguments
from seqlm.training.fit import card_table, choose_attention, choose_batch_shape, fit_to_device
from seqlm.training.memory import plan_memory
from seqlm.training.preflight import check_ds_config

MiB = 2**20
# name as the driver reports it, memory as nvidia-smi reports it, compute capability
T4 = Device("Tesla T4", 15360 * MiB, (7, 5))
V100 = Device("Tesla V100-SXM2-32GB", 32768 * MiB, (7, 0))
P100 = Device("Tesla P100-PCIE-16GB", 16280 * MiB, (6, 0))
RTX_2080_TI = Device("NVIDIA GeForce RTX 2080 Ti", 11264 * MiB, (7, 5))
RTX_3090 = Device("NVIDIA GeForce RTX 3090", 24576 * MiB, (8, 6))
RTX_4090 = Device("NVIDIA GeForce RTX 4090", 24564 * MiB, (8, 9))
RTX_5090 = Device("NVIDIA GeForce RTX 5090", 32607 * MiB, (12, 0))
A100_40 = Device("NVIDIA A100-SXM4-40GB", 40960 * MiB, (8, 0))
A100_80 = Device("NVIDIA A100-SXM4-80GB", 81920 * MiB, (8, 0))
H100 = Device("NVIDIA H100 80GB HBM3", 81559 * MiB, (9, 0))
H200 = Device("NVIDIA H200", 143771 * MiB, (9, 0))
CARDS = [T4, V100, P100, RTX_2080_TI, RTX_3090, RTX_4090, RTX_5090, A100_40, A100_80, H100, H200]
QWEN = load_config("qwen2.5-0.5b")


def with_liger(device: Device) -> Device:
    return Device(device.name, device.memory_bytes, device.capability, liger_installed=True)


# Precision by card: bf16 needs compute capability 8.0 (Ampere); Turing (T4), Volta (V100) and Pascal have fp16 only.
CARDS = [(with_liger(T4), "fp16"), (V100, "fp16"), (RTX_3090, "bf16"), (RTX_4090, "bf16"), (RTX_5090, "bf16"),
         (A100_40, "bf16"), (A100_80, "bf16"), (H100, "bf16"), (with_liger(H100), "bf16"), (H200, "bf16")]
MARGIN = 0.9  # README: the automatic choice fills at most 90% of the card


@pytest.mark.parametrize("device, precision", CARDS, ids=lambda v: v.name if isinstance(v, Device) else None)
def test_the_choice_for_each_card(device, precision):
    """The 0.5B preset, block 2048, 64 sequences a step, one GPU, ZeRO-2: the largest micro-batch dividing 64 whose
    estimate fits, with a saving only when nothing fits without it (the estimate itself is checked against the
    tensors autograd keeps, in test_memory.py)."""
    assert device.precision()[0] == precision
    shape = choose_batch_shape(QWEN, 2048, device, 64)
    n, budget = parameter_count(QWEN), MARGIN * device.memory_bytes

    def estimate(micro: int, checkpointing: bool, fused: bool) -> float:
        return plan_memory(QWEN, n, micro, 2048, 1, 2, checkpointing, fused).total

    assert shape.micro_batch * shape.accumulation == 64
    assert estimate(shape.micro_batch, shape.checkpointing, shape.fused_loss) <= budget
    larger = [d for d in (2, 4, 8, 16, 32, 64) if d > shape.micro_batch]
    assert not larger or estimate(larger[0], shape.checkpointing, shape.fused_loss) > budget
    if shape.checkpointing:  # a third more compute: only when one sequence does not fit without it
        assert estimate(1, False, shape.fused_loss) > budget and estimate(1, False, True) > budget
    if shape.fused_loss:
        assert estimate(1, shape.checkpointing, False) > budget
    assert not shape.fused_loss or device.liger_installed


@pytest.mark.parametrize("device, ways", [
    (T4, ["pip install liger-kernel", "sequences of 1024 tokens", "2 GPUs", "ZeRO-3"]),
    (P100, ["sequences of 1024 tokens", "2 GPUs", "ZeRO-3"]),  # no Triton below compute capability 7.0: no Liger
    (RTX_2080_TI, ["3 GPUs", "ZeRO-3"]),  # the optimizer state alone nearly fills it: no block size fits
], ids=lambda v: v.name if isinstance(v, Device) else None)
def test_a_card_too_small_is_one_line_saying_what_would_fit(device, ways):
    with pytest.raises(ValueError) as refused:
        choose_batch_shape(QWEN, 2048, device, 64)
    line = str(refused.value)
    assert "\n" not in line and f"this {device.name}" in line and "micro-batch 1" in line
    assert all(way in line for way in ways)
    if "pip install" not in ways[0]:
        assert "liger" not in line


@pytest.mark.parametrize("device", [with_liger(T4), V100, RTX_4090, RTX_5090, A100_40, H100, H200, Device("CPU")],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("global_batch, world_size", [(64, 1), (64, 2), (64, 8), (256, 8), (48, 3), (7, 1)])
def test_the_global_batch_is_kept(device, global_batch, world_size):
    shape = choose_batch_shape(QWEN, 2048, device, global_batch, world_size)
    assert shape.micro_batch * shape.accumulation * world_size == global_batch


def test_the_largest_fitting_micro_batch_that_divides_is_taken():
    n = parameter_count(QWEN)
    assert plan_memory(QWEN, n, 2, 2048, checkpointing=False).total <= 0.9 * RTX_5090.memory_bytes
    assert choose_batch_shape(QWEN, 2048, RTX_5090, 64).micro_batch == 2
    shape = choose_batch_shape(QWEN, 2048, RTX_5090, 63)  # 2 fits but does not divide 63; 3 does not fit
    assert (shape.micro_batch, shape.accumulation, shape.checkpointing) == (1, 63, False)


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match=r"64 sequences does not split over 3 ranks: pass --global_batch_size 66 or 63"):
        choose_batch_shape(QWEN, 2048, H100, 64, world_size=3)
    with pytest.raises(ValueError, match="64 per rank, which micro-batches of 6 do not divide"):
        choose_batch_shape(QWEN, 2048, H100, 64, micro_batch=6)


def test_given_savings_are_kept():
    assert choose_batch_shape(QWEN, 2048, H200, 64, checkpointing=True).checkpointing is True
    forced = choose_batch_shape(QWEN, 2048, RTX_4090, 64, checkpointing=False, micro_batch=4)
    assert (forced.micro_batch, forced.checkpointing) == (4, False)  # does not fit: fit_to_device warns
    with pytest.raises(ValueError, match="pip install liger-kernel"):  # an auto micro-batch that fits nowhere
        choose_batch_shape(QWEN, 2048, T4, 64, checkpointing=True)


@pytest.mark.parametrize("device, bf16, fp16, chosen", [
    (H100, None, None, "bf16"), (RTX_3090, None, None, "bf16"), (T4, None, None, "fp16"), (V100, None, None, "fp16"),
    (P100, None, None, "fp16"), (Device("CPU"), None, None, "fp32"),
    (H100, None, True, "fp16"), (T4, True, None, "bf16"),  # a flag set true wins
    (H100, None, False, "bf16"), (H100, False, None, "fp16"), (T4, None, False, "fp32"),  # false removes its choice only
    (H100, False, False, "fp32"), (Device("CPU"), False, None, "fp32"),
])
def test_precision(device, bf16, fp16, chosen):
    assert device.precision(bf16, fp16)[0] == chosen


# What torch.cuda.get_device_properties reports (name, total_memory, major, minor), from the cards themselves.
PROPERTIES = {"Tesla T4": (15_655_829_504, 7, 5), "Tesla V100-SXM2-32GB": (34_089_730_048, 7, 0),
              "NVIDIA A100-SXM4-80GB": (85_097_971_712, 8, 0)}


@pytest.mark.parametrize("name, dtype", [("Tesla T4", torch.float16), ("Tesla V100-SXM2-32GB", torch.float16),
                                         ("NVIDIA A100-SXM4-80GB", torch.bfloat16)])
def test_one_precision_rule_for_training_and_inference(name, dtype):
    """torch.cuda.is_bf16_supported() says True on a T4 and a V100 (emulated bf16): the rule goes by the compute
    capability, for training (Device.of) and for chat, serve, evaluate and benchmark alike (Device.inference_dtype starts
    from it: tests/serving/test_inference_precision.py)."""
    memory, major, minor = PROPERTIES[name]
    device = Device.from_properties(SimpleNamespace(name=name, total_memory=memory, major=major, minor=minor))
    assert device.dtype == dtype
    training = fit_to_device(load_config("tiny"), 128, parse(), ModelArguments(), device)
    assert (training.bf16, training.fp16) == (dtype == torch.bfloat16, dtype == torch.float16)


@pytest.mark.parametrize("device, ds_precision, flags, error", [
    (T4, {"bf16": {"enabled": True}}, [],
     "the DeepSpeed config sets bf16 enabled=true but this run trains in fp16 (the line above says why): set "
     "\"enabled\": \"auto\" in its \"bf16\" block, or pass --bf16 true"),
    (H100, {"fp16": {"enabled": True}}, [], "the DeepSpeed config sets fp16 enabled=true but this run trains in bf16"),
    (H100, {"bf16": {"enabled": False}}, [], "the DeepSpeed config sets bf16 enabled=false but this run trains in bf16"),
    (V100, {"fp16": {"enabled": "auto", "loss_scale": 128}}, [],
     "the DeepSpeed config sets a static fp16 loss_scale of 128, but fp16 here relies on dynamic loss scaling"),
])
def test_a_ds_config_that_contradicts_the_precision_is_one_line(tmp_path, device, ds_precision, flags, error):
    config = {**json.loads((REPO / "ds_config_zero2.json").read_text()), **ds_precision}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    args = parse(*flags)
    args.deepspeed = str(tmp_path / "ds.json")
    with pytest.raises(ValueError, match="^" + re.escape(error)):
        check_ds_config(fit_to_device(load_config("tiny"), 128, args, ModelArguments(), device))


def test_fp16_false_alone_keeps_bf16_on_a_card_that_has_it():
    args = fit_to_device(load_config("tiny"), 128, parse("--fp16", "false"), ModelArguments(), H100)
    assert (args.bf16, args.fp16) == (True, False)


def test_benchmarks_during_training_under_zero_3_are_one_line(tmp_path):
    config = json.loads((REPO / "ds_config_zero2.json").read_text())
    config["zero_optimization"]["stage"] = 3
    (tmp_path / "ds.json").write_text(json.dumps(config))
    args = parse()
    args.deepspeed = str(tmp_path / "ds.json")
    args = fit_to_device(load_config("tiny"), 128, args, ModelArguments(), H100)
    with pytest.raises(ValueError, match=r"^--benchmark_suite scores on the first rank alone, which ZeRO-3 cannot "
                                         r"\(each rank holds a part of the weights\): train without it and score the "
                                         r"saved model with benchmark.py, or use ZeRO-2 \(ds_config_zero2.json\)$"):
        check_ds_config(args, benchmarking=True)
    check_ds_config(args)  # ZeRO-3 itself is fine


def test_the_shipped_ds_config_takes_every_precision():
    for device in T4, H100, Device("CPU"):
        check_ds_config(fit_to_device(load_config("tiny"), 128, parse(), ModelArguments(), device))


def test_flash_attention_only_where_it_runs():
    installed = {d: Device(d.name, d.memory_bytes, d.capability, flash_attention_installed=True) for d in (T4, H100)}
    assert choose_attention(installed[H100], None)[0] == "flash_attention_2"
    assert choose_attention(installed[T4], None)[0] == "sdpa_repeated_kv"  # flash-attention 2 needs 8.0
    assert choose_attention(H100, None)[0] == "sdpa"  # not installed
    assert choose_attention(installed[H100], "eager")[0] == "eager"


class SdpaCalls(TorchFunctionMode):
    """The key heads and enable_gqa of every scaled_dot_product_attention call made inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((args[1].shape[1], kwargs.get("enable_gqa", False)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("device, key_heads, enable_gqa", [(T4, 4, False), (V100, 4, False), (H100, 2, True)],
                         ids=lambda v: v.name if isinstance(v, Device) else None)
def test_grouped_heads_reach_sdpa_only_where_its_flash_kernel_runs(tmp_path, device, key_heads, enable_gqa):
    """The tiny preset has 4 query heads and 2 k/v heads. Before compute capability 8.0, torch 2.13 runs enable_gqa only
    in its math kernel (fp32 scores, heads x T x T): there sdpa must get k/v repeated to all 4 heads, and no
    enable_gqa, so that its memory-efficient kernel takes the call. From 8.0 its flash kernel takes grouped heads."""
    attention = choose_attention(device, None)[0]
    ids = torch.randint(0, 1000, (2, 16))
    model = build_model(load_config("tiny"), None, attention)
    model.save_pretrained(tmp_path)
    for model in model, build_model(load_config("tiny"), str(tmp_path), attention):  # trained, and fine-tuned
        with SdpaCalls() as sdpa:
            model(input_ids=ids, labels=ids).loss.backward()
        assert sdpa.calls == [(key_heads, enable_gqa)] * 2  # one a layer
    assert "attn" not in (tmp_path / "config.json").read_text()  # a saved model loads anywhere


def parse(*flags: str) -> PretrainingArguments:
    """Arguments as pretrain.py parses them; --use_cpu, so that the Trainer's own check lets bf16 pass on this machine
    (seqlm.training.fit is given the card instead)."""
    return HfArgumentParser(PretrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--report_to", "none", "--deepspeed", str(REPO / "ds_config_zero2.json"),
         "--use_cpu", "true", *flags])[0]


@pytest.mark.parametrize("flags, value", [([], "auto"), (["--per_device_train_batch_size", "8"], 8),
                                          (["--per_device_train_batch_size", "AUTO"], "auto")])
def test_micro_batch_flag(flags, value):
    assert parse(*flags).per_device_train_batch_size == value


@pytest.mark.parametrize("flags, error", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: use auto or a positive number"),
    (["--per_device_train_batch_size", "many"], "--per_device_train_batch_size many: use auto or a positive number"),
    (["--global_batch_size", "0"], "--global_batch_size 0: use a positive number of sequences"),
])
def test_bad_batch_flags_are_one_line(flags, error, monkeypatch, caplog):
    assert refusal(monkeypatch, caplog, "pretrain", *flags) == error


@pytest.mark.parametrize("device, precision, attention", [(T4, "fp16", "sdpa_repeated_kv"), (H100, "bf16", "sdpa")],
                         ids=["T4", "H100"])
def test_the_trainer_and_deepspeed_see_the_choices(device, precision, attention, caplog):
    """The rebuilt arguments carry them into the Trainer's checks and the "auto" values of the DeepSpeed config."""
    model_args = ModelArguments()
    with caplog.at_level(logging.INFO):
        args = fit_to_device(QWEN, 2048, parse("--use_liger_kernel", "true"), model_args, device)
    ds = args.hf_deepspeed_config.config
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert args.mixed_precision == precision
    assert ds["train_micro_batch_size_per_gpu"] == args.per_device_train_batch_size
    assert ds["train_batch_size"] == 64 == args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert args.use_liger_kernel is True and model_args.attn_implementation == attention
    assert f"on {device.name} (compute capability" in caplog.text and f": {precision} (" in caplog.text
    assert "global batch 64 sequences of 2048 tokens" in caplog.text


def test_a_given_micro_batch_and_global_batch_set_the_accumulation():
    args = fit_to_device(QWEN, 2048, parse("--per_device_train_batch_size", "2", "--global_batch_size", "32"),
                         ModelArguments(), H100)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 16)
    args = fit_to_device(QWEN, 2048, parse("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3"),
                         ModelArguments(), H100)
    assert (args.global_batch_size, args.gradient_accumulation_steps) == (6, 3)  # as today without the new flag


def test_on_a_cpu_auto_is_the_micro_batch_before_auto():
    args = fit_to_device(load_config("tiny"), 128, parse(), ModelArguments(), Device("CPU"))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.bf16, args.fp16) == \
        (4, 16, False, False)


def test_checkpointing_on_cpu_ranks_is_on_and_the_guides_say_so():
    """auto on CPU ranks: no memory plan, so the least memory; the flag's row in the pretraining guide (both languages)
    says so instead of "only when the run needs it to fit"."""
    args = fit_to_device(load_config("tiny"), 128, parse(), ModelArguments(), Device("CPU"))
    assert args.activation_checkpointing is True
    for guide, cpu in (("docs/pretraining.md", "on CPU ranks, which have no memory plan, always on"),
                       ("docs/pretraining.zh.md", "CPU 上没有显存估算，始终打开")):
        [row] = [line for line in (REPO / guide).read_text().splitlines()
                 if line.startswith("| `--activation_checkpointing` | `auto` |")]
        assert cpu in row, guide


def test_the_guides_table_is_the_planners():
    """docs/gpus.md and its Chinese version print the planner's table as `python -m seqlm.training.fit` does."""
    table = card_table()
    for guide in ("docs/gpus.md", "docs/gpus.zh.md"):
        assert table in (REPO / guide).read_text(), f"{guide}: paste the output of python -m seqlm.training.fit"


def test_a_given_accumulation_is_never_overridden():
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 4 with --per_device_train_batch_size auto"):
        parse("--gradient_accumulation_steps", "4")
    with pytest.raises(ValueError, match="--global_batch_size 64 is not --per_device_train_batch_size 2 x "
                                         "--gradient_accumulation_steps 4 x 1 rank:"):
        fit_to_device(QWEN, 2048, parse("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
                                        "--global_batch_size", "64"), ModelArguments(), device=H100)


def test_out_of_gpu_memory_names_flags_that_keep_the_global_batch(tmp_path, caplog):
    """A micro-batch given alone would make a global batch of its own (micro x 16 x GPUs): the advice names both."""
    import torch

    from seqlm.training.run import one_line_on_failure
    from seqlm.training.settings import requested_global_batch

    args = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                per_device_train_batch_size=8, gradient_accumulation_steps=16, global_batch_size=128)
    with pytest.raises(SystemExit) as e, one_line_on_failure(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert e.value.code == 2
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "\n" not in record.getMessage()
    assert "--per_device_train_batch_size 4 --global_batch_size 128" in record.getMessage()
    advised = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                   per_device_train_batch_size=4, global_batch_size=128)
    assert requested_global_batch(advised) == 128


def test_the_planner_takes_config_overrides_as_pretrain_py_does(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fit", "--config_name", "tiny", "--config_overrides",
                                      "hidden_size=32,intermediate_size=128", "--block_size", "64"])
    fit.main()
    assert capsys.readouterr().out.startswith(
        f"tiny (hidden_size=32,intermediate_size=128): {tiny_parameters(32, 128, 2):,} parameters; global batch 64 "
        "sequences of 64 tokens")
    monkeypatch.setattr(sys, "argv", ["fit", "--config_name", "tiny", "--config_overrides", "hidden_size=30"])
    with pytest.raises(SystemExit) as stop:
        fit.main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("fit: error: --config_overrides hidden_size=30: hidden_size")


@pytest.mark.slow  # a DeepSpeed run on a CPU rank in bf16: 20-50 s
def test_gradients_accumulate_in_fp32_under_the_shipped_ds_config():
    """Without data_types.grad_accum_dtype DeepSpeed sums micro-batches in the model's dtype, bf16, which drops the
    small terms (docs/reliability.md). bench.grad_accum runs ZeRO-2 on a CPU rank in bf16 with the shipped config and
    compares what the optimizer would step from with the fp64 sum of the micro-batches' gradients."""
    result = subprocess.run([sys.executable, "-m", "bench.grad_accum", "--ranks", "1", "--micro_steps", "4", "--only",
                             "shipped"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    error = float(re.search(r"shipped relative error (\S+)", result.stdout).group(1))
    assert error < 1e-6  # fp32 sums of bf16 terms: 1e-9; bf16 sums: 1e-3


def planner(monkeypatch, capsys, *flags: str) -> list[str]:
    """The lines of `python -m seqlm.training.fit FLAGS`."""
    monkeypatch.setattr(sys, "argv", ["fit", *flags])
    fit.main()
    return capsys.readouterr().out.splitlines()


def test_the_planner_prints_the_choice_first_and_says_when_it_assumes_checkpointing(monkeypatch, capsys):
    """As troubleshooting shows it, for a 24 GB card: the automatic choice (the RTX 4090 row of docs/gpus.md), then
    the micro-batch asked for, which needs activation checkpointing, saying so with the plan without it."""
    without, with_ = (re.search(r"activation checkpointing: ≈ ([\d.]+) GB", line)[1] for line in
                      planner(monkeypatch, capsys, "--per_device_train_batch_size", "4")[1:])
    _, card, choice, given = planner(monkeypatch, capsys, "--gpu_memory_gb", "24", "--per_device_train_batch_size", "4")
    assert card == "on a GPU of 24 GiB (compute capability 9.0, 25.8 GB):"
    assert choice.startswith("the automatic choice: micro-batch 1 x 64 accumulation steps x 1 rank, without activation "
                             "checkpointing (auto: not needed): ≈ ")
    assert choice.endswith(", within 90% of the GPU")
    assert given.startswith(f"as given: micro-batch 4 x 16 accumulation steps x 1 rank, with activation checkpointing "
                            f"(auto: without it {without} GB): ≈ {with_} GB per GPU")
    assert given.endswith("more than 90% of the GPU: use --per_device_train_batch_size 1 --gradient_accumulation_steps "
                          "64 (the same global batch of 64; estimated 18.7 GB), or --per_device_train_batch_size auto")
    given = planner(monkeypatch, capsys, "--gpu_memory_gb", "24", "--per_device_train_batch_size", "4",
                    "--activation_checkpointing", "true")[3]
    assert given.startswith(f"as given: micro-batch 4 x 16 accumulation steps x 1 rank, with activation checkpointing "
                            f"(as given): ≈ {with_} GB per GPU")


@pytest.mark.parametrize("name, mib, capability", fit.COMMON_CARDS, ids=[card[0] for card in fit.COMMON_CARDS])
def test_the_planner_command_gives_the_guides_choice_for_each_card(monkeypatch, capsys, name, mib, capability):
    """The row of docs/gpus.md for a card, and the command given that card's memory as nvidia-smi shows it (MiB / 1024)
    and its compute capability: the same micro-batch, accumulation and savings, or the same ways to fit. The table
    assumes Liger installed where it is needed, or where nothing fits and the card runs it (compute capability 7.0)."""
    [row] = [line.split(" | ")[1:] for line in (REPO / "docs/gpus.md").read_text().splitlines()
             if line.startswith(f"| {name} (compute capability")]
    precision, shape, checkpointing, liger = row[:4]
    fitting = shape.startswith("does not fit one GPU; fits: ")
    with_liger = liger.startswith("needed") or (fitting and capability >= (7, 0))
    lines = planner(monkeypatch, capsys, "--gpu_memory_gb", str(mib / 1024), "--compute_capability",
                    "{}.{}".format(*capability), *["--use_liger_kernel"] * with_liger)
    [choice] = [line for line in lines if line.startswith("the automatic choice: ")]
    if fitting:
        assert "does not fit" in choice
        assert all(way in choice for way in shape.removeprefix("does not fit one GPU; fits: ").split("; "))
        return
    assert choice.startswith(f"the automatic choice: micro-batch {shape} accumulation steps x "
                             f"1 rank, {dict(on='with', off='without')[checkpointing]} activation checkpointing")
    assert ("with Liger's fused loss" in choice) is liger.startswith("needed")
