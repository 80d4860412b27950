"""The model: a preset architecture with random weights, or an HF checkpoint to continue from."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from seqlm import paths
from seqlm.device import Device
from seqlm.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
# sdpa with every query head given its own copy of k/v. Without a mask, transformers' sdpa passes grouped k/v with
# enable_gqa=True, which torch 2.13 runs only in its flash kernel (compute capability 8.0 and later) or in its math
# kernel, which keeps the whole heads x T x T score matrix in fp32: on a T4 or V100 that is the one taken. With
# repeated k/v the memory-efficient kernel runs there.
SDPA_REPEATED_KV = "sdpa_repeated_kv"


def sdpa_repeated_kv_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    groups = module.num_key_value_groups
    # To transformers' sdpa, heads with a k/v each are not grouped: it passes no enable_gqa.
    ungrouped = SimpleNamespace(num_key_value_groups=1, is_causal=getattr(module, "is_causal", True))
    return sdpa_attention_forward(ungrouped, query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask,
                                  **kwargs)


AttentionInterface.register(SDPA_REPEATED_KV, sdpa_repeated_kv_forward)
AttentionMaskInterface.register(SDPA_REPEATED_KV, sdpa_mask)  # the same masks as sdpa (padding, packed documents)


def load_config(name: str, overrides: str | None = None) -> PretrainedConfig:
    """A preset name (configs/NAME.json), a config.json path, or a model folder / hub id; `overrides` (run_clm.py's
    --config_overrides, "hidden_size=512,num_hidden_layers=8") changes some of its numbers. ValueError in one line for
    overrides it cannot take."""
    preset = paths.CONFIGS_DIR / f"{name}.json"
    config = AutoConfig.from_pretrained(str(preset if preset.is_file() else Path(name)))
    if overrides:
        try:
            config.update_from_string(overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--config_overrides {overrides}: {e}: give KEY=VALUE pairs of numbers in {name}'s "
                             "config, separated by commas") from None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and len(layer_types) != config.num_hidden_layers:
            values = config.to_dict()
            del values["layer_types"]  # one a layer, derived from num_hidden_layers when the config is made
            config = type(config).from_dict(values)
        if config.hidden_size % config.num_attention_heads or \
                config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"--config_overrides {overrides}: hidden_size ({config.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({config.num_attention_heads}), and that of num_key_value_heads "
                             f"({config.num_key_value_heads})")
    return config


def parameter_count(config: PretrainedConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return AutoModelForCausalLM.from_config(config).num_parameters()


def inference_device(requested: str = "auto") -> str:
    """Where chat.py, serve.py, evaluate.py and benchmark.py run a model: `requested` (cuda:1, cpu, ...), or for auto
    the first GPU, else Apple's GPU, else the CPU."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def inference_dtype(device: str, model_path: str) -> torch.dtype:
    """The precision to load the checkpoint `model_path` in on `device`: Device.inference_dtype, from that GPU's own
    properties (cuda:1's, not the first GPU's) and the precision the checkpoint was trained in; fp32 off CUDA. Loading
    in fp32 where fp16 was the rule is said in one line."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return torch.float32
    card = Device.from_properties(torch.cuda.get_device_properties(device))
    config = AutoConfig.from_pretrained(model_path)
    dtype, why = card.inference_dtype(config.dtype)
    if dtype != card.dtype:
        weights = parameter_count(config) * 4 / 1e9
        log.warning("%s loads in float32 on %s, %s: %s; %.1f GB of weights instead of %.1f", model_path, device,
                    card.describe(), why, weights, weights / 2)
    return dtype


def build_model(config: PretrainedConfig, model_name_or_path: str | None, attn: str) -> PreTrainedModel:
    """`attn`: the attention implementation (seqlm.training.fit.choose_attention)."""
    if model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, attn_implementation=attn, dtype=torch.float32)
        log.info("continuing from %s", model_name_or_path)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    embedding = model.get_input_embeddings().weight.numel()
    log.info("model %s, %s attention: %s parameters (%s in the embedding)", config.model_type, attn,
             f"{model.num_parameters():,}", f"{embedding:,}")
    return model


def document_separator(config: PretrainedConfig) -> int:
    """The id that ends every document: the model's eos_token_id (<|endoftext|> = 151643 for Qwen2.5). Not the
    tokenizer's eos_token, which is <|im_end|> in the Qwen chat tokenizers."""
    separator = config.eos_token_id
    if not isinstance(separator, int):
        raise ValueError(f"the model config needs one integer eos_token_id to separate documents (has {separator!r})")
    return separator


def check_compatible(config: PretrainedConfig, tokenizer, block_size: int, flag: str = "--block_size") -> None:
    """Raise ValueError, in one line saying how to fix it, for a tokenizer or block size (given by `flag`) the model
    cannot take."""
    if block_size > config.max_position_embeddings:
        raise ValueError(f"{flag} {block_size} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}: lower it")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer):,} tokens but the model's vocab_size is "
                         f"{config.vocab_size:,}: use the tokenizer that belongs to this config")


def load_config_and_tokenizer(model_args, block_size: int) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, int]:
    """Config, tokenizer and document separator, checked against each other; OSError/ValueError if unusable."""
    if model_args.config_overrides and model_args.model_name_or_path:
        raise ValueError("--config_overrides changes the architecture, which the weights of --model_name_or_path fix: "
                         "leave one of them out")
    config = load_config(model_args.model_name_or_path or model_args.config_name, model_args.config_overrides)
    tokenizer = load_tokenizer(model_args.tokenizer_name)
    check_compatible(config, tokenizer, block_size)
    return config, tokenizer, document_separator(config)


def end_text_with_separator(tokenizer: PreTrainedTokenizerBase, separator_id: int) -> None:
    """Make the document separator the tokenizer's eos_token. A pretrained model ends text where its documents ended;
    left alone, the Trainer would instead rewrite the model's eos_token_id to the tokenizer's (<|im_end|> in the Qwen
    chat tokenizers) before training, and the saved model would stop generating at the wrong token."""
    if tokenizer.eos_token_id != separator_id:
        log.info("tokenizer eos_token %s -> %s, the document separator", tokenizer.eos_token,
                 tokenizer.convert_ids_to_tokens(separator_id))
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(separator_id)
