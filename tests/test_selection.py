"""Which epoch each set of weights is tested at (train.select), and the run's declared answer (eval.headline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cnnlab.engine
from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.engine import fit
from cnnlab.evaluation import evaluate_run
from cnnlab.results import Checkpoint
from cnnlab.selection import selection_rule
from cnnlab.steps import Evaluation

# Validation accuracies a run is made to see, epoch by epoch: the moving average peaks at epoch 3, where the
# weights themselves dip; the weights' own best is epoch 2; the last epoch is neither's best.
RAW = [0.50, 0.70, 0.40, 0.60]
EMA = [0.45, 0.60, 0.80, 0.65]


def scripted_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch loop's validation figures replaced by RAW and EMA (the weights' first, then their average's, each
    epoch); every other evaluation, the test pass's among them, runs for real."""
    script = [acc for pair in zip(RAW, EMA) for acc in pair]
    real = cnnlab.engine.evaluate

    def evaluate(*args, **kwargs) -> Evaluation:
        result = real(*args, **kwargs)
        if script and not kwargs.get("confusion") and not kwargs.get("tta"):
            return Evaluation(loss=result.loss, acc=script.pop(0), examples=result.examples)
        return result

    monkeypatch.setattr(cnnlab.engine, "evaluate", evaluate)


def run(tiny_overrides: list[str], *settings: str) -> tuple[Path, dict]:
    cfg = load_config(None, [*tiny_overrides, "train.epochs=4", "model.activation=relu", "optim.lr=0.1",
                             "train.ema={half_life: 0.5}", *settings])
    summary = fit(cfg, quiet=True)
    return Path(summary["run_dir"]), summary


def test_best_tests_each_weight_set_at_its_own_best_epoch(tiny_overrides, monkeypatch):
    scripted_validation(monkeypatch)
    run_dir, summary = run(tiny_overrides, "train.select=best")
    selection = summary["selection"]
    assert selection["rule"] == "best"
    assert selection["raw"] == {"epoch": 2, "checkpoint": "best", "val_acc": 0.70}
    assert selection["ema"] == {"epoch": 3, "checkpoint": "best_ema", "val_acc": 0.80}
    assert Checkpoint.load(run_dir / "checkpoints" / "best.pt").epoch == 2
    assert Checkpoint.load(run_dir / "checkpoints" / "best_ema.pt").epoch == 3
    assert Checkpoint.load(run_dir / "checkpoints" / "last.pt").epoch == 4
    # the figures are those of the checkpoints named: eval of each gives the run's own test loss
    raw = evaluate_run(run_dir, checkpoint="best", weights="raw")
    ema = evaluate_run(run_dir, checkpoint="best", weights="ema")
    last = evaluate_run(run_dir, checkpoint="last", weights="raw")
    assert raw.loss == pytest.approx(summary["test_loss"], rel=1e-4)
    assert ema.loss == pytest.approx(summary["test_loss_ema"], rel=1e-4)
    assert last.loss != pytest.approx(summary["test_loss"], rel=1e-4)  # the last epoch's weights are other weights
    assert (raw.used["epoch"], ema.used["epoch"]) == (2, 3)
    # what the weights did best on validation, as tested: the average at its peak
    assert summary["better_weights"] == "ema"


def test_last_tests_every_weight_set_at_the_end_of_a_schedule_that_anneals_to_zero(tiny_overrides, monkeypatch):
    scripted_validation(monkeypatch)
    run_dir, summary = run(tiny_overrides, "schedule.name=onecycle")  # train.select: auto
    selection = summary["selection"]
    assert selection["rule"] == "last" and "onecycle" in selection["why"]
    assert selection["raw"] == {"epoch": 4, "checkpoint": "last", "val_acc": 0.60}
    assert selection["ema"] == {"epoch": 4, "checkpoint": "last", "val_acc": 0.65}
    last = evaluate_run(run_dir)  # auto: the checkpoint and weights of the run's headline, as tested
    assert (last.checkpoint, last.weights, last.used["epoch"]) == ("last", "ema", 4)
    assert last.loss == pytest.approx(summary["test_loss_ema"], rel=1e-4)
    best = evaluate_run(run_dir, checkpoint="best", weights="raw")
    assert best.used["epoch"] == 2  # still there, for whoever wants the weights' best epoch


def test_the_headline_is_the_declared_figure_and_leads_the_done_line(tiny_overrides, monkeypatch, capsys):
    scripted_validation(monkeypatch)
    cfg = load_config(None, [*tiny_overrides, "train.epochs=4", "model.activation=relu", "optim.lr=0.1",
                             "train.ema={half_life: 0.5}", "eval.tta=[flip]"])
    assert cfg.headline() == "test_acc_ema_tta"  # auto: the average, with the run's TTA
    summary = fit(cfg)
    assert summary["headline"] == "test_acc_ema_tta"
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done: "))
    assert done.startswith(f"done: ema test acc, flip TTA {summary['test_acc_ema_tta']:.4f}; test acc ")
    assert "each at its best val epoch: raw 2 (0.7000), ema 3 (0.8000)" in done  # a constant schedule: best

    declared = load_config(None, [*tiny_overrides, "train.ema={half_life: 0.5}", "eval.headline=test_acc"])
    assert declared.headline() == "test_acc"


def test_a_headline_the_run_does_not_measure_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["run", "configs/lenet.yaml", "--set", "eval.headline=test_acc_ema_tta",
                                      "--set", f"output.dir={tmp_path}"])
    assert result.exit_code == 2
    assert "eval.headline: test_acc_ema_tta is not measured without train.ema and eval.tta" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("settings", "rule"), [
    ([], "best"),  # constant schedule: never settles
    (["schedule.name=onecycle"], "last"),
    (["schedule.name=cosine"], "last"),
    (["schedule.name=cosine", "schedule.min_lr_ratio=0.1"], "best"),
    (["schedule.name=step", "schedule.step_size=1", "train.epochs=3"], "last"),  # 0.1^3 of lr at the end
    (["schedule.name=onecycle", "train.patience=3"], "best"),  # early stopping may end it before it anneals
    (["schedule.name=onecycle", "train.select=best"], "best"),
    (["train.select=last"], "last"),
])
def test_auto_takes_the_last_epoch_only_where_the_schedule_anneals_to_zero(settings, rule):
    assert selection_rule(load_config(None, settings)).select == rule


def test_predict_and_eval_name_the_run_and_weights_they_used(trained):
    run_dir, summary = trained
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(run_dir), "--image", "0", "--json"])
    assert result.exit_code == 0, result.output
    used = json.loads(result.stdout)[0]["model"]
    assert used["run"] == str(run_dir) and used["weights"] == "raw" and used["checkpoint"] == "best"
    assert used["epoch"] == summary["selection"]["raw"]["epoch"] and used["headline_value"] == summary["test_acc"]
    result = runner.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (f"run {run_dir}: the weights of epoch {used['epoch']} of 3 (best checkpoint); "
                                             f"its test acc {summary['test_acc']:.4f}")


def test_a_command_that_picks_the_run_takes_your_own_newest_run_over_a_sweeps_trial_and_names_it(trained, tmp_path):
    import shutil

    run_dir, summary = trained
    own = tmp_path / "results" / "lenet" / "own"
    shutil.copytree(run_dir, own)
    trial = tmp_path / "results" / "sweeps" / "short" / "runs" / "lenet" / "trial"
    shutil.copytree(run_dir, trial)
    recorded = json.loads((trial / "summary.json").read_text())
    (trial / "summary.json").write_text(json.dumps({**recorded, "finished": "2999-01-01T00:00:00Z"}))  # the newest
    (trial.parents[2] / "20261208T000000Z").mkdir()
    (trial.parents[2] / "20261208T000000Z" / "trials.json").write_text("[]")
    runner = CliRunner()
    results = str(tmp_path / "results")
    for command in (["predict", "--image", "0", "--results", results], ["eval", "--results", results],
                    ["visualize", "--results", results, "--layer", "0"]):
        said = runner.invoke(app, command)
        assert said.exit_code == 0, said.output
        assert said.stdout.splitlines()[0].startswith(f"run {own}: the weights of epoch "), command
    named = runner.invoke(app, ["predict", "--image", "0", "--json", str(trial.parents[2])])  # a sweep named: its trial
    assert named.exit_code == 0, named.output
    assert json.loads(named.stdout)[0]["model"]["run"] == str(trial)
