"""A local stand-in for the Hugging Face hub and ModelScope, for the download tests.

The stand-in answers only the requests huggingface_hub 2.4 makes here (read from its source): GET
/api/{models,datasets}/<repo>[/revision/<rev>] (repo info: sha), GET /api/{models,datasets}/<repo>/tree/<sha> (file
listing), HEAD+GET /[datasets/]<repo>/resolve/<sha>/<file> (X-Repo-Commit, ETag, Content-Length), and
GET /api/agent-harnesses (a registry huggingface_hub fetches once a day to fill its User-Agent); plus ModelScope's
file API with Range support. No network is needed.
"""
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import REPO

from seqlm import paths
from seqlm.data import download  # noqa: E402

SCRIPT = REPO / "download_dataset.py"
SHA = "4f2c1c8e6b1d3a5f7e9d0b2a4c6e8f0a1b3d5c7e"  # the fake repos' commit
TOKEN = "hf_fakeTokenThatMustNeverBePrinted"
MODEL = {name: json.dumps({"file": name}).encode() for name in download.MODEL_FILES}
MODEL |= {"merges.txt": b"#version: 0.2\n\xc4\xa0 t\n", "model.safetensors": bytes(range(256)) * 64,
          "README.md": b"# fake\n"}
SFT_NAME = paths.SFT_FILE.name
REPOS = {
    ("models", download.MODEL_REPO): MODEL,
    ("datasets", download.SFT_REPO): {SFT_NAME: '{"instruction": "你好", "output": "你好！"}\n'.encode() * 100},
}
CORPUS = random.Random(0).randbytes(300_000)
CORPUS_PATH = f"/api/v1/datasets/{download.CORPUS_DATASET}/repo"
CORPUS_QUERY = f"Revision=master&FilePath={paths.CORPUS_ARCHIVE.name}"
API = re.compile(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?")
RESOLVE = re.compile(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class Handler(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.serve(body=False)

    def do_GET(self) -> None:
        self.serve(body=True)

    def log_message(self, *args) -> None:
        pass

    def serve(self, body: bool) -> None:
        self.server.seen.append((self.command, self.path, self.headers))
        path, _, query = self.path.partition("?")
        if path == CORPUS_PATH and query == CORPUS_QUERY:
            return self.send(CORPUS, body, ranges=not self.server.ignore_range, cut=self.server.cut_after)
        if path == "/api/agent-harnesses":
            return self.send(b'{"standardEnvVars": [], "harnesses": {}}', body, {"Content-Type": "application/json"})
        if (m := API.fullmatch(path)) and (files := REPOS.get(m.group(1, 2))):
            _, repo, endpoint, _ = m.groups()
            if endpoint != "tree":
                info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": name} for name in files]}
            else:  # tree, as listed by list_repo_tree: git blob id, plus LFS metadata for big files
                info = [{"type": "file", "path": name, "size": len(data), "oid": git_oid(data)} | lfs(name, data)
                        for name, data in files.items()]
            return self.send(json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        if (m := RESOLVE.fullmatch(path)) and (files := REPOS.get(("datasets" if m[1] else "models", m[2]))):
            name = m[4]
            if m[3] == SHA and name in files:
                data = files[name]
                etag = sha256(data) if is_lfs(name) else git_oid(data)
                return self.send(data, body, {"X-Repo-Commit": SHA, "ETag": f'"{etag}"'})
        self.send(b"not found", body, status=404)

    def send(self, data: bytes, body: bool, headers: dict | None = None, status: int = 200, ranges: bool = False,
             cut: int | None = None) -> None:
        start = int(m[1]) if ranges and (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.send_response(206 if start else status)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            self.wfile.write(data[start:cut])  # cut: hang up early, as a dropped connection would


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(".safetensors")


def lfs(name: str, data: bytes) -> dict:
    return {"lfs": {"oid": sha256(data), "size": len(data), "pointerSize": 134}} if is_lfs(name) else {}


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.seen, srv.ignore_range, srv.cut_after = [], False, None  # seen: (method, path, headers)
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent_url():
    """A server that accepts connections (the kernel does it) but never answers, like a stalled proxy or firewall."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "data"), *args],
                          env={**os.environ, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def served_corpus(srv) -> str:
    return f"{srv.url}{CORPUS_PATH}?{CORPUS_QUERY}"


def resolved(srv) -> list[str]:
    """Files whose metadata or content was requested."""
    return [path.rsplit("/", 1)[1] for _, path, _ in srv.seen if "/resolve/" in path]
