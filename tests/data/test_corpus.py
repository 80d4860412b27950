"""seqlm.data.corpus: reading a seq-monkey JSON Lines corpus, plain or archived, and judging each line."""
import io
import json
import tarfile

import pytest

from seqlm.data import corpus
from seqlm.data.corpus import (
    BadLine,
    CorruptInput,
    LineStats,
    iter_texts,
    open_corpus,
    parse_line,
    read_lines,
)

KINDS = ("tar.bz2", "tar.gz", "jsonl.gz", "jsonl.bz2")


@pytest.mark.parametrize("raw, text", [
    ('{"text": "人民日报"}\n'.encode(), "人民日报"),
    (b'\xef\xbb\xbf{"text": "\xe4\xba\xba"}\n', "人"),                    # a UTF-8 BOM (first line of a file)
    ('{"text": "第一行\\n第二行"}\r\n'.encode(), "第一行\n第二行"),         # CRLF line ending
    ('{"text": "最后一行"}'.encode(), "最后一行"),                           # a complete last line without newline
    (b'{"text": "\\u4eba\\u6c11"}\n', "人民"),                              # ensure_ascii escapes
    (b'{"text": "smile \\ud83d\\ude00"}\n', "smile \U0001F600"),           # an escaped surrogate *pair* is fine
    (b'{"id": 7, "text": " x ", "meta": {"a": [1]}}\n', " x "),            # other keys ignored, text kept as is
    # what json.loads takes and orjson (the fast path) does not: judged as json.loads judges it
    (b'{"text": "x", "score": NaN}\n', "x"),
    (b'{"text": "x", "id": 123456789012345678901234567890}\n', "x"),
    (b'{"text": "x", "note": "\\ud800"}\n', "x"),                        # a lone surrogate outside the text
    (b'{"text": 1, "text": "x"}\n', "x"),                                  # a repeated key: the last one counts
    (b'{"text":\r"x"}\n', "x"),                                           # a bare CR is JSON whitespace
])
def test_parse_line_accepts(raw, text):
    assert parse_line(raw) == text


@pytest.mark.parametrize("raw, reason", [
    (b"\n", "blank_line"),
    (b"  \t \r\n", "blank_line"),
    (b"\xef\xbb\xbf\n", "blank_line"),
    (b"this is not json\n", "invalid_json"),
    (b'{"text": "unterminated\n', "invalid_json"),
    (b'{"text": "cut in the mid', "truncated_line"),                     # the last line of a cut file
    (b"[" * 100_000 + b"\n", "invalid_json"),                            # too deep for the parser
    (b'["text", "a list"]\n', "not_an_object"),
    (b'"just a string"\n', "not_an_object"),
    (b"42\n", "not_an_object"),
    (b'{"title": "no text key"}\n', "missing_text"),
    (b'{"text": ""}\n', "empty_text"),
    (b'{"text": " \\n\\t "}\n', "empty_text"),
    ('{"text": "\u3000 "}\n'.encode(), "empty_text"),                       # an ideographic space is a space too
    (b'{"text": NaN}\n', "text_not_a_string"),
    (b'{"text": 42}\n', "text_not_a_string"),
    (b'{"text": null}\n', "text_not_a_string"),
    (b'{"text": ["a"]}\n', "text_not_a_string"),
    (b'{"text": "bad \xff\xfe bytes"}\n', "invalid_utf8"),
    (b'{"text": "half \xe4\xba"}\n', "invalid_utf8"),                    # a multi-byte character cut short
    (b'{"text": "lone \\ud800 surrogate"}\n', "lone_surrogate"),         # valid JSON, but not encodable text
])
def test_parse_line_rejects_with_reason(raw, reason):
    with pytest.raises(BadLine) as e:
        parse_line(raw)
    assert e.value.reason == reason


def test_lone_surrogate_would_break_the_tokenizer(offline_qwen_tokenizer):
    # Why lone_surrogate is a skip reason: the text json.loads returns cannot go through the tokenizer.
    text = json.loads(b'{"text": "lone \\ud800 surrogate"}')["text"]
    with pytest.raises((TypeError, UnicodeEncodeError, ValueError)):
        offline_qwen_tokenizer.backend_tokenizer.encode_batch_fast([text], add_special_tokens=False)


@pytest.mark.parametrize("kind", KINDS)
def test_open_corpus_reads_every_format_byte_for_byte(peoples_daily_jsonl, build_corpus_archive, kind):
    archive = build_corpus_archive(peoples_daily_jsonl, kind)
    with open_corpus(archive) as f:
        assert f.read() == peoples_daily_jsonl.read_bytes()


def test_iter_texts_and_stats(tmp_path, peoples_daily_texts, peoples_daily_lines):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(peoples_daily_lines[0] + b"oops\n" + peoples_daily_lines[1] + b"\n" + peoples_daily_lines[2])
    stats = LineStats()
    assert list(iter_texts(path, stats)) == peoples_daily_texts[:3]
    assert (stats.lines, stats.valid) == (5, 3)
    assert stats.skipped == {"invalid_json": 1, "blank_line": 1}
    assert stats.examples == {"invalid_json": [2], "blank_line": [4]}
    assert stats.chars == sum(map(len, peoples_daily_texts[:3]))
    assert stats.bytes == sum(map(len, peoples_daily_lines[:3]))


@pytest.mark.parametrize("block", [2, 7, corpus.BLOCK])
def test_lines_are_split_at_newlines_only_whatever_the_block_size(tmp_path, peoples_daily_lines, monkeypatch, block):
    monkeypatch.setattr(corpus, "BLOCK", block)  # 2 and 7: every line runs over many blocks
    odd = [b'{"text":\r"cr"}\n', b"\n", b'{"text": "crlf"}\r\n', b'{"text": "end"}']  # a bare CR, no final newline
    data = b"".join(peoples_daily_lines[:3] + odd)
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(data)
    stats = LineStats()
    with open_corpus(path) as f:
        got = list(read_lines(f, path, stats))
    lines = list(io.BytesIO(data))  # as iterating a binary file splits them
    assert [raw for raw, _ in got] == [line for line in lines if line != b"\n"]
    assert [text for _, text in got][3:] == ["cr", "crlf", "end"]
    assert (stats.lines, stats.valid, stats.skipped) == (len(lines), len(lines) - 1, {"blank_line": 1})


def test_examples_keep_the_first_five_line_numbers(tmp_path, peoples_daily_lines):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join([peoples_daily_lines[0]] + [b"[1]\n"] * 7 + [peoples_daily_lines[1]]))
    stats = LineStats()
    with open_corpus(path) as f:
        assert len(list(read_lines(f, path, stats))) == 2
    assert stats.skipped == {"not_an_object": 7}
    assert stats.examples == {"not_an_object": [2, 3, 4, 5, 6]}
    assert "skipped 7 not_an_object (first at line 2, 3, 4, 5, 6)" in stats.summary()


def test_strict_raises_at_the_first_bad_line_with_its_number(tmp_path, peoples_daily_lines):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(peoples_daily_lines[:3]) + b'{"text": 1}\n' + b"junk\n")
    stats = LineStats()
    got = []
    with pytest.raises(BadLine) as e, open_corpus(path) as f:
        for raw, _ in read_lines(f, path, stats, strict=True):
            got.append(raw)
    assert got == peoples_daily_lines[:3]
    assert e.value.reason == "text_not_a_string"
    assert f"{path}:4:" in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [0.05, 0.6])
def test_truncated_archive_is_corrupt_input(peoples_daily_jsonl, peoples_daily_lines, build_corpus_archive, kind, keep):
    archive = build_corpus_archive(peoples_daily_jsonl, kind)
    data = archive.read_bytes()
    archive.write_bytes(data[:int(len(data) * keep)])
    got = []
    with pytest.raises(CorruptInput, match="damaged"):
        with open_corpus(archive) as f:
            for raw, _ in read_lines(f, archive, LineStats()):
                got.append(raw)
    # what came out before the damage is whole lines of the original, in order: no cut line passes as valid
    assert got == peoples_daily_lines[:len(got)]
    assert len(got) < len(peoples_daily_lines)


def test_tar_without_jsonl_member(tmp_path):
    (tmp_path / "notes.txt").write_text("no corpus here\n")
    archive = tmp_path / "empty.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    with pytest.raises(FileNotFoundError, match="no .jsonl file inside"):
        with open_corpus(archive):
            pass


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        with open_corpus(tmp_path / "absent.jsonl"):
            pass
