"""The Makefile as a user meets it: what `make run` runs, and what its set-up says when it cannot go on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_run_passes_ARGS_on_to_cnnlab_run():
    shown = subprocess.run(["make", "-n", "run", "ARGS=--threads 1 --epochs 2"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert ".venv/bin/cnnlab run configs/lenet.yaml --threads 1 --epochs 2" in shown.stdout.splitlines()


def fake_bin(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + script)
    (folder / name).chmod(0o755)


def test_a_held_apt_lock_is_waited_for_and_a_failure_says_what_to_run_by_hand(tmp_path):
    """A fresh machine's first `make run` met another apt process holding the lock: apt-get failed at once
    ('E: Could not get lock', make Error 100) and nothing said what to do."""
    bin_, log = tmp_path / "bin", tmp_path / "apt.log"
    fake_bin(bin_, "id", 'echo 0\n')  # as root, so that the set-up installs the data set itself
    fake_bin(bin_, "apt-get", f'echo "$@" >> {log}\ncase " $* " in *" install "*)\n'
                              '  echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt)" >&2\n'
                              '  exit 100;;\nesac\n')
    fake_bin(bin_, "cnnlab", 'echo "error: Fashion-MNIST not found" >&2\nexit 2\n')  # the data is missing
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "CNNLAB": str(bin_ / "cnnlab"),
           "APT_LOCK_WAIT": "7"}
    done = subprocess.run([str(ROOT / "scripts" / "ensure-data.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert any(" install " in f" {call} " and "DPkg::Lock::Timeout=7" in call for call in calls), calls
    hint = [line for line in done.stderr.splitlines() if line.startswith("cnnlab:")]
    assert len(hint) == 1 and "sudo apt-get install dataset-fashion-mnist" in hint[0], done.stderr
    assert "Traceback" not in done.stderr


def test_the_set_up_says_the_pytorch_download_takes_minutes_before_it_starts():
    shown = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    torch = next(i for i, line in enumerate(lines) if "pip install" in line and "torch==" in line)
    assert any("minutes" in line and line.lstrip().startswith(("echo", "@echo")) for line in lines[:torch]), lines
