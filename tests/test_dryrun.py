"""--print-config and --dry-run on run, sweep and tune: what would run, checked and timed, with nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import dump_config, load_config
from cnnlab.dryrun import Estimate, total_text
from cnnlab.numtext import duration_text

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def tiny(tiny_overrides, tmp_path) -> list[str]:
    return [arg for o in [*tiny_overrides, f"output.dir={tmp_path / 'results'}"] for arg in ("--set", o)]


def test_print_config_prints_the_resolved_config_which_reloads_to_the_same(tmp_path, tiny):
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet_relu.yaml"), "--print-config", "--epochs", "7", *tiny])
    assert result.exit_code == 0, result.output
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.output)
    expected = load_config(CONFIGS / "lenet_relu.yaml", [a for a in tiny if a != "--set"], {"train.epochs": 7})
    assert dump_config(load_config(printed)) == dump_config(expected) == result.output
    assert yaml.safe_load(result.output)["train"]["epochs"] == 7
    assert not (tmp_path / "results").exists()


def test_a_dry_run_checks_describes_and_times_a_run_and_writes_nothing(tmp_path, tiny):
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet_relu.yaml"), "--dry-run", *tiny])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "data: Fashion-MNIST, 300 training / 100 validation / 200 test images of 1x28x28, 10 classes" in said
    assert "Linear(84, 10)" in said and "total: 61,706 parameters" in said
    assert "ms a training batch of 32" in said and "for 2 epochs and the test" in said
    assert said.endswith("dry run: nothing written") and not (tmp_path / "results").exists()
    bad = runner.invoke(app, ["run", str(CONFIGS / "lenet_relu.yaml"), "--dry-run", *tiny, "--set", "model.channels=[0, 1]"])
    assert bad.exit_code == 2 and "model.channels" in bad.output


def test_a_sweeps_dry_run_and_printed_configs_cover_every_trial(tmp_path, tiny):
    args = ["sweep", str(CONFIGS / "lenet_relu.yaml"), "--set", "optim.lr=0.05,0.1,-1", "--jobs", "2", *tiny]
    printed = runner.invoke(app, [*args, "--print-config"])
    assert printed.exit_code == 0, printed.output
    documents = [d for d in yaml.safe_load_all(printed.output) if d]
    assert [d["optim"]["lr"] for d in documents] == [0.05, 0.1] and documents[0]["name"] == "lr=0.05"
    assert "# lr=-1 seed 0: invalid: " in printed.output
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 2, dry.output  # the valid trials checked and timed, the invalid one named, then exit 2
    said = " ".join(dry.output.split())
    assert said.count("ms a training batch of 32") == 2 and "2 runs: about" in said and "with 2 at a time" in said
    assert "lr=-1 seed 0: invalid: " in said and said.endswith("1 of 3 trials is invalid (named above); fix it or leave it "
                                                               "out of the sweep")
    assert not (tmp_path / "results").exists()


def test_a_sweeps_dry_run_names_every_trial_its_data_refuses(tmp_path, tiny):
    # data.val_size: 1000 takes every training image: found as the trial is prepared, after the first was timed
    args = ["sweep", str(CONFIGS / "lenet_relu.yaml"), *tiny, "--set", "data.val_size=100,1000,2000", "--dry-run"]
    dry = runner.invoke(app, args)
    assert dry.exit_code == 2, dry.output
    said = " ".join(dry.output.split())
    assert said.count("ms a training batch of 32") == 1
    assert "val_size=1000 seed 0: invalid: data.val_size: 1,000 leaves no training images" in said
    assert "val_size=2000 seed 0: invalid: data.val_size: 2,000 leaves no training images" in said
    assert said.endswith("2 of 3 trials are invalid (named above); fix them or leave them out of the sweep")
    assert not (tmp_path / "results").exists()


def test_a_dry_run_writes_no_decoding_cache(tmp_path, monkeypatch):
    from test_folder import make_folder

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    pictures = make_folder(tmp_path / "pictures", per_class=8, mixed=False)
    args = ["--set", "data.name=folder", "--set", f"data.root={pictures}", "--set", "data.val_size=6", "--set",
            "train.device=cpu", "--set", f"output.dir={tmp_path / 'results'}"]
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--dry-run", *args])
    assert result.exit_code == 0, result.output
    assert " ".join(result.output.split()).endswith("dry run: nothing written")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


def test_a_dry_run_with_mlflow_leaves_no_telemetry_file(tmp_path, tiny):
    """Importing MLflow 3 writes ~/.config/mlflow/telemetry.json (and reports usage) unless told not to; pytest and CI
    tell it, so the command runs in a process of its own with neither."""
    quiet = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
    env = {**{k: v for k, v in os.environ.items() if k not in quiet}, "HOME": str(tmp_path / "home"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-m", "cnnlab", "run", str(CONFIGS / "lenet_relu.yaml"), "--dry-run", *tiny,
                           "--set", "output.loggers=[mlflow]"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "config").exists() and not (tmp_path / "home").exists() and not (tmp_path / "results").exists()


def test_a_tunes_dry_run_times_its_base_config(tmp_path, tiny):
    dry = runner.invoke(app, ["tune", str(CONFIGS / "tune" / "lenet_relu.yaml"), "--dry-run", *tiny])
    assert dry.exit_code == 0, dry.output
    assert "trials of the base config" in dry.output and "ms a training batch of 32" in dry.output
    printed = runner.invoke(app, ["tune", str(CONFIGS / "tune" / "lenet_relu.yaml"), "--print-config", *tiny])
    assert printed.exit_code == 0 and "#   optim.lr: loguniform" in printed.output
    assert yaml.safe_load(printed.output)["train"]["epochs"] == 2 and not (tmp_path / "results").exists()


def test_estimates_add_up_and_read_as_durations():
    one = Estimate(step_seconds=0.1, batch_size=256, steps_per_epoch=200, eval_seconds=5, test_seconds=10, epochs=3,
                   train_step="ordinary")
    assert one.epoch_seconds == pytest.approx(25) and one.total_seconds == pytest.approx(85)
    assert one.images_per_second == pytest.approx(2560)
    assert total_text([one, one], 2) == "about 2.8 min of training in all; with 2 at a time at least 85 s (trials at " \
                                        "once share the machine, each slower)"
    assert [duration_text(s) for s in (4.04, 45, 600, 7200, float("nan"))] == ["4.0 s", "45 s", "10.0 min", "2.0 h", "?"]
