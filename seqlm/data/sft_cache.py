"""Supervised fine-tuning data: conversations (seqlm.data.conversation) tokenized once into a memory-mapped cache with
the exact mask of the tokens to learn, built as the token cache is (seqlm.data.cache).

The loss is on each assistant content and its `<|im_end|>` (that is how the model learns to end its turn); every
other label is -100. The ids are built turn by turn, `<|im_start|>{role}\\n` + content + `<|im_end|>` + `\\n`, so the
mask is exact by construction; they equal the tokenization of the whole conversation rendered by the chat template
the model is saved with (the tests check it: contents are stripped, so no BPE merge crosses a turn's edges).

A cache folder (`<file>-sft-<key>` in the token cache folder) holds
    tokens.bin         every conversation's ids, uint32
    trained.bin        one byte per token: 1 where the loss applies
    offsets.npy        int64, conversations + 1 entries: conversation i is tokens[offsets[i]:offsets[i + 1]]
    first_trained.npy  int64, the position of each conversation's first trained token
    manifest.json      what built it and what was skipped; written last, so a folder with a manifest is complete
Truncation to max_length happens when reading, so one cache serves every length."""
from __future__ import annotations

import array
import itertools
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from seqlm.data.cache import TOKEN_DTYPE, build_once, prefetch
from seqlm.data.conversation import IM_END, IM_START, Conversation, chat_template, parse_conversation
from seqlm.data.corpus import LineStats, open_corpus, read_lines

FORMAT_VERSION = 2  # 2: xxh3 digests of the source and of every file in the manifest
BATCH_CONVERSATIONS = 512  # per encoder call, as in token_cache
IGNORE_INDEX = -100


class ChatMLEncoder:
    """Token ids and loss mask of conversations, built turn by turn (module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None):
        backend = tokenizer.backend_tokenizer
        start, self.end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
        self.header = {role: [start, *backend.encode(f"{role}\n", add_special_tokens=False).ids]
                       for role in ("system", "user", "assistant")}
        self.newline = backend.encode("\n", add_special_tokens=False).ids
        self.system = (system_prompt or "").strip()
        # Text such as "<|im_end|>" inside a content is encoded as the special token, which would forge a turn.
        self.first_added_id = min(tokenizer.added_tokens_decoder)
        self._encode_batch = backend.encode_batch_fast  # ids only: no character offsets to compute

    def messages(self, conversation: Conversation) -> list[dict[str, str]]:
        """The messages as formatted, with the default system prompt where the conversation has none."""
        if self.system and conversation.messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system}, *conversation.messages]
        return conversation.messages

    def encode(self, conversations: list[Conversation]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """(ids, trained) of each conversation, trained 1 on the assistant contents and their <|im_end|>; None for a
        conversation whose text holds a special token."""
        dialogs = [self.messages(c) for c in conversations]
        contents = iter(self._encode_batch([m["content"] for d in dialogs for m in d], add_special_tokens=False))
        out = []
        for dialog in dialogs:
            ids: list[int] = []
            trained: list[int] = []
            clean = True
            for message in dialog:
                content = next(contents).ids
                clean = clean and max(content) < self.first_added_id
                header = self.header[message["role"]]
                learn = int(message["role"] == "assistant")
                ids += header + content + [self.end] + self.newline
                trained += [0] * len(header) + [learn] * (len(content) + 1) + [0] * len(self.newline)
            out.append((np.array(ids, dtype=TOKEN_DTYPE), np.array(trained, dtype=np.uint8)) if clean else None)
        return out


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _conversations(source: Path, stats: LineStats, bar: tqdm) -> Iterator[Conversation]:
    with open_corpus(source) as f:
        for raw, conversation in read_lines(f, source, stats, parse=parse_conversation):
            bar.update(len(raw))
            yield conversation


def _build(encoder: ChatMLEncoder, source: Path, folder: Path, manifest: dict) -> tuple[str, list[str]]:
    stats, dropped = LineStats(), Counter()
    lengths, first_trained = array.array("q"), array.array("q")  # 8 bytes a conversation, not a Python int each
    num_trained = 0
    with open(folder / "tokens.bin", "wb") as tokens, open(folder / "trained.bin", "wb") as trained_out, \
            tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc=f"tokenizing {source.name}",
                 mininterval=1) as bar:
        for batch in prefetch(_chunks(_conversations(source, stats, bar), BATCH_CONVERSATIONS)):
            encoded = [e for e in encoder.encode(batch) if e is not None]
            dropped["special_token_in_text"] += len(batch) - len(encoded)
            if not encoded:
                continue
            tokens.write(np.concatenate([ids for ids, _ in encoded]).tobytes())
            mask = np.concatenate([trained for _, trained in encoded])
            trained_out.write(mask.tobytes())
            num_trained += int(mask.sum())
            lengths.extend(len(ids) for ids, _ in encoded)
            first_trained.extend(int(trained.argmax()) for _, trained in encoded)
    skipped = {**stats.skipped, **{k: v for k, v in dropped.items() if v}}
    if not lengths:
        raise ValueError(f"{source}: no usable conversation ({stats.lines:,} lines; skipped: {skipped or 'none'})")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "first_trained.npy", np.frombuffer(first_trained, dtype=np.int64))
    manifest.update(conversations=len(lengths), num_tokens=int(offsets[-1]), trained_tokens=num_trained,
                    skipped=skipped)
    return (f"{len(lengths):,} conversations, {offsets[-1]:,} tokens, {num_trained:,} of them trained on",
            [f"  skipped {count:,} {reason}" for reason, count in Counter(skipped).most_common()])


def build_sft_cache(source: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None,
                    cache_root: str | os.PathLike) -> Path:
    """Return the cache folder of the conversations in `source`, tokenizing them first unless a complete one exists
    (seqlm.data.cache)."""
    encoder = ChatMLEncoder(tokenizer, system_prompt)
    return build_once(source, cache_root, tokenizer, "sft-", FORMAT_VERSION, [chat_template(system_prompt)],
                      lambda *args: _build(encoder, *args))


class ConversationDataset(torch.utils.data.Dataset):
    """The tokenized conversations of one or more cache folders, each cut to its first `max_length` tokens. One left
    with no trained token is skipped (and counted). Map-style: the Trainer's sampler orders it from the seed, and a
    resumed run skips ahead without reading data."""

    def __init__(self, folders: list[str | os.PathLike], max_length: int):
        self.folders = [Path(f) for f in folders]
        sources, starts, lengths = [], [], []
        self.conversations = self.truncated = self.skipped = 0
        for i, folder in enumerate(self.folders):
            offsets = np.load(folder / "offsets.npy")
            full = np.diff(offsets)
            keep = np.load(folder / "first_trained.npy") < max_length
            self.conversations += len(full)
            self.skipped += int((~keep).sum())
            self.truncated += int((full[keep] > max_length).sum())
            sources.append(np.full(int(keep.sum()), i, dtype=np.int32))
            starts.append(offsets[:-1][keep])
            lengths.append(np.minimum(full[keep], max_length))
        self.sources, self.starts = np.concatenate(sources), np.concatenate(starts)
        self.lengths = np.concatenate(lengths)
        if len(self.lengths) == 0:
            raise ValueError(f"{', '.join(map(str, self.folders))}: no conversation has an assistant token within "
                             f"the first {max_length} tokens: raise --max_length")
        self._arrays: list[tuple[np.memmap, np.memmap]] | None = None  # opened lazily, not pickled into workers

    def summary(self) -> str:
        return (f"{len(self):,} conversations ({int(self.lengths.sum()):,} tokens); {self.truncated:,} cut to "
                f"max_length, {self.skipped:,} skipped with no assistant token within it")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._arrays is None:
            self._arrays = [(np.memmap(f / "tokens.bin", dtype=TOKEN_DTYPE, mode="r"),
                             np.memmap(f / "trained.bin", dtype=np.uint8, mode="r")) for f in self.folders]
        tokens, trained = self._arrays[self.sources[i]]
        span = slice(self.starts[i], self.starts[i] + self.lengths[i])
        ids = torch.from_numpy(tokens[span].astype(np.int64))
        labels = ids.masked_fill(torch.from_numpy(trained[span] == 0), IGNORE_INDEX)
        return {"input_ids": ids, "labels": labels}
