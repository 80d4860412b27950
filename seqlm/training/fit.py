"""Fit a run to the device it trains on, decided from the card before anything loads (pretrain.py and finetune.py call
fit_to_device in the open):

- precision: seqlm.device's one rule (Device.precision): bf16 where the GPU has it (compute capability 8.0 or more),
  fp16 where it does not (DeepSpeed's dynamic loss scaling: ds_config_zero2.json leaves `loss_scale` at its default 0,
  which means dynamic; seqlm.training.preflight refuses a static one), fp32 on a CPU; --bf16 / --fp16 true win;
- attention: flash-attention 2 where it is installed and runs (compute capability 8.0 or more), else sdpa;
- the batch shape: `--per_device_train_batch_size auto` takes the largest micro-batch that divides the global batch per
  rank and whose memory plan fits the GPU (seqlm.training.memory.fits: at most MEMORY_MARGIN of it);
  --gradient_accumulation_steps follows, so that the global batch is exactly the one asked for
  (seqlm.training.settings). Activation checkpointing and Liger's fused loss, unless given, are switched on only when
  the run needs them to fit, the cheaper in compute first. A micro-batch given that does not fit is warned about, with
  the flags the automatic choice would take.

Over several ranks the card is what they all have (common_device: the least memory, the oldest compute capability), so
that every rank takes the same choices.

The same rule answers before a GPU is rented:

    python -m seqlm.training.fit      # the choices for common cards: the table in docs/gpus.md
    python -m seqlm.training.fit --gpu_memory_gb 24 --per_device_train_batch_size 16   # the choice, then 16's plan
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, PretrainedConfig

from seqlm.device import Device
from seqlm.model import SDPA_REPEATED_KV, load_config, parameter_count
from seqlm.training.flops import flops_per_token, peak_tflops
from seqlm.training.memory import GB, MEMORY_MARGIN, MemoryPlan, fits, plan_memory, zero_stage
from seqlm.training.settings import DEFAULT_GLOBAL_BATCH_SIZE, per_rank_batch, ranks, requested_global_batch

log = logging.getLogger(__name__)

CPU_MICRO_BATCH = 4  # no memory plan for a CPU: the micro-batch before auto
# The ways to fit a run into less memory, (activation checkpointing, fused loss), cheapest in compute first:
# checkpointing recomputes every layer's forward pass (a third more compute); the fused loss recomputes nothing.
SAVINGS = ((False, False), (False, True), (True, False), (True, True))


@dataclass
class BatchShape:
    micro_batch: int
    accumulation: int
    checkpointing: bool
    fused_loss: bool
    plan: MemoryPlan | None  # None on a CPU

    def savings(self) -> str:
        used = [name for name, on in (("activation checkpointing", self.checkpointing),
                                      ("Liger's fused loss", self.fused_loss)) if on]
        return " and ".join(used) or "neither activation checkpointing nor a fused loss"


def choose_attention(device: Device, given: str | None) -> tuple[str, str]:
    """(the attention implementation, why)."""
    if given:
        return given, "as given by --attn_implementation"
    if not device.is_gpu:
        return "sdpa", "no GPU"
    if device.runs_flash_attention:
        return "flash_attention_2", "installed, and the GPU runs it"
    if device.repeats_kv:
        return SDPA_REPEATED_KV, "flash-attention 2 and sdpa's flash kernel need compute capability 8.0: k/v " \
                                 "repeated to every head, so that sdpa's memory-efficient kernel runs"
    return "sdpa", "flash-attention 2: not installed"




def allowed(given: bool | str | None, on: bool, available: bool = True) -> bool:
    """Whether a saving may be `on`: as given, or, left to choose ("auto", None), off or available."""
    return given == on if given not in ("auto", None) else available or not on


def choose_batch_shape(config: PretrainedConfig, block_size: int, device: Device, global_batch: int,
                       world_size: int = 1, zero: int | None = 2, micro_batch: int | str = "auto",
                       checkpointing: bool | str = "auto", fused_loss: bool | None = None) -> BatchShape:
    """The micro-batch, accumulation, checkpointing and fused loss of a run of `global_batch` sequences of
    `block_size` tokens per optimizer step, over `world_size` ranks of `device` under ZeRO stage `zero` (None: no
    DeepSpeed). micro_batch, checkpointing ("auto" or given) and fused_loss (None or given) as the flags say. Raises
    ValueError, in one line, when the global batch cannot be kept or an auto micro-batch fits nowhere."""
    per_rank = per_rank_batch(global_batch, world_size)
    if micro_batch != "auto" and per_rank % micro_batch:
        raise ValueError(f"a global batch of {global_batch} sequences is {per_rank} per rank, which micro-batches of "
                         f"{micro_batch} do not divide: pass a --per_device_train_batch_size that divides {per_rank}, "
                         "or auto")
    candidates = ([micro_batch] if micro_batch != "auto" else
                  [d for d in range(per_rank, 0, -1) if per_rank % d == 0])
    savings = [(c, f) for c, f in SAVINGS if allowed(checkpointing, c) and allowed(fused_loss, f, device.runs_liger)]
    if not device.is_gpu:  # nothing to plan for: the choices that need the least memory
        checkpointing = checkpointing if checkpointing != "auto" else True
        micro = next(d for d in candidates if d <= CPU_MICRO_BATCH) if micro_batch == "auto" else micro_batch
        return BatchShape(micro, per_rank // micro, checkpointing, bool(fused_loss), None)

    parameters = parameter_count(config)

    def plan(micro: int, saving: tuple[bool, bool]) -> MemoryPlan:
        return plan_memory(config, parameters, micro, block_size, world_size, zero, *saving,
                           repeated_kv=device.repeats_kv)

    for saving in savings:
        micro = next((d for d in candidates if fits(plan(d, saving), device.memory_bytes)), None)
        if micro is not None:
            return BatchShape(micro, per_rank // micro, *saving, plan(micro, saving))
    if micro_batch != "auto":  # the user's number: fit_to_device warns, with flags that fit
        return BatchShape(micro_batch, per_rank // micro_batch, *savings[-1], plan(micro_batch, savings[-1]))
    smallest = BatchShape(1, per_rank, *savings[-1], plan(1, savings[-1]))
    raise ValueError(f"micro-batch 1 x {block_size} tokens does not fit {MEMORY_MARGIN:.0%} of the "
                     f"{device.memory_bytes / GB:.1f} GB of this {device.name}, even with {smallest.savings()} "
                     f"(estimated {smallest.plan.total / GB:.1f} GB): "
                     + ", or ".join(ways_to_fit(config, block_size, device, world_size, zero, checkpointing,
                                                fused_loss)))


def ways_to_fit(config: PretrainedConfig, block_size: int, device: Device, world_size: int, zero: int | None,
                checkpointing: bool | str, fused_loss: bool | None) -> list[str]:
    """What would fit one sequence a rank, by the same plan: Liger's fused loss, a shorter block, more GPUs."""
    parameters = parameter_count(config)
    checkpointing = allowed(checkpointing, True)
    sharded = zero if zero and zero >= 2 else 2  # more GPUs help only where ZeRO splits the state over them

    def one_fits(block: int, ranks: int, fused: bool, stage: int | None = zero) -> bool:
        return fits(plan_memory(config, parameters, 1, block, ranks, stage, checkpointing, fused, device.repeats_kv),
                    device.memory_bytes)

    fused_now = bool(fused_loss) or device.runs_liger
    ways = []
    if fused_loss is None and not fused_now and dataclasses.replace(device, liger_installed=True).runs_liger \
            and one_fits(block_size, world_size, True):
        ways.append("pip install liger-kernel (its fused loss fits)")
    block = block_size // 2
    while block >= 128 and not one_fits(block, world_size, fused_now):
        block //= 2
    if block >= 128:
        ways.append(f"sequences of {block} tokens (--block_size, or --max_length for fine-tuning)")
    ranks = next((n for n in range(world_size + 1, 65) if one_fits(block_size, n, fused_now, sharded)), None)
    if ranks:
        ways.append(f"{ranks} GPUs (ZeRO-{sharded} splits the optimizer state over them"
                    + (")" if sharded == zero else ": DS_CONFIG=ds_config_zero2.json)"))
    ways.append("ZeRO-3 with the optimizer offloaded to the CPU (a DeepSpeed config with offload_optimizer; not "
                "estimated here)")
    return ways


def ranks_devices(device: Device, world_size: int) -> list[Device]:
    """Every rank's device, in rank order, gathered over the default process group (the Trainer's, started by
    training_args.world_size)."""
    if world_size == 1:
        return [device]
    devices = [None] * world_size
    dist.all_gather_object(devices, device)
    return devices


def common_device(devices: list[Device]) -> Device:
    """The device every rank plans for, so that all choose the same precision and batch shape (ranks with other
    accumulation steps would wait in ZeRO's collectives until --ddp_timeout): the least memory, the oldest compute
    capability, flash-attention and Liger only where every rank has them; a CPU if any rank is one."""
    if len(set(devices)) == 1:
        return devices[0]
    if not all(d.is_gpu for d in devices):
        return Device("CPU")
    smallest = min(devices, key=lambda d: d.memory_bytes)
    oldest = min(devices, key=lambda d: d.capability)
    name = smallest.name if smallest.name == oldest.name else f"{smallest.name} / {oldest.name}"
    return Device(name, smallest.memory_bytes, oldest.capability, all(d.flash_attention_installed for d in devices),
                  all(d.liger_installed for d in devices))


def describe_mix(devices: list[Device], common: Device) -> str:
    """One line: the devices of the ranks, and what they all plan for."""
    counts = Counter(d.describe() for d in devices)
    line = f"the ranks' devices differ ({', '.join(f'{n} x {d}' for d, n in counts.items())}): every rank plans for " \
           f"the least memory and the oldest compute capability among them, {common.describe()}"
    for what, installed in (("flash-attention 2", [d.flash_attention_installed for d in devices]),
                            ("liger-kernel", [d.liger_installed for d in devices])):
        if 0 < sum(installed) < len(installed):
            line += f"; {what} is installed on {sum(installed)} of {ranks(len(installed))} only, so none uses it"
    return line


def fit_to_device(config: PretrainedConfig, block_size: int, training_args, model_args,
                  device: Device | None = None):
    """Decide precision, attention and the batch shape for `device` (default: this rank's; with several ranks, what
    they all have: common_device), log each choice and why, set model_args.attn_implementation, and return the
    TrainingArguments rebuilt with the choices: rebuilt, so that the Trainer's own checks and the "auto" values of the
    DeepSpeed config see them. Raises ValueError in one line."""
    devices = ranks_devices(device or Device.of(training_args), training_args.world_size)
    device = common_device(devices)
    if len(set(devices)) > 1 and training_args.process_index == 0:
        log.warning(describe_mix(devices, device))
    precision, precision_reason = device.precision(training_args.bf16, training_args.fp16)
    model_args.attn_implementation, attention_reason = choose_attention(device, model_args.attn_implementation)
    log.info("on %s: %s (%s); %s attention (%s)", device.describe(), precision, precision_reason,
             model_args.attn_implementation, attention_reason)

    global_batch = requested_global_batch(training_args)
    world_size, zero = training_args.world_size, zero_stage(training_args)
    given = dict(checkpointing=training_args.activation_checkpointing, fused_loss=training_args.use_liger_kernel)
    shape = choose_batch_shape(config, block_size, device, global_batch, world_size, zero,
                               training_args.per_device_train_batch_size, **given)
    chosen = "chosen" if training_args.per_device_train_batch_size == "auto" else "given"
    if shape.plan is None:
        why = "no GPU to plan for"
    else:
        log.info("memory plan: %s", shape.plan.summary())
        within = fits(shape.plan, device.memory_bytes)
        why = (f"estimated {shape.plan.total / GB:.1f} GB, {'within' if within else 'more than'} {MEMORY_MARGIN:.0%} "
               f"of the GPU's {device.memory_bytes / GB:.1f} GB")
        if not within and training_args.should_log:  # once, not once per GPU
            log.warning("this run will probably run out of GPU memory: %s",
                        fitting_flags(config, block_size, device, global_batch, world_size, zero, **given))
    log.info("global batch %d sequences of %d tokens = micro-batch %d (%s) x %d accumulation steps x %s; %s (%s)",
             global_batch, block_size, shape.micro_batch, chosen, shape.accumulation, ranks(world_size),
             shape.savings(), why)
    return dataclasses.replace(
        training_args, bf16=precision == "bf16", fp16=precision == "fp16", global_batch_size=global_batch,
        per_device_train_batch_size=shape.micro_batch, gradient_accumulation_steps=shape.accumulation,
        activation_checkpointing=shape.checkpointing, gradient_checkpointing=None, use_liger_kernel=shape.fused_loss)


def fitting_flags(config: PretrainedConfig, block_size: int, device: Device, global_batch: int, world_size: int,
                  zero: int | None, checkpointing: bool | str, fused_loss: bool | None) -> str:
    """What the automatic choice would pass instead of a given micro-batch that does not fit: the same global batch,
    and the savings it needs; or, when nothing fits, the ways that would."""
    try:
        shape = choose_batch_shape(config, block_size, device, global_batch, world_size, zero, "auto", checkpointing,
                                   fused_loss)
    except ValueError as e:
        return str(e)
    flags = f"--per_device_train_batch_size {shape.micro_batch} --gradient_accumulation_steps {shape.accumulation}"
    flags += "".join(f" --{flag} true" for flag, on in (("activation_checkpointing", shape.checkpointing),
                                                        ("use_liger_kernel", shape.fused_loss)) if on)
    return f"use {flags} (the same global batch of {global_batch}; estimated {shape.plan.total / GB:.1f} GB), " \
           "or --per_device_train_batch_size auto"


# ---------------------------------------------------------------- the table of common cards in docs/gpus.md

# (name as the driver reports it, memory in MiB as nvidia-smi reports it, compute capability)
COMMON_CARDS = (
    ("Tesla T4", 15360, (7, 5)), ("Tesla P100-PCIE-16GB", 16280, (6, 0)), ("NVIDIA GeForce RTX 2080 Ti", 11264, (7, 5)),
    ("Tesla V100-SXM2-32GB", 32768, (7, 0)), ("NVIDIA GeForce RTX 3090", 24576, (8, 6)),
    ("NVIDIA GeForce RTX 4090", 24564, (8, 9)), ("NVIDIA GeForce RTX 5090", 32607, (12, 0)),
    ("NVIDIA A100-SXM4-40GB", 40960, (8, 0)), ("NVIDIA A100-SXM4-80GB", 81920, (8, 0)),
    ("NVIDIA H100 80GB HBM3", 81559, (9, 0)), ("NVIDIA H200", 143771, (9, 0)),
)
SUBSET_TOKENS = 574e6  # the 1M-line subset (GUIDE.md: ≈574 tokens a line on the first 100k lines)
ASSUMED_MFU = 0.3  # of the card's dense 16-bit peak, without checkpointing; not measured here
RECOMPUTE = 4 / 3  # checkpointing's recomputed forward pass: 8N instead of 6N FLOPs per token


def card_table(preset: str = "qwen2.5-0.5b", block_size: int = 2048) -> str:
    """A markdown table of the choices for one GPU of each common card, with hours for the 1M-line subset."""
    config = load_config(preset)
    with torch.device("meta"):
        per_token = flops_per_token(AutoModelForCausalLM.from_config(config), block_size)
    rows = ["| card | precision | micro-batch x accumulation | activation checkpointing | Liger's fused loss | "
            "estimated hours, 1 GPU |", "|---|---|---|---|---|---:|"]
    for name, mib, capability in COMMON_CARDS:
        device = Device(name, mib * 2**20, capability)
        precision, _ = device.precision()
        try:
            shape = choose_batch_shape(config, block_size, device, DEFAULT_GLOBAL_BATCH_SIZE)
            fused = "not needed"
        except ValueError:
            try:
                shape = choose_batch_shape(config, block_size, dataclasses.replace(device, liger_installed=True),
                                           DEFAULT_GLOBAL_BATCH_SIZE)
                fused = "needed: pip install liger-kernel"
            except ValueError:
                fitting = ways_to_fit(config, block_size, dataclasses.replace(device, liger_installed=True), 1, 2,
                                      "auto", None)[:-1]  # what the planner estimates, not ZeRO-3
                rows.append(f"| {device.describe()} | {precision} | does not fit one GPU; fits: "
                            f"{'; '.join(fitting)} | | | |")
                continue
        seconds = SUBSET_TOKENS * per_token / (peak_tflops(name) * 1e12 * ASSUMED_MFU)
        hours = seconds * (RECOMPUTE if shape.checkpointing else 1) / 3600
        rows.append(f"| {device.describe()} | {precision} | {shape.micro_batch} x {shape.accumulation} | "
                    f"{'on' if shape.checkpointing else 'off'} | {fused} | ≈ {hours:.1f} |")
    return "\n".join(rows)


def checkpointing_words(shape: BatchShape, given: bool | str, without: MemoryPlan) -> str:
    """Whether a plan has activation checkpointing, and why: as given, or what "auto" made of it."""
    if given != "auto":
        words = f"{'with' if shape.checkpointing else 'without'} activation checkpointing (as given)"
    elif shape.checkpointing:
        words = f"with activation checkpointing (auto: without it {without.total / GB:.1f} GB)"
    else:
        words = "without activation checkpointing (auto: not needed)"
    return words + (", with Liger's fused loss" if shape.fused_loss else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_name", default="qwen2.5-0.5b", help="preset (configs/) or config.json")
    p.add_argument("--config_overrides", help="as pretrain.py's, e.g. hidden_size=512,num_hidden_layers=8")
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--per_device_train_batch_size", type=int,
                   help=f"a micro-batch to plan besides the automatic choice ({CPU_MICRO_BATCH} without "
                        "--gpu_memory_gb)")
    p.add_argument("--global_batch_size", type=int, default=DEFAULT_GLOBAL_BATCH_SIZE)
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs in all (ZeRO splits over them)")
    p.add_argument("--zero_stage", type=int, choices=[-1, 0, 1, 2, 3], default=2,
                   help="DeepSpeed ZeRO stage; -1 for no DeepSpeed (plain DDP, autocast)")
    p.add_argument("--activation_checkpointing", choices=["auto", "true", "false"], default="auto",
                   help="auto: as pretrain.py, only when the run does not fit without it")
    p.add_argument("--use_liger_kernel", action="store_true", help="fused linear cross-entropy: no full logits")
    p.add_argument("--gpu_memory_gb", type=float,
                   help="the GPU's memory in GiB, nvidia-smi's MiB / 1024 (24 for an RTX 4090, 15 for a T4): the "
                        "automatic choice for it, and whether --per_device_train_batch_size fits")
    p.add_argument("--compute_capability", type=float, default=9.0,
                   help="the GPU's compute capability (7.5 for a T4, 8.0 for an A100; the table lists them): below "
                        "8.0 the attention keeps k/v repeated to every head")
    if len(sys.argv) == 1:
        print(card_table())
        return
    args = p.parse_args()
    try:
        config = load_config(args.config_name, args.config_overrides)
    except ValueError as e:
        p.error(str(e))
    parameters = parameter_count(config)
    zero = None if args.zero_stage < 0 else args.zero_stage
    checkpointing = {"auto": "auto", "true": True, "false": False}[args.activation_checkpointing]
    name = args.config_name + (f" ({args.config_overrides})" if args.config_overrides else "")
    print(f"{name}: {parameters:,} parameters; global batch {args.global_batch_size} sequences of {args.block_size} "
          f"tokens over {ranks(args.num_gpus)}, " + (f"ZeRO-{zero}" if zero is not None else "no DeepSpeed"))
    major, minor = divmod(round(args.compute_capability * 10), 10)
    if not args.gpu_memory_gb:  # no choice to make: the plan of one micro-batch, and what checkpointing changes
        micro = args.per_device_train_batch_size or CPU_MICRO_BATCH
        for on in [checkpointing] if checkpointing != "auto" else [False, True]:
            plan = plan_memory(config, parameters, micro, args.block_size, args.num_gpus, zero, on,
                               args.use_liger_kernel, Device("GPU", 0, (major, minor)).repeats_kv)
            print(f"micro-batch {micro} {'with' if on else 'without'} activation checkpointing: {plan.summary()}")
        return
    device = Device(f"GPU of {args.gpu_memory_gb:g} GiB", args.gpu_memory_gb * 2**30, (major, minor),
                    liger_installed=args.use_liger_kernel)
    given = dict(checkpointing=checkpointing, fused_loss=args.use_liger_kernel or None)
    print(f"on a {device.describe()}:")
    micro_batches = ["auto"] + ([args.per_device_train_batch_size] if args.per_device_train_batch_size else [])
    for micro in micro_batches:  # the choice first: what pretrain.py takes
        label = "the automatic choice" if micro == "auto" else "as given"
        try:
            shape = choose_batch_shape(config, args.block_size, device, args.global_batch_size, args.num_gpus, zero,
                                       micro, **given)
        except ValueError as e:
            print(f"{label}: {e}")
            continue
        without = plan_memory(config, parameters, shape.micro_batch, args.block_size, args.num_gpus, zero, False,
                              shape.fused_loss, device.repeats_kv)
        verdict = f"within {MEMORY_MARGIN:.0%} of the GPU"
        if not fits(shape.plan, device.memory_bytes):
            verdict = f"more than {MEMORY_MARGIN:.0%} of the GPU: " + fitting_flags(
                config, args.block_size, device, args.global_batch_size, args.num_gpus, zero, **given)
        print(f"{label}: micro-batch {shape.micro_batch} x {shape.accumulation} accumulation steps x "
              f"{ranks(args.num_gpus)}, {checkpointing_words(shape, checkpointing, without)}: {shape.plan.summary()}, "
              f"{verdict}")


if __name__ == "__main__":
    main()
