"""Tokenize a corpus once into a flat token stream on disk, and read fixed-size training blocks out of it.

A cache folder holds
    tokens.bin        every document's tokens followed by the separator, as uint32 (the vocabulary > 65,535)
    doc_offsets.npy   int64, num_docs + 1 entries: document i is tokens[offsets[i]:offsets[i + 1]]
    manifest.json     what built it, and the size of the documents' text (num_chars, and num_bytes in UTF-8); written
                      last, so a folder with a manifest is complete
Built once per corpus, tokenizer and separator (seqlm.data.cache)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from seqlm.data.cache import TOKEN_DTYPE, build_once, is_built, prefetch, read_manifest
from seqlm.data.corpus import LineStats, open_corpus, read_lines
from seqlm.data.encoder import Encoder

FORMAT_VERSION = 2  # 2: xxh3 digests of the source and of every file in the manifest
BATCH_DOCS = 512  # documents per encoder call: enough to keep every core busy, little memory


def _text_batches(path: Path, stats: LineStats, bar: tqdm) -> Iterator[list[str]]:
    batch: list[str] = []
    with open_corpus(path) as f:
        for raw, text in read_lines(f, path, stats):
            batch.append(text)
            bar.update(len(raw))
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def _build(tokenizer: PreTrainedTokenizerBase, separator_id: int, source: Path, folder: Path,
           manifest: dict) -> tuple[str, list[str]]:
    stats = LineStats()
    num_tokens, num_bytes, max_id, lengths_path = 0, 0, 0, folder / "doc_lengths.tmp"
    encode, separator = Encoder(tokenizer), np.array([separator_id], dtype=TOKEN_DTYPE)
    with open(folder / "tokens.bin", "wb") as out, open(lengths_path, "wb") as lengths, \
            tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc=f"tokenizing {source.name}",
                 mininterval=1) as bar:
        # Three stages overlap: reading JSON, tokenizing (native threads) and joining the ids here.
        encoded = prefetch((texts, encode(texts)) for texts in prefetch(_text_batches(source, stats, bar)))
        for texts, docs in encoded:
            ids = np.concatenate([part for doc in docs for part in (np.asarray(doc, dtype=TOKEN_DTYPE), separator)])
            out.write(ids.tobytes())
            lengths.write(np.fromiter((len(doc) + 1 for doc in docs), dtype=np.int64, count=len(docs)).tobytes())
            num_tokens += len(ids)
            num_bytes += sum(len(text.encode("utf-8")) for text in texts)
            max_id = max(max_id, int(ids.max()))
    if stats.valid == 0:
        raise ValueError(f"{source}: no valid line to tokenize\n{stats.summary()}")
    offsets = np.lib.format.open_memmap(folder / "doc_offsets.npy", mode="w+", dtype=np.int64, shape=(stats.valid + 1,))
    offsets[0] = 0
    np.cumsum(np.fromfile(lengths_path, dtype=np.int64), out=offsets[1:])
    offsets.flush()
    lengths_path.unlink()
    manifest.update(separator_id=separator_id, encoder=encode.name, num_docs=stats.valid, num_tokens=num_tokens,
                    num_chars=stats.chars, num_bytes=num_bytes, max_token_id=max_id, skipped_lines=dict(stats.skipped))
    return (f"{stats.valid:,} documents, {num_tokens:,} tokens ({encode.name})",
            stats.summary().splitlines()[1:])


def build_token_cache(source: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, separator_id: int,
                      cache_root: str | os.PathLike) -> Path:
    """Return the cache folder of `source`, tokenizing it first unless a complete one exists (seqlm.data.cache)."""
    return build_once(source, cache_root, tokenizer, *_kind_and_settings(separator_id),
                      lambda *args: _build(tokenizer, separator_id, *args))


def token_cache_is_built(source: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, separator_id: int,
                         cache_root: str | os.PathLike) -> bool:
    return is_built(source, cache_root, tokenizer, *_kind_and_settings(separator_id))


def _kind_and_settings(separator_id: int) -> tuple[str, int, list]:
    return "", FORMAT_VERSION, [separator_id]


class TokenCache:
    """A finished cache folder, memory-mapped."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.doc_offsets = np.load(self.folder / "doc_offsets.npy", mmap_mode="r")

    def check_ids(self, vocab_size: int) -> None:
        """ValueError, in one line, if the cache holds ids the model has no embedding for."""
        if self.manifest["max_token_id"] >= vocab_size:
            raise ValueError(f"the cache {self.folder} holds token id {self.manifest['max_token_id']:,}, past the "
                             f"model's vocabulary of {vocab_size:,}: delete that folder, and check --tokenizer_name")

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"]

    def tokens(self) -> np.memmap:
        return np.memmap(self.folder / "tokens.bin", dtype=TOKEN_DTYPE, mode="r", shape=(self.num_tokens,))

    def documents(self) -> Iterator[np.ndarray]:
        tokens = self.tokens()
        for start, end in zip(self.doc_offsets[:-1], self.doc_offsets[1:]):
            yield tokens[start:end]


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive `block_size`-token blocks of the whole stream (documents run across block edges, the separator
    between them); only the final partial block is dropped. Map-style, so the Trainer's sampler shuffles it
    with the seed and a resume skips ahead without reading data."""

    def __init__(self, folder: str | os.PathLike, block_size: int):
        self.cache = TokenCache(folder)
        self.block_size = block_size
        self.num_blocks = self.cache.num_tokens // block_size
        if self.num_blocks == 0:
            raise ValueError(f"{folder}: {self.cache.num_tokens:,} tokens are fewer than one block of {block_size}")
        self._tokens: np.memmap | None = None  # opened lazily: a memmap would be pickled whole into workers

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        if self._tokens is None:
            self._tokens = self.cache.tokens()
        ids = torch.from_numpy(self._tokens[i * self.block_size:(i + 1) * self.block_size].astype(np.int64))
        return {"input_ids": ids, "labels": ids}
