"""download_dataset.py / seqlm.data.download against a local stand-in for the Hugging Face hub and ModelScope
(tests/hub.py)."""
import hashlib
import time

import pytest
from hub import (  # noqa: F401 (server, silent_url: fixtures)
    CORPUS,
    CORPUS_PATH,
    CORPUS_QUERY,
    MODEL,
    REPOS,
    SFT_NAME,
    SHA,
    TOKEN,
    cli,
    closed_url,
    resolved,
    served_corpus,
    server,
    silent_url,
)

from seqlm import paths
from seqlm.data import download


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    # Isolate the hub cache and token, and keep any proxy settings away from 127.0.0.1.
    for key in ["HF_HUB_OFFLINE", "HF_ENDPOINT", "MODELSCOPE_DOMAIN", "HF_HUB_ETAG_TIMEOUT"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face hub


def test_model_without_weights_then_nothing_again(server, tmp_path):
    out = cli(tmp_path, "--model", HF_ENDPOINT=server.url)
    assert out.returncode == 0, out.stderr
    model_dir = tmp_path / "data" / paths.MODEL_DIR.name
    for name in download.MODEL_FILES:
        assert (model_dir / name).read_bytes() == MODEL[name]
    assert not (model_dir / "model.safetensors").exists() and "model.safetensors" not in resolved(server)
    assert "README.md" not in resolved(server)
    assert any(h.get("Authorization") == f"Bearer {TOKEN}" for _, _, h in server.seen)  # HF_TOKEN is used...
    assert TOKEN not in out.stdout + out.stderr  # ...and never printed

    server.seen.clear()
    again = cli(tmp_path, "--model", HF_ENDPOINT=server.url)
    assert again.returncode == 0, again.stderr
    # Only the repo info call: no file listing, no metadata (HEAD) or content (GET) request for any file.
    assert [path for _, path, _ in server.seen] == [f"/api/models/{download.MODEL_REPO}"]


def test_with_weights_fetches_only_the_weights_on_top(server, tmp_path):
    assert cli(tmp_path, "--model", HF_ENDPOINT=server.url).returncode == 0
    server.seen.clear()
    out = cli(tmp_path, "--model", "--with-weights", HF_ENDPOINT=server.url)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / paths.MODEL_DIR.name / "model.safetensors").read_bytes() == MODEL["model.safetensors"]
    assert set(resolved(server)) == {"model.safetensors"}


def test_sft(server, tmp_path):
    out = cli(tmp_path, "--sft", HF_ENDPOINT=server.url)
    assert out.returncode == 0, out.stderr
    sft_file = tmp_path / "data" / paths.SFT_FILE.relative_to(paths.DATA_DIR)
    assert sft_file.read_bytes() == REPOS["datasets", download.SFT_REPO][SFT_NAME]
    assert f"/datasets/{download.SFT_REPO}/resolve/{SHA}/{SFT_NAME}" in [path for _, path, _ in server.seen]


@pytest.mark.parametrize("offline", ["closed port", "HF_HUB_OFFLINE=1", "silent server"])
def test_model_unreachable_is_one_line_and_quick(tmp_path, silent_url, offline):
    env = {"HF_ENDPOINT": silent_url if offline == "silent server" else closed_url(), "HF_HUB_ETAG_TIMEOUT": "2"}
    if offline == "HF_HUB_OFFLINE=1":
        env["HF_HUB_OFFLINE"] = "1"
    start = time.monotonic()
    out = cli(tmp_path, "--model", **env)
    assert out.returncode == 1
    assert time.monotonic() - start < 60  # seconds (≈ 3 when idle), not minutes of retries; loose for busy machines
    [line] = out.stderr.splitlines()
    reason = {"closed port": "ConnectError", "HF_HUB_OFFLINE=1": "OfflineModeIsEnabled", "silent server": "ReadTimeout"}
    assert line.startswith(f"error: cannot download {download.MODEL_REPO} from the Hugging Face hub")
    assert f"({reason[offline]})" in line and "HF_ENDPOINT" in line
    assert ", ".join(download.MODEL_FILES) in line and str(tmp_path / "data" / paths.MODEL_DIR.name) in line
    assert TOKEN not in out.stdout + out.stderr


@pytest.mark.parametrize("mirror", [True, False])
def test_an_unreachable_hub_is_named_and_a_mirror_set_is_not_advised_again(tmp_path, mirror):
    """With HF_ENDPOINT at a mirror, the mirror is what failed: the line says so instead of advising to set one."""
    env = {"HF_ENDPOINT": closed_url()} if mirror else {"HF_HUB_OFFLINE": "1"}  # offline: never reaches the real hub
    out = cli(tmp_path, "--model", **env)
    [line] = out.stderr.splitlines()
    hub = f"{env['HF_ENDPOINT']} (HF_ENDPOINT)" if mirror else "https://huggingface.co"
    advice = "Check that mirror, or set HF_ENDPOINT to another" if mirror else \
        "Set HF_ENDPOINT to a mirror (e.g. https://hf-mirror.com)"
    assert line.startswith(f"error: cannot download {download.MODEL_REPO} from the Hugging Face hub at {hub} (")
    assert f"). {advice}, or place config.json, " in line


def test_model_already_there_is_fine_offline(server, tmp_path):
    assert cli(tmp_path, "--model", HF_ENDPOINT=server.url).returncode == 0
    out = cli(tmp_path, "--model", HF_ENDPOINT=closed_url())
    assert out.returncode == 0, out.stderr
    assert "keeping the files already in" in out.stdout


def test_default_is_model_and_corpus_each_failure_on_its_own_line(tmp_path):
    out = cli(tmp_path, HF_ENDPOINT=closed_url(), MODELSCOPE_DOMAIN=closed_url())
    assert out.returncode == 1
    model_line, corpus_line = out.stderr.splitlines()
    assert download.MODEL_REPO in model_line
    assert CORPUS_PATH in corpus_line and "(ConnectionError)" in corpus_line
    assert paths.CORPUS_ARCHIVE.name in corpus_line


# ---------------------------------------------------------------------------------------------------------------------
# ModelScope corpus


def test_corpus_url():
    assert download.corpus_url() == f"https://www.modelscope.cn{CORPUS_PATH}?{CORPUS_QUERY}"


def test_corpus_full_download_then_skip(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELSCOPE_DOMAIN", server.url)
    dest = tmp_path / paths.CORPUS_ARCHIVE.name
    download.fetch_corpus(dest, md5=hashlib.md5(CORPUS).hexdigest())
    assert dest.read_bytes() == CORPUS and not list(tmp_path.glob("*.partial"))
    assert "Range" not in server.seen[0][2]

    server.seen.clear()
    download.fetch_corpus(dest, md5=hashlib.md5(CORPUS).hexdigest())
    assert server.seen == [] and "already there" in capsys.readouterr().out


@pytest.mark.parametrize("have, ignore_range", [(100_000, False), (1000, True), (len(CORPUS), False)],
                         ids=["206 rest of the file", "200 server ignores Range", "416 partial already complete"])
def test_corpus_resumes_partial(server, tmp_path, have, ignore_range):
    server.ignore_range = ignore_range
    dest = tmp_path / paths.CORPUS_ARCHIVE.name
    # With a server that ignores Range the partial's bytes must be thrown away, so make them wrong.
    dest.with_name(dest.name + ".partial").write_bytes(b"x" * have if ignore_range else CORPUS[:have])
    download.fetch_corpus(dest, url=served_corpus(server), md5=hashlib.md5(CORPUS).hexdigest())
    assert dest.read_bytes() == CORPUS
    assert [h.get("Range") for _, _, h in server.seen] == [f"bytes={have}-"]


def test_corpus_interrupted_then_resumed(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "CHUNK", 10_000)  # several chunks arrive before the hang-up (the one cut is lost)
    dest = tmp_path / paths.CORPUS_ARCHIVE.name
    url, md5 = served_corpus(server), hashlib.md5(CORPUS).hexdigest()
    server.cut_after = 120_000
    with pytest.raises(download.DownloadError, match="keeps what arrived, rerun to resume"):
        download.fetch_corpus(dest, url=url, md5=md5)
    kept = dest.with_name(dest.name + ".partial").read_bytes()
    assert 100_000 <= len(kept) <= 120_000 and CORPUS.startswith(kept) and not dest.exists()
    server.cut_after = None
    download.fetch_corpus(dest, url=url, md5=md5)
    assert dest.read_bytes() == CORPUS
    assert server.seen[-1][2].get("Range") == f"bytes={len(kept)}-"


def test_corpus_md5_mismatch_keeps_nothing_mislabelled(server, tmp_path):
    dest = tmp_path / paths.CORPUS_ARCHIVE.name
    with pytest.raises(download.DownloadError, match=r"MD5 .* expected 0{32}; moved it to .*\.bad"):
        download.fetch_corpus(dest, url=served_corpus(server), md5="0" * 32)
    assert not dest.exists() and not dest.with_name(dest.name + ".partial").exists()
    assert dest.with_name(dest.name + ".bad").read_bytes() == CORPUS


def test_corpus_unreachable_is_quick(silent_url, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT", 0.5)
    with pytest.raises(download.DownloadError, match=r"cannot download the corpus from .* \(ReadTimeout\)"):
        download.fetch_corpus(tmp_path / paths.CORPUS_ARCHIVE.name, url=silent_url + "/archive?Signature=secret")
    with pytest.raises(download.DownloadError) as e:
        download.fetch_corpus(tmp_path / paths.CORPUS_ARCHIVE.name, url=closed_url() + "/archive?Signature=secret")
    assert "Signature" not in str(e.value)  # signed query strings stay out of messages


def test_corpus_cli_no_verify(server, tmp_path):
    out = cli(tmp_path, "--corpus", "--no-verify", MODELSCOPE_DOMAIN=server.url)  # our bytes don't match the real MD5
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / paths.CORPUS_ARCHIVE.name).read_bytes() == CORPUS
