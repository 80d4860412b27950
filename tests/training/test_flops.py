"""The FLOPs-per-token formula behind the logged MFU, checked against torch's own FLOP counter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from seqlm.model import load_config
from seqlm.training.flops import flops_per_token, peak_tflops


@pytest.mark.parametrize("preset, seq_len", [("tiny", 256), ("qwen2.5-0.5b", 2048)])
def test_formula_matches_torch_flop_counter(preset, seq_len):
    # The meta device gives shapes without memory: the real 0.5B config at its real block size costs nothing.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(preset), attn_implementation="sdpa")
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / seq_len
    assert abs(flops_per_token(model, seq_len) / counted - 1) < 0.03


def test_qwen25_05b_flops_per_token_at_2048():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config("qwen2.5-0.5b"))
    assert flops_per_token(model, 2048) == 6 * 494_032_768 + 12 * 24 * 14 * 64 * 2048  # ≈ 3.49 GFLOP


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA A800 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0),
                                        ("NVIDIA GeForce RTX 4090", 165.2), ("NVIDIA GeForce RTX 5090", 209.5),
                                        ("NVIDIA H800", 989.0), ("Some Future GPU", None),
                                        # variants whose family's name is in theirs, as nvidia-smi prints them
                                        ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200 NVL", 835.5),
                                        ("NVIDIA H800 PCIe", 756.0), ("NVIDIA GeForce RTX 3090 Ti", 80.0),
                                        ("NVIDIA GeForce RTX 4090 D", 147.1), ("NVIDIA GB200", 2500.0),
                                        ("NVIDIA GeForce RTX 3090", 71.0), ("NVIDIA B200", 2250.0)])
def test_peak_table(name, peak):
    assert peak_tflops(name) == peak
