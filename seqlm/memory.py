"""Per-GPU memory of a bf16 or fp16 training run (the same bytes), estimated before launch: an OOM should cost seconds,
not an hour. seqlm.fit chooses the micro-batch, checkpointing and fused loss from it.

    python -m seqlm.memory --config_name qwen2.5-0.5b --block_size 2048 --per_device_train_batch_size 8 \\
        --num_gpus 8 --zero_stage 2 --gpu_memory_gb 80

Four parts, in bytes:
- weights, gradients and AdamW state, by ZeRO stage (ZeRO paper, section 5: 16-bit weights and gradients, an fp32
  master copy and two fp32 moments; stages 1 and 2 split the fp32 parts, and stage 2 the gradients, over the GPUs);
- the activations kept for the backward pass, per token, from the tensors transformers' Qwen2 (and Llama-shaped)
  layers save in 16 bits with sdpa or flash attention (tests/test_memory.py counts them with saved-tensor hooks);
- the logits: the loss upcasts them to fp32 and keeps its log-softmax, and the backward adds a gradient of each,
  10 bytes per token and vocabulary entry (151,936 for Qwen): a Liger fused cross-entropy never materialises them;
- what the CUDA context and the caching allocator take beyond tensors.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from .device import Device
from .model import load_config, parameter_count

log = logging.getLogger(__name__)

GB = 1e9
CUDA_OVERHEAD = 1.5 * GB  # CUDA context, cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 1.1  # the caching allocator rounds and fragments
MASTER_AND_MOMENTS = 12  # bytes per parameter: fp32 master weights and AdamW's two fp32 moments
FP32_GRADIENTS = 4


@dataclass
class MemoryPlan:
    parameters: int
    weights_and_gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (self.weights_and_gradients + self.optimizer + self.activations + self.logits) * FRAGMENTATION \
            + CUDA_OVERHEAD

    def summary(self) -> str:
        parts = [f"{name} {value / GB:.1f}" for name, value in (
            ("weights+gradients", self.weights_and_gradients), ("optimizer", self.optimizer),
            ("activations", self.activations), ("logits", self.logits))]
        return f"≈ {self.total / GB:.1f} GB per GPU ({', '.join(parts)} GB, plus allocator and CUDA context)"


PLAN_LINE = re.compile(r"memory plan: ≈ ([\d.]+) GB per GPU \(weights\+gradients ([\d.]+), optimizer ([\d.]+), "
                       r"activations ([\d.]+), logits ([\d.]+) GB")


def logged_plan(output: str) -> tuple[float, float] | None:
    """(tensors, total) in GB of the plan check_gpu_memory logged in a run's `output`: the tensors are what
    torch.cuda.max_memory_allocated measures, the total adds the allocator's and the CUDA context's share."""
    if match := PLAN_LINE.search(output):
        total, *parts = map(float, match.groups())
        return sum(parts), total
    return None


def state_bytes(parameters: int, zero_stage: int | None, world_size: int) -> tuple[float, float]:
    """(16-bit weights + gradients, fp32 optimizer state) per GPU. zero_stage None: no DeepSpeed, torch autocast
    (fp32 weights and gradients, bf16 copies of the weights while computing)."""
    if zero_stage is None:
        return (4 + 4 + 2) * parameters, 8 * parameters
    gradients = 2 * parameters / world_size if zero_stage >= 2 else 2 * parameters
    # DeepSpeed's ZeRO optimizers (bf16 and fp16 alike) also keep fp32 gradients (of their partition) to step from.
    optimizer = (MASTER_AND_MOMENTS + FP32_GRADIENTS) * parameters
    # Stage 3 splits the weights too; estimated as stage 2 (an upper bound).
    return 2 * parameters + gradients, optimizer / (world_size if zero_stage >= 1 else 1)


def layer_activation_bytes(config: PretrainedConfig) -> int:
    """Bytes one decoder layer keeps per token for the backward pass in bf16 or fp16 (measured in bf16, see tests/test_memory.py):
    its two RMSNorms (fp32 input and bf16 output each: 6h + 6h) and residual inputs, the MLP's gate, up, activation
    and product (4 x 2 bytes x intermediate), q/k/v and the attention output (2 bytes each), fp32 log-sum-exp per
    head."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    return 16 * h + 8 * config.intermediate_size + 4 * q + 4 * kv + 4 * heads + 8


def saved_activation_bytes(config: PretrainedConfig, tokens: int, checkpointing: bool) -> int:
    """What the forward pass of the model body keeps for `tokens` tokens (batch x sequence), the logits excluded:
    every layer's activations, or with checkpointing each layer's input only (2h); plus the final norm (8h) and, without
    checkpointing, the rotary tables."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    if checkpointing:
        return tokens * (2 * h * layers + 8 * h + 20)
    return tokens * (layer_activation_bytes(config) * layers + 8 * h + 2 * head_dim + 20)


def activation_bytes(config: PretrainedConfig, tokens: int, checkpointing: bool) -> int:
    """The peak: with checkpointing, the backward pass recomputes one layer at a time in full."""
    recomputed = tokens * layer_activation_bytes(config) if checkpointing else 0
    return saved_activation_bytes(config, tokens, checkpointing) + recomputed


def logits_bytes(config: PretrainedConfig, tokens: int, fused_cross_entropy: bool) -> float:
    if fused_cross_entropy:
        # Liger's fused linear cross-entropy: a chunk of logits the size of the hidden states, the input's
        # gradient, and an fp32 gradient of the output matrix.
        return tokens * 4 * config.hidden_size + 4 * config.vocab_size * config.hidden_size
    return tokens * 10 * config.vocab_size


def plan_memory(config: PretrainedConfig, parameters: int, micro_batch: int, block_size: int, world_size: int = 1,
                zero_stage: int | None = 2, checkpointing: bool = True,
                fused_cross_entropy: bool = False) -> MemoryPlan:
    tokens = micro_batch * block_size
    weights, optimizer = state_bytes(parameters, zero_stage, world_size)
    return MemoryPlan(parameters, weights, optimizer, activation_bytes(config, tokens, checkpointing),
                      logits_bytes(config, tokens, fused_cross_entropy))


def largest_micro_batch(config: PretrainedConfig, parameters: int, gpu_bytes: float, block_size: int,
                        **settings) -> int:
    """The largest micro-batch whose plan fits `gpu_bytes` (0 if not even one sequence does)."""
    fits = lambda b: plan_memory(config, parameters, b, block_size, **settings).total <= gpu_bytes  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def advice(config: PretrainedConfig, parameters: int, gpu_bytes: float, micro_batch: int, accumulation: int,
           block_size: int, **settings) -> str | None:
    """None when the run fits; else one line: what does not fit, and flags that keep the global batch and do fit."""
    plan = plan_memory(config, parameters, micro_batch, block_size, **settings)
    if plan.total <= gpu_bytes:
        return None
    fitting = largest_micro_batch(config, parameters, gpu_bytes, block_size, **settings)
    message = (f"micro-batch {micro_batch} x {block_size} tokens needs {plan.summary()}, more than the "
               f"{gpu_bytes / GB:.0f} GB of this GPU: ")
    if fitting == 0:
        hint = "not even one sequence fits" + ("" if settings.get("checkpointing") else
                                                ": turn on --activation_checkpointing")
        return message + hint + ", or lower --block_size, or use more GPUs with ZeRO"
    fitting = max(d for d in range(1, fitting + 1) if micro_batch % d == 0)  # keeps the global batch exact
    return message + (f"use --per_device_train_batch_size {fitting} --gradient_accumulation_steps "
                      f"{accumulation * micro_batch // fitting} (same global batch)")


def zero_stage(training_args) -> int | None:
    """The ZeRO stage of the run's DeepSpeed config (a path or a dict); None without DeepSpeed."""
    config = training_args.deepspeed
    if not config:
        return None
    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    return int(config.get("zero_optimization", {}).get("stage", 0))


def run_settings(config: PretrainedConfig, training_args) -> dict:
    """What the memory of this run depends on besides the batch shape."""
    return dict(world_size=training_args.world_size, zero_stage=zero_stage(training_args),
                fused_cross_entropy=bool(training_args.use_liger_kernel))


def check_gpu_memory(config: PretrainedConfig, block_size: int, training_args, gpu_bytes: float | None = None) -> None:
    """On a GPU (of `gpu_bytes`, default this rank's), log the plan of this run; warn, with flags that fit, when it
    exceeds the GPU. A warning, not an error: the estimate can be off by a few GB, and the user may know better."""
    gpu_bytes = gpu_bytes or Device.of(training_args).memory_bytes
    if gpu_bytes is None:
        return
    parameters = parameter_count(config)
    settings = dict(run_settings(config, training_args), checkpointing=bool(training_args.activation_checkpointing))
    micro_batch = training_args.per_device_train_batch_size
    log.info("memory plan: %s", plan_memory(config, parameters, micro_batch, block_size, **settings).summary())
    warning = advice(config, parameters, gpu_bytes, micro_batch, training_args.gradient_accumulation_steps,
                     block_size, **settings)
    if warning and training_args.should_log:  # once, not once per GPU
        log.warning("this run will probably run out of GPU memory: %s", warning)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_name", default="qwen2.5-0.5b", help="preset (configs/) or config.json")
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs in all (ZeRO splits over them)")
    p.add_argument("--zero_stage", type=int, choices=[-1, 0, 1, 2, 3], default=2,
                   help="DeepSpeed ZeRO stage; -1 for no DeepSpeed (plain DDP, autocast)")
    p.add_argument("--activation_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--use_liger_kernel", action="store_true", help="fused linear cross-entropy: no full logits")
    p.add_argument("--gpu_memory_gb", type=float, help="also print the largest micro-batch that fits this")
    args = p.parse_args()
    config = load_config(args.config_name)
    parameters = parameter_count(config)
    settings = dict(world_size=args.num_gpus, zero_stage=None if args.zero_stage < 0 else args.zero_stage,
                    checkpointing=args.activation_checkpointing, fused_cross_entropy=args.use_liger_kernel)
    plan = plan_memory(config, parameters, args.per_device_train_batch_size, args.block_size, **settings)
    print(f"{args.config_name}: {parameters:,} parameters; micro-batch {args.per_device_train_batch_size} x "
          f"{args.block_size} tokens: {plan.summary()}")
    if args.gpu_memory_gb:
        fitting = largest_micro_batch(config, parameters, args.gpu_memory_gb * GB, args.block_size, **settings)
        print(f"largest micro-batch that fits {args.gpu_memory_gb:g} GB: {fitting}")


if __name__ == "__main__":
    main()
