"""seqlm.data.subset.make_subset and the make_subset.py CLI, on real People's Daily text.

Expected outputs come from the input file itself (its raw lines), never from the code under test."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from helpers import REPO

from seqlm.data import corpus
from seqlm.data.corpus import BadLine, CorruptInput
from seqlm.fileio import partial_name
from seqlm.data.subset import NotEnoughLines, make_subset

KINDS = ("tar.bz2", "tar.gz", "jsonl.gz", "jsonl.bz2")


def lines_of(path) -> list[bytes]:
    """The raw lines of a file, read independently of seqlm (keepends, as bytes)."""
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def leftovers(folder, *keep) -> list[str]:
    """Files in `folder` other than `keep`: partial outputs and the like."""
    if not os.path.isdir(folder):
        return []
    return sorted(set(os.listdir(folder)) - {os.path.basename(k) for k in keep})


# ---------------------------------------------------------------- first N lines


def test_first_n_exact_and_byte_identical_with_disjoint_validation(tmp_path, peoples_daily_jsonl):
    source = lines_of(peoples_daily_jsonl)
    out, val = tmp_path / "out" / "train.jsonl", tmp_path / "out" / "val.jsonl"
    stats = make_subset(peoples_daily_jsonl, out, 50, val, 20)
    assert out.read_bytes() == b"".join(source[:50])   # exactly 50 lines, not 51
    assert val.read_bytes() == b"".join(source[50:70])  # the next 20: disjoint, contiguous
    assert len(lines_of(out)) == 50 and len(lines_of(val)) == 20
    assert (stats.lines, stats.valid, sum(stats.skipped.values())) == (70, 70, 0)  # stopped after 70 lines
    assert leftovers(out.parent, out, val) == []


def test_no_validation_and_whole_file(tmp_path, peoples_daily_jsonl):
    source = lines_of(peoples_daily_jsonl)
    out = tmp_path / "train.jsonl"
    make_subset(peoples_daily_jsonl, out, 1)
    assert out.read_bytes() == source[0]
    make_subset(peoples_daily_jsonl, out, len(source))  # every line: allowed, and replaces the earlier output
    assert out.read_bytes() == peoples_daily_jsonl.read_bytes()
    with pytest.raises(NotEnoughLines):
        make_subset(peoples_daily_jsonl, tmp_path / "more.jsonl", len(source) + 1)
    assert not (tmp_path / "more.jsonl").exists()


def test_last_line_without_newline_gets_one(tmp_path, peoples_daily_lines):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"".join(peoples_daily_lines[:3])[:-1])  # a complete last line, no final newline
    out, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    make_subset(path, out, 2, val, 1)
    assert out.read_bytes() == b"".join(peoples_daily_lines[:2])
    assert val.read_bytes() == peoples_daily_lines[2]


@pytest.mark.parametrize("kind", KINDS)
def test_archive_input(tmp_path, peoples_daily_jsonl, build_corpus_archive, kind):
    archive = build_corpus_archive(peoples_daily_jsonl, kind)
    source = lines_of(peoples_daily_jsonl)
    out, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    make_subset(archive, out, 120, val, 30)
    assert out.read_bytes() == b"".join(source[:120])
    assert val.read_bytes() == b"".join(source[120:150])


@pytest.mark.parametrize("bad", [
    dict(lines=0), dict(lines=-1), dict(val_lines=-1), dict(val_lines=5, val_output_path=None),
])
def test_invalid_arguments(tmp_path, peoples_daily_jsonl, bad):
    args = dict(lines=5, val_output_path=tmp_path / "val.jsonl", val_lines=0) | bad
    with pytest.raises(ValueError):
        make_subset(peoples_daily_jsonl, tmp_path / "train.jsonl", **args)
    assert leftovers(tmp_path, peoples_daily_jsonl) == []


def test_same_paths_are_refused(tmp_path, peoples_daily_jsonl):
    before = peoples_daily_jsonl.read_bytes()
    with pytest.raises(ValueError, match="different files"):  # would replace the corpus with its own subset
        make_subset(peoples_daily_jsonl, peoples_daily_jsonl, 10)
    with pytest.raises(ValueError, match="different files"):  # both writers would share one temporary file
        make_subset(peoples_daily_jsonl, tmp_path / "a.jsonl", 10, tmp_path / "a.jsonl", 5)
    assert peoples_daily_jsonl.read_bytes() == before
    assert leftovers(tmp_path, peoples_daily_jsonl) == []


# ---------------------------------------------------------------- seeded sampling


def _sample(tmp_path, corpus, seed, name, lines=40, val_lines=15):
    out, val = tmp_path / f"{name}.train.jsonl", tmp_path / f"{name}.val.jsonl"
    stats = make_subset(corpus, out, lines, val, val_lines, sample=True, seed=seed)
    return lines_of(out), lines_of(val), stats


def test_seeded_sample_is_reproducible_ordered_and_disjoint(tmp_path, peoples_daily_jsonl):
    source = lines_of(peoples_daily_jsonl)
    assert len(set(source)) == len(source)  # so that a line identifies its position
    position = {line: i for i, line in enumerate(source)}

    train, val, _ = _sample(tmp_path, peoples_daily_jsonl, seed=1, name="a")
    again, val_again, _ = _sample(tmp_path, peoples_daily_jsonl, seed=1, name="b")
    other, val_other, _ = _sample(tmp_path, peoples_daily_jsonl, seed=2, name="c")

    assert (len(train), len(val)) == (40, 15)
    assert (train, val) == (again, val_again)
    assert train != other and val != val_other
    for sample in (train, val, other, val_other):
        idx = [position[line] for line in sample]  # KeyError if a line is not an input line
        assert idx == sorted(idx) and len(set(idx)) == len(idx)  # input order, no repeats
    assert not set(train) & set(val)
    assert not set(other) & set(val_other)
    # a sample of the whole file, not its head: something from the back half is drawn
    assert max(position[line] for line in train + val) >= len(source) // 2


def test_sample_skips_bad_lines_and_checks_size(tmp_path, peoples_daily_lines):
    path = tmp_path / "corpus.jsonl"
    good = peoples_daily_lines[:30]
    path.write_bytes(b"".join(line + b"{broken\n" for line in good))
    train, val, stats = _sample(tmp_path, path, seed=0, name="s", lines=25, val_lines=5)
    assert sorted(train + val) == sorted(good)  # all 30 valid lines are taken, no bad one
    assert stats.skipped["invalid_json"] >= 1
    with pytest.raises(NotEnoughLines):
        make_subset(path, tmp_path / "t.jsonl", 26, tmp_path / "v.jsonl", 5, sample=True)
    assert not (tmp_path / "t.jsonl").exists() and not (tmp_path / "v.jsonl").exists()


# ---------------------------------------------------------------- bad lines


def _mixed_corpus(real: list[bytes]):
    """(raw lines, expected valid lines, {reason: [line numbers]}) of a corpus with one defect of every kind."""
    cut = real[9][: len(real[9]) // 2]  # a real line cut in its middle, without newline: a truncated download
    assert not cut.endswith(b"\n")
    rows = [
        (b"\xef\xbb\xbf" + real[0], None),                      # 1 UTF-8 BOM: valid
        (real[1], None),                                      # 2
        (b"<html>not json</html>\n", "invalid_json"),          # 3
        (b'["text", "x"]\n', "not_an_object"),                # 4
        (b'{"content": "x"}\n', "missing_text"),              # 5
        (b'{"text": ""}\n', "empty_text"),                    # 6
        (b'{"text": 12}\n', "text_not_a_string"),             # 7
        (real[2].replace(b"}\n", b"}\r\n"), None),             # 8 CRLF: valid
        (b'{"text": "\xff\xfe"}\n', "invalid_utf8"),          # 9
        (b"\n", "blank_line"),                                # 10
        (real[3], None),                                      # 11
        (b"   \r\n", "blank_line"),                           # 12
        (b'{"text": "\\udc00"}\n', "lone_surrogate"),         # 13
        (b"{'text': 'single quotes'}\n", "invalid_json"),     # 14
        (real[4], None),                                      # 15
        (b'{"text": "  "}\n', "empty_text"),                  # 16
        (b'{"text": null}\n', "text_not_a_string"),           # 17
        (real[5], None),                                      # 18
        (cut, "truncated_line"),                              # 19 last line, cut
    ]
    where: dict[str, list[int]] = {}
    for lineno, (_, reason) in enumerate(rows, 1):
        if reason:
            where.setdefault(reason, []).append(lineno)
    return [raw for raw, _ in rows], [raw for raw, reason in rows if reason is None], where


@pytest.mark.parametrize("block", [7, corpus.BLOCK])  # 7 bytes: lines run over many blocks
def test_bad_lines_are_skipped_and_reported(tmp_path, peoples_daily_lines, peoples_daily_texts, monkeypatch, block):
    monkeypatch.setattr(corpus, "BLOCK", block)
    rows, valid, where = _mixed_corpus(peoples_daily_lines)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(rows))
    out, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    stats = make_subset(path, out, 4, val, 2)

    assert out.read_bytes() == b"".join(valid[:4])  # valid lines are copied byte for byte (BOM, CRLF kept)
    assert val.read_bytes() == b"".join(valid[4:])
    texts = [json.loads(line.decode("utf-8-sig"))["text"] for line in lines_of(out) + lines_of(val)]
    assert texts == peoples_daily_texts[:6]
    # it stopped at the 6th valid line (line 18); line 19 was never read
    assert stats.lines == 18 and stats.valid == 6
    del where["truncated_line"]
    assert stats.skipped == Counter({reason: len(at) for reason, at in where.items()})
    assert stats.examples == where
    assert stats.valid + sum(stats.skipped.values()) == stats.lines
    summary = stats.summary()
    assert "lines read 18, valid 6" in summary
    assert "skipped 2 invalid_json (first at line 3, 14)" in summary
    assert "skipped 1 lone_surrogate (first at line 13)" in summary


def test_truncated_last_line_is_counted_when_read(tmp_path, peoples_daily_lines):
    rows, valid, where = _mixed_corpus(peoples_daily_lines)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(rows))
    # 7 wanted: the whole file is read, and the message says which lines were skipped and why
    with pytest.raises(NotEnoughLines, match=r"has only 6 valid lines of 19 \(skipped 13: 2 invalid_json from line 3, "
                                             r"2 empty_text from line 6, .*, 1 lone_surrogate from line 13\)"):
        make_subset(path, tmp_path / "train.jsonl", 5, tmp_path / "val.jsonl", 2)
    assert leftovers(tmp_path, path) == []
    # sampling reads the whole file in its counting pass; what it returns is the copying pass
    stats = make_subset(path, tmp_path / "train.jsonl", 6, sample=True)
    assert lines_of(tmp_path / "train.jsonl") == valid
    assert stats.valid == 6 and stats.valid + sum(stats.skipped.values()) == stats.lines


@pytest.mark.parametrize("sample", [False, True])
def test_strict_stops_at_the_first_bad_line(tmp_path, peoples_daily_lines, sample):
    rows, _, _ = _mixed_corpus(peoples_daily_lines)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(rows))
    with pytest.raises(BadLine) as e:
        make_subset(path, tmp_path / "train.jsonl", 3, sample=sample, strict=True)
    assert e.value.reason == "invalid_json"
    assert f"{path}:3:" in str(e.value)
    assert leftovers(tmp_path, path) == []
    # strict on a clean prefix: the two first lines (BOM, plain) are valid, so it succeeds without reading line 3
    make_subset(path, tmp_path / "train.jsonl", 2, strict=True)
    assert (tmp_path / "train.jsonl").read_bytes() == b"".join(rows[:2])


def test_a_failing_parse_hook_fails_the_copy(tmp_path, peoples_daily_jsonl):
    def broken(raw: bytes) -> str:  # a bug, not a bad line: the parsing process passes it on
        raise KeyError("bug")

    with pytest.raises(KeyError, match="bug"):
        make_subset(peoples_daily_jsonl, tmp_path / "train.jsonl", 5, parse=broken)
    assert leftovers(tmp_path, peoples_daily_jsonl) == []


# ---------------------------------------------------------------- damaged input, atomic output


@pytest.mark.parametrize("kind", ["tar.bz2", "jsonl.gz"])
@pytest.mark.parametrize("sample", [False, True])
def test_truncated_archive_is_reported_and_leaves_no_output(tmp_path, peoples_daily_jsonl, build_corpus_archive,
                                                             kind, sample):
    archive = build_corpus_archive(peoples_daily_jsonl, kind)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 6 // 10])
    out_dir = tmp_path / "out"
    out, val = out_dir / "train.jsonl", out_dir / "val.jsonl"
    # about half the lines are readable, so a first-N run writes them before it reaches the damage
    with pytest.raises(CorruptInput, match="damaged") as e:
        make_subset(archive, out, 190, val, 10, sample=sample)
    assert str(archive) in str(e.value)
    if not sample:
        assert int(str(e.value).split("after line ")[1].split()[0].replace(",", "")) > 50
    assert not out.exists() and not val.exists()
    assert leftovers(out_dir) == []  # no partial file left either
    # the lines before the damage are still usable
    make_subset(archive, out, 40, val, 10)
    assert out.read_bytes() == b"".join(lines_of(peoples_daily_jsonl)[:40])


def test_not_enough_lines_leaves_no_output(tmp_path, peoples_daily_lines):
    path = tmp_path / "short.jsonl"
    path.write_bytes(b"".join(peoples_daily_lines[:30]))
    out, val = tmp_path / "o" / "train.jsonl", tmp_path / "o" / "val.jsonl"
    for sample in (False, True):
        with pytest.raises(NotEnoughLines, match="30 valid lines"):
            make_subset(path, out, 25, val, 10, sample=sample)
        assert leftovers(tmp_path / "o") == []


def test_a_crashed_runs_partial_file_is_not_reused(tmp_path, peoples_daily_lines, peoples_daily_jsonl):
    out = tmp_path / "out" / "train.jsonl"
    out.parent.mkdir()
    # partial files as a killed run leaves them: one with our pid (pids repeat), one with another's
    ours, theirs = partial_name(out), out.with_name(f".{out.name}.999999999.partial")
    stale = b"".join(peoples_daily_lines[100:150])  # 50 valid lines: looks like a finished output
    ours.write_bytes(stale)
    theirs.write_bytes(stale)
    short = tmp_path / "short.jsonl"
    short.write_bytes(b"".join(peoples_daily_lines[:10]))
    with pytest.raises(NotEnoughLines):
        make_subset(short, out, 50)
    assert not out.exists()  # the stale partial was not renamed into place
    assert not ours.exists()
    make_subset(peoples_daily_jsonl, out, 50)
    assert out.read_bytes() == b"".join(peoples_daily_lines[:50])
    assert theirs.read_bytes() == stale  # another process's file is not ours to touch


# ---------------------------------------------------------------- the CLI


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "make_subset.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cli_writes_subset_and_prints_summary(tmp_path, peoples_daily_lines):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"".join(peoples_daily_lines[:20]) + b"not json\n" + b"".join(peoples_daily_lines[20:60]))
    out, val = tmp_path / "data" / "sub.jsonl", tmp_path / "data" / "val.jsonl"
    r = run_cli("--input", path, "--output", out, "--lines", 45, "--val-output", val, "--val-lines", 10, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"".join(peoples_daily_lines[:45])
    assert val.read_bytes() == b"".join(peoples_daily_lines[45:55])
    assert "lines read 56, valid 55" in r.stdout
    assert "skipped 1 invalid_json (first at line 21)" in r.stdout
    assert f"wrote {out} (45 lines) and {val} (10 lines)" in r.stdout


def test_cli_asked_for_more_lines_than_the_corpus_has_says_what_it_skipped(tmp_path, peoples_daily_lines):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"".join(peoples_daily_lines[:20]) + b"not json\n" + b"".join(peoples_daily_lines[20:30]))
    r = run_cli("--input", path, "--output", tmp_path / "o.jsonl", "--lines", 40, "--val-output", tmp_path / "v.jsonl",
                "--val-lines", 5, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == (
        f"error: {path} has only 30 valid lines of 31 (skipped 1: 1 invalid_json from line 21); asked for 40 + 5 "
        "(--lines + --val-lines): ask for fewer, or pass a larger corpus. Nothing was written")
    assert leftovers(tmp_path, path) == []


def test_cli_missing_input_is_a_one_line_error(tmp_path):
    r = run_cli("--input", tmp_path / "absent.jsonl.tar.bz2", "--output", tmp_path / "o.jsonl", "--lines", 5,
                "--val-lines", 0, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'absent.jsonl.tar.bz2'}: no such file\n")
    assert r.stdout == ""
    assert leftovers(tmp_path) == []


def test_cli_damaged_archive_is_a_one_line_error(tmp_path, peoples_daily_jsonl, build_corpus_archive):
    archive = build_corpus_archive(peoples_daily_jsonl, "tar.bz2")
    archive.write_bytes(archive.read_bytes()[:5000])  # damage inside the first bz2 block
    r = run_cli("--input", archive, "--output", tmp_path / "o.jsonl", "--lines", 5, "--val-lines", 0, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr and "damaged" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()
