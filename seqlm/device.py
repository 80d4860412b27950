"""The device a rank trains on, as the choices of seqlm.training.fit see it: its memory, and what its compute capability and
the installed packages let it run (bf16, flash-attention 2, Liger's Triton kernels)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from transformers.utils import is_flash_attn_2_available

BF16_CAPABILITY = (8, 0)  # Ampere and later: bf16 tensor cores; flash-attention 2 runs on the same GPUs
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
        return cls.from_properties(torch.cuda.get_device_properties(training_args.device))

    @classmethod
    def from_properties(cls, properties) -> Device:
        """A GPU from what torch.cuda.get_device_properties reports: name, total_memory, major, minor."""
        return cls(properties.name, properties.total_memory, (properties.major, properties.minor),
                   is_flash_attn_2_available(), importlib.util.find_spec("liger_kernel") is not None)

    @property
    def is_gpu(self) -> bool:
        return self.capability is not None

    @property
    def has_bf16(self) -> bool:
        return self.is_gpu and self.capability >= BF16_CAPABILITY

    def precision(self, bf16: bool | None = None, fp16: bool | None = None) -> tuple[str, str]:
        """(bf16, fp16 or fp32, why): the one rule for training, chat, serving and evaluation. bf16 where the GPU
        has it in hardware (compute capability 8.0: torch.cuda.is_bf16_supported() also says yes on a T4 or V100,
        where bf16 is emulated and slow), fp16 on other GPUs, fp32 on a CPU. A flag set true wins; a flag set false
        removes only its own choice (--fp16 false on an H100 still trains in bf16; --bf16 false there gives fp16)."""
        if bf16:
            return "bf16", "as given by --bf16"
        if fp16:
            return "fp16", "as given by --fp16"
        if not self.is_gpu:
            return "fp32", "no GPU"
        if self.has_bf16 and bf16 is None:
            return "bf16", "the GPU has bf16"
        if fp16 is None:
            why = "--bf16 false" if self.has_bf16 else "the GPU has no bf16 (it needs compute capability 8.0)"
            return "fp16", f"{why}; with DeepSpeed's dynamic loss scaling"
        return "fp32", "as given by --bf16 / --fp16 false"

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the rule, as a torch dtype."""
        return DTYPES[self.precision()[0]]

    def inference_dtype(self, trained: torch.dtype | None) -> tuple[torch.dtype, str]:
        """(dtype, why) to run a checkpoint trained in `trained` (its config's dtype; None where it says none): the rule's
        precision, but fp32 instead of fp16 on a GPU without bf16 unless the checkpoint was trained in fp16. Training
        in fp16 kept every forward pass within fp16's range (a non-finite loss stops a run); bf16 has fp32's range, and
        a model trained in it may have activations past fp16's largest value, 65,504, which become inf in fp16 (Qwen2
        models trained in bf16 give NaN or only "!" in fp16: QwenLM/Qwen3#761, #868). fp32 is the safe choice there,
        at 4 bytes a parameter instead of 2."""
        precision, why = self.precision()
        if precision != "fp16" or trained == torch.float16:
            return DTYPES[precision], why
        trained_in = str(trained).removeprefix("torch.") if trained else "a precision its config does not say"
        return torch.float32, (f"the GPU has no bf16, and fp16 could overflow a checkpoint trained in {trained_in} "
                               "(activations past 65,504 become inf)")

    @property
    def repeats_kv(self) -> bool:
        """Whether sdpa gets k/v repeated to every query head (seqlm.model.SDPA_REPEATED_KV): on GPUs before compute
        capability 8.0, where torch's only fused kernel for grouped heads (flash) does not run."""
        return self.is_gpu and self.capability < BF16_CAPABILITY

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
