"""Learning, not only a falling loss: our default recipe, trained at a fixed budget, must reach a held-out bits per
character no worse than it measured (docs/benchmarks.md, "Learning"), within a margin. A change that makes the model
learn worse (packing, masking, the schedule, the initialisation) fails here while every other test still passes."""
import json
import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # one pretraining run of bench/recipe.py's full budget: minutes

DEFAULTS = "defaults (seed 42)"
# bench/recipe.py's full budget, measured 2026-12-07 on the 2-core CPU VM (docs/benchmarks.md, "Learning"): our
# defaults reached 7.686 bits per character with seed 42 and 7.6685 with seed 43. The ceiling is the worse of the two
# plus MARGIN, about three times their spread (0.0175): room for another CPU's rounding and for changes that only move
# the data order, as a seed does. It is no check of the schedule: at this budget the tutorial's constant rate scored
# lower (7.551), so a regression to it would pass.
MARGIN = 0.05
CEILING = 7.686 + MARGIN


def test_the_default_recipe_reaches_its_measured_held_out_bits_per_char(tmp_path):
    command = [sys.executable, "-m", "bench.recipe", "--variants", DEFAULTS, "--out", str(tmp_path / "out"),
               "--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [run] = json.loads((tmp_path / "out" / "results.json").read_text())
    assert run["variant"] == DEFAULTS and run["tokens"] == 100 * 8 * 256  # 100 steps of 8 blocks of 256 tokens
    assert run["bits_per_char"] <= CEILING, f"{run['bits_per_char']:.4f} bits per character, above {CEILING:.3f}"
