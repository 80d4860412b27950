"""Held-out metrics that compare across tokenizers and block sizes: bits per character and per UTF-8 byte.

The loss is the mean negative log-likelihood, in nats, per predicted token, so its scale depends on how much text a
token holds: a tokenizer with longer tokens has a higher loss for a model that is just as good. The information per
unit of text does not:
    bits per character = loss / ln 2 × predicted tokens / characters of those tokens    (bytes likewise)
The predicted tokens are those of the blocks evaluated, all but the first of each block (it has no context), counted
exactly: with --max_eval_samples, the first N blocks only. A document separator predicts where a document ends and
holds no text; every other token holds the UTF-8 bytes it stands for (byte-level BPE, as Qwen's), and a character
is counted in the token that holds its first byte. The text is the tokenizer's normalized (NFC) text."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.convert_slow_tokenizer import bytes_to_unicode

from seqlm.data.token_cache import BlockDataset, build_token_cache

log = logging.getLogger(__name__)
CHUNK = 1 << 22  # tokens looked up at a time: bounded memory on any held-out set


class TokenTextSizes:
    """UTF-8 bytes and characters (first bytes of a character) each token id stands for."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, separator_id: int):
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        self.bytes, self.chars = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
        self.exact = True
        added = {t.content for t in tokenizer.added_tokens_decoder.values()}
        for token, i in tokenizer.get_vocab().items():
            if i == separator_id:
                continue
            if token in added:
                raw = token.encode("utf-8")  # a special token written literally in a document
            elif all(char in byte_of for char in token):
                raw = bytes(byte_of[char] for char in token)
            else:  # not a byte-level vocabulary: the token's decoded text, which may split characters differently
                raw, self.exact = tokenizer.convert_tokens_to_string([token]).encode("utf-8"), False
            self.bytes[i] = len(raw)
            self.chars[i] = sum(1 for b in raw if b & 0xC0 != 0x80)
        if not self.exact:
            log.warning("the tokenizer is not byte-level BPE: bits per character and byte count each token's decoded "
                        "text, an approximation")

    def of(self, tokens: np.ndarray) -> tuple[int, int]:
        """(characters, bytes) of a token stream."""
        chars = byte_count = 0
        for start in range(0, len(tokens), CHUNK):
            ids = np.asarray(tokens[start:start + CHUNK], dtype=np.int64)
            chars, byte_count = chars + int(self.chars[ids].sum()), byte_count + int(self.bytes[ids].sum())
        return chars, byte_count


@dataclass(frozen=True)
class EvaluatedText:
    """What an evaluation scores: its first `blocks` blocks of `total_blocks`, the tokens they predict, and the
    characters and UTF-8 bytes of those tokens."""

    blocks: int
    total_blocks: int
    block_size: int
    predictions: int
    chars: int
    bytes: int
    exact: bool = True

    @classmethod
    def of(cls, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, separator_id: int) -> EvaluatedText:
        """The text of an evaluation dataset as pretrain.py builds it (a Subset of the first blocks of a
        ConcatDataset of BlockDatasets, or one of those)."""
        sizes = TokenTextSizes(tokenizer, separator_id)
        sources = block_datasets(dataset)
        remaining = len(dataset)
        chars = byte_count = 0
        for blocks in sources:
            n = min(remaining, len(blocks))
            tokens = blocks.cache.tokens()[:n * blocks.block_size]
            first = tokens[::blocks.block_size]  # not predicted: no context
            c, b = sizes.of(tokens)
            c_first, b_first = sizes.of(first)
            chars, byte_count, remaining = chars + c - c_first, byte_count + b - b_first, remaining - n
        block_size = sources[0].block_size
        return cls(blocks=len(dataset), total_blocks=sum(map(len, sources)), block_size=block_size,
                   predictions=len(dataset) * (block_size - 1), chars=chars, bytes=byte_count, exact=sizes.exact)

    def bits(self, loss: float, prefix: str = "") -> dict[str, float]:
        """Bits per character and per byte of a mean loss (nats per predicted token) on this text."""
        bits = loss / math.log(2) * self.predictions
        return {f"{prefix}bits_per_char": bits / self.chars, f"{prefix}bits_per_byte": bits / self.bytes}

    def describe(self) -> str:
        part = (f"all {self.blocks:,} blocks" if self.blocks == self.total_blocks
                else f"the first {self.blocks:,} of {self.total_blocks:,} blocks")
        return (f"{part} of {self.block_size:,} tokens: {self.predictions:,} predicted tokens, {self.chars:,} "
                f"characters, {self.bytes:,} UTF-8 bytes" + ("" if self.exact else " (approximate)"))


def block_datasets(dataset: Dataset) -> list[BlockDataset]:
    """The BlockDatasets inside an evaluation dataset, in order."""
    if isinstance(dataset, BlockDataset):
        return [dataset]
    if isinstance(dataset, Subset):
        if list(dataset.indices) != list(range(len(dataset))):
            raise ValueError("bits per character need the first blocks of the held-out set, not a selection")
        return block_datasets(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return [b for d in dataset.datasets for b in block_datasets(d)]
    raise TypeError(f"bits per character need token-cache blocks, not a {type(dataset).__name__}")


class BitsPerCharCallback(TrainerCallback):
    """Adds eval_bits_per_char and eval_bits_per_byte to every evaluation log, through `add_to` (called by
    SafeTrainer.log, before the Trainer's history, printers and loggers see the entry)."""

    def __init__(self, text: EvaluatedText):
        self.text = text

    def add_to(self, logs: dict, state, args) -> None:
        if "eval_loss" in logs:
            logs.update(self.text.bits(logs["eval_loss"], prefix="eval_"))


def score_file(model, tokenizer, separator_id: int, file, block_size: int, token_cache_dir, batch_size: int,
               max_blocks: int | None = None) -> dict:
    """Loss, perplexity and bits per character and per byte of a model on a JSON Lines file of {"text": ...}, packed
    into blocks as for training (the token cache, each document ended by separator_id)."""
    blocks = BlockDataset(build_token_cache(file, tokenizer, separator_id, token_cache_dir), block_size)
    loss, predictions = mean_loss(model, blocks, batch_size, max_blocks)  # over the first blocks
    text = EvaluatedText.of(Subset(blocks, range(min(len(blocks), max_blocks or len(blocks)))), tokenizer, separator_id)
    return dict(file=str(file), blocks=text.blocks, total_blocks=text.total_blocks, predicted_tokens=predictions,
                chars=text.chars, bytes=text.bytes, loss=loss, perplexity=math.exp(min(loss, 50.0)), **text.bits(loss))


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
