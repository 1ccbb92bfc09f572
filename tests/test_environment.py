"""The environment: every imported package is declared, every declared one is pinned."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return {_name(r) for r in [*project["dependencies"], *extras]}


def imported_distributions() -> dict[tuple[str, ...], set[str]]:
    """Distributions that provide a module -> files importing it, for every third-party
    import in src/ and flows/ (mlflow is provided by mlflow, mlflow-skinny, ...)."""
    owners = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("imagen_ops", "flows"):
                    continue
                dists = tuple(d.lower().replace("_", "-") for d in owners.get(top, [top]))
                found.setdefault(dists, set()).add(path.name)
    return found


def test_every_imported_package_is_declared() -> None:
    known = declared()
    missing = {d: f for d, f in imported_distributions().items() if not known.intersection(d)}
    assert not missing, f"imported but not in pyproject.toml: {missing}"


def test_every_declared_package_is_pinned_in_the_constraints() -> None:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = {_name(line): line for line in lines if line and not line.startswith("#")}
    assert all("==" in line for line in pins.values()), "constraints pin exact versions"
    assert not declared() - set(pins), f"not pinned: {declared() - set(pins)}"
    assert pins["torch"].startswith("torch==2.13.0")


LAYOUT = ["flows/", "src/", "data.dvc", "dvc.yaml", "mlflow/", "tests/", "pyproject.toml"]
"""The top level a fresh clone has (the design's layout)."""


def test_a_fresh_clone_has_the_designed_top_level() -> None:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    tracked = listed.stdout.splitlines()
    missing = [p for p in LAYOUT if not any(f == p or f.startswith(p) for f in tracked)]
    assert not missing, f"not in git, so not in a fresh clone: {missing}"
