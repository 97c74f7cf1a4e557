"""`cnnlab sweep` and `cnnlab compare` on tiny generated data (each trial is a real subprocess)."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.sweep import expand

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()


@pytest.fixture
def sweep_overrides(tiny_data):
    sets = [f"data.root={tiny_data}", "data.check_counts=false", "data.val_size=100", "train.epochs=2",
            "train.batch_size=64", "train.device=cpu", "optim.lr=0.05", "model.activation=relu"]
    return [arg for s in sets for arg in ("--set", s)]


def write_folder(folder: Path, broken: bool = True) -> Path:
    folder.mkdir()
    base = CONFIGS / "lenet.yaml"
    (folder / "_base.yaml").write_text(f"extends: {base}\n")  # skipped: files starting with _ are bases
    (folder / "small.yaml").write_text("extends: _base.yaml\nmodel: {channels: [4, 8]}\n")
    (folder / "wide.yaml").write_text("extends: _base.yaml\nmodel: {channels: [8, 16]}\n")
    if broken:
        (folder / "broken.yaml").write_text("extends: _base.yaml\ntrain: {epocs: 3}\n")
    return folder


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_folder_sweep_survives_a_broken_trial_and_skips_finished_ones(tmp_path, sweep_overrides):
    folder = write_folder(tmp_path / "family")
    results = tmp_path / "results"
    first = runner.invoke(app, ["sweep", str(folder), "--results", str(results), "--jobs", "2", *sweep_overrides])
    assert first.exit_code == 1, first.output  # one trial failed
    [sweep_dir] = (results / "sweeps" / "family").glob("2*")
    assert {p.name for p in sweep_dir.iterdir()} >= {"summary.csv", "summary.md", "curves.png", "bars.png", "trials.json"}
    rows = {r["name"]: r for r in read_csv(sweep_dir / "summary.csv")}
    assert set(rows) == {"broken", "small", "wide"}
    assert rows["broken"]["status"] == "failed" and "train.epocs" in rows["broken"]["error"]
    for name in ("small", "wide"):
        assert rows[name]["status"] == "completed"
        assert float(rows[name]["test_acc"]) > 0.5  # the tiny data set is easy
        assert not Path(rows[name]["run_dir"]).is_absolute()  # the sweep folder can move with its runs
        assert (sweep_dir / rows[name]["run_dir"] / "summary.json").is_file()
    assert int(rows["wide"]["params"]) > int(rows["small"]["params"])
    table = (sweep_dir / "summary.md").read_text()
    assert "| small | n=1 (seed 0) |" in table and "1 failed of 1" in table
    for png in ("curves.png", "bars.png"):
        with Image.open(sweep_dir / png) as image:
            assert image.format == "PNG" and image.width >= 400

    (folder / "broken.yaml").unlink()
    second = runner.invoke(app, ["sweep", str(folder), "--results", str(results), *sweep_overrides])
    assert second.exit_code == 0, second.output
    assert "2 trials (2 done before" in second.output
    newest = sorted((results / "sweeps" / "family").glob("2*"))[-1]
    assert {r["status"] for r in read_csv(newest / "summary.csv")} == {"skipped"}
    assert len(list((results / "sweeps" / "family" / "runs" / "small").iterdir())) == 1

    forced = runner.invoke(app, ["sweep", str(folder), "--results", str(results), "--force", *sweep_overrides])
    assert forced.exit_code == 0, forced.output
    assert len(list((results / "sweeps" / "family" / "runs" / "small").iterdir())) == 2

    compared = runner.invoke(app, ["compare", str(results / "sweeps" / "family")])
    assert compared.exit_code == 0 and "small" in compared.output and "wide" in compared.output


def test_grid_sweep_with_seeds_reports_mean_and_std(tmp_path, sweep_overrides):
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(f"base: {CONFIGS / 'lenet.yaml'}\ngrid: {{model.kernel_size: [3, 5]}}\nseeds: [0, 1]\n")
    result = runner.invoke(app, ["sweep", str(sweep_file), "--results", str(tmp_path / "r"), "--jobs", "2",
                                 *sweep_overrides])
    assert result.exit_code == 0, result.output
    [sweep_dir] = (tmp_path / "r" / "sweeps" / "grid").glob("2*")
    rows = read_csv(sweep_dir / "summary.csv")
    assert sorted((r["model.kernel_size"], r["seed"]) for r in rows) == [("3", "0"), ("3", "1"), ("5", "0"), ("5", "1")]
    table = (sweep_dir / "summary.md").read_text()
    assert "| kernel_size=3 | n=2 (seeds 0,1) |" in table and " ± " in table
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert {t["status"] for t in trials} == {"completed"}


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x.yaml\ngrid: {optim.lr: 0.1}\n")
    result = runner.invoke(app, ["sweep", str(bad)])
    assert result.exit_code == 2 and "grid must map config keys to non-empty lists" in result.output
    bad.write_text("grdi: {optim.lr: [0.1]}\n")
    result = runner.invoke(app, ["sweep", str(bad)])
    assert result.exit_code == 2 and "unknown sweep key(s) grdi" in result.output
    assert runner.invoke(app, ["sweep", str(tmp_path / "missing")]).exit_code == 2


def test_the_report_folder_expands_to_every_experiment():
    name, trials = expand(CONFIGS / "seed", [])
    assert name == "seed" and all(t.config is not None for t in trials)
    names = [t.name for t in trials]
    assert names == sorted(names) and len(names) == 12 and "_report" not in names
    by_name = {t.name: t.config for t in trials}
    assert by_name["s5_1_lenet"].data.val_size == 0 and not by_name["s5_1_lenet"].data.normalize
    assert by_name["s6_4_resnet"].train.epochs == 50 and by_name["s6_4_resnet"].model.name == "resnet"


def test_the_shipped_grid_sweep_expands():
    name, trials = expand(CONFIGS / "sweeps" / "kernels_lr.yaml", [])
    assert name == "kernels_lr" and len(trials) == 18 and all(t.config is not None for t in trials)
    assert {t.name for t in trials} == {f"kernel_size={k}-lr={lr}" for k in (3, 5, 7) for lr in (0.05, 0.1)}
    assert all(t.config.model.kwargs["activation"] == "relu" for t in trials)


def test_a_sweep_stopped_by_sigterm_records_what_ran_and_resumes_the_stopped_trial(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import HANG_SECONDS, wait_for, write_dataset

    data = write_dataset(tmp_path / "data", n_train=3000, n_test=200)
    family = tmp_path / "family"
    family.mkdir()
    for name, lr in (("a", 0.05), ("b", 0.03)):
        (family / f"{name}.yaml").write_text(
            f"data: {{root: {data}, check_counts: false, val_size: 200}}\nmodel: {{activation: relu}}\n"
            f"optim: {{lr: {lr}, momentum: 0.9}}\ntrain: {{epochs: 5, batch_size: 32, device: cpu, threads: 1}}\n")
    command = [sys.executable, "-m", "cnnlab", "sweep", str(family), "--results", str(tmp_path / "results"), "--quiet"]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "results" / "sweeps" / "family" / "runs"
    wait_for(lambda: any(len(m.read_text().splitlines()) > 1 for m in runs.glob("b/*/metrics.csv")),
             "trial b finishing its first epoch", sweep)
    sweep.send_signal(signal.SIGTERM)
    output = sweep.communicate(timeout=HANG_SECONDS)[0]
    assert sweep.returncode == 143, output
    [stopped_dir] = (tmp_path / "results" / "sweeps" / "family").glob("2*")
    trials = {t["name"]: t for t in json.loads((stopped_dir / "trials.json").read_text())}
    assert trials["a"]["status"] == "completed" and trials["b"]["status"] == "interrupted"
    assert {r["name"]: r["status"] for r in read_csv(stopped_dir / "summary.csv")} == {"a": "completed", "b": "interrupted"}
    [b_run] = runs.glob("b/*")
    assert json.loads((b_run / "summary.json").read_text())["status"] == "interrupted"

    # a folder of its own, same second or not
    again = subprocess.run(command, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 done before" in again.stdout and "resume b seed 0" in again.stdout
    assert list(runs.glob("b/*")) == [b_run]  # continued in its own folder, not started over
    finished = json.loads((b_run / "summary.json").read_text())
    assert finished["status"] == "completed" and finished["epochs_completed"] == 5
    assert finished["resumes"][0]["from_status"] == "interrupted"
    assert len(read_csv(b_run / "metrics.csv")) == 5
    assert os.environ.get("CNNLAB_PARENT_PID") is None


def test_a_results_path_with_an_arrow_in_it(tmp_path, sweep_overrides):
    """The sweep learns each trial's folder from a file the trial writes, not by parsing its output."""
    results = tmp_path / "x -> y"
    result = runner.invoke(app, ["sweep", str(CONFIGS / "kernels"), "--results", str(results), *sweep_overrides,
                                 "--set", "train.epochs=1", "--quiet"])
    assert result.exit_code == 0, result.output
    [sweep_dir] = (results / "sweeps" / "kernels").glob("2*")
    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 3 and all(float(r["test_acc"]) > 0 for r in rows)
    assert all((sweep_dir / r["run_dir"] / "summary.json").is_file() for r in rows)


def test_a_multirun_sweeps_the_grid_of_comma_lists_over_one_config_quoting_and_lists_included():
    name, trials = expand(CONFIGS / "lenet_relu.yaml", ["optim.lr=0.05,0.1", "model.channels=[4, 8],[6, 16]",
                                                        "train.epochs=3", "name=not the trial's"], seeds=[0, 1])
    assert name == "lenet_relu" and len(trials) == 8 and all(t.config is not None for t in trials)
    assert [(t.name, t.seed) for t in trials[:2]] == [("lr=0.05-channels=4x8", 0), ("lr=0.05-channels=4x8", 1)]
    assert {(t.config.optim.lr, t.config.model.kwargs["channels"]) for t in trials} == \
        {(lr, ch) for lr in (0.05, 0.1) for ch in ((4, 8), (6, 16))}
    assert all(t.config.train.epochs == 3 and t.config.model.kwargs["activation"] == "relu" for t in trials)
    # A quoted comma is one value; a folder's configs are each crossed with the grid; a sweep file's grid grows.
    _, [one] = expand(CONFIGS / "lenet_relu.yaml", ["output.dir='results,old'"])
    assert str(one.config.output.dir) == "results,old" and one.swept == {}
    _, family = expand(CONFIGS / "kernels", ["optim.lr=0.05,0.1"])
    assert [t.name for t in family] == [f"lenet_k{k}-lr={lr}" for k in (3, 5, 7) for lr in (0.05, 0.1)]
    _, grown = expand(CONFIGS / "sweeps" / "kernels_lr.yaml", ["train.epochs=1,2"])
    assert len(grown) == 36 and grown[0].swept == {"model.kernel_size": 3, "optim.lr": 0.05, "train.epochs": 1}


def test_a_multirun_of_one_config_runs_skips_what_is_done_and_refuses_a_bad_config(tmp_path, sweep_overrides):
    config, results = tmp_path / "small.yaml", tmp_path / "results"
    config.write_text(f"extends: {CONFIGS / 'lenet.yaml'}\nmodel: {{channels: [4, 8]}}\n")
    args = ["sweep", str(config), "--results", str(results), *sweep_overrides, "--set", "train.epochs=1,2", "--seeds", "0,1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    [sweep_dir] = (results / "sweeps" / "small").glob("2*")
    rows = read_csv(sweep_dir / "summary.csv")
    assert sorted((r["name"], r["seed"], r["status"]) for r in rows) == \
        [(f"epochs={e}", str(s), "completed") for e in (1, 2) for s in (0, 1)]
    again = runner.invoke(app, args)  # the same multirun again: every trial was done
    assert again.exit_code == 0 and "4 trials (4 done before" in " ".join(again.output.split()), again.output
    # A trial whose process was killed (its summary still says running, no process holds it) is continued, not redone.
    killed = (sweep_dir / next(r["run_dir"] for r in rows if r["name"] == "epochs=2" and r["seed"] == "1")).resolve()
    summary = json.loads((killed / "summary.json").read_text())
    (killed / "summary.json").write_text(json.dumps({**summary, "status": "running", "pid": 2**31 - 1}))
    third = runner.invoke(app, args)
    said = " ".join(third.output.split())
    assert third.exit_code == 0 and "4 trials (3 done before" in said and f"resume epochs=2 seed 1 in {killed}" in said, said
    assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
    config.write_text("model: {name: lenet, kernal_size: 3}\n")
    bad = runner.invoke(app, ["sweep", str(config), "--set", "optim.lr=0.1,0.2", "--results", str(tmp_path / "other")])
    assert bad.exit_code == 2 and "model.kernal_size" in bad.output and not (tmp_path / "other").exists()
    empty = runner.invoke(app, ["sweep", str(CONFIGS / "lenet.yaml"), "--set", "optim.lr=0.1,"])
    assert empty.exit_code == 2 and "an empty value between commas" in empty.output


def test_run_given_a_comma_list_points_to_the_multirun():
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet_relu.yaml"), "--set", "optim.lr=0.05,0.1"])
    assert result.exit_code == 2
    assert f"sweep them: cnnlab sweep {CONFIGS / 'lenet_relu.yaml'} --set optim.lr=0.05,0.1" in " ".join(result.output.split())
