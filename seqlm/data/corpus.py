"""Read a seq-monkey-style JSON Lines corpus (`{"text": ...}` per line), plain or inside an archive, and
validate each line. Everything streams: memory stays flat whatever the size of the input."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import math
import os
import tarfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import orjson

BOM = b"\xef\xbb\xbf"
MAX_EXAMPLES = 5  # first line numbers kept per skip reason
# Bytes read at a time. Small enough that a block and its copies (lines, output) stay in the CPU cache: 1 MB blocks
# measured 40% slower.
BLOCK = 1 << 16
T = TypeVar("T")


class BadLine(ValueError):
    """A line that is not a JSON object with a non-empty string `text`; `reason` is a short key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # pickled whole: seqlm.data.subset parses in another process
        return type(self), (self.reason, self.detail)


class CorruptInput(IOError):
    """A compressed input that cannot be read to its end."""


def _tar_member(archive: tarfile.TarFile, path: Path) -> BinaryIO:
    # Streaming mode ("r|*") reads members in order, so the first .jsonl file is taken as it comes.
    for member in archive:
        if member.isfile() and member.name.endswith((".jsonl", ".json")):
            return archive.extractfile(member)
    raise FileNotFoundError(f"{path}: no .jsonl file inside the archive")


@contextmanager
def open_corpus(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a .jsonl (or .json lines) file, a .gz/.bz2 of one, or a .tar(.gz|.bz2) holding one, as bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    name = path.name
    if ".tar" in path.suffixes:
        try:  # damage before the first .jsonl member shows here, before read_lines can see it
            archive = tarfile.open(path, mode="r|*")
        except (EOFError, tarfile.ReadError, zlib.error) as e:
            raise CorruptInput(f"{path}: the archive is damaged or ends early ({e})") from None
        with archive:
            try:
                member = _tar_member(archive, path)
            except (EOFError, tarfile.ReadError, zlib.error) as e:
                raise CorruptInput(f"{path}: the archive is damaged or ends early ({e})") from None
            yield member
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif name.endswith(".bz2"):
        with bz2.open(path, "rb") as f:
            yield f
    else:
        with open(path, "rb", buffering=1 << 20) as f:
            yield f


def load_object(raw: bytes) -> dict:
    """Decode one raw line into a JSON object, or raise BadLine saying why it is not one."""
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip():
        raise BadLine("blank_line")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("invalid_utf8", str(e)) from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        reason = "truncated_line" if not raw.endswith(b"\n") else "invalid_json"
        raise BadLine(reason, str(e)) from None
    except RecursionError:  # nesting too deep for the parser: not a document either
        raise BadLine("invalid_json", "nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadLine("not_an_object", type(obj).__name__)
    return obj


def check_encodable(raw: bytes, text: str) -> None:
    """Raise BadLine for a string of `raw` holding an escaped lone surrogate: it decodes, but cannot be encoded
    (the tokenizer fails on it)."""
    if b"\\ud" in raw or b"\\uD" in raw:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadLine("lone_surrogate", str(e)) from None


def parse_line(raw: bytes) -> str:
    """Return the document text of one raw line, or raise BadLine saying why it is unusable."""
    # orjson is several times faster than json.loads, and stricter: what it parses, json.loads parses alike (but
    # for integers beyond 64 bits, which orjson makes floats), and besides what is skipped below anyway (invalid
    # UTF-8, lone surrogates) it refuses a few lines that json.loads takes (a BOM, NaN, nesting deeper than 1024). So
    # a line it parses into a usable text is valid as it is; any other line is judged, and its reason named, the
    # exact way.
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    text = obj.get("text") if isinstance(obj, dict) else None
    if isinstance(text, str) and text and not text.isspace():  # as text.strip(), without copying the text
        return text
    return _parse_line_exactly(raw)


def _parse_line_exactly(raw: bytes) -> str:
    obj = load_object(raw)
    if "text" not in obj:
        raise BadLine("missing_text")
    text = obj["text"]
    if not isinstance(text, str):
        raise BadLine("text_not_a_string", type(text).__name__)
    if not text.strip():
        raise BadLine("empty_text")
    check_encodable(raw, text)
    return text


@dataclass
class LineStats:
    """Counts of a pass over a corpus; `valid + sum(skipped) == lines` always."""

    lines: int = 0
    valid: int = 0
    chars: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, lineno: int, reason: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(lineno)

    def summary(self) -> str:
        out = [f"lines read {self.lines:,}, valid {self.valid:,} ({self.chars:,} characters, {self.bytes:,} bytes)"]
        for reason, count in self.skipped.most_common():
            first = ", ".join(map(str, self.examples[reason]))
            out.append(f"  skipped {count:,} {reason} (first at line {first})")
        return "\n".join(out)


def read_lines(f: BinaryIO, path: str | os.PathLike, stats: LineStats, strict: bool = False,
               parse: Callable[[bytes], T] = parse_line) -> Iterator[tuple[bytes, T]]:
    """Yield (raw line, content) for each valid line; count the others in `stats`, or raise on the first if strict.

    `parse` turns a raw line into its content or raises BadLine: by default a document's text (for conversations,
    seqlm.data.conversation.parse_conversation); len() of a content is its size in characters. A truncated compressed stream is always an
    error: the lines before it were yielded already."""
    for raws, contents in read_blocks(f, path, stats, strict, parse):
        yield from zip(raws, contents)


def read_blocks(f: BinaryIO, path: str | os.PathLike, stats: LineStats, strict: bool = False,
                parse: Callable[[bytes], T] = parse_line,
                limit: int | None = None) -> Iterator[tuple[list[bytes], list[T]]]:
    """read_lines a block at a time, for callers that have no work to do per line: the raw lines and contents of
    the valid lines in about BLOCK bytes of `f` (a buffered file, as open_corpus gives), never none. `stats` counts
    a block before it is yielded. With `limit`, reading stops right after that many valid lines, so `stats` counts
    no line beyond them."""
    lineno = 0
    remaining = math.inf if limit is None else limit
    try:
        for lines in line_blocks(f):
            raws, contents, first, bad = [], [], lineno, None
            for raw in lines:
                lineno += 1
                try:
                    contents.append(parse(raw))
                except BadLine as e:
                    if strict:
                        bad = BadLine(e.reason, f"{path}:{lineno}: {e} (rerun without --strict to skip bad lines)")
                        break
                    stats.skip(lineno, e.reason)
                    continue
                raws.append(raw)
                if len(raws) == remaining:
                    break
            stats.lines += lineno - first
            stats.valid += len(raws)
            stats.chars += sum(map(len, contents))
            stats.bytes += sum(map(len, raws))
            if raws:
                yield raws, contents
            if bad is not None:  # after the valid lines before it, as a line by line reader would
                raise bad
            remaining -= len(raws)
            if not remaining:
                return
    except (EOFError, tarfile.ReadError, OSError, zlib.error) as e:
        raise CorruptInput(f"{path}: the archive ends early or is damaged after line {lineno:,} ({e})") from None


def line_blocks(f: BinaryIO) -> Iterator[list[bytes]]:
    """The lines of `f`, split at b"\\n" only and with it, as iterating a binary file gives them, but a block at a time.
    read1 returns what one read of the underlying stream gives: when a damaged archive fails, the lines before are
    out already."""
    pieces: list[bytes] = []  # a line not ended yet, collected whole only once it ends: linear in a 50 MB line
    while chunk := f.read1(BLOCK):
        pieces.append(chunk)
        if b"\n" in chunk:
            lines = io.BytesIO(b"".join(pieces)).readlines()
            pieces = [] if lines[-1].endswith(b"\n") else [lines.pop()]
            yield lines
    if pieces:  # the last line, without newline
        yield [b"".join(pieces)]


def iter_texts(path: str | os.PathLike, stats: LineStats | None = None) -> Iterator[str]:
    """The texts of the valid lines of a corpus file, in order."""
    stats = stats if stats is not None else LineStats()
    with open_corpus(path) as f:
        for _, text in read_lines(f, path, stats):
            yield text
