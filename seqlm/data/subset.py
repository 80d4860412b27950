"""Cut a training subset (and a disjoint validation split) out of a large corpus, streaming.

Valid input lines are copied byte for byte, so without sampling the subset equals the input's first N lines."""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import traceback
from bisect import bisect_left
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from seqlm.data.corpus import BadLine, CorruptInput, LineStats, line_blocks, open_corpus, parse_line, read_blocks
from seqlm.fileio import atomic_output

# Bytes an output is written by: with 1 MB writes bench/subset.py varied between 3 and 5 s on a cloud VM, against
# 2.1 s with these.
WRITE_BUFFER = 1 << 15
BLOCKS_A_MESSAGE = 16  # blocks of lines the parsing process judges before it reports: one a message was 15% slower


class NotEnoughLines(ValueError):
    pass


def _valid_blocks(path, stats: LineStats, strict: bool, desc: str, parse: Callable[[bytes], object],
                  limit: int | None = None) -> Iterator[list[bytes]]:
    """The valid lines of `path`, each ending in a newline, a few blocks at a time, as read_blocks judges them.

    A child process parses the lines and says which are valid; this one reads the file again alongside (a compressed
    one is decompressed twice) and keeps those. Parsing is most of the work: on two cores, it no longer adds to the
    reading and writing, and only a byte a line crosses between the processes."""
    with open_corpus(path) as f, tqdm(desc=desc, unit=" lines", unit_scale=True, mininterval=1, leave=False) as bar:
        lines = itertools.chain.from_iterable(line_blocks(f))
        for verdicts in _verdicts(path, stats, strict, parse, limit):
            raws = list(itertools.compress(itertools.islice(lines, len(verdicts)), verdicts))
            if raws:
                if not raws[-1].endswith(b"\n"):  # only the last line of a file can lack it
                    raws[-1] += b"\n"
                bar.update(len(raws))
                yield raws


def _verdicts(path, stats: LineStats, strict: bool, parse: Callable[[bytes], object],
              limit: int | None) -> Iterator[bytes]:
    """Whether each line of `path` is valid (1) or not (0), in order, in batches, from a child process running
    read_blocks; then `stats` takes its counts, and what stopped it early (BadLine, CorruptInput) is raised here."""
    # fork: the parse hook need not be importable, and the child starts at once. The threads running then (the
    # fsyncs of make_subset, tqdm's monitor) hold no lock that the child needs.
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_judge, args=(path, strict, parse, limit, sender), daemon=True)
    child.start()
    sender.close()
    try:
        while isinstance(message := receiver.recv(), bytes):
            yield message
    except EOFError:  # killed, or failing to send its exception
        raise RuntimeError(f"the process parsing {path} stopped unexpectedly") from None
    finally:
        child.terminate()  # for when this process stopped first; otherwise the child has said all and is ending
        child.join()
        receiver.close()
    child_stats, error = message
    vars(stats).update(vars(child_stats))  # into the caller's object
    if error is not None:
        raise error


def _judge(path, strict: bool, parse: Callable[[bytes], object], limit: int | None, conn: Connection) -> None:
    """The child of _verdicts: read_blocks over `path`, sending batches of verdicts as bytes, then (its LineStats,
    the exception that stopped it or None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which ends this process
    verdicts = bytearray()

    def judged(raw: bytes) -> object:
        verdicts.append(0)
        content = parse(raw)
        verdicts[-1] = 1
        return content

    stats, error = LineStats(), None
    try:
        with open_corpus(path) as f:
            for blocks, _ in enumerate(read_blocks(f, path, stats, strict, judged, limit), 1):
                if blocks % BLOCKS_A_MESSAGE == 0:
                    conn.send(bytes(verdicts))
                    verdicts.clear()
    except Exception as e:  # noqa: BLE001  (the parent raises it)
        if not isinstance(e, (BadLine, CorruptInput)):  # a bug (in a parse hook, say): where it is, for only here knows
            traceback.print_exc()
        error = e
    if verdicts:
        conn.send(bytes(verdicts))
    conn.send((stats, error))


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
    seqlm.data.conversation.parse_conversation for conversations). A damaged archive raises CorruptInput; with
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
        for _ in _valid_blocks(input_path, count, strict, "counting", parse):
            pass
        if count.valid < wanted:
            raise NotEnoughLines(_too_few(input_path, count, lines, val_lines))
        train_idx, val_idx = _sample_roles(count.valid, lines, val_lines, seed)
    else:
        train_idx, val_idx = range(lines), range(lines, wanted)
    limit = 1 + max(idx[-1] for idx in (train_idx, val_idx) if len(idx))  # reading stops after the last line taken

    stats = LineStats()
    with ExitStack() as stack:
        destinations = []
        for path, idx in [(output_path, train_idx)] + ([(val_output_path, val_idx)] if val_lines else []):
            out = stack.enter_context(open(stack.enter_context(atomic_output(path)), "wb", buffering=WRITE_BUFFER))
            destinations.append((out, idx))
        damaged = None
        try:
            source = _valid_blocks(input_path, stats, strict, "sampling" if sample else "copying", parse, limit)
            _copy(source, destinations)
        except CorruptInput as e:
            if not keep_partial or sample:
                raise
            damaged = e
        if damaged is None and stats.valid < limit:
            raise NotEnoughLines(_too_few(input_path, stats, lines, val_lines))
    if damaged is not None:
        raise CorruptInput(f"{damaged}; kept the {stats.valid:,} lines read before it, as asked (--keep-partial)")
    return stats


def _too_few(input_path, stats: LineStats, lines: int, val_lines: int) -> str:
    """One line: how many valid lines there are, which lines were skipped and why, and what was asked for."""
    skipped = sum(stats.skipped.values())
    why = ", ".join(f"{count:,} {reason} from line {stats.examples[reason][0]:,}"
                    for reason, count in stats.skipped.most_common())
    return (f"{input_path} has only {stats.valid:,} valid lines of {stats.lines:,}"
            f"{f' (skipped {skipped:,}: {why})' if skipped else ''}; asked for {lines:,} + {val_lines:,} (--lines + "
            "--val-lines): ask for fewer, or pass a larger corpus. Nothing was written")


def _copy(blocks: Iterator[list[bytes]], destinations: list[tuple[BinaryIO, Sequence[int]]]) -> None:
    """Write each valid line to the output whose sorted indices (among valid lines) hold its index."""
    start = 0
    for raws in blocks:
        end = start + len(raws)
        for out, idx in destinations:
            # bisect on sorted indices: O(log N) per block, memory proportional to the sample only
            taken = idx[bisect_left(idx, start):bisect_left(idx, end)]
            out.writelines([raws[i - start] for i in taken])
        start = end
