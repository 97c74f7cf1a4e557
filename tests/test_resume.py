"""Never lose a run: real `cnnlab run` processes killed with real signals, then resumed.

Each training here is a subprocess on generated data big enough (2,800 images, 88 batches an epoch)
that a signal lands inside an epoch. Augmentation, dropout and a cosine schedule are on, so every
generator the resume restores is exercised.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_SECONDS, checkpoint_epoch, wait_for, write_dataset
from typer.testing import CliRunner

from cnnlab.cli import app

TIMING = {"epoch_seconds", "train_examples_per_sec"}
runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_dataset(root / "data", n_train=3000, n_test=200)
    (root / "cfg.yaml").write_text(
        "name: resumable\n"
        "data: {root: data, check_counts: false, val_size: 200, augment: {flip: true, crop_padding: 2}}\n"
        "model: {activation: relu, dropout: 0.1}\n"
        "optim: {lr: 0.05, momentum: 0.9}\n"
        "schedule: {name: cosine}\n"
        "train: {epochs: 5, batch_size: 32, device: cpu, threads: 1}\n"
    )
    return root


def start(workdir: Path, results: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "run", "cfg.yaml", "--quiet", "--results", results, *extra],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def only_run(folder: Path) -> Path:
    runs = [p for p in folder.glob("resumable/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def wait_for_epochs(process: subprocess.Popen, results: Path, epochs: int) -> Path:
    """Block until the run has finished ``epochs`` epochs (its metrics.csv says so); return its folder."""
    def finished() -> Path | None:
        for metrics in results.glob("resumable/*/metrics.csv"):
            if len(metrics.read_text().splitlines()) > epochs:
                return metrics.parent
        return None

    return wait_for(finished, f"the run finishing epoch {epochs}", process)


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(workdir: Path) -> Path:
    """The same config trained without interruption."""
    process = start(workdir, "reference")
    output = process.communicate(timeout=HANG_SECONDS)[0]
    assert process.returncode == 0, output
    return only_run(workdir / "reference")


def resume(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", "resume", str(run), "--quiet", *args],
                          cwd=run.parents[2], capture_output=True, text=True, timeout=HANG_SECONDS)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(workdir, reference):
    process = start(workdir, "killed")
    run = wait_for_epochs(process, workdir / "killed", 2)
    # Epoch 2's checkpoint is written in the background while epoch 3 trains: once it is on disk the
    # kill lands inside epoch 3 and the resume must start from epoch 2, however slow the machine.
    wait_for(lambda: checkpoint_epoch(run) >= 2, "epoch 2's checkpoint", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert summary(run)["status"] == "running"  # nobody could write anything down...

    listing = runner.invoke(app, ["compare", str(run)])
    assert "1 stale of 1" in listing.output  # ...but the dead run is told from a live one
    looked = subprocess.run([sys.executable, "-m", "cnnlab", "eval", str(run)], capture_output=True, text=True,
                            cwd=workdir, timeout=HANG_SECONDS)
    assert looked.returncode == 0 and "warning:" in looked.stderr and "stale" in looked.stderr

    done = resume(run)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout and "(stale)" in done.stdout
    assert metric_rows(run) == metric_rows(reference)
    result, expected = summary(run), summary(reference)
    assert result["status"] == "completed" and result["test_acc"] == expected["test_acc"]
    assert result["best_epoch"] == expected["best_epoch"] and result["epochs_completed"] == 5
    assert result["wall_seconds"] >= result["train_seconds"]  # the killed session's time is not lost
    [entry] = result["resumes"]
    assert entry["from_status"] == "stale" and entry["from_epoch"] >= 2


def test_sigterm_stops_at_a_batch_exits_143_and_resume_completes_identically(workdir, reference):
    process = start(workdir, "terminated")
    run = wait_for_epochs(process, workdir / "terminated", 1)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=HANG_SECONDS)[0]
    assert process.returncode == 143, output
    stopped = summary(run)
    assert stopped["status"] == "interrupted" and stopped["error"] == "interrupted by SIGTERM"
    assert stopped["epochs_completed"] >= 1 and "stopped_at" in stopped
    assert f"cnnlab resume {run.relative_to(workdir)}" in output
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))

    done = resume(run)
    assert done.returncode == 0, done.stdout + done.stderr
    assert metric_rows(run) == metric_rows(reference)
    assert summary(run)["test_acc"] == summary(reference)["test_acc"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_sigint_and_sighup_are_recorded_like_sigterm(workdir, signum, code):
    results = f"sig{code}"
    process = start(workdir, results)
    run = wait_for_epochs(process, workdir / results, 1)
    process.send_signal(signum)
    output = process.communicate(timeout=HANG_SECONDS)[0]
    assert process.returncode == code, output
    assert summary(run)["status"] == "interrupted"
    assert signal.Signals(signum).name in summary(run)["error"]


def test_resume_extends_a_completed_run_and_refuses_what_it_cannot_do(workdir, reference, tmp_path):
    import shutil

    run = tmp_path / "copy" / "resumable" / reference.name
    shutil.copytree(reference, run)  # a run folder copied from elsewhere resumes in its new place
    refused = resume(run)
    assert refused.returncode == 2 and "has completed (5 epochs)" in refused.stderr and "--epochs" in refused.stderr
    assert "Traceback" not in refused.stderr

    extended = resume(run, "--epochs", "6", "--data-dir", str(workdir / "data"))  # the data moved too
    assert extended.returncode == 0, extended.stdout + extended.stderr
    rows = metric_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6] and rows[:5] == metric_rows(reference)
    assert summary(run)["epochs_completed"] == 6 and "epochs: 6" in (run / "config.yaml").read_text()


def test_a_changed_config_or_a_corrupt_checkpoint_is_refused_with_exit_2(workdir, reference, tmp_path):
    import shutil

    run = tmp_path / "r" / "resumable" / reference.name
    shutil.copytree(reference, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("lr: 0.05", "lr: 0.07").replace("batch_size: 32", "batch_size: 64"))
    changed = resume(run, "--epochs", "6")
    assert changed.returncode == 2, changed.stderr
    # the batch size is refused; the learning rate, which a resume may change, is not among the differences
    assert "trained with, in train.batch_size;" in changed.stderr and "Traceback" not in changed.stderr
    (run / "config.yaml").write_text(config)

    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a truncated copy
    corrupt = resume(run, "--epochs", "6")
    assert corrupt.returncode == 2 and str(last) in corrupt.stderr and "SHA-256" in corrupt.stderr
    assert "weights_only=False" not in corrupt.stderr
    assert summary(run)["status"] == "completed" and len(metric_rows(run)) == 5  # nothing was touched


def test_run_resume_auto_continues_the_unfinished_run_of_the_same_config(workdir, reference):
    process = start(workdir, "auto")
    run = wait_for_epochs(process, workdir / "auto", 1)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=HANG_SECONDS)

    again = subprocess.run([sys.executable, "-m", "cnnlab", "run", "cfg.yaml", "--quiet", "--results", "auto",
                            "--resume", "auto"], cwd=workdir, capture_output=True, text=True, timeout=HANG_SECONDS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert only_run(workdir / "auto") == run  # continued in place, no second folder
    assert metric_rows(run) == metric_rows(reference)

    other = subprocess.run([sys.executable, "-m", "cnnlab", "run", "cfg.yaml", "--quiet", "--results", "auto",
                            "--resume", "auto", "--epochs", "1"], cwd=workdir, capture_output=True, text=True,
                           timeout=HANG_SECONDS)
    assert other.returncode == 0, other.stderr
    assert len(list((workdir / "auto" / "resumable").iterdir())) == 2  # a finished run is not resumed: a new one


def test_a_failure_after_the_last_epoch_is_recorded_with_the_test_accuracy(workdir):
    """A real 'disk full' while drawing the curves: the file-size limit makes the PNG write fail."""
    import resource

    def small_files():
        limit = 20_000  # summary.json and metrics.csv fit, curves.png (about 30 kB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = subprocess.run(
        [sys.executable, "-m", "cnnlab", "run", "cfg.yaml", "--quiet", "--results", "full", "--epochs", "1",
         "--set", "output.checkpoints=false"],
        cwd=workdir, capture_output=True, text=True, timeout=HANG_SECONDS, preexec_fn=small_files,
    )
    assert process.returncode == 1, process.stdout + process.stderr
    assert "Traceback" not in process.stderr and "File too large" in process.stderr
    result = summary(only_run(workdir / "full"))
    assert result["status"] == "failed" and "File too large" in result["error"]
    assert result["test_acc"] > 0.5 and result["epochs_completed"] == 1


def test_a_live_run_cannot_be_resumed_twice(workdir):
    process = start(workdir, "live", "--epochs", "50")
    try:
        run = wait_for_epochs(process, workdir / "live", 1)
        clash = resume(run)
        assert clash.returncode == 2 and "still training" in clash.stderr
        listing = runner.invoke(app, ["compare", str(run)])
        assert "1 running of 1" in listing.output
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=HANG_SECONDS)
    assert summary(run)["status"] == "interrupted"


def test_os_level_handlers_are_restored_after_a_run(tiny_overrides):
    from cnnlab.config import load_config
    from cnnlab.engine import fit

    before = signal.getsignal(signal.SIGTERM)
    fit(load_config(None, [*tiny_overrides, "train.epochs=1"]), quiet=True)
    assert signal.getsignal(signal.SIGTERM) is before
    assert os.environ.get("CNNLAB_PARENT_PID") is None


# ---------------------------------------------------------------------------------------------
# In-process cases (fast): what resume and --resume auto decide


def _interrupted_run(tiny_overrides, monkeypatch, *extra):
    """A run stopped by Ctrl-C in its second epoch (the way test_engine does it): (cfg, run folder)."""
    import cnnlab.engine as engine
    from cnnlab.config import load_config

    real, calls = engine.train_one_epoch, {"n": 0}

    def interrupt_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cfg = load_config(None, [*tiny_overrides, "train.epochs=3", *extra])
    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(cfg, quiet=True)
    monkeypatch.setattr(engine, "train_one_epoch", real)
    [run] = Path(cfg.output.dir).glob("*/*")
    return cfg, run


def test_resume_auto_passes_over_a_run_whose_checkpoint_is_corrupt(tiny_overrides, monkeypatch, capsys):
    from cnnlab.engine import run_or_resume

    cfg, run = _interrupted_run(tiny_overrides, monkeypatch)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])
    result = run_or_resume(cfg, quiet=True)
    assert result["status"] == "completed" and Path(result["run_dir"]) != run  # a fresh run
    assert "fails its SHA-256 check" in capsys.readouterr().err
    assert summary(run)["status"] == "interrupted"  # the broken one is left as it was


def test_resume_auto_finds_the_run_however_the_results_folder_is_written(tiny_overrides, monkeypatch, tmp_path):
    from cnnlab.engine import run_or_resume

    monkeypatch.chdir(tmp_path)
    cfg, run = _interrupted_run([o for o in tiny_overrides if not o.startswith("output.dir")], monkeypatch,
                                "output.dir=rel-results")
    absolute = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": tmp_path / "rel-results"})})
    result = run_or_resume(absolute, quiet=True)
    assert Path(result["run_dir"]).resolve() == run.resolve() and result["epochs_completed"] == 3


def test_resume_auto_continues_the_run_with_the_threads_asked_for_now(tiny_overrides, monkeypatch):
    # A busy machine is a reason to continue with fewer threads, not to start the run again.
    from cnnlab.engine import run_or_resume

    cfg, run = _interrupted_run(tiny_overrides, monkeypatch, "train.threads=2")
    fewer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": 1})})
    result = run_or_resume(fewer, quiet=True)
    assert Path(result["run_dir"]) == run and result["epochs_completed"] == 3
    assert result["threads"] == 1
    assert [(c["key"], c["old"], c["new"]) for c in result["resumes"][-1]["changes"]] == [("train.threads", 2, 1)]


def test_an_early_stopped_run_is_completed_and_an_extension_counts_patience_afresh(tiny_overrides):
    from cnnlab.config import load_config
    from cnnlab.engine import fit
    from cnnlab.engine import resume as resume_run
    from cnnlab.errors import UserError

    first = fit(load_config(None, [*tiny_overrides, "optim.lr=1e-12", "train.epochs=10", "train.patience=2"]),
                quiet=True)
    run = Path(first["run_dir"])
    assert first["stopped_early"] and first["epochs_completed"] == 3
    with pytest.raises(UserError, match="stopped early"):
        resume_run(run, quiet=True)
    extended = resume_run(run, epochs=6, quiet=True)
    assert extended["epochs_completed"] == 5 and extended["stopped_early"]  # two more epochs of patience
    assert len(metric_rows(run)) == 5


def test_a_checkpoint_that_cannot_be_written_fails_the_run_and_says_so(workdir):
    """Checkpoints are written in the background while the next epoch trains: a real 'disk full'
    (the file-size limit: the checkpoint is larger) still ends the run, recorded, without a traceback."""
    import resource

    def small_files():
        limit = 30_000  # config, summary and metrics fit; a LeNet checkpoint (about 250 kB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = subprocess.run(
        [sys.executable, "-m", "cnnlab", "run", "cfg.yaml", "--quiet", "--results", "nodisk", "--epochs", "2"],
        cwd=workdir, capture_output=True, text=True, timeout=HANG_SECONDS, preexec_fn=small_files,
    )
    assert process.returncode == 1, process.stdout + process.stderr
    assert "Traceback" not in process.stderr and "File too large" in process.stderr
    result = summary(only_run(workdir / "nodisk"))
    assert result["status"] == "failed" and "File too large" in result["error"]
    assert not list((only_run(workdir / "nodisk") / "checkpoints").glob("*.pt"))  # nothing half-written


# ---------------------------------------------------------------------------------------------
# Every way a run ends leaves a folder that says what it holds


def _fill_the_disk_at_checkpoint(monkeypatch, n: int) -> None:
    """The disk is full from the ``n``-th checkpoint file on: the OS refuses to sync it (ENOSPC), as it
    does a write whose blocks it cannot find. Smaller files still fit (the refused temporary is gone)."""
    import errno
    import re

    real_fsync, synced = os.fsync, {"checkpoints": 0}

    def fsync(fd: int) -> None:
        if re.fullmatch(r"\.(best|last)\.pt\.[a-z0-9_]+\.tmp", Path(os.readlink(f"/proc/self/fd/{fd}")).name):
            synced["checkpoints"] += 1
            if synced["checkpoints"] >= n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_mid_run_leaves_a_record_of_what_is_on_disk_and_resumes(tiny_overrides, monkeypatch, tmp_path):
    """Epoch 1's checkpoints are written; epoch 2's (written in the background while epoch 3 trains)
    finds the disk full. summary.json, metrics.csv and the checkpoints must all say epoch 1."""
    from cnnlab.config import load_config
    from cnnlab.engine import fit
    from cnnlab.errors import TrainingError
    from cnnlab.results import Checkpoint

    reference = fit(load_config(None, [*tiny_overrides, "train.epochs=3", f"output.dir={tmp_path / 'reference'}"]),
                    quiet=True)
    cfg = load_config(None, [*tiny_overrides, "train.epochs=3"])
    with monkeypatch.context() as full:
        _fill_the_disk_at_checkpoint(full, 3)  # epoch 1 wrote best.pt and last.pt
        with pytest.raises(TrainingError, match="No space left on device"):
            fit(cfg, quiet=True)
    [run] = Path(cfg.output.dir).glob("*/*")
    result = summary(run)
    assert result["status"] == "failed" and "could not write" in result["error"]
    assert str(run / "checkpoints") in result["error"] and "No space left on device" in result["error"]
    last, best = (Checkpoint.load(run / "checkpoints" / f"{name}.pt") for name in ("last", "best"))
    assert result["epochs_completed"] == len(metric_rows(run)) == last.epoch == 1
    assert result["best_epoch"] == best.epoch == 1 and result["final"]["val_acc"] == float(metric_rows(run)[0]["val_acc"])
    assert "resume redoes epochs 2-3" in result["stopped_at"]
    assert not list(run.rglob("*.tmp"))

    done = runner.invoke(app, ["resume", str(run), "--quiet"])
    assert done.exit_code == 0, done.output
    assert summary(run)["status"] == "completed" and summary(run)["epochs_completed"] == 3
    assert metric_rows(run) == metric_rows(Path(reference["run_dir"]))  # as if the disk had never filled


def test_resume_removes_the_temporaries_a_killed_write_left_and_nothing_else(tiny_overrides, monkeypatch):
    """A run killed while writing a checkpoint leaves ``.last.pt.<random>.tmp`` behind (mkstemp's names,
    as atomic writes make them); the next process to hold the run's lock removes them, and only them."""
    import tempfile

    from cnnlab.engine import resume as resume_run
    from cnnlab.errors import UserError
    from cnnlab.results import RunDir

    _, run = _interrupted_run(tiny_overrides, monkeypatch)
    holder = RunDir(run)
    holder.lock()  # a live process holds the run (its temporaries are being written): nobody else may touch them
    checkpoints = run / "checkpoints"
    stale = [Path(tempfile.mkstemp(dir=checkpoints, prefix=f".{name}.", suffix=".tmp")[1])
             for name in ("last.pt", "last.pt", "best.pt", "best.pt.sha256")]
    stale += [checkpoints / ".last.pt.abc123.tmp", run / ".metrics.csv.k2j4x9_q.tmp"]
    kept = [checkpoints / "notes.tmp", checkpoints / ".last.pt.keep", checkpoints / ".other.pt.abcdefgh.tmp",
            checkpoints / ".last.pt.a.b.tmp", run / ".summary.json.abcdefgh.tmp", run / "last.pt.abcdefgh.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x" * 1000)

    with pytest.raises(UserError, match="being trained right now"):
        resume_run(run, quiet=True)
    assert all(path.exists() for path in stale)
    holder.unlock()

    assert resume_run(run, quiet=True)["status"] == "completed"
    assert [path for path in stale if path.exists()] == []
    assert all(path.read_bytes() == b"x" * 1000 for path in kept)


def test_a_second_ctrl_c_while_the_ending_is_written_waits_for_the_record(tiny_overrides, monkeypatch):
    """The first Ctrl-C stops the run at a batch; the second lands while the stop's checkpoint is being
    written. It must not cut the record short: summary.json says interrupted, where, and why."""
    import threading

    from cnnlab.config import load_config
    from cnnlab.engine import fit
    from cnnlab.listeners import Listener
    from cnnlab.results import Checkpoint, RunDir
    from cnnlab.stopping import Interrupted

    class CtrlCInEpoch2(Listener):
        def start_epoch(self, epoch: int, batches: int, done: int = 0) -> None:
            self.epoch = epoch

        def advance(self, loss_sum, correct, seen) -> None:
            if self.epoch == 2 and seen == 64:
                os.kill(os.getpid(), signal.SIGINT)

    real_save, seconds = RunDir.save_checkpoint, []

    def save_checkpoint(self, checkpoint, *names):
        if checkpoint.state["current"] is not None and not seconds:  # the stop's own checkpoint, in whichever thread
            seconds.append(threading.current_thread().name)
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
        real_save(self, checkpoint, *names)

    monkeypatch.setattr(RunDir, "save_checkpoint", save_checkpoint)
    cfg = load_config(None, [*tiny_overrides, "train.epochs=3"])
    with pytest.raises((Interrupted, KeyboardInterrupt)):
        fit(cfg, quiet=True, reporter=CtrlCInEpoch2())
    assert seconds, "the stop wrote no checkpoint"
    [run] = Path(cfg.output.dir).glob("*/*")
    result = summary(run)
    assert result["status"] == "interrupted" and result["error"] == "interrupted by SIGINT"
    assert result["stopped_at"] == "epoch 2, batch 2 of 10" and result["epochs_completed"] == len(metric_rows(run)) == 1
    assert Checkpoint.load(run / "checkpoints" / "last.pt").state["current"]["batches"] == 2


@pytest.mark.parametrize("attempt", range(3))  # intermittent before: run it more than once
def test_two_ctrl_c_back_to_back_are_recorded_as_one_interruption(workdir, attempt):
    results = f"twice{attempt}"
    process = start(workdir, results)
    run = wait_for_epochs(process, workdir / results, 1)
    os.kill(process.pid, signal.SIGINT)
    os.kill(process.pid, signal.SIGINT)
    output = process.communicate(timeout=HANG_SECONDS)[0]
    assert process.returncode == 130, output
    stopped = summary(run)
    assert stopped["status"] == "interrupted" and stopped["stopped_at"] and stopped["finished"], stopped
    assert stopped["epochs_completed"] == len(metric_rows(run))


def test_a_folder_that_cannot_take_its_first_files_is_exit_2_and_taken_back(workdir):
    """A real write failure at the start (the file-size limit: the lock's line fits, config.yaml does
    not): one line naming the folder and the cause, exit 2, and no folder holding only ``.lock``."""
    import resource

    def tiny_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    process = subprocess.run([sys.executable, "-m", "cnnlab", "run", "cfg.yaml", "--quiet", "--results", "nospace"],
                             cwd=workdir, capture_output=True, text=True, timeout=HANG_SECONDS, preexec_fn=tiny_files)
    assert process.returncode == 2, process.stdout + process.stderr
    assert "Traceback" not in process.stderr and "File too large" in process.stderr
    assert "cannot write the new run folder nospace/resumable/" in process.stderr
    assert list((workdir / "nospace" / "resumable").iterdir()) == []


# Changing settings on resume (`cnnlab resume RUN --set KEY=VALUE`)


def _trained_run(tiny_overrides, *extra) -> Path:
    """A completed 2-epoch run on the tiny data, SGD at lr 0.1."""
    from cnnlab.config import load_config
    from cnnlab.engine import fit

    cfg = load_config(None, [*tiny_overrides, "model.activation=relu", "optim.lr=0.1", *extra])
    return Path(fit(cfg, quiet=True)["run_dir"])


def test_a_diverged_run_is_continued_with_a_lower_learning_rate(tiny_overrides):
    from cnnlab.config import read_yaml
    from cnnlab.results import Checkpoint

    run = _trained_run(tiny_overrides)
    diverged = runner.invoke(app, ["resume", str(run), "--quiet", "--epochs", "3", "--set", "optim.lr=1e12"])
    assert diverged.exit_code == 1 and "diverged" in diverged.output, diverged.output
    assert summary(run)["status"] == "failed" and read_yaml(run / "config.yaml")["optim"]["lr"] == 1e12
    advice = f"continue it with a lower learning rate: cnnlab resume {run} --set optim.lr=5e+11"
    assert advice in diverged.stdout, diverged.stdout
    [change] = [c for c in summary(run)["resumes"][-1]["changes"] if c["key"] == "optim.lr"]
    assert change == {"key": "optim.lr", "old": 0.1, "new": 1e12, "epoch": 3}

    done = runner.invoke(app, ["resume", str(run), "--quiet", "--set", "optim.lr=0.05", "--set", "train.grad_clip=1",
                               "--set", "optim.weight_decay=0.001"])
    assert done.exit_code == 0, done.output
    assert "optim.lr 0.1 -> 0.05" in done.stdout
    assert [float(row["lr"]) for row in metric_rows(run)] == [0.1, 0.1, 0.05]  # the new rate, in the optimiser
    result = summary(run)
    assert result["status"] == "completed" and result["epochs_completed"] == 3
    changes = {c["key"]: c for c in result["resumes"][-1]["changes"]}
    assert changes["optim.lr"] == {"key": "optim.lr", "old": 0.1, "new": 0.05, "epoch": 3}  # from the checkpoint's
    assert changes["train.grad_clip"] == {"key": "train.grad_clip", "old": None, "new": 1.0, "epoch": 3}
    assert changes["optim.weight_decay"]["new"] == 0.001
    saved = read_yaml(run / "config.yaml")  # later resumes and `cnnlab run config.yaml` train with these
    assert saved["optim"]["lr"] == 0.05 and saved["train"]["grad_clip"] == 1.0
    group = Checkpoint.load(run / "checkpoints" / "last.pt").optimizer["param_groups"][0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (0.05, 0.05, 0.001)


def test_a_new_learning_rate_follows_the_schedule_from_where_the_run_stopped(tiny_overrides, monkeypatch):
    """A cosine schedule's state holds the rate it scales (base_lrs): the new one must replace it."""
    from cnnlab.config import ScheduleConfig
    from cnnlab.engine import resume as resume_run
    from cnnlab.optim import lr_factor

    _, run = _interrupted_run(tiny_overrides, monkeypatch, "schedule.name=cosine", "optim.lr=0.1")
    resumed = resume_run(run, settings=["optim.lr=0.02", "schedule.min_lr_ratio=0.5"], quiet=True)
    assert resumed["status"] == "completed"
    factor = lr_factor(ScheduleConfig(name="cosine", min_lr_ratio=0.5), 3)
    rows = metric_rows(run)
    assert float(rows[0]["lr"]) == pytest.approx(0.1 * lr_factor(ScheduleConfig(name="cosine"), 3)(0))
    assert float(rows[2]["lr"]) == pytest.approx(0.02 * factor(2))  # epoch 3 starts at step 2 epochs in
    assert [c["key"] for c in resumed["resumes"][-1]["changes"]] == ["optim.lr", "schedule.min_lr_ratio"]


def test_a_resume_cannot_change_the_model_or_the_data(tiny_overrides):
    run = _trained_run(tiny_overrides)
    before = (run / "summary.json").read_text(), (run / "config.yaml").read_text()
    for setting in ("model.activation=sigmoid", "data.val_size=50", "train.batch_size=8", "optim.name=adam"):
        refused = runner.invoke(app, ["resume", str(run), "--epochs", "3", "--set", setting])
        key = setting.partition("=")[0]
        assert refused.exit_code == 2, refused.output
        assert f"--set {key}: a resumed run cannot change {key}" in refused.stderr
        assert "optim.lr, optim.momentum, optim.weight_decay, schedule.*" in refused.stderr
        assert "Traceback" not in refused.output
    bad = runner.invoke(app, ["resume", str(run), "--epochs", "3", "--set", "optim.lr=-1"])
    assert bad.exit_code == 2 and "optim.lr" in bad.stderr and "greater than 0" in bad.stderr, bad.output
    assert ((run / "summary.json").read_text(), (run / "config.yaml").read_text()) == before  # nothing touched
