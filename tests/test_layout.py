"""The package's folders are the pipeline's stages, and imports run one way between them (seqlm/__init__.py)."""
import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "seqlm"
STAGES = ("data", "evaluation", "training", "serving")
# What each stage may import besides the shared modules (seqlm/*.py) and itself.
ALLOWED = {"data": set(), "evaluation": {"data"}, "training": {"data", "evaluation"}, "serving": {"data"},
           "shared": set()}


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else "shared"


def seqlm_imports(path: Path) -> set[str]:
    """Every seqlm module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "seqlm":
            found |= {f"{node.module}.{a.name}" if node.module in ("seqlm", *(f"seqlm.{s}" for s in STAGES))
                      else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "seqlm"}
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: use absolute seqlm imports"
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO)) for p in MODULES])
def test_imports_run_one_way(path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    stage = stage_of(module)
    for imported in seqlm_imports(path):
        other = stage_of(imported)
        assert other in (stage, "shared", *ALLOWED[stage]), f"{module} ({stage}) imports {imported} ({other})"


def test_a_flat_package_stays_small():
    """Each folder holds few enough modules to read its list at a glance."""
    for folder in (PACKAGE, *(PACKAGE / s for s in STAGES)):
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 15, f"{folder}: {len(modules)} modules"


def test_tests_follow_the_package():
    """A stage's tests are in tests/<stage>/."""
    for stage in STAGES:
        assert (PACKAGE / stage).is_dir() and list((REPO / "tests" / stage).glob("test_*.py")), stage
