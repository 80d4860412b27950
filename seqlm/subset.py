"""Cut a training subset (and a disjoint validation split) out of a large corpus, streaming.

Valid input lines are copied byte for byte, so without sampling the subset equals the input's first N lines."""
from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from tqdm import tqdm

from .corpus import CorruptInput, LineStats, open_corpus, parse_line, read_lines
from .fileio import atomic_output


class NotEnoughLines(ValueError):
    pass


def _valid_lines(path, stats: LineStats, strict: bool, desc: str, parse: Callable[[bytes], object]) -> Iterator[bytes]:
    with open_corpus(path) as f, tqdm(desc=desc, unit=" lines", unit_scale=True, mininterval=1, leave=False) as bar:
        for raw, _ in read_lines(f, path, stats, strict, parse):
            bar.update()
            yield raw if raw.endswith(b"\n") else raw + b"\n"


def _sample_roles(num_valid: int, lines: int, val_lines: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (among valid lines) of the training and of the validation sample."""
    chosen = np.random.default_rng(seed).choice(num_valid, size=lines + val_lines, replace=False)
    return np.sort(chosen[val_lines:]), np.sort(chosen[:val_lines])


def make_subset(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    lines: int,
    val_output_path: str | os.PathLike | None = None,
    val_lines: int = 0,
    sample: bool = False,
    seed: int = 0,
    strict: bool = False,
    parse: Callable[[bytes], object] = parse_line,
    keep_partial: bool = False,
) -> LineStats:
    """Write `lines` valid lines to `output_path` and the next (or, sampling, other) `val_lines` to the validation
    file. Returns the counts of the pass that wrote them. Raises NotEnoughLines before renaming anything into
    place when the input is too short. A line is valid when `parse` accepts it (default: a `{"text"}` document;
    seqlm.conversation.parse_conversation for conversations). A damaged archive raises CorruptInput; with
    `keep_partial` (and without sampling) the lines read before the damage are kept under the output names first."""
    if lines <= 0 or val_lines < 0:
        raise ValueError(f"--lines must be positive and --val-lines not negative (got {lines}, {val_lines})")
    if val_lines and val_output_path is None:
        raise ValueError("--val-lines needs a validation output path")
    outputs = [Path(output_path).resolve()] + ([Path(val_output_path).resolve()] if val_lines else [])
    if len(set(outputs)) < len(outputs) or Path(input_path).resolve() in outputs:
        raise ValueError("the input, the output and the validation output must all be different files")
    wanted = lines + val_lines

    if sample:  # pass 1 counts the valid lines so that every line has the same chance
        count = LineStats()
        for _ in _valid_lines(input_path, count, strict, "counting", parse):
            pass
        if count.valid < wanted:
            raise NotEnoughLines(f"{input_path} has {count.valid:,} valid lines; asked for {lines:,} + {val_lines:,}")
        train_idx, val_idx = _sample_roles(count.valid, lines, val_lines, seed)

    stats = LineStats()
    with ExitStack() as stack:
        train = stack.enter_context(open(stack.enter_context(atomic_output(output_path)), "wb", buffering=1 << 20))
        val: BinaryIO | None = None
        if val_lines:
            val = stack.enter_context(open(stack.enter_context(atomic_output(val_output_path)), "wb", buffering=1 << 20))
        written, damaged = 0, None
        source = _valid_lines(input_path, stats, strict, "sampling" if sample else "copying", parse)
        try:
            written = _copy(source, train, val, lines, wanted, train_idx if sample else None, val_idx if sample else None)
        except CorruptInput as e:
            if not keep_partial or sample:
                raise
            damaged = e
        source.close()
        if damaged is None and written < wanted:
            raise NotEnoughLines(f"{input_path} has {stats.valid:,} valid lines; asked for {lines:,} + {val_lines:,}")
    if damaged is not None:
        raise CorruptInput(f"{damaged}; kept the {written:,} lines read before it, as asked (--keep-partial)")
    return stats


def _copy(source, train: BinaryIO, val: BinaryIO | None, lines: int, wanted: int, train_idx, val_idx) -> int:
    """Write lines from `source` until `wanted` are written: the first `lines` to train and the rest to val, or,
    given sample indices, the sampled ones. Returns the number written."""
    written = 0
    for i, raw in enumerate(source):
        if train_idx is not None:
            # searchsorted on sorted indices: O(log N) per line, memory proportional to the sample only
            if _contains(train_idx, i):
                train.write(raw)
                written += 1
            elif _contains(val_idx, i):
                val.write(raw)
                written += 1
        else:
            (train if i < lines else val).write(raw)
            written += 1
        if written == wanted:
            break
    return written


def _contains(sorted_idx: np.ndarray, i: int) -> bool:
    j = np.searchsorted(sorted_idx, i)
    return j < len(sorted_idx) and sorted_idx[j] == i
