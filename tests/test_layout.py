"""The package's shape: every import points down a floor, and no modules import each other in a circle
(scripts/check_imports.py holds the floors)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_imports.py"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_points_down_and_none_goes_round():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "cnnlab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_the_checker_sees_upward_imports_circles_and_modules_on_no_floor(tmp_path):
    checker = load_checker()
    src = write_package(tmp_path, {
        "__init__.py": "",
        "errors.py": "def f():\n    from cnnlab import cli  # inside a function: still an import\n",
        "cli.py": "import cnnlab.errors\n",
        "sweep.py": "from cnnlab.cluster import RayLauncher\n",
        "cluster.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cnnlab.sweep import Trial\n",
        "models/__init__.py": "from cnnlab.models import registry\n",
        "models/registry.py": "from . import build\n",  # relative, a floor up
        "models/build.py": "",
        "newthing.py": "",
    })
    found = checker.problems(src)
    assert any("errors (floor 0) imports cli" in line and "errors.py:2" in line for line in found), found
    assert "import circle: cluster <-> sweep" in found
    assert "import circle: cli <-> errors" in found
    assert any("models.registry (floor 1) imports models.build" in line for line in found), found
    assert any("cnnlab.newthing stands on no floor" in line for line in found), found
    assert len(found) == 5, found
