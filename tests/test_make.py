"""The Makefile as a user meets it: what `make run` runs, and what its set-up says when it cannot go on."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_run_passes_ARGS_on_to_cnnlab_run():
    shown = subprocess.run(["make", "-n", "run", "ARGS=--threads 1 --epochs 2"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert ".venv/bin/cnnlab run configs/lenet.yaml --threads 1 --epochs 2" in shown.stdout.splitlines()
