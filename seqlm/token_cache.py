"""Tokenize a corpus once into a flat token stream on disk, and read fixed-size training blocks out of it.

A cache folder holds
    tokens.bin        every document's tokens followed by the separator, as uint32 (the vocabulary > 65,535)
    doc_offsets.npy   int64, num_docs + 1 entries: document i is tokens[offsets[i]:offsets[i + 1]]
    manifest.json     what built it, and the size of the documents' text (num_chars, and num_bytes in UTF-8: what
                      bits per character/byte divide by); written last, so a folder with a manifest is complete
The folder name carries a key of the corpus content, the tokenizer and the settings: any change gives a new
folder, and every later run (on every rank) reuses a finished one."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from .corpus import LineStats, open_corpus, read_lines
from .encoder import Encoder
from .fileio import atomic_output, file_lock

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint32
BATCH_DOCS = 512  # documents per encoder call: enough to keep every core busy, little memory


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    # The serialized fast tokenizer holds the vocabulary, merges, normalizer and added tokens: all that
    # changes the ids.
    return hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def cache_key(source_digest: str, tok_digest: str, separator_id: int) -> str:
    settings = json.dumps([FORMAT_VERSION, source_digest, tok_digest, separator_id, np.dtype(TOKEN_DTYPE).str])
    return hashlib.blake2b(settings.encode(), digest_size=8).hexdigest()


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


def _prefetch(items: Iterable, depth: int = 4) -> Iterator:
    """Produce `items` in a thread, to overlap the stages of tokenizing (the tokenizer releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _build(source: Path, folder: Path, tokenizer: PreTrainedTokenizerBase, separator_id: int, manifest: dict) -> None:
    folder.mkdir(parents=True)
    stats = LineStats()
    num_tokens, num_bytes, max_id, lengths_path = 0, 0, 0, folder / "doc_lengths.tmp"
    start = time.perf_counter()
    encode, separator = Encoder(tokenizer), np.array([separator_id], dtype=TOKEN_DTYPE)
    with open(folder / "tokens.bin", "wb") as out, open(lengths_path, "wb") as lengths, \
            tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc=f"tokenizing {source.name}",
                 mininterval=1) as bar:
        # Three stages overlap: reading JSON, tokenizing (native threads) and joining the ids here.
        encoded = _prefetch((texts, encode(texts)) for texts in _prefetch(_text_batches(source, stats, bar)))
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
    manifest.update(encoder=encode.name, num_docs=stats.valid, num_tokens=num_tokens, num_chars=stats.chars,
                    num_bytes=num_bytes, max_token_id=max_id, skipped_lines=dict(stats.skipped),
                    seconds=round(time.perf_counter() - start, 1))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"tokenized {source}: {stats.valid:,} documents, {num_tokens:,} tokens "
          f"({num_tokens / max(manifest['seconds'], 1e-9):,.0f} tokens/s, {encode.name})")
    if stats.skipped:
        print(stats.summary())


def build_token_cache(source: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, separator_id: int,
                      cache_root: str | os.PathLike) -> Path:
    """Return the cache folder of `source`, tokenizing it first unless a complete one exists. Safe to call from
    many processes at once: one builds, the others wait for it and reuse its result."""
    source, cache_root = Path(source), Path(cache_root)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    source_digest, tok_digest = file_digest(source), tokenizer_digest(tokenizer)
    folder = cache_root / f"{source.name}-{cache_key(source_digest, tok_digest, separator_id)}"
    if (folder / "manifest.json").is_file():
        return folder
    with file_lock(cache_root / f".{folder.name}.lock"):
        if not (folder / "manifest.json").is_file():  # another process may have built it while we waited
            manifest = dict(format=FORMAT_VERSION, source=str(source.resolve()), source_digest=source_digest,
                            source_bytes=source.stat().st_size, tokenizer=tokenizer.name_or_path,
                            tokenizer_digest=tok_digest, separator_id=separator_id,
                            token_dtype=np.dtype(TOKEN_DTYPE).name)
            with atomic_output(folder) as tmp:
                _build(source, tmp, tokenizer, separator_id, manifest)
    return folder


class TokenCache:
    """A finished cache folder, memory-mapped."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.doc_offsets = np.load(self.folder / "doc_offsets.npy", mmap_mode="r")

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
