"""``cnnlab lr-find``: the learning-rate range test writes its curve and a suggestion a run can take."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import wait_for
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.lrfind import SKIP_START, ramp, smooth, suggest

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()


def test_the_ramp_is_exponential_and_the_suggestion_is_where_the_smoothed_loss_falls_fastest():
    lrs = ramp(1e-4, 1.0, 41)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0) and lrs[20] == pytest.approx(1e-2)
    assert len({round(b / a, 9) for a, b in zip(lrs, lrs[1:])}) == 1  # the same factor every step
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull toward 0
    # a loss flat, then falling slowly, fastest at index 30, then diverging
    losses = [2.0] * 20 + [2.0 - 0.01 * i for i in range(1, 10)] + [1.9, 1.7, 1.6, 1.55] + [1.6, 2.5, 9.0, 50.0]
    assert suggest(lrs[:len(losses)], losses) == lrs[30]
    assert suggest(lrs[:30], [1.0 + 0.01 * i for i in range(30)]) is None  # it never falls
    assert suggest(lrs[:SKIP_START + 2], [1.0] * (SKIP_START + 2)) is None  # too few points


def lr_find(tmp_path: Path, tiny_data: Path, *args: str):
    return runner.invoke(app, ["lr-find", str(CONFIGS / "lenet_relu.yaml"), "--data-dir", str(tiny_data), "--results",
                               str(tmp_path / "results"), "--set", "data.check_counts=false", "--set",
                               "data.val_size=100", "--set", "train.batch_size=32", *args])


def test_lr_find_writes_its_curve_and_a_suggestion_that_a_run_takes(tmp_path, tiny_data):
    result = lr_find(tmp_path, tiny_data, "--steps", "40", "--start", "1e-5", "--end", "3")
    assert result.exit_code == 0, result.output
    suggested = re.search(r"suggested optim.lr: (\S+) ", result.output)
    assert suggested, result.output
    (folder,) = (tmp_path / "results" / "lr-find" / "lenet_relu").iterdir()
    rows = list(csv.DictReader((folder / "lr_find.csv").open()))
    assert 0 < len(rows) <= 40 and float(rows[0]["lr"]) == pytest.approx(1e-5)
    lrs = [float(row["lr"]) for row in rows]
    assert lrs == sorted(lrs) and all(math.isfinite(float(row["loss"])) for row in rows)
    assert (folder / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    snippet = yaml.safe_load((folder / "suggestion.yaml").read_text())
    assert snippet["optim"]["lr"] == pytest.approx(float(suggested.group(1)))
    assert 1e-5 <= snippet["optim"]["lr"] <= 3
    cfg = load_config(CONFIGS / "lenet_relu.yaml", [f"optim.lr={snippet['optim']['lr']}"])
    assert cfg.optim.lr == snippet["optim"]["lr"]


def test_a_ramp_into_divergence_stops_early_and_says_where(tmp_path, tiny_data):
    # label smoothing keeps the loss from reaching 0 on data this easy (where no learning rate could make it rise)
    result = lr_find(tmp_path, tiny_data, "--steps", "60", "--start", "1e-3", "--end", "1e8", "--set",
                     "train.label_smoothing=0.1")
    assert result.exit_code == 0, result.output
    assert re.search(r"stopped at lr \S+ after \d+ of 60 batches: the loss rose past 4x its lowest", result.output), \
        result.output


@pytest.mark.parametrize("args, message", [
    (["--steps", "5"], "--steps 5: the range test needs at least 20 batches"),
    (["--start", "1", "--end", "0.1"], "give 0 < start < end"),
    (["--start", "1e-300", "--end", "1e300"], "--start 1e-300 --end 1e+300: end/start is too large for a number to hold"),
    (["--set", "optim.lr=fast"], "optim.lr"),
])
def test_bad_input_is_exit_2_and_writes_nothing(tmp_path, tiny_data, args, message):
    result = lr_find(tmp_path, tiny_data, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()


def test_ctrl_c_stops_the_ramp_at_once_and_writes_nothing(tmp_path, tiny_data):
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cnnlab", "lr-find", str(CONFIGS / "lenet_relu.yaml"), "--data-dir", str(tiny_data),
             "--results", str(tmp_path / "results"), "--steps", "1000000", "--set", "data.check_counts=false",
             "--set", "data.val_size=100"], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: "lr-find lenet_relu:" in log.read_text(), "the ramp's first line", process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()
    assert not (tmp_path / "results" / "lr-find" / "lenet_relu").exists() or \
        not any((tmp_path / "results" / "lr-find" / "lenet_relu").iterdir())
