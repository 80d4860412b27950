"""Input that breaks naive pipelines: a damaged archive kept only on request, and a 50 MB line."""
import json
import subprocess
import sys

import pytest
from helpers import ENDOFTEXT, REPO

from seqlm.data.token_cache import TokenCache, build_token_cache


def make_subset(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "make_subset.py"), *args], capture_output=True, text=True,
                          timeout=300)


def truncated_archive(build_corpus_archive, peoples_daily_jsonl):
    archive = build_corpus_archive(peoples_daily_jsonl, "tar.bz2")
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * 0.6)])
    return archive


def test_damaged_archive_keeps_nothing_unless_asked(tmp_path, build_corpus_archive, peoples_daily_jsonl):
    archive = truncated_archive(build_corpus_archive, peoples_daily_jsonl)
    out = tmp_path / "subset.jsonl"
    result = make_subset("--input", str(archive), "--output", str(out), "--lines", "190", "--val-lines", "0")
    assert result.returncode == 1 and "damaged" in result.stderr and not out.exists()

    result = make_subset("--input", str(archive), "--output", str(out), "--lines", "190", "--val-lines", "0",
                         "--keep-partial")
    assert result.returncode == 1 and "damaged" in result.stderr and "--keep-partial" in result.stderr
    kept = out.read_bytes().splitlines(keepends=True)
    assert 0 < len(kept) < 190
    assert kept == peoples_daily_jsonl.read_bytes().splitlines(keepends=True)[:len(kept)]  # whole lines, in order


@pytest.fixture(scope="module")
def huge_line_corpus(module_tmp, peoples_daily_texts):
    """Three documents, the middle one a single line of 50 MB (real text, repeated)."""
    text = "\n".join(peoples_daily_texts)
    huge = (text * (50_000_000 // len(text.encode()) + 1))
    path = module_tmp("huge") / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in ("第一篇。", huge, "最后一篇。"):
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    assert path.stat().st_size > 50_000_000
    return path, len(huge)


def test_a_50_mb_line_goes_through_make_subset(huge_line_corpus, tmp_path):
    path, _ = huge_line_corpus
    out = tmp_path / "subset.jsonl"
    result = make_subset("--input", str(path), "--output", str(out), "--lines", "3", "--val-lines", "0")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == path.read_bytes()


def test_a_50_mb_line_goes_through_tokenization(huge_line_corpus, offline_qwen_tokenizer, tmp_path):
    path, chars = huge_line_corpus
    cache = TokenCache(build_token_cache(path, offline_qwen_tokenizer, ENDOFTEXT, tmp_path))
    assert cache.manifest["num_docs"] == 3
    lengths = [len(d) for d in cache.documents()]
    assert lengths[1] > chars / 3  # the huge document came through whole (≈1.5 characters a token)
