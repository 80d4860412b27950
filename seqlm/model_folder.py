"""Is this a model folder we can load as a causal LM? Checked up front, so that a wrong path costs one clear line,
not a traceback or half a minute of hub retries (transformers takes any missing `a/b` path for a hub id)."""
from __future__ import annotations

import json
from pathlib import Path

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
CAUSAL_LM_CLASSES = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                     for name in ((names,) if isinstance(names, str) else names)}


class ModelFolderError(ValueError):
    """A model path that cannot be loaded as a causal LM; the message is one line saying why."""


def is_local(path: str) -> bool:
    """A path that exists, or whose first folder does (output/sft, ./x): a local path, never a hub id."""
    p = Path(path)
    return p.exists() or p.is_absolute() or path.startswith(".") or Path(p.parts[0]).is_dir()


def check_model_folder(path: str) -> None:
    """Raise ModelFolderError unless `path` is a hub id or a folder holding a causal LM's config and weights."""
    if not is_local(path):
        return  # a hub id: from_pretrained will say what is wrong with it
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"no model folder {path}: train one (bash pretrain.sh, bash finetune.sh), or pass "
                               "--model_path with a checkpoint folder or a hub id")
    if not (folder / "config.json").is_file():
        deepspeed = folder.name.startswith("global_step")
        hint = " (a DeepSpeed global_step folder? use its checkpoint-N parent)" if deepspeed else ""
        raise ModelFolderError(f"{path} has no config.json: not a Hugging Face model folder{hint}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}/config.json is not valid JSON ({e})") from None
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    # A model type can have a causal LM class and still be saved as another head (BertForMaskedLM).
    causal_head = not architectures or set(architectures) & CAUSAL_LM_CLASSES
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal_head:
        kind = ", ".join(architectures) or model_type or "an unknown model type"
        raise ModelFolderError(f"{path} holds {kind}, not a causal language model")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelFolderError(f"{path} has a config.json but no weights ({SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME})")


def check_tokenizer_fits(path: str, tokenizer, vocab_size: int) -> None:
    """Raise ModelFolderError when the folder's tokenizer has ids its model has no embedding for."""
    if len(tokenizer) > vocab_size:
        raise ModelFolderError(f"{path}: the tokenizer has {len(tokenizer):,} tokens, the model only {vocab_size:,}: "
                               "they do not belong together")
