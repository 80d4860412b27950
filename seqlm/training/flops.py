"""Model FLOPs utilisation: the share of the hardware's peak that training turns into model arithmetic."""
from __future__ import annotations

import torch

# Dense 16-bit tensor peaks per device, TFLOP/s, with fp32 accumulation (vendor datasheets, without sparsity): bf16,
# or fp16 on cards without bf16 (T4, V100, RTX 20xx; P100 has no tensor cores: its fp16 rate). Longest names first, so
# "L40S" is matched before "L40" and "H100 PCIe" before "H100".
# A variant named by a longer name than its family's ("H100 NVL", "RTX 3090 Ti", "GB200") needs its own entry, or it
# gets the family's figure. The RTX 4090 D has no datasheet figure: the 4090's, times its 14,592 of the 4090's 16,384
# cores at the same clock.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.5, "H100": 989.0, "H200 NVL": 835.5, "H200": 989.0, "H800 PCIe": 756.0,
    "H800": 989.0, "H20": 148.0, "GH200": 989.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L20": 119.5, "A10": 125.0,
    "RTX 5090": 209.5, "RTX 4090 D": 147.1, "RTX 4090": 165.2, "RTX 3090 Ti": 80.0, "RTX 3090": 71.0,
    "GB200": 2500.0, "B200": 2250.0,
    "Tesla T4": 65.0, "V100-SXM2": 125.0, "V100-PCIE": 112.0, "V100S": 130.0, "P100-SXM2": 21.2, "P100-PCIE": 18.7,
    "RTX 2080 Ti": 53.8,
}


def peak_tflops(device_name: str) -> float | None:
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name:
            return PEAK_TFLOPS[name]
    return None


def device_peak_tflops() -> float | None:
    return peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, appendix B; as nanoGPT's estimate_mfu): N counts every
    parameter, the tied embedding included, since it is also the output matmul."""
    config = model.config
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6 * model.num_parameters() + 12 * layers * heads * head_dim * seq_len
