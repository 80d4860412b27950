"""The Makefile, run by the real make."""
import os
import subprocess
import sys

from helpers import REPO

# A real Python that reports itself as 3.10 (sitecustomize runs before any -c code).
OLD_PYTHON = '''import sys
from collections import namedtuple
sys.version_info = namedtuple("version_info", "major minor micro releaselevel serial")(3, 10, 12, "final", 0)
'''


def test_an_old_python_stops_make_in_one_line_before_any_venv(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(OLD_PYTHON)
    fake = tmp_path / "python3"
    fake.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    # As a user types it, not as a sub-make of `make test` (which would add "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", f"VENV={venv}", f"PYTHON={fake}", "setup"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    [line] = (result.stdout + result.stderr).strip().splitlines()
    assert f"{fake} is Python 3.10" in line and "make PYTHON=python3.11" in line
    assert not venv.exists()
