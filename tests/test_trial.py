"""A trial as a function (``run_trial``) and the structured events a launcher follows it by."""

import io
import json
from pathlib import Path

from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.events import EventWriter, read_events
from cnnlab.trial import run_trial

runner = CliRunner()


def test_run_trial_returns_the_result_as_data_and_tells_its_events(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "model.activation=relu", "optim.lr=0.1"])
    heard = []
    result = run_trial(cfg, EventWriter(sink=heard.append))
    assert result.status == "completed" and result.exit_code == 0 and not result.error
    assert result.run_dir is not None and (result.run_dir / "summary.json").is_file()
    assert result.summary.test_acc > 0.5 and result.epochs_done == 2
    assert [row["epoch"] for row in result.metrics] == [1, 2]
    kinds = [event["event"] for event in heard]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert [e["epoch"] for e in heard if e["event"] == "epoch_end"] == [1, 2]
    assert Path(heard[0]["run_dir"]) == result.run_dir.resolve()
    assert heard[-1]["summary"]["test_acc"] == result.summary.test_acc
    # Run again: the trial's exact config completed, and a trial continues unfinished runs only; a
    # completed one is trained again in a new folder (the sweep's skip rule decides before that).
    again = run_trial(cfg)
    assert again.status == "completed" and again.run_dir != result.run_dir


def test_run_trial_does_not_raise_for_bad_input(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, f"data.root={tmp_path / 'nowhere'}"])
    result = run_trial(cfg)
    assert result.status == "failed" and result.exit_code == 2 and result.run_dir is None
    assert "nowhere" in result.error


def test_events_survive_the_pipe_and_junk_is_skipped():
    stream = io.StringIO()
    writer = EventWriter(stream)
    writer.start_run("lenet", Path("results/x"), 3)
    writer.end_epoch({"epoch": 1, "val_acc": float("nan")}, is_best=True)
    writer.error("error", "bad config", 2)
    lines = ["not json\n", json.dumps(["a list"]) + "\n", json.dumps({"event": "rm -rf"}) + "\n",
             "x" * (2 << 20) + "\n", *stream.getvalue().splitlines(keepends=True)]
    events = list(read_events(lines))
    assert [e["event"] for e in events] == ["run_start", "epoch_end", "error"]
    assert Path(events[0]["run_dir"]).is_absolute()
    assert events[1]["row"]["val_acc"] != events[1]["row"]["val_acc"]  # NaN stays NaN
    assert events[2] == {"event": "error", "kind": "error", "message": "bad config", "exit_code": 2}


def test_a_trials_error_reaches_the_sweep_through_its_events(tmp_path, tiny_data):
    folder = tmp_path / "family"
    folder.mkdir()
    common = (f"data: {{root: {tiny_data}, check_counts: false, val_size: 100}}\n"
              "train: {epochs: 1, batch_size: 64, device: cpu}\n")
    (folder / "good.yaml").write_text(common)
    # Valid as a config, so it launches; its process then finds no data and exits 2 with a message.
    (folder / "nodata.yaml").write_text(common.replace(str(tiny_data), str(tmp_path / "missing")))
    result = runner.invoke(app, ["sweep", str(folder), "--results", str(tmp_path / "results"), "--quiet"])
    assert result.exit_code == 1, result.output
    [sweep_dir] = (tmp_path / "results" / "sweeps" / "family").glob("2*")
    rows = {row["name"]: row for row in json.loads((sweep_dir / "trials.json").read_text())}
    assert rows["good"]["status"] == "completed"
    assert rows["nodata"]["status"] == "failed"
    assert "missing" in rows["nodata"]["error"] and "Fashion-MNIST" in rows["nodata"]["error"]
    assert "FAILED nodata seed 0: " in result.output
