"""Per-GPU memory of a bf16 or fp16 training run (the same bytes), estimated before launch: an OOM should cost seconds,
not an hour. seqlm.training.fit chooses the micro-batch, checkpointing and fused loss from it, and its command line
prints a plan (python -m seqlm.training.fit --help).

Four parts, in bytes:
- weights, gradients and AdamW state, by ZeRO stage (ZeRO paper, section 5: 16-bit weights, an fp32 master copy and
  two fp32 moments; stages 1 and 2 split the fp32 parts over the GPUs). Gradients, as ds_config_zero2.json has
  DeepSpeed 0.19.8 keep them (runtime/zero/stage_1_and_2.py): summed over the micro-batches in an fp32 buffer of the
  rank's partition (`data_types.grad_accum_dtype`), which the optimizer step then takes as its fp32 gradient; during
  the backward pass, two 16-bit buckets of `reduce_bucket_size` elements (`overlap_comm` reduces one while the other
  fills);
- the activations kept for the backward pass, per token, from the tensors transformers' Qwen2 (and Llama-shaped)
  layers save in 16 bits with sdpa or flash attention (tests/training/test_memory.py counts them with saved-tensor hooks);
- the logits: at the start of the backward pass the loss holds its fp32 log-softmax, the gradient of it and the
  gradient of its input, 12 bytes per token and vocabulary entry (151,936 for Qwen; the forward pass peaks at 10:
  16-bit logits, their fp32 copy, the log-softmax); a Liger fused cross-entropy never materialises them;
- what the CUDA context and the caching allocator take beyond tensors.

The peak is the start of the backward pass, everything above at once. The optimizer step comes after the
activations, the logits and the buckets are gone, and its fp32 gradient is the accumulation buffer itself: it adds
less (torch AdamW's temporaries, a few bytes a parameter of the partition) than the backward pass held.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from seqlm.paths import REPO

GB = 1e9
CUDA_OVERHEAD = 1.5 * GB  # CUDA context, cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 1.1  # the caching allocator rounds and fragments
MASTER_AND_MOMENTS = 12  # bytes per parameter: fp32 master weights and AdamW's two fp32 moments
FP32_GRADIENTS = 4  # the accumulation buffer (data_types.grad_accum_dtype fp32), also the optimizer step's gradient
REDUCE_BUCKET = json.loads((REPO / "ds_config_zero2.json").read_text())["zero_optimization"]["reduce_bucket_size"]
LOSS_BYTES = 12  # per token and vocabulary entry, at the start of the backward pass: see the module's docstring
MEMORY_MARGIN = 0.9  # a plan may fill this share of the GPU: the rest absorbs the estimate's error


@dataclass
class MemoryPlan:
    parameters: int
    weights_and_gradients: float  # the 16-bit buckets included
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
    """(tensors, total) in GB of the plan seqlm.training.fit logged in a run's `output`: the tensors are what
    torch.cuda.max_memory_allocated measures, the total adds the allocator's and the CUDA context's share."""
    if match := PLAN_LINE.search(output):
        total, *parts = map(float, match.groups())
        return sum(parts), total
    return None


def state_bytes(parameters: int, zero_stage: int | None, world_size: int) -> tuple[float, float]:
    """(16-bit weights + fp32 gradients + 16-bit buckets, fp32 optimizer state) per GPU. zero_stage None: no
    DeepSpeed, torch autocast (fp32 weights and gradients, bf16 copies of the weights while computing)."""
    if zero_stage is None:
        return (4 + 4 + 2) * parameters, 8 * parameters
    gradients = FP32_GRADIENTS * parameters / (world_size if zero_stage >= 2 else 1)
    buckets = 2 * REDUCE_BUCKET * 2
    # Stage 3 splits the weights too; estimated as stage 2 (an upper bound).
    optimizer = MASTER_AND_MOMENTS * parameters / (world_size if zero_stage >= 1 else 1)
    return 2 * parameters + gradients + buckets, optimizer


def layer_activation_bytes(config: PretrainedConfig, repeated_kv: bool = False) -> int:
    """Bytes one decoder layer keeps per token for the backward pass in bf16 or fp16 (measured in bf16, see tests/training/test_memory.py):
    its two RMSNorms (fp32 input and bf16 output each: 6h + 6h) and residual inputs, the MLP's gate, up, activation
    and product (4 x 2 bytes x intermediate), q/k/v and the attention output (2 bytes each), fp32 log-sum-exp per
    head. `repeated_kv`: k and v as wide as q (seqlm.model.SDPA_REPEATED_KV, GPUs before compute capability 8.0)."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = q if repeated_kv else config.num_key_value_heads * head_dim
    return 16 * h + 8 * config.intermediate_size + 4 * q + 4 * kv + 4 * heads + 8


def saved_activation_bytes(config: PretrainedConfig, tokens: int, checkpointing: bool, repeated_kv: bool = False) -> int:
    """What the forward pass of the model body keeps for `tokens` tokens (batch x sequence), the logits excluded:
    every layer's activations, or with checkpointing each layer's input only (2h); plus the final norm (8h) and, without
    checkpointing, the rotary tables."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    if checkpointing:
        return tokens * (2 * h * layers + 8 * h + 20)
    return tokens * (layer_activation_bytes(config, repeated_kv) * layers + 8 * h + 2 * head_dim + 20)


def activation_bytes(config: PretrainedConfig, tokens: int, checkpointing: bool, repeated_kv: bool = False) -> int:
    """The peak: with checkpointing, the backward pass recomputes one layer at a time in full."""
    recomputed = tokens * layer_activation_bytes(config, repeated_kv) if checkpointing else 0
    return saved_activation_bytes(config, tokens, checkpointing, repeated_kv) + recomputed


def logits_bytes(config: PretrainedConfig, tokens: int, fused_cross_entropy: bool) -> float:
    if fused_cross_entropy:
        # Liger's fused linear cross-entropy: a chunk of logits the size of the hidden states, the input's
        # gradient, and an fp32 gradient of the output matrix.
        return tokens * 4 * config.hidden_size + 4 * config.vocab_size * config.hidden_size
    return tokens * LOSS_BYTES * config.vocab_size


def plan_memory(config: PretrainedConfig, parameters: int, micro_batch: int, block_size: int, world_size: int = 1,
                zero_stage: int | None = 2, checkpointing: bool = True,
                fused_cross_entropy: bool = False, repeated_kv: bool = False) -> MemoryPlan:
    tokens = micro_batch * block_size
    weights, optimizer = state_bytes(parameters, zero_stage, world_size)
    return MemoryPlan(parameters, weights, optimizer, activation_bytes(config, tokens, checkpointing, repeated_kv),
                      logits_bytes(config, tokens, fused_cross_entropy))


def fits(plan: MemoryPlan, gpu_bytes: float) -> bool:
    """The one memory rule: a plan fits a GPU when it fills at most MEMORY_MARGIN of it."""
    return plan.total <= MEMORY_MARGIN * gpu_bytes


def zero_stage(training_args) -> int | None:
    """The ZeRO stage of the run's DeepSpeed config (a path or a dict); None without DeepSpeed."""
    config = training_args.deepspeed
    if not config:
        return None
    if isinstance(config, str):
        config = json.loads(Path(config).read_text())
    return int(config.get("zero_optimization", {}).get("stage", 0))
