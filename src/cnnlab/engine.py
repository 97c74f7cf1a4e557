"""Usage: ``summary = fit(load_config("configs/lenet.yaml"))``; ``summary = resume(Path("results/lenet/2026..."))``.

A run's life. ``fit`` and ``resume`` share one start (``start``): signals handled, the session
prepared (session.py), the training state fresh or the checkpoint's, the folder made or locked and
rewritten (an ``Opening``: ``NewRun`` or ``Continuation``); then ``train``, the epoch loop from
wherever the state stands and the test pass; and every ending (completed, interrupted, failed,
pruned) recorded in the folder, which then agrees with its checkpoint. ``run_or_resume`` is
``cnnlab run --resume auto``. What a run trains with lives below: runtime.py, optim.py, steps.py,
capture.py, session.py.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cnnlab.averaging import recompute_batchnorm
from cnnlab.config import Config, dump_config, parse_override, set_value, validate
from cnnlab.data import Data
from cnnlab.errors import TrainingError, UserError, say, warn
from cnnlab.listeners import Listener, start_epoch
from cnnlab.modelinfo import count_params
from cnnlab.progress import make_reporter
from cnnlab.record import RunRecord, StartupClock, for_rank, recording_ending, run_listeners
from cnnlab.results import (
    AVERAGE_FIGURES,
    RESUMABLE,
    Checkpoint,
    CheckpointWriter,
    RunDir,
    RunSummary,
    Selection,
    TestedWeights,
    git_commit,
    read_summary,
    utc_now,
)
from cnnlab.runs import OpenedRun, comparable, config_differences, describe_state, open_run, runs_of
from cnnlab.runtime import process_age
from cnnlab.selection import COLUMNS, best_checkpoints, selection_rule, tested_epoch
from cnnlab.session import Session, join_world, prepare, step_fields
from cnnlab.state import AVERAGE_COLUMNS, EpochProgress, TrainState, epoch_score
from cnnlab.steps import evaluate, train_one_epoch
from cnnlab.stopping import Interrupted, Pruned, StopSignals

# ---------------------------------------------------------------------------------------------
# Starting a run: new, or continued in its own folder


def describe_run(session: Session, run: RunDir) -> RunSummary:
    """The summary.json of a run that has just started: what is trained, on what, where, by whom."""
    cfg, data, runtime = session.cfg, session.data, session.runtime
    train_step, train_step_note = step_fields(session)
    return RunSummary(
        status="running",
        name=cfg.name,
        run_id=run.run_id,
        model=cfg.model.name,
        seed=cfg.seed,
        params=count_params(session.model),
        flops_per_image=session.flops,
        weights=session.weights.to_dict() if session.weights is not None else None,
        frozen_params=session.frozen_params or None,
        epochs=cfg.train.epochs,
        eval_split=data.eval_split_name,
        data_root=str(data.root),
        train_size=len(data.train),
        val_size=len(data.val) if data.val is not None else 0,
        test_size=len(data.test),
        pixel_mean=data.mean,
        pixel_std=data.std,
        data=data.spec,
        skipped_images=len(data.skipped) or None,
        skipped_examples=list(data.skipped[:5]) or None,
        device=str(runtime.device),
        device_name=runtime.device_name,
        precision=runtime.precision,
        threads=session.threads.count,
        cpus=session.threads.as_dict(),
        channels_last=runtime.channels_last,
        tf32=runtime.tf32,
        train_step=train_step,
        train_step_note=train_step_note,
        world_size=session.world.size,
        backend=session.world.backend,
        sync_bn=session.sync_bn if session.world.distributed else None,
        torch_version=str(torch.__version__),
        git_commit=git_commit(),
        pid=os.getpid(),
        host=socket.gethostname(),
        started=utc_now(),
    )


class Opening(Protocol):
    """What differs between starting a new run and continuing one: the state it trains on from, and
    its folder (made, or locked and rewritten) with the summary it starts with."""

    fresh: bool  # whether the model starts from its initial (and pretrained) weights, not from a checkpoint

    def restore(self, session: Session) -> TrainState: ...

    def open(self, session: Session, state: TrainState, reporter: Listener) -> tuple[RunDir, RunSummary]: ...


def start(cfg: Config, opening: Opening, reporter: Listener | None, quiet: bool, wall_start: float) -> dict[str, Any]:
    """The one start of every run: prepare ``cfg``'s session, take ``opening``'s state and folder, train.

    Bad input raises ``UserError`` before the folder is touched. Signals are handled from the first
    moment (``StopSignals``), so that no moment of a run's life is left to an unrecorded death by signal.
    """
    with StopSignals() as stop:
        session = prepare(cfg, pretrained=opening.fresh)
        if session.world.is_main:
            say(session.data.placement_line)
            if session.weights is not None:
                say(session.weights.line())
            if session.threads.line:
                say(session.threads.line)
        state = opening.restore(session)
        stop.check()  # asked to stop while setting up: leave before anything is written
        reporter = reporter or make_reporter(quiet=quiet)
        run, summary = opening.open(session, state, reporter)
        return train(session, run, state, summary, reporter, wall_start, stop)


def fit(cfg: Config, *, quiet: bool = False, reporter: Listener | None = None) -> dict[str, Any]:
    """Train and test one experiment; returns its summary (also written to ``summary.json``).

    Bad input raises ``UserError`` before the run folder exists. A failure during training is
    recorded in ``summary.json`` (status ``failed`` or ``interrupted``) and re-raised.
    """
    return start(cfg, NewRun(), reporter, quiet, time.perf_counter())


class NewRun:
    """A new run: a fresh state, and a new folder with its config and opening summary."""

    fresh = True

    def restore(self, session: Session) -> TrainState:
        return TrainState()

    def open(self, session: Session, state: TrainState, reporter: Listener) -> tuple[RunDir, RunSummary]:
        cfg, world = session.cfg, session.world
        run = RunDir.create(cfg.output.dir, cfg.name) if world.is_main else None
        path = world.broadcast(str(run.path) if run is not None else None)
        run = run or RunDir(Path(path), writer=False)
        summary = describe_run(session, run)
        open_new_run(run, dump_config(cfg), summary)
        return run, summary


def open_new_run(run: RunDir, config_text: str, summary: RunSummary) -> None:
    """Lock a new run folder and write its config and opening summary. A folder that cannot take them
    (a full disk) is bad input, exit 2, and is taken back: no folder holding only ``.lock`` is left."""
    try:
        run.lock()
        run.write_config(config_text)
        run.write_summary(summary)
    except UserError:
        run.discard()
        raise
    except OSError as err:
        run.discard()
        raise UserError(f"cannot write the new run folder {run.path}: {err.strerror or type(err).__name__}; free some "
                        "space, or choose another results folder with --results") from None


# ---------------------------------------------------------------------------------------------
# Resuming: a run continued in its own folder

# What a resumed run may change (`cnnlab resume RUN --set KEY=VALUE`): how the optimiser steps from the
# checkpoint on and how long and how patiently it trains. The checkpoint's state stays right under each:
# the weights, the optimiser's buffers (SGD's momentum is kept, and optim.name, whose state Adam's moments
# are, is not here), the position in the epoch and the data order. Not the model or the data (the weights
# and the split belong to them), nor train.batch_size (it makes the epoch's batches, where a checkpoint
# stands inside one), nor the loss (label_smoothing) or the precision. train.threads is where it trains, as
# train.device is (`resume --threads 1` on a machine that turned busy; a count other than the checkpoint's may
# change the last bits of what follows, as on another machine).
RESUME_SETTABLE = ("optim.lr", "optim.momentum", "optim.weight_decay", "schedule.*", "train.grad_clip",
                   "train.epochs", "train.patience", "train.threads")


def resume(
    run_dir: Path,
    *,
    epochs: int | None = None,
    settings: list[str] | None = None,
    device: str | None = None,
    data_root: Path | None = None,
    threads: int | str | None = None,
    quiet: bool = False,
    reporter: Listener | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Continue ``run_dir`` from ``checkpoints/last.pt`` in the same folder; returns the summary.

    ``epochs`` extends (or, for an unfinished run, changes) the total; ``settings`` (``--set``
    strings) change the keys of ``RESUME_SETTABLE``, in config.yaml too, from the next batch on;
    ``device``, ``data_root`` and ``threads`` (``train.threads``, recorded as a change) may change because a run
    can move to another machine, or its machine get busy. Anything else that differs between ``config.yaml``
    and the checkpoint is refused.
    """
    wall_start = time.perf_counter()
    cfg, continuation = plan_resume(run_dir, epochs=epochs, settings=settings, device=device, data_root=data_root,
                                    threads=threads, trust_code=trust_code)
    return start(cfg, continuation, reporter, quiet, wall_start)


def plan_resume(run_dir: Path, *, epochs: int | None, settings: list[str] | None, device: str | None,
                data_root: Path | None, trust_code: bool, threads: int | str | None = None) -> tuple[Config, Continuation]:
    """The config a resume of ``run_dir`` trains with, and what it continues from; everything a resume
    refuses (a live run, no checkpoint, a changed config, too few epochs) is refused here, before
    anything is prepared."""
    changed = settable_overrides(settings or [], run_dir)
    opened = open_run(run_dir, checkpoint=None, trust_code=trust_code)
    run_dir = opened.path
    if opened.state == "running":
        raise UserError(f"{run_dir} is {describe_state(opened)}; stop it before resuming it")
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise UserError(f"{run_dir} has no checkpoints/last.pt to resume from (output.checkpoints was false, or it "
                        f"stopped before its first epoch ended); start it again with `cnnlab run {run_dir / 'config.yaml'}`")
    checkpoint = Checkpoint.load(last)
    if checkpoint.state is None:
        raise UserError(f"{last} was written by an older cnnlab without the training state a resume needs; it can "
                        "still be evaluated, but the run must be started again to train further")
    try:
        trained = validate(checkpoint.config, "its config", trust_code)
    except UserError as err:
        raise UserError(f"{last}: the config stored in it is not a valid cnnlab config ({err})") from None
    # config.yaml may differ in what a resume may change: an earlier `resume --set` wrote it, and its session
    # may have ended before its first checkpoint. Each such difference is recorded as a change below.
    differing = [key for key in config_differences(comparable(trained.to_dict()), comparable(opened.cfg.to_dict()))
                 if not resume_settable(key)]
    if differing:
        raise UserError(f"{run_dir / 'config.yaml'} differs from the config its checkpoint was trained with, in "
                        f"{', '.join(differing)}; put config.yaml back as it was, or start a new run with the new config "
                        f"(a resume may change only {', '.join(RESUME_SETTABLE)}, with --set)")

    values = opened.cfg.to_dict()
    for key, value in changed:
        values = set_value(values, key, value)
    if epochs is not None:
        values["train"]["epochs"] = epochs
    if device is not None:
        values["train"]["device"] = device
    if data_root is not None:
        values["data"]["root"] = str(data_root)
    if threads is not None:
        values["train"]["threads"] = threads
    source = f"resuming {run_dir}" + (" with --set " + " ".join(settings) if settings else "")
    cfg = validate(values, source, trust_code=trust_code)

    done, total = checkpoint.epoch, cfg.train.epochs
    if total < done or (total == done and checkpoint.state.get("current") is not None):
        asked = f"--epochs {total}" if epochs is not None else f"train.epochs {total}"
        raise UserError(f"{asked}: the run has already trained {done} epoch(s); give a larger number")
    extending = epochs is not None or any(key == "train.epochs" for key, _ in changed)
    if opened.state == "completed" and (not extending or total <= done):
        raise UserError(f"{run_dir} has completed ({done} epochs"
                        + (", stopped early" if checkpoint.state.get("stopped_early") else "")
                        + f"); to train it further pass --epochs N with N > {done}")
    changes = [{"key": key, "old": old, "new": new, "epoch": done + 1}
               for key, old, new in setting_changes(trained, cfg)]
    return cfg, Continuation(opened, checkpoint, last, done, changes)


@dataclass
class Continuation:
    """A run continued in its own folder from its last checkpoint (``path``), which has trained
    ``done`` epochs; ``changes``: the settings that differ from the checkpoint's, recorded in this
    resume's entry of the summary."""

    opened: OpenedRun
    checkpoint: Checkpoint
    path: Path
    done: int
    changes: list[dict[str, Any]]
    fresh = False  # the checkpoint's weights, not model.weights

    def restore(self, session: Session) -> TrainState:
        check_same_data(session.data, self.opened.summary, self.opened.path)
        state = TrainState()
        session.restore(self.checkpoint, state, self.path)
        if self.opened.state == "completed":  # extended: it trains on, and patience counts afresh
            state.stopped_early, state.patience_start = False, self.done
        return state

    def open(self, session: Session, state: TrainState, reporter: Listener) -> tuple[RunDir, RunSummary]:
        """Lock the folder (refused when another process took it meanwhile), then rewrite its config,
        metrics and summary for the resumed run."""
        run_dir, world = self.opened.path, session.world
        world.barrier()  # under torchrun: every rank has read the folder before rank 0 writes to it
        run = RunDir(run_dir, writer=world.is_main)
        refusal = None
        try:
            run.lock()
            if run.writer and read_summary(run_dir / "summary.json") != self.opened.summary:  # another resume got here first
                run.unlock()
                raise UserError(f"{run_dir} changed while this resume was starting (another process resumed it); "
                                "look at it again before resuming")
        except UserError as err:
            refusal = str(err)
        refusal = world.broadcast(refusal)  # rank 0's verdict, for every rank: none waits for a rank that left
        if refusal is not None:
            raise UserError(refusal)
        return run, self._rewrite(run, session, state, for_rank(reporter, world))

    def _rewrite(self, run: RunDir, session: Session, state: TrainState, reporter: Listener) -> RunSummary:
        """The folder's config, metrics and summary for the resumed run (holding its lock); said in one line."""
        opened, cfg, done, changes = self.opened, session.cfg, self.done, self.changes
        run_dir, summary = run.path, opened.summary
        if cfg != opened.cfg:
            run.write_config(dump_config(cfg))
        run.metrics = state.metrics
        run.write_metrics()  # rows past the checkpoint are redone
        fresh = describe_run(session, run)
        resumed = summary.model_copy(update={k: getattr(fresh, k) for k in (
            "status", "epochs", "device", "device_name", "precision", "threads", "cpus", "torch_version", "git_commit", "pid",
            "host", "data_root", "data")})
        for key in ("error", "stopped_at", "finished", "test_acc", "test_loss", "test_checkpoint", "final", "test_tta",
                    "test_acc_tta", "test_loss_tta", *AVERAGE_FIGURES, "better_weights", "best_val_weights", "selection",
                    "headline"):
            setattr(resumed, key, None)
        at = state.current.batches if state.current is not None else 0
        resumed.resumes = [*summary.resumes, {
            "at": utc_now(), "from_status": opened.state, "from_epoch": done, "from_batch": at, "epochs": cfg.train.epochs,
            "device": str(session.runtime.device), "host": socket.gethostname(), "pid": os.getpid(), "changes": changes,
        }]
        run.write_summary(resumed)
        where = f"epoch {done + 1} of {cfg.train.epochs}" + (f", batch {at}" if at else "") if done < cfg.train.epochs \
            else f"the test, after its last epoch ({done})"
        with_changes = "".join(f", {c['key']} {c['old']} -> {c['new']}" for c in changes)
        reporter.message(f"resuming {run_dir} ({opened.state}) at {where}{with_changes}")
        return resumed


def resume_settable(key: str) -> bool:
    """Whether a resumed run may change the dotted config ``key`` (``RESUME_SETTABLE``)."""
    return key in RESUME_SETTABLE or any(p.endswith(".*") and key.startswith(p[:-1]) for p in RESUME_SETTABLE)


def settable_overrides(settings: list[str], run_dir: Path) -> list[tuple[str, Any]]:
    """``resume --set`` strings as (dotted key, value); a key a resumed run may not change is refused."""
    parsed = []
    for text in settings:
        parts, value = parse_override(text)
        key = ".".join(parts)
        if not resume_settable(key):
            raise UserError(f"--set {key}: a resumed run cannot change {key} (its checkpoint's weights, optimiser state "
                            f"and data belong to the config it was trained with); a resume may change "
                            f"{', '.join(RESUME_SETTABLE)}. To train with another {key}, start a new run: "
                            f"cnnlab run {Path(run_dir) / 'config.yaml'} --set {text}")
        parsed.append((key, value))
    return parsed


def setting_changes(trained: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, value the checkpoint was trained with, value from now on) for each settable key that differs."""
    before, after = trained.to_dict(), cfg.to_dict()
    return [(key, _lookup(before, key), _lookup(after, key))
            for key in config_differences(before, after) if resume_settable(key)]


def _lookup(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def check_same_data(data: Data, summary: RunSummary, run_dir: Path) -> None:
    """Refuse to continue a run on other data than it was trained on (sizes and pixel statistics)."""
    now = {"train_size": len(data.train), "val_size": len(data.val) if data.val is not None else 0,
           "test_size": len(data.test), "pixel_mean": data.mean, "pixel_std": data.std}
    differs = [f"{key} {getattr(summary, key)} then, {value} now" for key, value in now.items()
               if getattr(summary, key) is not None and getattr(summary, key) != value]
    if differs:
        raise UserError(f"the data in {data.root} is not the data {run_dir} was trained on ({'; '.join(differs)}); "
                        f"point --data-dir at the original files (the run used {summary.data_root})")


def find_resumable(cfg: Config) -> Path | None:
    """The newest unfinished run (interrupted, failed, stale) of exactly ``cfg`` whose checkpoint loads."""
    for run_dir, _, state in runs_of(cfg):
        last = run_dir / "checkpoints" / "last.pt"
        if state not in RESUMABLE or not last.is_file():
            continue
        try:
            if Checkpoint.load(last).state is not None:
                return run_dir
        except UserError as err:
            warn(f"{err}; not resuming that run")
    return None


def run_or_resume(cfg: Config, *, quiet: bool = False, reporter: Listener | None = None) -> dict[str, Any]:
    """``cnnlab run CONFIG --resume auto``: continue the newest unfinished run of this config, or start one."""
    world = join_world(cfg)  # under torchrun, rank 0 decides for every rank
    previous = world.broadcast(find_resumable(cfg) if world.is_main else None)
    if previous is None:
        return fit(cfg, quiet=quiet, reporter=reporter)
    return resume(previous, device=cfg.train.device, threads=cfg.train.threads, quiet=quiet, reporter=reporter,
                  trust_code=True)


# ---------------------------------------------------------------------------------------------
# Training, and how it ended

FINAL_FIGURES = ("train_loss", "train_acc", "val_loss", "val_acc", *AVERAGE_COLUMNS)  # summary.json's final, if measured


def train(
    session: Session,
    run: RunDir,
    state: TrainState,
    summary: RunSummary,
    reporter: Listener,
    wall_start: float,
    stop: StopSignals,
) -> dict[str, Any]:
    """The epoch loop from wherever ``state`` stands, then the test; every ending is recorded.

    ``stop`` must be entered (its signal handlers installed) by the caller, before the run's folder
    was made, so that no moment of a run's life is left to the default, unrecorded death by signal.
    """
    cfg, data, runtime, model, optimizer = session.cfg, session.data, session.runtime, session.model, session.optimizer
    world = session.world
    reporter = run_listeners(cfg, world, run, reporter, StartupClock(summary, session.startup))
    reporter.start_run(cfg.name, run.path, cfg.train.epochs, resumed=state.epoch + (state.current is not None) > 0,
                       config=cfg.to_dict())
    wall_before = state.wall_seconds  # time spent in earlier sessions of a resumed run, as its checkpoint says
    run.metrics = state.metrics
    summary.startup_seconds = _rounded(process_age())  # from the command to the first batch (this session's, on resume)
    # What the folder's checkpoint holds: the one this run resumed from, or none yet.
    checkpoints = CheckpointWriter(run, state.state_dict(session.generators) if state.epoch or state.current else None)
    try:
        while state.epoch < cfg.train.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            if state.current is None:
                state.current = EpochProgress(lr=optimizer.param_groups[0]["lr"], order_state=session.order.get_state())
                state.current.to(runtime.device)
            progress = state.current
            session.order.set_state(progress.order_state)  # the epoch's permutation, drawn again on resume
            start_epoch(reporter, epoch, session.steps_per_epoch, progress.batches, optimizer.param_groups[0]["lr"])
            epoch_start = time.perf_counter() - progress.seconds
            if session.static_step is not None:
                train_metrics = session.static_step.train_epoch(progress, reporter, stop)
            else:
                batches = world.shard(data.batches("train", cfg.train.batch_size, shuffle=True, generator=session.order,
                                                   skip=progress.batches, min_last=world.min_last_batch))
                train_metrics = train_one_epoch(session.forward, batches, optimizer, session.scheduler, session.loss_fn,
                                                runtime, cfg.train.grad_clip, reporter, progress=progress, stop=stop,
                                                world=world, mix=data.mix, accumulate=cfg.train.accumulate,
                                                average=session.average)
            if not math.isfinite(train_metrics["loss"]):
                raise TrainingError(
                    f"the training loss diverged ({train_metrics['loss']}) in epoch {epoch}; lower optim.lr "
                    f"(now {cfg.optim.lr}) or set train.grad_clip"
                )
            if session.static_eval is not None:
                val = session.static_eval(stop)
            else:
                val = evaluate(session.forward, world.shard(data.batches(data.eval_split_name, cfg.train.eval_batch_size)),
                               runtime, stop, world)
            row = {
                "epoch": epoch,
                "train_loss": train_metrics["loss"],
                "train_acc": train_metrics["acc"],
                "val_loss": val.loss,
                "val_acc": val.acc,
                "lr": progress.lr,
                "epoch_seconds": time.perf_counter() - epoch_start,
                "train_examples_per_sec": train_metrics["examples"] / max(train_metrics["seconds"], 1e-9),
            }
            if session.average is not None:  # the averaged weights, beside the weights themselves
                # Under torchrun each rank's BatchNorm statistics follow its own shard (unless synced): rank 0's
                # average, the one checkpoints hold, is the one every rank evaluates
                world.broadcast_module(session.average.module)
                averaged = evaluate(session.average.module, world.shard(data.batches(data.eval_split_name,
                                                                                     cfg.train.eval_batch_size)),
                                    runtime, stop, world)
                row["val_loss_ema"], row["val_acc_ema"] = averaged.loss, averaged.acc
            if session.swa is not None and epoch > cfg.train.epochs - cfg.train.swa.epochs:
                if epoch == cfg.train.epochs - cfg.train.swa.epochs + 1:
                    session.swa.updates = 0  # the window's first epoch (again, after a resume with more epochs)
                session.swa.update()  # the weights at the end of one of the last epochs: counted once, like the others
            is_best = epoch_score(row) > state.best_acc  # early stopping's measure: the weights or their average
            if is_best:
                state.best_acc, state.best_epoch = epoch_score(row), epoch
            state.epoch, state.current = epoch, None
            state.train_seconds += train_metrics["seconds"]
            state.train_examples += train_metrics["examples"]
            state.metrics.append(row)  # written to metrics.csv by the run's record, a listener
            bests = best_checkpoints(state.metrics, has_ema=session.average is not None)  # each weight set's own best
            if cfg.train.patience and epoch - max(state.best_epoch, state.patience_start) >= cfg.train.patience:
                state.stopped_early = True
            state.wall_seconds = wall_before + time.perf_counter() - wall_start
            if cfg.output.checkpoints and run.writer:
                checkpoints.save(session.checkpoint(state), *bests, "last")
            reporter.end_epoch(row, is_best=is_best)
            if state.stopped_early:
                reporter.message(f"early stop: no better {data.eval_split_name} accuracy for {cfg.train.patience} epochs")

        checkpoints.flush()
        swa = finish_swa(session, run, state, summary, reporter, checkpoints, stop) if session.swa is not None else None
        average = session.average.module if session.average is not None else None
        summary.selection = select_tested(session, run, state, summary, model, average, swa)
        world.broadcast_module(model)  # the other ranks test the same weights without reading the folder
        if average is not None:
            world.broadcast_module(average)

        def test_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return world.shard(data.batches("test", cfg.train.eval_batch_size))

        test = evaluate(model, test_batches(), runtime, stop, world, confusion=True, num_classes=data.spec.num_classes)
        summary.test_acc, summary.test_loss = test.acc, test.loss
        summary.test_confusion = test.confusion
        if cfg.eval.tta:  # beside the plain figures, never instead of them
            augmented = evaluate(model, test_batches(), runtime, stop, world, tta=cfg.eval.tta)
            summary.test_tta, summary.test_acc_tta, summary.test_loss_tta = list(cfg.eval.tta), augmented.acc, augmented.loss
        for kind, averaged in (("ema", average), ("swa", swa)):  # summary.test_acc_ema, test_loss_swa_tta, ...
            if averaged is None:
                continue
            for tta in ((), cfg.eval.tta) if cfg.eval.tta else ((),):
                tested = evaluate(averaged, test_batches(), runtime, stop, world, tta=tta)
                suffix = "_tta" if tta else ""
                setattr(summary, f"test_acc_{kind}{suffix}", tested.acc)
                setattr(summary, f"test_loss_{kind}{suffix}", tested.loss)
        summary.test_checkpoint = summary.selection.raw.checkpoint
        summary.headline = cfg.headline()
        final = run.metrics[-1]
        summary.status = "completed"
        summary.epochs_completed = state.epoch
        summary.best_epoch, summary.best_val_acc = state.best_epoch, state.best_acc
        summary.final = {k: final[k] for k in FINAL_FIGURES if k in final}
        if average is not None or swa is not None:
            # on the validation split, each set of weights as it was tested; ties go to the weights themselves
            scores = {name: tested.val_acc for name in ("raw", "ema", "swa")
                      if (tested := getattr(summary.selection, name)) is not None and tested.val_acc is not None}
            summary.better_weights = max(scores, key=scores.__getitem__)
        if average is not None:  # whose figure best_val_acc is: the best epoch's weights, or their moving average
            best_row = run.metrics[state.best_epoch - 1]
            summary.best_val_weights = "ema" if best_row["val_acc_ema"] > best_row["val_acc"] else "raw"
        summary.train_examples_per_sec = state.train_examples / max(state.train_seconds, 1e-9)
        summary.train_seconds = state.train_seconds
        summary.stopped_early = state.stopped_early
        summary.finished = utc_now()
        summary.train_step, summary.train_step_note = step_fields(session)
        summary.wall_seconds = wall_before + time.perf_counter() - wall_start
        summary.run_dir = str(run.path)
        reporter.finish(summary, run.path)  # the record first: summary.json, curves.png; then the rest
        world.barrier()  # under torchrun the others wait for rank 0's files, then all leave the group together
        world.leave()
    except BaseException as err:
        with recording_ending(reporter, summary, run, stop):  # a second Ctrl-C waits; then every listener hears
            with RunRecord.guarded(run):  # the epoch's checkpoint still being written: finished first
                checkpoints.flush()
            _record_ending(err, session, run, state, summary, wall_before + time.perf_counter() - wall_start, stop,
                           checkpoints)
        if summary.status == "failed" and isinstance(err, OSError) and _in_folder(err.filename, run.path):
            raise TrainingError(summary.error) from err  # one line naming the file, not an OSError's repr
        raise
    finally:
        checkpoints.close()
        run.unlock()
    return summary.to_dict()


def select_tested(session: Session, run: RunDir, state: TrainState, summary: RunSummary, model: nn.Module,
                  average: nn.Module | None, swa: nn.Module | None) -> Selection:
    """Each set of weights loaded as ``train.select`` says it is tested (the model and the moving average each from
    its own best epoch's checkpoint, or left at the last epoch's), and what was chosen, for summary.json. Under
    torchrun only rank 0 reads the files; the caller shares what it loaded."""
    cfg, rows = session.cfg, state.metrics
    rule = selection_rule(cfg)
    loaded: dict[str, Checkpoint] = {}

    def tested(weights: str, module: nn.Module) -> TestedWeights:
        epoch, name = tested_epoch(rule, rows, weights, cfg.output.checkpoints)
        if name != "last" and run.writer:
            path = run.checkpoint_dir / f"{name}.pt"
            if name == "best_ema" and not path.is_file():  # a run begun before each set had its own best checkpoint
                name, path = "best", run.checkpoint_dir / "best.pt"
            saved = loaded.get(name) or loaded.setdefault(name, Checkpoint.load(path, session.runtime.device))
            module.load_state_dict(saved.ema if weights == "ema" else saved.model)
            epoch = saved.epoch
        score = summary.val_acc_swa if weights == "swa" else rows[epoch - 1].get(COLUMNS[weights])
        return TestedWeights(epoch=epoch, checkpoint=name, val_acc=score)

    return Selection(rule=rule.select, why=rule.why, raw=tested("raw", model),
                     ema=tested("ema", average) if average is not None else None,
                     swa=tested("swa", swa) if swa is not None else None)


def finish_swa(session: Session, run: RunDir, state: TrainState, summary: RunSummary, reporter: Listener,
               checkpoints: CheckpointWriter, stop: StopSignals) -> nn.Module | None:
    """``train.swa`` once training ends: the average's BatchNorm statistics measured over the training images (as
    they are tested: not augmented), saved in the last checkpoint, and its accuracy on the validation split in the
    summary; the average to test, or None when there is none. Again on resume from any point after the last epoch:
    the measurement starts afresh each time."""
    cfg, data, runtime, world, swa = session.cfg, session.data, session.runtime, session.world, session.swa
    summary.swa_epochs = swa.updates
    if not swa.updates:
        reporter.message(f"train.swa: early stopping (train.patience) ended training at epoch {state.epoch}, before "
                         f"epoch {cfg.train.epochs - cfg.train.swa.epochs + 1} where the average of the last "
                         f"{cfg.train.swa.epochs} epochs starts; no average to test")
        return None

    def forward(x: torch.Tensor) -> None:
        with runtime.autocast():
            swa.module(x)
        stop.check()

    # every batch, but a last one too short to give each process two images (BatchNorm trains on no fewer)
    images = (x for x, _ in world.shard(batch for batch in data.batches("train", cfg.train.eval_batch_size)
                                        if len(batch[1]) >= world.min_last_batch))
    if recompute_batchnorm(swa.module, images, forward):
        world.broadcast_module(swa.module)  # under torchrun each rank measured its shard: rank 0's, as saved
        if cfg.output.checkpoints and run.writer:
            checkpoints.save(session.checkpoint(state), "last")
            checkpoints.flush()
    val = evaluate(swa.module, world.shard(data.batches(data.eval_split_name, cfg.train.eval_batch_size)), runtime,
                   stop, world)
    summary.val_acc_swa, summary.val_loss_swa = val.acc, val.loss
    return swa.module


def _record_ending(err: BaseException, session: Session, run: RunDir, state: TrainState, summary: RunSummary,
                   wall_seconds: float, stop: StopSignals, checkpoints: CheckpointWriter) -> None:
    """Write down how a run ended early: status, error, where it stopped; checkpoint a graceful stop.

    The summary says what the folder holds, not what was trained: the epochs of the last checkpoint
    written (after a full disk, maybe fewer than were trained), with metrics.csv cut to match, so
    that summary, metrics and checkpoints agree and a resume continues from there.

    Under torchrun a signal reaches the ranks at different batches, and a rank whose peers left
    sees its collective fail: the run is then ``interrupted`` (by the signal this rank received)
    and continues from the last epoch's checkpoint, the only state every rank agreed on.
    """
    if stop.requested is not None and session.world.distributed and not isinstance(err, (Interrupted, KeyboardInterrupt)):
        err = Interrupted(stop.requested)
    interrupted = isinstance(err, (Interrupted, KeyboardInterrupt))
    summary.status = "pruned" if isinstance(err, Pruned) else "interrupted" if interrupted else "failed"
    summary.error = None if isinstance(err, Pruned) else "interrupted (Ctrl-C)" if isinstance(err, KeyboardInterrupt) \
        else str(err) if isinstance(err, Interrupted) else failure_text(err, run)
    state.wall_seconds = wall_seconds
    if isinstance(err, Interrupted) and state.current is not None and session.cfg.output.checkpoints \
            and not session.world.distributed:
        # Stopped between batches: everything agrees, so resume can continue from this very batch. (Stopped after
        # the last epoch, in the test, last.pt is the last epoch's already, and the model may hold the best's.)
        with RunRecord.guarded(run):
            checkpoints.save(session.checkpoint(state), "last")
            checkpoints.flush()
    rows, resumes_at = _on_disk(session, run, state, checkpoints)
    if run.rows_written != len(rows):  # metrics.csv ran ahead of the checkpoint (or its own write failed)
        run.metrics = rows
        with RunRecord.guarded(run):
            run.write_metrics()
    done = state.current.batches if state.current is not None else 0
    summary.stopped_at = str(err) if isinstance(err, Pruned) else \
        stopped_at(state.epoch, done, session.steps_per_epoch, resumes_at)
    summary.epochs_completed = len(rows)
    if rows:  # the last finished epoch's figures, and the best (the first of equals, as training picks it)
        summary.final = {k: rows[-1][k] for k in FINAL_FIGURES if k in rows[-1]}
        best = max(range(len(rows)), key=lambda i: (epoch_score(rows[i]), -i))
        summary.best_epoch, summary.best_val_acc = int(rows[best]["epoch"]), epoch_score(rows[best])
    summary.finished = utc_now()
    summary.train_step, summary.train_step_note = step_fields(session)
    summary.wall_seconds = wall_seconds


def _on_disk(session: Session, run: RunDir, state: TrainState,
             checkpoints: CheckpointWriter) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """(the metrics rows the folder stands behind, where its checkpoint would resume: (epochs, batches),
    (0, -1) for no checkpoint yet, None for a run that keeps none): those of the last checkpoint written,
    or without checkpoints the rows metrics.csv was last written with."""
    if not session.cfg.output.checkpoints:
        return state.metrics[:run.rows_written], None
    saved = checkpoints.on_disk
    if saved is None:
        return [], (0, -1)
    batches = int(saved["current"]["batches"]) if saved.get("current") else 0
    return list(saved["metrics"]), (len(saved["metrics"]), batches)


def stopped_at(epoch: int, batches: int, steps_per_epoch: int, resumes_at: tuple[int, int] | None) -> str:
    """Where a run stopped (``epoch`` done, ``batches`` into the next) and, where its checkpoint is
    older (torchrun's ranks stop at different batches; a write failed), what a resume will redo.
    ``resumes_at``: (epochs, batches) of the checkpoint; (0, -1) for none; None when it keeps none."""
    where = f"epoch {epoch + 1}, batch {batches} of {steps_per_epoch}" if batches else f"after epoch {epoch}"
    if resumes_at is None or resumes_at == (epoch, batches):
        return where
    if resumes_at == (0, -1):
        return f"{where} (no checkpoint was written to resume from)"
    saved, saved_batches = resumes_at
    if saved_batches:
        return f"{where} (resume continues from its checkpoint: epoch {saved + 1}, batch {saved_batches})"
    last = epoch + 1 if batches else epoch
    redone = f"epoch {last}" if saved + 1 == last else f"epochs {saved + 1}-{last}"
    return f"{where} (resume redoes {redone}: the last checkpoint is from the end of epoch {saved})"


def failure_text(err: BaseException, run: RunDir) -> str:
    """summary.json's error for a failed run; a file of the run that could not be written is named."""
    if isinstance(err, OSError) and _in_folder(err.filename, run.path):  # a full disk, a quota, a file-size limit
        return f"could not write {err.filename}: {err.strerror or type(err).__name__}"
    return f"{type(err).__name__}: {err}"


def _in_folder(filename: Any, folder: Path) -> bool:
    return isinstance(filename, str) and Path(filename).is_relative_to(folder)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


