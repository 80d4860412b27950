"""The device a rank trains on, as the choices of seqlm.training.fit see it: its memory, and what its compute capability and
the installed packages let it run (bf16, flash-attention 2, Liger's Triton kernels)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from transformers.utils import is_flash_attn_2_available

BF16_CAPABILITY = (8, 0)  # Ampere and later: bf16 tensor cores; flash-attention 2 runs on the same GPUs
TRITON_CAPABILITY = (7, 0)  # the oldest GPUs Triton compiles for (torch's inductor refuses older), so Liger's too


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float | None = None  # None: a CPU
    capability: tuple[int, int] | None = None  # CUDA compute capability; None: a CPU
    flash_attention_installed: bool = False
    liger_installed: bool = False

    @classmethod
    def of(cls, training_args) -> Device:
        """This rank's device, from its properties: not mem_get_info(), which would open a CUDA context on GPU 0 from
        every rank."""
        if training_args.use_cpu or not torch.cuda.is_available():
            return cls("CPU")
        properties = torch.cuda.get_device_properties(training_args.device)
        return cls(properties.name, properties.total_memory, (properties.major, properties.minor),
                   is_flash_attn_2_available(), importlib.util.find_spec("liger_kernel") is not None)

    @property
    def is_gpu(self) -> bool:
        return self.capability is not None

    @property
    def has_bf16(self) -> bool:
        return self.is_gpu and self.capability >= BF16_CAPABILITY

    @property
    def runs_flash_attention(self) -> bool:
        return self.has_bf16 and self.flash_attention_installed

    @property
    def runs_liger(self) -> bool:
        return self.is_gpu and self.capability >= TRITON_CAPABILITY and self.liger_installed

    def describe(self) -> str:
        if not self.is_gpu:
            return self.name
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]}, " \
               f"{self.memory_bytes / 1e9:.1f} GB)"
