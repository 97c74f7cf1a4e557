"""What a run prints while it trains: the time the whole run has left, from what this process measured."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from cnnlab.progress import ConsoleReporter, LiveReporter, Pace


class Clock:
    """Time that moves only when the test says (a machine's load cannot change what the test sees)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def row(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.6, "val_acc": 0.78, "lr": 0.1,
            "epoch_seconds": 12.0, "train_examples_per_sec": 5000.0}


def test_pace_scales_timed_batches_then_whole_epochs_to_the_runs_time_left():
    clock = Clock()
    pace = Pace(clock)
    pace.start_epoch(epochs=10, epoch=1, batches=100, done=0)
    assert pace.left(0) is None  # nothing timed yet
    clock.now += 5  # 10 batches in 5 s: 0.5 s a batch, 90 left in this epoch and 9 epochs of 100 after it
    assert pace.left(10) == pytest.approx(0.5 * (90 + 900))
    clock.now += 55  # the epoch took 60 s with its evaluation
    pace.end_epoch()
    assert pace.left() == pytest.approx(9 * 60)
    pace.start_epoch(epochs=10, epoch=2, batches=100, done=0)
    clock.now += 20
    assert pace.left(25) == pytest.approx(0.75 * 60 + 8 * 60)
    resumed = Pace(clock)  # a resumed epoch's rest is not a whole epoch's time
    resumed.start_epoch(epochs=10, epoch=4, batches=100, done=50)
    clock.now += 10
    resumed.end_epoch()
    assert resumed.epoch_seconds() is None


def test_quiet_lines_end_with_the_time_the_run_has_left(tmp_path):
    clock, buffer = Clock(), io.StringIO()
    reporter = ConsoleReporter(Console(file=buffer, width=300), clock=clock)
    reporter.start_run("lenet", tmp_path, epochs=3)
    for epoch in (1, 2, 3):
        reporter.start_epoch(epoch, batches=50, lr=0.1)
        clock.now += 40
        reporter.end_epoch(row(epoch), is_best=epoch == 1)
    lines = buffer.getvalue().splitlines()
    assert lines[1].endswith("5,000 img/s  *best  run left 80 s") and lines[2].endswith("run left 40 s")
    assert "run left" not in lines[3]


def bar_line(reporter: LiveReporter) -> str:
    """The live bar as it is drawn now, its runs of spaces made one."""
    buffer = io.StringIO()
    Console(file=buffer, width=400).print(reporter.progress.make_tasks_table(reporter.progress.tasks))
    return " ".join(buffer.getvalue().split())


def test_the_live_bar_shows_speed_learning_rate_and_each_time_once_in_one_format(tmp_path):
    clock, buffer = Clock(), io.StringIO()
    reporter = LiveReporter(Console(file=buffer, width=200, force_terminal=True), clock=clock)
    reporter.start_run("lenet", Path(tmp_path), epochs=2)
    reporter.start_epoch(1, batches=10, lr=0.05)
    for batch in range(1, 6):
        clock.now += 1
        reporter.advance(torch.tensor(batch * 32 * 0.5), torch.tensor(batch * 20), batch * 32)
    task = reporter.progress.tasks[0]
    assert task.fields["lr"] == "0.05" and task.fields["speed"] == "32"  # 4 batches of 32 in 4 s after the first
    line = bar_line(reporter)
    # 1 s a batch: 5 more in this epoch, 10 in the next; every time labelled, in duration_text's one format
    assert line.endswith("32 img/s lr 0.05 elapsed 5.0 s epoch left 5.0 s run left 15 s"), line
    assert not re.search(r"\d:\d\d", line), line
    reporter.end_epoch(row(1), is_best=True)


def test_a_one_epoch_run_says_1_epoch_and_its_time_left_once(tmp_path):
    clock, buffer = Clock(), io.StringIO()
    reporter = LiveReporter(Console(file=buffer, width=200), clock=clock)
    reporter.start_run("lenet", Path(tmp_path), epochs=1)
    assert f"run lenet: 1 epoch -> {tmp_path}" in buffer.getvalue()
    reporter.start_epoch(1, batches=10, lr=0.9)
    for batch in range(1, 4):
        clock.now += 1
        reporter.advance(torch.tensor(batch * 32 * 0.5), torch.tensor(batch * 20), batch * 32)
    line = bar_line(reporter)
    assert line.endswith("lr 0.9 elapsed 3.0 s epoch left 7.0 s"), line  # the epoch's time left is the run's
    reporter.end_epoch(row(1), is_best=True)


def test_a_training_command_speaks_before_pytorch_is_imported(tmp_path):
    """The first line comes before PyTorch's seconds of importing: here PyTorch cannot be imported at all, and the
    line is there all the same, before the error."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['cnnlab', 'run', 'configs/lenet.yaml']; "
            "from cnnlab.entry import main; main()")
    leader, follower = pty.openpty()  # a terminal, as a person's
    done = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    os.close(follower)
    text = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end is closed: all was read
            break
        if not chunk:
            break
        text += chunk
    os.close(leader)
    said = text.decode(errors="replace")
    assert done.returncode == 1, said
    assert "cnnlab run configs/lenet.yaml: starting (loading PyTorch)" in said
    assert said.index("starting (loading PyTorch)") < said.index("error:")


def test_a_sweeps_display_counts_batches_says_each_trials_results_and_estimates_the_rest(tmp_path):
    from cnnlab.config import load_config
    from cnnlab.launch import Trial
    from cnnlab.sweep import SweepDisplay

    clock, buffer = Clock(), io.StringIO()
    trials = [Trial(f"t{i}", 0, config=load_config(None, ["train.epochs=2"])) for i in range(4)]
    with SweepDisplay(Console(file=buffer, width=300), live=True, jobs=2, clock=clock) as display:
        display.begin(total=4, done=0)
        task = display.trial_started(trials[0])
        display.on_event(task, trials[0], {"event": "epoch_start", "epoch": 2, "batches": 50, "done": 0})
        display.on_event(task, trials[0], {"event": "batches", "epoch": 2, "done": 20})
        bar = next(t for t in display.progress.tasks if t.id == task)
        assert (bar.completed, bar.total) == (70, 100)  # batches of the whole trial: 50 of epoch 1, 20 of epoch 2
        display.on_event(task, trials[0], {"event": "run_end", "summary": {"test_acc": 0.8812, "best_val_acc": 0.879,
                                                                          "best_epoch": 2, "eval_split": "val"}})
        clock.now += 120
        trials[0].status = "completed"
        display.trial_finished(task, trials[0])
        overall = display.progress.tasks[0]
        assert overall.completed == 1 and overall.fields["note"] == "about 4.0 min left"  # 3 left, 2 at a time
        for trial, status in ((trials[1], "interrupted"), (trials[2], "not started")):
            trial.status = status
            display.trial_finished(None, trial)
        assert display.progress.tasks[0].completed == 1  # a stopped trial has not ended: it is still to run
    said = buffer.getvalue()
    assert "done  t0 seed 0: test acc 0.8812, val acc 0.8790 (best epoch 2), 2.0 min" in said
    assert "STOPPED t1 seed 0" in said and "SKIPPED t2 seed 0" in said


def test_a_sweeps_line_for_a_finished_trial_leads_with_its_headline():
    from cnnlab.sweep import _metrics

    plain = {"test_acc": 0.8812, "best_val_acc": 0.879, "best_epoch": 7, "headline": "test_acc"}
    assert _metrics(plain, None, 0) == ": test acc 0.8812, val acc 0.8790 (best epoch 7)"
    averaged = {**plain, "headline": "test_acc_ema_tta", "test_acc_ema_tta": 0.8901, "test_tta": ["flip"]}
    assert _metrics(averaged, None, 0).startswith(": ema test acc, flip TTA 0.8901, test acc 0.8812, ")
