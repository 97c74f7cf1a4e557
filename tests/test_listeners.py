"""The listeners of a run: a neutral base, the typed summary at the end, and an early ending that
reaches every listener (the run's own record first) even when one of them fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnlab.config import load_config
from cnnlab.engine import fit
from cnnlab.listeners import FanOut, Listener
from cnnlab.results import RunSummary


class Heard(Listener):
    """Keeps the summary it is finished with, and what summary.json said at that moment."""

    def __init__(self) -> None:
        self.summary: RunSummary | None = None
        self.on_disk: str | None = None

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        self.summary = summary
        self.on_disk = json.loads((Path(run_dir) / "summary.json").read_text())["status"]


class FailsInEpoch2(Listener):
    def end_epoch(self, row, is_best) -> None:
        if row["epoch"] == 2:
            raise RuntimeError("a listener broke")


class FailsAtTheEnd(Listener):
    def finish(self, summary, run_dir) -> None:
        raise OSError("the server is gone")


def test_the_base_listener_hears_everything_and_does_nothing():
    listener = Listener()
    listener.start_run("x", Path("results/x"), 3, resumed=True, config={})
    listener.start_epoch(1, 10, done=2)
    listener.end_epoch({"epoch": 1}, is_best=True)
    listener.message("text")
    listener.finish(RunSummary(status="completed", name="x"), Path("results/x"))


def test_a_completed_run_tells_its_listeners_the_typed_summary(tiny_overrides):
    heard = Heard()
    fit(load_config(None, tiny_overrides), reporter=heard)
    assert isinstance(heard.summary, RunSummary) and heard.summary.status == "completed"
    assert heard.on_disk == "completed"  # the record wrote summary.json before the others heard


def test_an_early_ending_reaches_every_listener_when_one_fails(tiny_overrides, capsys):
    heard = Heard()
    cfg = load_config(None, [*tiny_overrides, "train.epochs=3"])
    with pytest.raises(RuntimeError, match="a listener broke"):
        fit(cfg, reporter=FanOut(FailsInEpoch2(), FailsAtTheEnd(), heard))
    [run] = Path(cfg.output.dir).glob("*/*")
    assert heard.summary is not None and heard.summary.status == "failed" and heard.summary.epochs_completed == 2
    assert heard.on_disk == "failed"  # the record was told first
    assert f"could not record the ending in {run}: OSError: the server is gone" in capsys.readouterr().err


def test_a_listener_written_before_start_epoch_took_the_learning_rate_still_hears_every_epoch(tiny_overrides):
    class Older(Listener):
        def __init__(self) -> None:
            self.epochs: list[tuple[int, int, int]] = []

        def start_epoch(self, epoch: int, batches: int, done: int = 0) -> None:
            self.epochs.append((epoch, batches, done))

    class Newer(Listener):
        def __init__(self) -> None:
            self.rates: list[float | None] = []

        def start_epoch(self, epoch: int, batches: int, done: int = 0, lr: float | None = None) -> None:
            self.rates.append(lr)

    older, newer = Older(), Newer()
    fit(load_config(None, [*tiny_overrides, "optim.lr=0.05"]), reporter=older, quiet=True)
    assert [e[0] for e in older.epochs] == [1, 2] and all(done == 0 for _, _, done in older.epochs)
    fit(load_config(None, [*tiny_overrides, "optim.lr=0.05"]), reporter=FanOut(Older(), newer), quiet=True)
    assert newer.rates == [0.05, 0.05]
