"""`cnnlab tune`: Ray Tune with Optuna's TPE and ASHA on tiny data, in an embedded Ray instance."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'cnnlab[ray]')")

from conftest import HANG_SECONDS, wait_for, write_dataset

from cnnlab.cli import app
from cnnlab.results import read_summary

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()


def space_file(tmp_path: Path, data: Path, trials: int = 4, epochs: int = 3) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        f"base: {CONFIGS / 'lenet_relu.yaml'}\nmetric: val_acc\ntrials: {trials}\nseed: 0\n"
        "space:\n"
        "  optim.lr: {loguniform: [0.0005, 0.3]}\n"  # the low end learns nothing in 3 epochs: ASHA stops it
        "  model.channels: {choice: [[4, 8], [6, 16]]}\n"
        "  model.dropout: {uniform: [0.0, 0.3]}\n"
    )
    # One thread a trial: on a loaded machine a trial given both cores' threads is ten times slower (they
    # wait for each other). A trial's default, the CPUs Ray gives it, is taken in the relative-paths test.
    (tmp_path / "sets").write_text("\n".join([
        f"data.root={data}", "data.check_counts=false", "data.val_size=200", f"train.epochs={epochs}",
        "train.batch_size=64", "train.device=cpu", "train.threads=1"]))
    return path


def sets(tmp_path: Path) -> list[str]:
    return [arg for line in (tmp_path / "sets").read_text().splitlines() for arg in ("--set", line)]


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv") as handle:
        return list(csv.DictReader(handle))


def test_tune_prunes_poor_trials_and_writes_a_best_yaml_that_run_reproduces(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", n_train=1200, n_test=200)
    space = space_file(tmp_path, data)
    result = runner.invoke(app, ["tune", str(space), "--results", str(tmp_path / "results"), "--jobs", "1",
                                 *sets(tmp_path)])
    assert result.exit_code == 0, result.output
    [folder] = (tmp_path / "results" / "tune" / "space").glob("2*")
    rows = read_rows(folder)
    assert [row["trial"] for row in rows] == ["1", "2", "3", "4"]
    statuses = {row["status"] for row in rows}
    assert "completed" in statuses and "pruned" in statuses and statuses <= {"completed", "pruned"}, rows
    for row in rows:  # every trial is an ordinary run folder, its sampled values in their own columns
        summary = read_summary(folder / row["run_dir"] / "summary.json")
        assert summary.status == row["status"] and float(row["optim.lr"]) > 0 and row["model.channels"] in ("[4, 8]", "[6, 16]")
        if row["status"] == "pruned":
            assert summary.epochs_completed < 3 and "ASHA" in summary.stopped_at
            assert (folder / row["run_dir"] / "curves.png").is_file()
    assert "pruned" in (folder / "summary.md").read_text()
    with Image.open(folder / "progress.png") as image:
        assert image.format == "PNG"

    best = folder / "best.yaml"
    completed = [row for row in rows if row["status"] == "completed"]
    winner = max(completed, key=lambda row: float(row["score"]))
    assert f"trial {winner['trial']}" in best.read_text()
    monkeypatch.chdir(tmp_path)  # best.yaml writes to the base config's output.dir (results/, relative)
    again = runner.invoke(app, ["run", str(best), "--quiet"])
    assert again.exit_code == 0, again.output
    [rerun] = (tmp_path / "results" / winner["name"]).glob("2*")
    reproduced = read_summary(rerun / "summary.json")
    original = read_summary(folder / winner["run_dir"] / "summary.json")
    assert reproduced.best_val_acc == pytest.approx(original.best_val_acc, abs=0.02)
    assert reproduced.params == original.params


def test_sigterm_to_the_process_group_stops_the_tune_in_order_and_resume_continues_it(tmp_path):
    """As `timeout` or a batch system stops a job: SIGTERM to cnnlab's whole process group. Ray's own
    processes live in a session of their own, so cnnlab hears it first and stops its trials in order."""
    data = write_dataset(tmp_path / "data", n_train=3000, n_test=200)
    space = space_file(tmp_path, data, trials=2, epochs=6)
    command = [sys.executable, "-m", "cnnlab", "tune", str(space), "--results", str(tmp_path / "results"), "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*command, "--jobs", "1", *sets(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    runs = tmp_path / "results" / "tune" / "space" / "runs"

    def in_third_epoch() -> bool:
        metrics = list(runs.glob("*/*/metrics.csv"))
        return bool(metrics) and len(metrics[0].read_text().splitlines()) >= 3

    wait_for(in_third_epoch, "the first trial finishing its second epoch", process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 143, output
    assert "continue it with --resume" in output and "Traceback" not in output
    [first] = runs.glob("*/*/summary.json")
    stopped = read_summary(first)
    assert stopped.status == "interrupted" and stopped.error == "interrupted by SIGTERM", stopped
    assert stopped.epochs_completed >= 2
    [folder] = (tmp_path / "results" / "tune" / "space").glob("2*")
    rows = read_rows(folder)  # the tune's files are written for what ran
    assert rows[0]["status"] == "interrupted" and rows[0]["run_dir"], rows
    assert all(row["status"] == "not started" and not row["run_dir"] for row in rows[1:]), rows
    assert (folder / "trials.json").is_file() and not (folder / ".stop").exists()

    refused = subprocess.run([*command, "--resume", "--trials", "5"], capture_output=True, text=True, env=env,
                             timeout=HANG_SECONDS)
    assert refused.returncode == 2 and "leave out --set, --trials, --jobs and the run options" in refused.stderr
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=HANG_SECONDS)  # as started
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = read_rows(folder)  # the same tune folder, continued
    assert len(rows) == 2 and {row["status"] for row in rows} <= {"completed", "pruned"}
    continued = read_summary(first)  # the same run folder, continued from its checkpoint, not from epoch 1
    assert continued.status in ("completed", "pruned") and len(continued.resumes) == 1
    assert continued.resumes[0]["from_status"] == "interrupted"
    assert continued.resumes[0]["from_epoch"] == stopped.epochs_completed
    assert (folder / "best.yaml").is_file() or all(row["status"] == "pruned" for row in rows)


def test_a_tune_started_elsewhere_takes_every_relative_path_as_meant(tmp_path, monkeypatch):
    """Ray Tune runs each trial in a folder of its own: the space file's base (relative to the space
    file), a config's data.root and --results (relative to where the command runs) still mean what
    they say there."""
    work = tmp_path / "project"
    write_dataset(work / "data", n_train=400, n_test=100)
    (work / "configs" / "tune").mkdir(parents=True)
    (work / "configs" / "base.yaml").write_text(
        f"extends: {CONFIGS / 'lenet_relu.yaml'}\ndata: {{root: data, check_counts: false, val_size: 100}}\n"
        "train: {epochs: 1, batch_size: 64, device: cpu}\n")
    (work / "configs" / "tune" / "small.yaml").write_text(
        "base: ../base.yaml\ntrials: 1\nspace:\n  model.channels: {choice: [[4, 8]]}\n")
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["tune", "configs/tune/small.yaml", "--results", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    [folder] = (work / "out" / "tune" / "small").glob("2*")
    [row] = read_rows(folder)
    assert row["status"] == "completed", row
    best = (folder / "best.yaml").read_text()
    assert f"root: {work / 'data'}" in best  # where the trial's data was
    assert "dir: results" in best  # as the base config says: `cnnlab run best.yaml` writes where its runs go


def test_a_trial_without_a_run_folder_is_failed_only_when_it_failed():
    from cnnlab.tune import NotStarted, _without_run

    assert _without_run(None, {"status": "failed", "error": "data folder not found: /x"}) == \
        ("failed", "data folder not found: /x")  # the trial said why
    assert _without_run(None, {})[0] == "not started"  # the tune stopped before Ray Tune ran it
    assert _without_run(NotStarted("trial t did not start: the tune was stopped by SIGTERM"), {}) == \
        ("not started", "trial t did not start: the tune was stopped by SIGTERM")
    assert _without_run(RuntimeError("Traceback...\nRayActorError: the worker died"), {}) == \
        ("failed", "RayActorError: the worker died")


@pytest.mark.parametrize("text,message", [
    ("space: {optim.lr: {loguniform: [0.1, 0.01]}}", "loguniform takes [low, high] with low < high"),
    ("space: {optim.lr: {normal: [0, 1]}}", "unknown distribution 'normal'"),
    ("space: {model.channelz: {choice: [[4, 8]]}}", "space.model.channelz"),
    ("space: {train.batch_size: {int: [0, 8]}}", "space.train.batch_size = 0 does not make a valid config"),
    ("metric: test_acc\nspace: {optim.lr: {uniform: [0.1, 0.2]}}", "metric 'test_acc'"),
    ("metric: val_loss\nmode: max\nspace: {optim.lr: {uniform: [0.1, 0.2]}}", "val_loss is minimised"),
    ("metric: val_acc_ema\nspace: {optim.lr: {uniform: [0.1, 0.2]}}", "metric val_acc_ema is the moving average's"),
    ("trials: 0\nspace: {optim.lr: {uniform: [0.1, 0.2]}}", "trials must be an integer of at least 1"),
    ("grid: {optim.lr: [0.1]}", "unknown key(s) grid"),
    ("space: {}", "space must map config keys to distributions"),
    ("space: {train.epochs: {uniform: [2, 5]}}", "space.train.epochs = 3.5 does not make a valid config"),
    ("space: {name: {choice: [a, b]}}", "cnnlab names each trial and places its run folder itself"),
])
def test_a_bad_search_space_is_one_message_exit_2_and_nothing_written(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(f"base: {CONFIGS / 'lenet_relu.yaml'}\n{text}\n")
    result = runner.invoke(app, ["tune", str(path), "--results", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "results" / "tune").exists()


def test_resume_with_nothing_to_resume_says_so(tmp_path, tiny_data):
    result = runner.invoke(app, ["tune", str(space_file(tmp_path, tiny_data)), "--results", str(tmp_path / "results"),
                                 "--resume"])
    assert result.exit_code == 2 and "nothing to resume" in result.output


def test_without_ray_tune_says_how_to_install_it(tmp_path, tiny_data):
    blocker = tmp_path / "noray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "cnnlab", "tune", str(space_file(tmp_path, tiny_data)), "--results",
                             str(tmp_path / "results")], capture_output=True, text=True, env=env, timeout=HANG_SECONDS)
    assert result.returncode == 2 and "cnnlab tune needs Ray" in result.stderr and "pip install 'cnnlab[ray]'" in result.stderr
    assert not (tmp_path / "results").exists()


def test_the_shipped_example_space_is_valid():
    from cnnlab.tune import read_space

    space = read_space(CONFIGS / "tune" / "lenet_relu.yaml", [], None)
    assert {d.key for d in space.dimensions} == {"optim.lr", "train.batch_size", "model.channels", "model.dropout"}
    assert space.metric == "val_acc" and space.mode == "max" and space.trials == 20


def test_the_live_table_shows_each_trials_values_epoch_accuracy_and_state(tmp_path):
    import io

    from ray import cloudpickle
    from rich.console import Console

    from cnnlab.tune import TrialTable, read_space, trial_lines

    space = read_space(CONFIGS / "tune" / "lenet_relu.yaml", [], 5)
    table = TrialTable(space)
    sampled = {"optim.lr": 0.0123456, "train.batch_size": 2, "model.channels": 1, "model.dropout": 0.25}  # choices by index
    table.update(1, sampled, None, "running")
    table.update(1, sampled, {"epoch": 3, "val_acc": 0.81234, "status": "running"}, "running")
    table.update(2, sampled, {"epoch": 1, "val_acc": 0.5}, "pruned")
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(table.render())
    lines = [" ".join(line.split()) for line in buffer.getvalue().splitlines()]
    assert "tune lenet_relu: 2 of 5 trials started" in lines[0]
    assert lines[1] == "trial optim.lr train.batch_size model.channels model.dropout epoch val acc state"
    assert lines[2] == "1 0.01235 256 [12, 32] 0.25 3 0.8123 running" and lines[3].endswith("1 0.5000 pruned")
    callback = trial_lines(tmp_path / "stop", space)  # Ray Tune pickles its callbacks with the tune's state
    assert cloudpickle.loads(cloudpickle.dumps(callback)).table.space.name == "lenet_relu"


def test_a_trial_reports_the_moving_averages_figures_when_it_has_them():
    from cnnlab.tune import epoch_metrics

    row = {"epoch": 2, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_acc": 0.85, "lr": 0.1}
    assert "val_acc_ema" not in epoch_metrics(row, "r")
    reported = epoch_metrics({**row, "val_loss_ema": 0.3, "val_acc_ema": 0.9}, "r")
    assert reported["val_acc_ema"] == 0.9 and reported["val_loss_ema"] == 0.3 and reported["epoch"] == 2


def test_a_trials_score_is_its_metric_at_the_epoch_its_run_was_tested_at(trained, tmp_path):
    # tune ranks trials by what the runs report: the last epoch's figure where train.select took the last epoch.
    import json
    import shutil
    from types import SimpleNamespace

    from cnnlab.results import read_metrics_csv, write_metrics_csv
    from cnnlab.tune import score

    run_dir, summary = trained
    values = [float(row["val_acc"]) for row in read_metrics_csv(run_dir / "metrics.csv")]
    space = SimpleNamespace(metric="val_acc", mode="max")
    assert summary["selection"]["rule"] == "best" and score({"run_dir": str(run_dir)}, space) == max(values)
    last = shutil.copytree(run_dir, tmp_path / "last")
    recorded = json.loads((last / "summary.json").read_text())
    recorded["selection"]["rule"] = "last"
    (last / "summary.json").write_text(json.dumps(recorded))
    rows = read_metrics_csv(last / "metrics.csv")
    rows[-1]["val_acc"] = min(values) - 0.25  # the last epoch below every other
    write_metrics_csv(last / "metrics.csv", rows)
    assert score({"run_dir": str(last)}, space) == pytest.approx(min(values) - 0.25)
