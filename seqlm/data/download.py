"""Fetch what the pipeline needs into data/: the Qwen2.5-0.5B config + tokenizer (weights optional), the BELLE SFT
set and the benchmarks' task data from the Hugging Face hub, and the seq-monkey pretraining corpus from ModelScope.

Every fetch is idempotent (files already in place are not fetched again) and resumable. A source that fails becomes
one DownloadError line: which source at which address, why in a few words, and how to place the files by hand; the
hub's repositories that fail for one reason share one line.
HF_ENDPOINT (mirrors) and HF_TOKEN are read by huggingface_hub itself; nothing here prints them.
"""
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import requests
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from tqdm import tqdm

from seqlm import paths

MODEL_REPO = "Qwen/Qwen2.5-0.5B"
MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
               "merges.txt"]
MODEL_WEIGHTS = "model.safetensors"
SFT_REPO = "BelleGroup/train_3.5M_CN"
CORPUS_DATASET = "ddzhu123/seq-monkey"  # on ModelScope
CORPUS_MD5 = "ffacae345d22ab4f1464221d8ecf92c6"  # published with the corpus
TIMEOUT = 10  # seconds to connect / between bytes: an unreachable server should fail fast, not hang
CHUNK = 1 << 20

# What huggingface_hub 2.x raises when the hub is unreachable (httpx2 transport errors), refuses us (HfHubHTTPError is
# an httpx2.HTTPError), HF_HUB_OFFLINE=1 is set, or a file could not be fetched and is not on disk either.
HUB_ERRORS = (httpx2.HTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError)


class DownloadError(Exception):
    """A fetch failed; the message is the single line shown to the user."""


class HubError(DownloadError):
    """Repositories the hub did not give, for one reason, and where to place their files by hand instead."""

    def __init__(self, repos: list[str], places: list[str], reason: str):
        self.repos, self.places, self.reason = repos, places, reason
        # A mirror already set is the one that failed: telling the user to set one would send them in a circle.
        mirror = os.environ.get("HF_ENDPOINT")
        where, advice = ((" (HF_ENDPOINT)", "Check that mirror, or set HF_ENDPOINT to another") if mirror else
                         ("", "Set HF_ENDPOINT to a mirror (e.g. https://hf-mirror.com)"))
        super().__init__(f"cannot download {', '.join(repos)} from the Hugging Face hub at "
                         f"{_public(constants.ENDPOINT)}{where} ({reason}). {advice}, or place {'; '.join(places)} by "
                         "hand.")


def one_line_per_cause(errors: list[DownloadError]) -> list[DownloadError]:
    """The errors to show, in order, the hub's failures for one reason merged into one: an unreachable hub fails every
    repository alike (`--eval` asks it for six)."""
    shown: list[DownloadError] = []
    first: dict[str, int] = {}
    for e in errors:
        if isinstance(e, HubError) and e.reason in first:
            i = first[e.reason]
            shown[i] = HubError(shown[i].repos + e.repos, shown[i].places + e.places, e.reason)
            continue
        if isinstance(e, HubError):
            first[e.reason] = len(shown)
        shown.append(e)
    return shown


def rebase(path: Path, data_dir: Path) -> Path:
    """A default path from seqlm.paths, moved from paths.DATA_DIR to data_dir."""
    return data_dir / path.relative_to(paths.DATA_DIR)


def _reason(e: Exception) -> str:
    # Only the status or the exception type: full messages can carry URLs with signed query strings.
    response = getattr(e, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(e).__name__


def _public(url: str) -> str:
    """The URL without user:password@ or query string, safe to print."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face hub


def _from_hub(repo_id: str, repo_type: str, local_dir: Path, files: list[str], fetch: Callable[[str], object],
              revision: str | None = None) -> None:
    """Run fetch(commit_sha) for the revision (default: main). If the hub fails, files already in local_dir will do
    (`files` are names or glob patterns); else raise DownloadError."""
    try:
        # Resolve the commit ourselves: huggingface_hub makes this call with no timeout at all, so a firewalled hub
        # would hang for minutes. Given a commit sha, files it already put in local_dir cost no further request.
        sha = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision,
                                timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        fetch(sha)
    except HUB_ERRORS as e:
        if all(any(local_dir.glob(f)) for f in files):
            print(f"{repo_id}: hub unavailable ({_reason(e)}), keeping the files already in {local_dir}")
            return
        branch = f" (branch {revision})" if revision else ""
        raise HubError([f"{repo_id}{branch}"], [f"{', '.join(files)} in {local_dir}/"], _reason(e)) from e
    print(f"{repo_id}: {', '.join(files)} in {local_dir}")


def fetch_model(local_dir: Path = paths.MODEL_DIR, with_weights: bool = False) -> None:
    """Config + tokenizer of the architecture we train from scratch; the ~1 GB of weights for continued pretraining."""
    files = MODEL_FILES + ([MODEL_WEIGHTS] if with_weights else [])
    patterns = MODEL_FILES + (["*.safetensors"] if with_weights else [])
    _from_hub(MODEL_REPO, "model", local_dir, files, lambda sha: snapshot_download(
        MODEL_REPO, revision=sha, local_dir=local_dir, allow_patterns=patterns))


def fetch_sft(local_dir: Path = paths.SFT_FILE.parent) -> None:
    """The BELLE 3.5M Chinese instruction set (4.85 GB), one JSON object per line."""
    name = paths.SFT_FILE.name
    _from_hub(SFT_REPO, "dataset", local_dir, [name], lambda sha: hf_hub_download(
        SFT_REPO, name, repo_type="dataset", revision=sha, local_dir=local_dir))


def fetch_benchmark_data(repo: str, patterns: list[str], revision: str, data_dir: Path = paths.EVAL_DATA_DIR) -> None:
    """The files of `repo` that match `patterns` (a benchmark's task data: seqlm.evaluation.benchmarks says which),
    into data_dir/<repo>/, read offline after that."""
    local_dir = data_dir / repo
    _from_hub(repo, "dataset", local_dir, patterns, lambda sha: snapshot_download(
        repo, repo_type="dataset", revision=sha, local_dir=local_dir, allow_patterns=patterns), revision=revision)


# ---------------------------------------------------------------------------------------------------------------------
# ModelScope corpus, plain HTTP


def corpus_url(filename: str = paths.CORPUS_ARCHIVE.name) -> str:
    """ModelScope's file API. MODELSCOPE_DOMAIN is read like the modelscope SDK does (a bare domain); a full
    http(s):// endpoint is accepted too."""
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    endpoint = (domain if "://" in domain else f"https://{domain}").rstrip("/")
    return f"{endpoint}/api/v1/datasets/{CORPUS_DATASET}/repo?Revision=master&FilePath={filename}"


def fetch_corpus(dest: Path = paths.CORPUS_ARCHIVE, url: str | None = None, md5: str | None = CORPUS_MD5) -> None:
    """Stream the archive into <dest>.partial (continuing what is there), check its MD5, then rename it to dest."""
    if dest.is_file():
        print(f"{dest} already there, skipping")
        return
    url = url or corpus_url()
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _resume(url, partial)
    except requests.RequestException as e:
        kept = f"{partial} keeps what arrived, rerun to resume. " if partial.is_file() else ""
        raise DownloadError(
            f"cannot download the corpus from {_public(url)} ({_reason(e)}). {kept}Set MODELSCOPE_DOMAIN or "
            f"--corpus-url to a reachable copy, or place {dest.name} (MD5 {CORPUS_MD5}) in {dest.parent}/ by hand."
        ) from e
    if md5 is not None and (got := _md5(partial)) != md5.lower():
        bad = dest.with_name(dest.name + ".bad")
        os.replace(partial, bad)  # so that neither a rerun nor the pipeline mistakes it for the corpus
        raise DownloadError(f"MD5 of the downloaded corpus is {got}, expected {md5}; moved it to {bad}. "
                            "Delete it and rerun.")
    os.replace(partial, dest)
    print(f"corpus: {dest}")


def _resume(url: str, partial: Path) -> None:
    have = partial.stat().st_size if partial.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if have and r.status_code == 416:  # nothing past what we have: the partial is complete (the MD5 will tell)
            return
        r.raise_for_status()
        if r.status_code != 206:  # the server ignored Range and sends the whole file: start over
            have = 0
        total = have + int(r.headers.get("Content-Length", 0)) or None
        with open(partial, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                               unit_divisor=1024, desc=partial.name) as bar:
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc="md5") as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()
