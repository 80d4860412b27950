"""What the token cache (pretraining documents) and the SFT cache (conversations) share: a folder per corpus, keyed by
the corpus content, the tokenizer and the settings; built once, by one process while the others wait; renamed into
place whole, and complete only once its manifest.json, written last, is there. The manifest lists every file with
its size and digest, and every reuse checks them first (about 1 s per GB of tokens): a damaged cache stops the run
in one line, before anything is built on it.

Any change of source, tokenizer or settings gives a new folder; every later run, on every rank, reuses a finished
one."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

from seqlm.fileio import atomic_output, file_digest, file_listing, file_lock, listing_difference, stale_partials

MANIFEST = "manifest.json"
TOKEN_DTYPE = np.uint32  # the Qwen vocabulary has more than 65,535 entries


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    # The serialized fast tokenizer holds the vocabulary, merges, normalizer and added tokens: all that
    # changes the ids.
    return hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


class DamagedCache(ValueError):
    """A finished cache folder whose files are no longer as they were written; the message is one line."""


def check_cache(folder: Path) -> None:
    """Raise DamagedCache unless every file the manifest lists has its size and digest."""
    listed = read_manifest(folder).get("files")
    if not listed:
        raise DamagedCache(f"the cache {folder} lists no file digests (built by an older version): delete that folder "
                           "and rerun to rebuild it")
    problem = listing_difference(folder, listed, "has changed since it was written")
    if problem:
        raise DamagedCache(f"the cache {folder} is damaged: {problem}. Delete that folder and rerun to rebuild it")


def _key(source: Path, cache_root: Path, tokenizer: PreTrainedTokenizerBase, kind: str, version: int,
         settings: list) -> tuple[str, str, Path]:
    """The digests of source and tokenizer, and the folder they key."""
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    source_digest, tok_digest = file_digest(source), tokenizer_digest(tokenizer)
    key_parts = json.dumps([version, source_digest, tok_digest, *settings, np.dtype(TOKEN_DTYPE).str])
    folder = cache_root / f"{source.name}-{kind}{hashlib.blake2b(key_parts.encode(), digest_size=8).hexdigest()}"
    return source_digest, tok_digest, folder


def is_built(source: str | os.PathLike, cache_root: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, kind: str,
             version: int, settings: list) -> bool:
    """Whether build_once would find a complete cache of `source` (without checking its files' digests)."""
    return (_key(Path(source), Path(cache_root), tokenizer, kind, version, settings)[2] / MANIFEST).is_file()


def build_once(source: str | os.PathLike, cache_root: str | os.PathLike, tokenizer: PreTrainedTokenizerBase,
               kind: str, version: int, settings: list,
               build: Callable[[Path, Path, dict], tuple[str, list[str]]]) -> Path:
    """The cache folder `<source name>-<kind><key>` of `source`, built first unless a complete one exists. Safe to
    call from many processes at once: one builds, the others wait for it and reuse its result.

    build(source, folder, manifest) writes the cache into the (new, empty) folder, adds its counts to the manifest
    (`num_tokens` at least), and returns what it made in words ("1,700 documents, 512,000 tokens") and lines of notes
    (what it skipped) to print."""
    source, cache_root = Path(source), Path(cache_root)
    source_digest, tok_digest, folder = _key(source, cache_root, tokenizer, kind, version, settings)
    if (folder / MANIFEST).is_file():
        check_cache(folder)
        return folder
    with file_lock(cache_root / f".{folder.name}.lock"):
        if (folder / MANIFEST).is_file():  # another process built it while we waited
            check_cache(folder)
            return folder
        # Whoever holds the lock builds: a partial folder of this cache is what a killed build left.
        for stale in stale_partials(folder):
            print(f"removing {stale}, left by a tokenization that was stopped")
            shutil.rmtree(stale, ignore_errors=True)
        manifest = dict(format=version, source=str(source.resolve()), source_digest=source_digest,
                        source_bytes=source.stat().st_size, tokenizer=tokenizer.name_or_path,
                        tokenizer_digest=tok_digest, token_dtype=np.dtype(TOKEN_DTYPE).name)
        with atomic_output(folder) as tmp:
            tmp.mkdir(parents=True)
            start = time.perf_counter()
            made, notes = build(source, tmp, manifest)
            seconds = time.perf_counter() - start
            manifest["seconds"] = round(seconds, 3)
            manifest["files"] = file_listing(tmp, sorted(p.name for p in tmp.iterdir()))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        print(f"tokenized {source}: {made} in {seconds:.3g} s ({manifest['num_tokens'] / seconds:,.0f} tokens/s)",
              *notes, sep="\n")
    return folder


def prefetch(items: Iterable, depth: int = 4) -> Iterator:
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
