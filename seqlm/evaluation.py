"""Held-out metrics that compare across tokenizers and block sizes: bits per character and per UTF-8 byte.

The loss is the mean negative log-likelihood, in nats, per predicted token, so its scale depends on how much text a
token holds: a tokenizer with longer tokens has a higher loss for a model that is just as good. The information per
unit of text does not:
    bits per character = loss / ln 2 × tokens / characters        (bytes likewise, with the UTF-8 bytes)
The tokens count every document's separator (predicting where a document ends is part of the model); characters
and bytes are those of the documents' text, from the token cache's manifest. The ratio is that of whole files, so it
also holds when only the first blocks are evaluated."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm import tqdm
from transformers import TrainerCallback

from .corpus import LineStats, iter_texts
from .token_cache import BlockDataset, TokenCache, build_token_cache


@dataclass(frozen=True)
class TextSize:
    """How much text a token stream holds: its tokens, and the characters and UTF-8 bytes they encode."""

    tokens: int
    chars: int
    bytes: int

    def __add__(self, other: TextSize) -> TextSize:
        return TextSize(self.tokens + other.tokens, self.chars + other.chars, self.bytes + other.bytes)

    def bits(self, loss: float, prefix: str = "") -> dict[str, float]:
        """Bits per character and per byte of a mean loss (nats per token) on this text."""
        bits_per_token = loss / math.log(2)
        return {f"{prefix}bits_per_char": bits_per_token * self.tokens / self.chars,
                f"{prefix}bits_per_byte": bits_per_token * self.tokens / self.bytes}


def text_size(cache: TokenCache) -> TextSize:
    m = cache.manifest
    if "num_chars" not in m:
        # A cache built before the manifest counted its text: count it from the source, which still exists (its
        # content is part of the cache key, and pretrain.py checks the file is there).
        stats = LineStats()
        num_bytes = sum(len(text.encode("utf-8")) for text in iter_texts(m["source"], stats))
        return TextSize(m["num_tokens"], stats.chars, num_bytes)
    return TextSize(m["num_tokens"], m["num_chars"], m["num_bytes"])


def block_datasets(dataset: Dataset) -> list[BlockDataset]:
    """The BlockDatasets inside an evaluation dataset as pretrain.py builds it (Subset of ConcatDataset of them)."""
    if isinstance(dataset, BlockDataset):
        return [dataset]
    if isinstance(dataset, Subset):
        return block_datasets(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return [b for d in dataset.datasets for b in block_datasets(d)]
    raise TypeError(f"bits per character need token-cache blocks, not a {type(dataset).__name__}")


class BitsPerCharCallback(TrainerCallback):
    """Adds eval_bits_per_char and eval_bits_per_byte to every evaluation log, through `add_to` (called by
    SafeTrainer.log, before the Trainer's history, printers and loggers see the entry)."""

    def __init__(self, size: TextSize):
        self.size = size

    @classmethod
    def from_dataset(cls, eval_dataset: Dataset) -> BitsPerCharCallback:
        sizes = [text_size(b.cache) for b in block_datasets(eval_dataset)]
        return cls(sum(sizes[1:], sizes[0]))

    def add_to(self, logs: dict, state, args) -> None:
        if "eval_loss" in logs:
            logs.update(self.size.bits(logs["eval_loss"], prefix="eval_"))


def score_file(model, tokenizer, separator_id: int, file, block_size: int, token_cache_dir, batch_size: int,
               max_blocks: int | None = None) -> dict:
    """Loss, perplexity and bits per character and per byte of a model on a JSON Lines file of {"text": ...}, packed
    into blocks as for training (the token cache, each document ended by separator_id)."""
    blocks = BlockDataset(build_token_cache(file, tokenizer, separator_id, token_cache_dir), block_size)
    loss, predictions = mean_loss(model, blocks, batch_size, max_blocks)
    return dict(file=str(file), blocks=min(len(blocks), max_blocks or len(blocks)), predicted_tokens=predictions,
                loss=loss, perplexity=math.exp(min(loss, 50.0)), **text_size(blocks.cache).bits(loss))


@torch.no_grad()
def mean_loss(model, blocks: BlockDataset, batch_size: int, max_blocks: int | None = None) -> tuple[float, int]:
    """Mean loss (nats per predicted token) over the first `max_blocks` blocks, as the Trainer's evaluation computes
    it: every block predicts its tokens 2..T from those before them. Returns it with the number of predictions."""
    model.eval()
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    total, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="evaluating", unit="batch", mininterval=1):
        ids = torch.stack([blocks[i]["input_ids"] for i in range(start, min(start + batch_size, n))]).to(model.device)
        predictions = ids.numel() - len(ids)
        total += model(input_ids=ids, labels=ids).loss.item() * predictions  # the model's loss is the batch mean
        count += predictions
    return total / count, count
