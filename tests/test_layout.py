"""The folder tree is the pipeline: every import inside ``catreview`` points to an earlier stage.

Stages, in order (README "How it fits together"): the foundation modules, then ``data``,
``models``, ``predict``, ``query``, ``export``, ``adapters``, ``evaluate``, ``compare``, ``app``,
``cli``. ``training`` is the recipe layer on top: nothing in ``catreview`` imports it.
Imports under ``if TYPE_CHECKING:`` and inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

FOUNDATION = ["errors", "files", "config", "jobs", "metrics"]
STAGES = ["data", "models", "predict", "query", "export", "adapters", "heads", "evaluate", "compare", "app", "cli"]
RANK = {name: i for i, name in enumerate([*FOUNDATION, *STAGES])}
PACKAGE = REPO_ROOT / "catreview"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _stage(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0].removesuffix(".py")


def test_every_import_points_to_an_earlier_stage() -> None:
    modules = [p for p in PACKAGE.rglob("*.py") if _stage(p) in RANK]
    assert len(modules) > 50  # the whole package is checked, not an empty glob
    backwards = []
    for path in modules:
        here = _stage(path)
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "catreview" or len(parts) < 2 or parts[1] not in RANK or parts[1] == here:
                continue
            if RANK[parts[1]] > RANK[here]:
                backwards.append(f"{path.relative_to(REPO_ROOT)} ({here}) imports {name}")
    assert backwards == []


def test_nothing_in_catreview_imports_training() -> None:
    users = [
        str(p.relative_to(REPO_ROOT))
        for p in PACKAGE.rglob("*.py")
        if any(name == "training" or name.startswith("training.") for name in _imports(p))
    ]
    assert users == []


def test_every_subpackage_is_a_stage() -> None:
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(STAGES)
