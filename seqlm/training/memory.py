"""Per-GPU memory of a bf16 or fp16 training run (the same bytes), estimated before launch: an OOM should cost seconds,
not an hour. seqlm.training.fit chooses the micro-batch, checkpointing and fused loss from it, and its command line
prints a plan (python -m seqlm.training.fit --help).

Four parts, in bytes:
- weights, gradients and AdamW state, by ZeRO stage (ZeRO paper, section 5: 16-bit weights and gradients, an fp32
  master copy and two fp32 moments; stages 1 and 2 split the fp32 parts, and stage 2 the gradients, over the GPUs);
- the activations kept for the backward pass, per token, from the tensors transformers' Qwen2 (and Llama-shaped)
  layers save in 16 bits with sdpa or flash attention (tests/training/test_memory.py counts them with saved-tensor hooks);
- the logits: the loss upcasts them to fp32 and keeps its log-softmax, and the backward adds a gradient of each,
  10 bytes per token and vocabulary entry (151,936 for Qwen): a Liger fused cross-entropy never materialises them;
- what the CUDA context and the caching allocator take beyond tensors.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

GB = 1e9
CUDA_OVERHEAD = 1.5 * GB  # CUDA context, cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 1.1  # the caching allocator rounds and fragments
MASTER_AND_MOMENTS = 12  # bytes per parameter: fp32 master weights and AdamW's two fp32 moments
FP32_GRADIENTS = 4
MEMORY_MARGIN = 0.9  # a plan may fill this share of the GPU: the rest absorbs the estimate's error


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
    """(tensors, total) in GB of the plan seqlm.training.fit logged in a run's `output`: the tensors are what
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
    return tokens * 10 * config.vocab_size


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
