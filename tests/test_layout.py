"""The package shows the workflow: one subpackage per stage, dependencies pointing one way.

Stages (``bids``, ``anat``, ``func``, ``geometry``, ``store``, ``models``,
``evaluation``, ``records``, ``demo``) import ``bh_models.core`` and never each
other: they talk through files. ``core`` imports nothing else of the package;
``cli`` (the user's entry point) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "bh_models"
STAGES = ("bids", "anat", "func", "geometry", "store", "models", "evaluation", "records", "demo")
RULE_FILES = {"bids", "anat", "func", "geometry", "store", "models", "evaluation", "records", "common"}
#: Known sideways imports, each with its reason; the list only shrinks.
ALLOWED_SIDEWAYS: set[tuple[str, str]] = set()


def imported_subpackages(path: Path) -> set[str]:
    """``bh_models`` subpackages a module imports (statically, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "bh_models":
                found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bh_models.")}
    return found - {"__version__"}


def test_every_stage_is_a_documented_subpackage():
    for stage in (*STAGES, "core"):
        init = PACKAGE / stage / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, f"{init}: the docstring must say what it holds and may import"
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    assert flat == [], f"modules outside the stage subpackages: {flat}"


def test_rule_files_are_named_like_the_stages():
    assert {p.stem for p in (REPO / "rules").glob("*.smk")} == RULE_FILES


@pytest.mark.parametrize("stage", (*STAGES, "core"))
def test_dependencies_point_one_way(stage):
    allowed = {stage} if stage == "core" else {stage, "core"}
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        sideways = {sub for sub in imported_subpackages(path) - allowed if (rel, sub) not in ALLOWED_SIDEWAYS}
        assert not sideways, f"{path.relative_to(REPO)} imports bh_models.{sorted(sideways)}; stages talk " \
                             "through files (move shared code to bh_models.core)"
