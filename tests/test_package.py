"""What importing seqlm does to a process: its exit skips the interpreter's last garbage collection."""
import subprocess
import sys

import pytest
from helpers import REPO

# An object in a reference cycle is freed only by a garbage collection; its __del__ says when.
CYCLE = """
class Node:
    def __del__(self):
        print("collected", flush=True)
node = Node()
node.self = node
del node
"""


@pytest.mark.parametrize("imports, collected", [("", True), ("import seqlm", False)])
def test_the_last_garbage_collection_is_skipped(imports, collected):
    """It walks every object torch and DeepSpeed made (1.3 s at the end of a training rank): after seqlm's import,
    what is left at exit is the system's to take back."""
    result = subprocess.run([sys.executable, "-c", f"import gc\ngc.disable()\n{imports}\n{CYCLE}"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("collected" in result.stdout) == collected
