"""The model: a preset architecture with random weights, or an HF checkpoint to continue from."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from . import paths

log = logging.getLogger(__name__)


def presets() -> list[str]:
    return sorted(p.stem for p in paths.CONFIGS_DIR.glob("*.json"))


def load_config(name: str) -> PretrainedConfig:
    """A preset name (configs/NAME.json), a config.json path, or a model folder / hub id."""
    preset = paths.CONFIGS_DIR / f"{name}.json"
    return AutoConfig.from_pretrained(str(preset if preset.is_file() else Path(name)))


def default_attention() -> str:
    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


def build_model(config: PretrainedConfig, model_name_or_path: str | None, attn_implementation: str | None) -> PreTrainedModel:
    attn = attn_implementation or default_attention()
    if model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, attn_implementation=attn, dtype=torch.float32)
        log.info("continuing from %s", model_name_or_path)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    embedding = model.get_input_embeddings().weight.numel()
    log.info("model %s, %s attention: %s parameters (%s in the embedding)", config.model_type, attn,
             f"{model.num_parameters():,}", f"{embedding:,}")
    return model
