"""Supervised fine-tuning around the Trainer: batches padded to their longest conversation, a length-grouped order
that is the same on every rank and after a resume. The data come from seqlm.data.sft_cache; the chat format and the
fine-tuned model's tokenizer and generation settings from seqlm.data.conversation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from seqlm.data.sft_cache import IGNORE_INDEX, ConversationDataset
from seqlm.training.trainer import SafeTrainer

MEGABATCH = 50  # batches whose conversations are sorted by length together (as transformers' LengthGroupedSampler)


@dataclass
class PadToLongest:
    """Collate conversations padded to the longest of the batch: pad id, attention mask 0 and label -100 there."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        shape = (len(features), max(len(f["input_ids"]) for f in features))
        batch = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(shape, dtype=torch.long),
                 "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long)}
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = f["input_ids"]
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = f["labels"]
        return batch


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """A random order in which runs of similar length follow each other, so little of a batch is padding: shuffle,
    cut into megabatches of MEGABATCH groups, sort each by length (the longest first, so an out-of-memory shows at
    once). Seeded by seed and epoch only: a resumed run continues the same order, and every rank draws the same
    (transformers' own sampler draws from the global random state)."""

    def __init__(self, lengths: np.ndarray, group_size: int, seed: int):
        self.lengths, self.seed, self.epoch = lengths, seed, 0
        self.megabatch = group_size * max(1, min(MEGABATCH, len(lengths) // (4 * group_size)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        groups = [g[np.argsort(-self.lengths[g], kind="stable")]
                  for g in np.split(order, range(self.megabatch, len(order), self.megabatch))]
        longest = max(range(len(groups)), key=lambda k: self.lengths[groups[k][0]])
        groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
        return iter(np.concatenate(groups).tolist())


class SFTTrainer(SafeTrainer):
    """The pipeline's Trainer (crash-safe checkpoints, stop on a non-finite loss, throughput logs), with
    LengthGroupedSampler for --train_sampling_strategy group_by_length."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, ConversationDataset):
            return super()._get_train_sampler(train_dataset)
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        return LengthGroupedSampler(dataset.lengths, group, seed)
