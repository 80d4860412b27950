"""The precision chat.py, serve.py, evaluate.py and benchmark.py load a checkpoint in: from the chosen GPU's own
properties (stand-ins for what torch.cuda.get_device_properties reports, the CPU build of torch having no GPU), and from
the precision the checkpoint was trained in."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO

from seqlm.device import Device
from seqlm.model import inference_device, inference_dtype

# name: (total_memory, major, minor), as the cards report them
CARDS = {"Tesla T4": (15_655_829_504, 7, 5), "Tesla V100-SXM2-32GB": (34_089_730_048, 7, 0),
         "NVIDIA A100-SXM4-80GB": (85_097_971_712, 8, 0), "NVIDIA H100 80GB HBM3": (85_029_158_912, 9, 0)}
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def card(name: str) -> SimpleNamespace:
    memory, major, minor = CARDS[name]
    return SimpleNamespace(name=name, total_memory=memory, major=major, minor=minor)


@pytest.mark.parametrize("name, trained, expected", [
    ("Tesla T4", BF16, FP32), ("Tesla T4", FP32, FP32), ("Tesla T4", None, FP32), ("Tesla T4", FP16, FP16),
    ("Tesla V100-SXM2-32GB", BF16, FP32), ("Tesla V100-SXM2-32GB", FP16, FP16),
    ("NVIDIA A100-SXM4-80GB", BF16, BF16), ("NVIDIA A100-SXM4-80GB", FP16, BF16), ("NVIDIA A100-SXM4-80GB", FP32, BF16),
    ("NVIDIA H100 80GB HBM3", BF16, BF16),
])
def test_fp16_only_for_checkpoints_trained_in_it_on_cards_without_bf16(name, trained, expected):
    assert Device.from_properties(card(name)).inference_dtype(trained)[0] == expected


def checkpoint(folder, dtype: str):
    """A checkpoint's config.json as training saves it: the 0.5B architecture and the precision it was trained in."""
    folder.mkdir()
    config = json.loads((REPO / "configs" / "qwen2.5-0.5b.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": dtype}))
    return str(folder)


@pytest.fixture
def a100_and_t4(monkeypatch):
    """A machine whose cuda:0 is an A100 and cuda:1 a T4 ("cuda" is the current device, 0)."""
    gpus = [card("NVIDIA A100-SXM4-80GB"), card("Tesla T4")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpus[torch.device(device).index or 0])


def test_the_chosen_gpu_decides_not_the_first(a100_and_t4, tmp_path, caplog):
    bf16_trained = checkpoint(tmp_path / "sft", "bfloat16")
    assert inference_device() == "cuda" and inference_device("cuda:1") == "cuda:1"
    with caplog.at_level(logging.WARNING):
        assert inference_dtype("cuda", bf16_trained) == BF16
        assert inference_dtype("cuda:0", bf16_trained) == BF16
        assert caplog.messages == []
        assert inference_dtype("cuda:1", bf16_trained) == FP32  # was bfloat16: cuda:0's precision, emulated on a T4
    assert caplog.messages == [
        f"{bf16_trained} loads in float32 on cuda:1, Tesla T4 (compute capability 7.5, 15.7 GB): the GPU has no bf16, "
        "and fp16 could overflow a checkpoint trained in bfloat16 (activations past 65,504 become inf); 2.0 GB of "
        "weights instead of 1.0"]


def test_a_checkpoint_trained_in_fp16_runs_in_fp16_on_a_t4(a100_and_t4, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert inference_dtype("cuda:1", checkpoint(tmp_path / "sft", "float16")) == FP16
    assert caplog.messages == []


def test_inference_on_a_cpu_is_fp32(tmp_path):
    assert inference_device() == "cpu"
    assert inference_dtype("cpu", checkpoint(tmp_path / "sft", "bfloat16")) == FP32
