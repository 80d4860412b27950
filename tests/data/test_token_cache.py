"""seqlm.data.token_cache with the real offline Qwen tokenizer on real People's Daily text.

The expected token stream is built here, independently: `tokenizer(text, add_special_tokens=False)` per document,
then the separator."""
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from helpers import ENDOFTEXT, IM_END, REPO, add_a_prefix_token, assert_rate_is_true, reshaped, write_jsonl
from transformers import AutoTokenizer

from seqlm.data import token_cache
from seqlm.data.cache import DamagedCache
from seqlm.data.corpus import CorruptInput
from seqlm.data.token_cache import BlockDataset, TokenCache, build_token_cache
from seqlm.fileio import atomic_output, partial_name
from seqlm.tokenizer import offline_tokenizer_dir


def expected_docs(tokenizer, texts, separator=ENDOFTEXT) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + [separator] for text in texts]


def complete_folders(cache_root) -> list[str]:
    return sorted(p.name for p in cache_root.iterdir() if (p / "manifest.json").is_file())


def stamp(folder) -> tuple:
    return tuple((folder / name).stat().st_mtime_ns for name in ("manifest.json", "tokens.bin", "doc_offsets.npy"))


@pytest.fixture(scope="module")
def reference(offline_qwen_tokenizer, peoples_daily_texts):
    """The independently tokenized documents of the shared corpus, each ending with the separator."""
    return expected_docs(offline_qwen_tokenizer, peoples_daily_texts)


# ---------------------------------------------------------------- content


@pytest.mark.parametrize("batch_docs", [7, token_cache.BATCH_DOCS])  # 7: many batch edges inside the corpus
def test_stream_is_every_document_then_the_separator(tmp_path, monkeypatch, offline_qwen_tokenizer,
                                                      peoples_daily_texts, peoples_daily_jsonl, reference,
                                                      batch_docs):
    monkeypatch.setattr(token_cache, "BATCH_DOCS", batch_docs)
    tok = offline_qwen_tokenizer
    assert tok.eos_token_id == IM_END  # the trap: the tokenizer's own eos is not the document separator
    folder = build_token_cache(peoples_daily_jsonl, tok, ENDOFTEXT, tmp_path / "cache")
    cache = TokenCache(folder)

    docs = [doc.tolist() for doc in cache.documents()]
    assert docs == reference
    assert [tok.decode(doc[:-1]) for doc in docs] == peoples_daily_texts  # decoding gives the documents back
    stream = cache.tokens()
    assert stream.tolist() == [t for doc in reference for t in doc]
    assert tok.decode(stream) == "".join(text + "<|endoftext|>" for text in peoples_daily_texts)
    assert np.count_nonzero(stream == ENDOFTEXT) == len(peoples_daily_texts)
    assert not np.any(stream == IM_END)

    offsets = np.asarray(cache.doc_offsets)
    assert offsets.dtype == np.int64
    assert offsets.tolist() == np.cumsum([0] + [len(d) for d in reference]).tolist()

    m = cache.manifest
    assert m["num_docs"] == len(reference)
    assert m["num_tokens"] == cache.num_tokens == sum(map(len, reference))
    assert m["max_token_id"] == max(max(d) for d in reference)
    assert m["separator_id"] == ENDOFTEXT and m["skipped_lines"] == {}
    assert m["encoder"] == "tiktoken"  # the Qwen tokenizer's ids, from seqlm.data.encoder's faster twin
    # uint32 on disk: 4 bytes a token (ids reach 151,643, beyond uint16)
    assert stream.dtype == np.uint32
    assert (folder / "tokens.bin").stat().st_size == 4 * m["num_tokens"]
    assert sorted(os.listdir(folder)) == ["doc_offsets.npy", "manifest.json", "tokens.bin"]


def test_a_tokenizer_without_a_tiktoken_twin_gives_the_same_stream(tmp_path, offline_qwen_tokenizer,
                                                                    peoples_daily_jsonl, reference):
    """The HF tokenizer's own path, for tokenizers of other shapes: two more added tokens, one a prefix of the other
    (absent from the text, so the ids are unchanged), rule the twin out."""
    tok = reshaped(offline_qwen_tokenizer, add_a_prefix_token)
    folder = build_token_cache(peoples_daily_jsonl, tok, ENDOFTEXT, tmp_path / "cache")
    assert TokenCache(folder).manifest["encoder"] == "tokenizers"
    assert [d.tolist() for d in TokenCache(folder).documents()] == reference


def test_compressed_source_gives_the_same_stream(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl, reference):
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(peoples_daily_jsonl.read_bytes()))
    folder = build_token_cache(gz, offline_qwen_tokenizer, ENDOFTEXT, tmp_path / "cache")
    assert [d.tolist() for d in TokenCache(folder).documents()] == reference


def test_bad_lines_are_skipped_and_counted(tmp_path, offline_qwen_tokenizer, peoples_daily_lines, peoples_daily_texts):
    bad = [b"not json\n", b"\n", b'{"text": ""}\n', b'{"text": 3}\n', b'{"no": "text"}\n', b"[1]\n",
           b'{"text": "\xff"}\n', b'{"text": "\\ud800"}\n', b"junk again\n"]
    lines = []
    for i, line in enumerate(peoples_daily_lines[:40]):
        lines.append(line)
        if i < len(bad):
            lines.append(bad[i])
    lines.append(peoples_daily_lines[40][:100])  # a truncated last line
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(lines))
    folder = build_token_cache(path, offline_qwen_tokenizer, ENDOFTEXT, tmp_path / "cache")
    cache = TokenCache(folder)
    assert [d.tolist() for d in cache.documents()] == expected_docs(offline_qwen_tokenizer, peoples_daily_texts[:40])
    assert cache.manifest["num_docs"] == 40
    assert cache.manifest["skipped_lines"] == {
        "invalid_json": 2, "blank_line": 1, "empty_text": 1, "text_not_a_string": 1, "missing_text": 1,
        "not_an_object": 1, "invalid_utf8": 1, "lone_surrogate": 1, "truncated_line": 1}


# ---------------------------------------------------------------- blocks


def test_blocks_are_consecutive_slices_of_the_stream(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl, reference):
    folder = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, tmp_path / "cache")
    stream = np.array([t for doc in reference for t in doc], dtype=np.int64)
    block = 1000
    ds = BlockDataset(folder, block)
    assert len(ds) == len(stream) // block and len(ds) > 50
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (block,)
        assert torch.equal(item["input_ids"], item["labels"])
        assert item["input_ids"].tolist() == stream[i * block:(i + 1) * block].tolist()
    for i in (len(ds), len(ds) + 5, -1):
        with pytest.raises(IndexError):
            ds[i]
    # a block can take the whole stream but one token; one token more than the stream is not a block
    assert len(BlockDataset(folder, len(stream))) == 1
    with pytest.raises(ValueError, match="fewer than one block"):
        BlockDataset(folder, len(stream) + 1)
    # the Trainer's DataLoader: batches stack blocks in index order
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == (4, block)
    assert batch["input_ids"].flatten().tolist() == stream[:4 * block].tolist()


# ---------------------------------------------------------------- reuse and rebuilding


def test_cache_is_reused_not_rebuilt(tmp_path, capsys, offline_qwen_tokenizer, peoples_daily_jsonl):
    root = tmp_path / "cache"
    folder = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    assert_rate_is_true(capsys.readouterr().out)
    before = stamp(folder)
    time.sleep(0.01)
    os.utime(peoples_daily_jsonl)  # a new modification time, same content: still the same cache
    again = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    assert again == folder
    assert stamp(folder) == before
    assert "tokenized" not in capsys.readouterr().out
    assert complete_folders(root) == [folder.name]


def test_is_built_says_whether_a_build_would_reuse_a_cache(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl):
    root = tmp_path / "cache"
    assert not token_cache.token_cache_is_built(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    folder = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    assert token_cache.token_cache_is_built(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    assert not token_cache.token_cache_is_built(peoples_daily_jsonl, offline_qwen_tokenizer, IM_END, root)
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [folder.name]  # asking built nothing


@pytest.mark.parametrize("damage", ["changed bytes", "truncated", "missing"])
def test_a_damaged_cache_is_refused_in_one_line_naming_the_folder(tmp_path, offline_qwen_tokenizer,
                                                                   peoples_daily_jsonl, damage):
    folder = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, tmp_path)
    tokens = folder / "tokens.bin"
    size = tokens.stat().st_size
    if damage == "changed bytes":
        with open(tokens, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xff\xff\xff\x7f")  # one id far past the vocabulary, the size unchanged
    elif damage == "truncated":
        with open(tokens, "r+b") as f:
            f.truncate(size - 4)
    else:
        tokens.unlink()
    problem = {"changed bytes": "has changed since it was written", "truncated": f"is {size - 4:,} bytes, not {size:,}",
               "missing": "is missing"}[damage]
    with pytest.raises(DamagedCache) as error:
        build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, tmp_path)
    assert str(error.value) == (f"the cache {folder} is damaged: tokens.bin {problem}. Delete that folder and rerun to "
                                "rebuild it")


def test_ids_past_the_vocabulary_are_refused(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl):
    cache = TokenCache(build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, tmp_path))
    cache.check_ids(151936)
    with pytest.raises(ValueError, match=f"holds token id {cache.manifest['max_token_id']:,}, past the model's "
                                         "vocabulary of 1,000: delete that folder"):
        cache.check_ids(1000)


def test_a_build_of_milliseconds_states_a_true_rate(tmp_path, capsys, offline_qwen_tokenizer):
    build_token_cache(write_jsonl(tmp_path / "one.jsonl", ["你好。"]), offline_qwen_tokenizer, ENDOFTEXT, tmp_path)
    out = capsys.readouterr().out
    assert ": 1 documents, 3 tokens (tiktoken) in " in out
    assert_rate_is_true(out)


def test_changed_content_gives_a_new_cache(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl, peoples_daily_texts):
    root = tmp_path / "cache"
    first = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    before = stamp(first)
    texts = peoples_daily_texts[:50]
    texts[10] = texts[10].replace("。", "！", 1)  # one character of one document
    peoples_daily_jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                   encoding="utf-8")
    second = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    assert second != first
    assert [d.tolist() for d in TokenCache(second).documents()] == expected_docs(offline_qwen_tokenizer, texts)
    assert stamp(first) == before  # the old cache is left as it was
    assert complete_folders(root) == sorted([first.name, second.name])


def test_changed_tokenizer_gives_a_new_cache(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl, peoples_daily_texts):
    root = tmp_path / "cache"
    first = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    changed = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))  # a copy: the shared one stays as is
    assert changed.add_tokens(["人民日报"]) == 1
    new_id = changed.convert_tokens_to_ids("人民日报")
    second = build_token_cache(peoples_daily_jsonl, changed, ENDOFTEXT, root)
    assert second != first
    docs = [d.tolist() for d in TokenCache(second).documents()]
    assert docs == expected_docs(changed, peoples_daily_texts)
    assert any(new_id in d for d in docs)
    assert not np.any(TokenCache(first).tokens() == new_id)
    assert [changed.decode(d[:-1]) for d in docs] == peoples_daily_texts
    # and the unchanged tokenizer, loaded again, maps back to the first cache
    reloaded = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))
    assert build_token_cache(peoples_daily_jsonl, reloaded, ENDOFTEXT, root) == first


def test_changed_separator_gives_a_new_cache(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl, peoples_daily_texts):
    root = tmp_path / "cache"
    first = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    second = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, IM_END, root)
    assert second != first
    docs = [d.tolist() for d in TokenCache(second).documents()]
    assert docs == expected_docs(offline_qwen_tokenizer, peoples_daily_texts, separator=IM_END)
    assert TokenCache(second).manifest["separator_id"] == IM_END
    assert not np.any(TokenCache(first).tokens() == IM_END)


# ---------------------------------------------------------------- crashes and concurrency


def test_interrupted_build_leaves_nothing_and_the_next_builds(tmp_path, monkeypatch, offline_qwen_tokenizer,
                                                             peoples_daily_jsonl, reference):
    monkeypatch.setattr(token_cache, "BATCH_DOCS", 16)  # so that batches are written before the damage is met
    data = gzip.compress(peoples_daily_jsonl.read_bytes())
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(data[: len(data) * 6 // 10])
    root = tmp_path / "cache"
    for _ in range(2):  # and again: a failed build does not poison the next attempt
        with pytest.raises(CorruptInput, match="damaged"):
            build_token_cache(gz, offline_qwen_tokenizer, ENDOFTEXT, root)
        assert complete_folders(root) == []
        assert [p.name for p in root.iterdir() if p.is_dir()] == []  # no partial folder either
    gz.write_bytes(data)  # the download is finished
    folder = build_token_cache(gz, offline_qwen_tokenizer, ENDOFTEXT, root)
    assert [d.tolist() for d in TokenCache(folder).documents()] == reference


def test_leftovers_of_a_crashed_build_are_not_reused(tmp_path, offline_qwen_tokenizer, peoples_daily_jsonl, reference):
    root = tmp_path / "cache"
    folder = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
    shutil.rmtree(folder)
    # a build killed before its manifest: a folder under the final name without one (e.g. copied over half-way),
    # and the partial folder of a killed process that had our pid (pids repeat in a restarted container)
    folder.mkdir()
    (folder / "tokens.bin").write_bytes(b"\0" * 64)
    stale = partial_name(folder)
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"\0" * 64)
    host = socket.gethostname()
    orphan = folder.with_name(f".{folder.name}.{host}.999999999.partial")  # of another process, killed
    shutil.copytree(stale, orphan)
    # a build in progress here, and one on another node that shares this folder with its own process ids
    with subprocess.Popen(["sleep", "600"]) as running:
        building = [folder.with_name(f".{folder.name}.{host}.{running.pid}.partial"),
                    folder.with_name(f".{folder.name}.other-node.{os.getpid()}.partial")]
        for partial in building:
            shutil.copytree(stale, partial)
        again = build_token_cache(peoples_daily_jsonl, offline_qwen_tokenizer, ENDOFTEXT, root)
        running.kill()
    assert again == folder
    assert [d.tolist() for d in TokenCache(folder).documents()] == reference
    assert not stale.exists() and not orphan.exists()
    assert all(partial.is_dir() for partial in building), "another build's folder is never removed"


def test_no_valid_line_and_missing_source(tmp_path, offline_qwen_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"nothing\n\n[1]\n")
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match="no valid line"):
        build_token_cache(path, offline_qwen_tokenizer, ENDOFTEXT, root)
    assert [p for p in root.iterdir() if p.is_dir()] == []
    with pytest.raises(FileNotFoundError):
        build_token_cache(tmp_path / "absent.jsonl", offline_qwen_tokenizer, ENDOFTEXT, root)


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from transformers import AutoTokenizer
    from seqlm.tokenizer import offline_tokenizer_dir
    from seqlm.data.token_cache import build_token_cache
    source, root, ready, go = sys.argv[1:5]
    tok = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.002)
    start = time.time()
    folder = build_token_cache(source, tok, %d, root)
    print("RESULT " + json.dumps({"folder": str(folder), "start": start, "end": time.time()}), flush=True)
""" % ENDOFTEXT)


def test_concurrent_builders_build_once(tmp_path, capsys, peoples_daily_lines, peoples_daily_texts,
                                        offline_qwen_tokenizer):
    """Three builders at once, as ranks do: two worker processes and this one."""
    # a corpus big enough (≈0.5 s to tokenize) for the others to arrive while the first builds
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"".join(peoples_daily_lines) * 4)
    root, script, go = tmp_path / "cache", tmp_path / "worker.py", tmp_path / "go"
    script.write_text(WORKER)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    procs = []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        procs.append((ready, subprocess.Popen(
            [sys.executable, str(script), str(path), str(root), str(ready), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(env, PYTHONPATH=str(REPO)))))
    deadline = time.time() + 60
    while not all(ready.exists() for ready, _ in procs):
        assert time.time() < deadline and all(p.poll() is None for _, p in procs), "a worker did not start"
        time.sleep(0.01)
    capsys.readouterr()
    go.touch()
    start = time.time()
    folder = build_token_cache(path, offline_qwen_tokenizer, ENDOFTEXT, root)
    results = [{"folder": str(folder), "start": start, "end": time.time(),
                "built": capsys.readouterr().out.count("tokenized ")}]
    for _, p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        result = json.loads(out.split("RESULT ", 1)[1])
        result["built"] = out.count("tokenized ")
        results.append(result)

    assert sum(r["built"] for r in results) == 1  # exactly one process tokenized
    builder = next(r for r in results if r["built"])
    assert all(r["start"] < builder["end"] for r in results), "the builders did not overlap: no concurrency tested"
    assert len({r["folder"] for r in results}) == 1
    assert complete_folders(root) == [folder.name]
    assert [p.name for p in root.iterdir() if p.is_dir() and p.name.endswith(".partial")] == []
    cache = TokenCache(folder)
    assert cache.manifest["num_docs"] == 4 * len(peoples_daily_texts)
    assert cache.num_tokens == 4 * sum(len(d) for d in expected_docs(offline_qwen_tokenizer, peoples_daily_texts))


def test_a_rebuilt_folder_replaces_the_old_one_in_one_step(tmp_path):
    """A reader (on another node, say) finds every file of the folder while it is replaced, in the old version or the
    new: never a folder half removed, never none."""
    folder = tmp_path / "cache"
    files = [f"part-{i}.bin" for i in range(40)]

    def write(version: int) -> None:
        with atomic_output(folder) as tmp:
            tmp.mkdir()
            for name in files:
                (tmp / name).write_text(str(version))

    write(0)
    seen, done = [], threading.Event()

    def read() -> None:  # each file by its path, as a reader that opens one finds it
        while not done.is_set():
            for name in files:
                try:
                    seen.append(int((folder / name).read_text()) >= 0)
                except FileNotFoundError:
                    seen.append(False)

    reader = threading.Thread(target=read)
    reader.start()
    for version in range(1, 60):
        write(version)
    done.set()
    reader.join()
    assert len(seen) > 100 and all(seen)
    assert {(folder / name).read_text() for name in files} == {"59"}
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
