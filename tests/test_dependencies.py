"""pyproject.toml declares what cnnlab imports: a package imported by src/cnnlab but installed here only
because something else pulled it in would be missing from a clean install of cnnlab alone."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the rule holds on 3.10 all the same

ROOT = Path(__file__).resolve().parent.parent

# Imported without being named in pyproject, and why that is sound.
COVERED_BY = {
    "pydantic_core": "pydantic",  # pydantic v2 depends on the one matching pydantic_core; its errors are pydantic's API
    # timm's pretrained weights live in the Hugging Face cache, which timm reaches through huggingface_hub (its
    # dependency); cnnlab reads that cache only for timm's named weights (models/weights.py)
    "huggingface_hub": "timm",
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src" / "cnnlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"cnnlab"}


def project_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def distribution_names(requirements: list[str]) -> set[str]:
    return {normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group()) for requirement in requirements}


def declared_distributions() -> set[str]:
    project = project_table()
    extras = [requirement for extra in project.get("optional-dependencies", {}).values() for requirement in extra]
    return distribution_names(project["dependencies"] + extras)


def test_every_third_party_import_is_a_declared_dependency():
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for module in sorted(imported_top_level_modules()):
        if module in COVERED_BY:
            assert normalise(COVERED_BY[module]) in declared
            continue
        if not {normalise(dist) for dist in providers.get(module, [module])} & declared:
            undeclared.append(module)
    assert undeclared == [], f"imported by src/cnnlab but not in pyproject.toml's dependencies: {undeclared}"


def test_numpy_is_a_core_dependency_not_an_extra():
    # The data layer (cache.py, npz.py, cifar.py, folder.py, pictures.py) and inference.py need it on every
    # install, not only with an extra.
    assert "numpy" in distribution_names(project_table()["dependencies"])
