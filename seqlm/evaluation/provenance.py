"""Where a number comes from: the exact code (git commit), the library versions and the hardware. The run report
records them for a training run; every benchmark prints them in one line."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from seqlm.paths import REPO

LIBRARIES = ("torch", "transformers", "accelerate", "deepspeed", "tokenizers", "swanlab", "numpy")


def git_commit() -> str | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (e.g. an unpacked release)
        return None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(world_size: int) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return dict(cpu=cpu_name(), cpu_cores=os.cpu_count(), gpus=gpus, processes=world_size,
                platform=platform.platform())


def provenance() -> str:
    """One line for a benchmark's output: the hardware, the date and the exact code."""
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu_name()} ({os.cpu_count()} cores); {datetime.date.today()}; "
            f"commit {git_commit() or 'unknown'}")
