"""The model presets in configs/: the Qwen2.5-0.5B architecture and the tiny one build, and fit the tokenizer; and
--config_overrides, which changes a preset's numbers."""
import json
import os

import pytest
import torch
from helpers import ENDOFTEXT, REPO, tiny_parameters
from transformers import AutoConfig, AutoModelForCausalLM

from seqlm.model import load_config, parameter_count

CONFIGS = os.path.join(REPO, "configs")


def load(name):
    return AutoConfig.from_pretrained(os.path.join(CONFIGS, f"{name}.json"))


def test_qwen25_05b_preset_builds_494m_parameters(offline_qwen_tokenizer):
    config = load("qwen2.5-0.5b")
    assert config.model_type == "qwen2"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (896, 4864, 24, 14, 2)
    assert config.tie_word_embeddings is True
    assert config.eos_token_id == ENDOFTEXT and config.bos_token_id == ENDOFTEXT
    assert config.vocab_size == 151936 >= len(offline_qwen_tokenizer)
    assert offline_qwen_tokenizer.convert_ids_to_tokens(config.eos_token_id) == "<|endoftext|>"
    with torch.device("meta"):  # shapes only: the count does not need 2 GB of random weights
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.num_parameters() == 494_032_768
    assert model.get_input_embeddings().weight.numel() == 151936 * 896
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied


def test_tiny_preset_builds_and_runs(offline_qwen_tokenizer):
    config = load("tiny")
    assert config.eos_token_id == ENDOFTEXT
    assert config.vocab_size >= len(offline_qwen_tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor([offline_qwen_tokenizer("人民日报社论", add_special_tokens=False)["input_ids"] + [ENDOFTEXT]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "tiny"])
def test_preset_files_are_plain_json_with_one_eos(name):
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        raw = json.load(f)
    assert raw["eos_token_id"] == ENDOFTEXT  # one integer: the document separator is taken from it
    assert raw["vocab_size"] == 151936


def test_config_overrides_change_a_presets_numbers():
    """--config_overrides (run_clm.py's): the tiny preset, narrower and one layer deeper."""
    config = load_config("tiny", "hidden_size=32,intermediate_size=128,num_hidden_layers=3")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (32, 128, 3)
    assert (config.vocab_size, config.num_attention_heads, config.num_key_value_heads) == (151936, 4, 2)
    assert parameter_count(config) == tiny_parameters(32, 128, 3)


@pytest.mark.parametrize("overrides, error", [
    ("hiden_size=32", "key hiden_size isn't in the original config dict"),
    ("hidden_size=wide", "invalid literal for int() with base 10: 'wide'"),
    ("sliding_window=8", "You can only update int, float, bool or string values in the config, got 8 for key "
                         "sliding_window"),
])
def test_config_overrides_it_cannot_take_are_one_line(overrides, error):
    with pytest.raises(ValueError) as refused:
        load_config("tiny", overrides)
    assert str(refused.value) == (f"--config_overrides {overrides}: {error}: give KEY=VALUE pairs of numbers in tiny's "
                                  "config, separated by commas")


def test_config_overrides_that_split_heads_unevenly_are_one_line():
    with pytest.raises(ValueError, match=r"^--config_overrides hidden_size=30: hidden_size \(30\) must be a multiple "
                                         r"of num_attention_heads \(4\), and that of num_key_value_heads \(2\)$"):
        load_config("tiny", "hidden_size=30")
