"""Usage: ``summary = fit(load_config("configs/lenet.yaml"))``.

The one train/evaluate loop every experiment shares: ``fit`` reads as a table of contents (runtime,
data, model, loss, optimiser, schedule, epoch loop, test, summary); ``train_one_epoch`` and
``evaluate`` are plain functions returning dicts. Device, precision and compile are resolved once in
``Runtime``; the hot loop never reads a value back to the host: losses and correct counts add up on
the device and are read once per epoch (and by the progress bar a few times a second at most).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.config import Config, OptimConfig, ScheduleConfig, dump_config
from cnnlab.data import Data, load_data
from cnnlab.distributed import World, current_world, use_sync_batchnorm
from cnnlab.errors import TrainingError, UserError, warn
from cnnlab.events import FanOut
from cnnlab.modelinfo import count_params, flops_per_image
from cnnlab.models.build import build_model
from cnnlab.progress import Reporter, make_reporter
from cnnlab.results import Checkpoint, CheckpointWriter, RunDir, RunSummary, git_commit, utc_now
from cnnlab.state import EpochProgress, TrainState
from cnnlab.stopping import Interrupted, Pruned, StopSignals

# ---------------------------------------------------------------------------------------------
# Runtime: resolved once


@dataclass
class Runtime:
    device: torch.device
    precision: str
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    channels_last: bool = False  # the NHWC layout, resolved for this device
    tf32: bool | None = None  # TF32 for fp32 matmuls and convolutions (CUDA only; None elsewhere)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device.type == "cpu":
            return cpu_name()
        return self.device.type


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device: {name} requested but no CUDA GPU is available; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"train.device: {name} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device: mps requested but Apple's MPS backend is not available; use auto or cpu")
    return device


def make_runtime(device_name: str, precision: str, channels_last: bool | str = "auto", tf32: bool = True) -> Runtime:
    """Device, precision and the device-aware settings, resolved once: ``channels_last`` auto is on for
    the CPU and off elsewhere (measured: it slows LeNet on an H200 by 26%); on CUDA cuDNN picks its
    fastest kernels for the (fixed) batch shapes, and ``tf32`` allows TF32 matmuls and convolutions."""
    device = resolve_device(device_name)
    layout = device.type == "cpu" if channels_last == "auto" else bool(channels_last)
    allow_tf32 = None
    if device.type == "cuda":
        if device.index is not None:  # cuda:N: streams, graphs and allocations default to it from here on
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32 = bool(tf32)
    if precision == "fp32":
        return Runtime(device, precision, contextlib.nullcontext, None, layout, allow_tf32)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None
    return Runtime(device, precision, lambda: torch.autocast(device.type, dtype=dtype), scaler, layout, allow_tf32)


# ---------------------------------------------------------------------------------------------
# Optimiser, schedule


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, epochs: int) -> Callable[[float], float]:
    """The learning rate, as a fraction of ``optim.lr``, at a (fractional) epoch ``t``."""
    warmup = cfg.warmup_epochs
    if cfg.name == "onecycle" and warmup == 0:
        warmup = cfg.pct_start * epochs

    def factor(t: float) -> float:
        if t < warmup:
            return (t + 1e-3) / warmup if warmup else 1.0
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** math.floor(t / cfg.step_size)
        progress = min(1.0, (t - warmup) / max(epochs - warmup, 1e-9))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch, so warm-up and cosine move smoothly within an epoch."""
    factor = lr_factor(cfg, epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step / steps_per_epoch))


def follow_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig) -> None:
    """After loading a checkpoint's optimiser and schedule, which carry the hyperparameters they were
    saved with: ``cfg``'s instead (a resume may change them), the learning rate where the (maybe new)
    schedule puts it at the saved step. Unchanged values give back exactly the saved ones."""
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        if "momentum" in group:  # SGD's; its momentum buffers are kept
            group["momentum"] = cfg.momentum
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)  # what LambdaLR scales from, saved in its state
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ---------------------------------------------------------------------------------------------
# One epoch of training, one evaluation


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    runtime: Runtime,
    grad_clip: float | None = None,
    reporter: Reporter | None = None,
    *,
    progress: EpochProgress | None = None,
    stop: StopSignals | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """Train over ``batches``, adding into ``progress`` (the epoch so far; a fresh one if None).

    ``progress`` is complete after every batch, so when ``stop`` raises between batches it holds
    exactly what a checkpoint needs to continue the epoch later. Under torchrun (``world``) the
    returned figures are summed over every rank's shard.
    """
    model.train()
    progress = progress if progress is not None else EpochProgress().to(runtime.device)
    start = time.perf_counter()
    try:
        for x, y in batches:
            with runtime.autocast():
                logits = model(x)
                loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            if runtime.scaler is not None:
                runtime.scaler.scale(loss).backward()
                runtime.scaler.unscale_(optimizer)
            else:
                loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if runtime.scaler is not None:
                runtime.scaler.step(optimizer)
                runtime.scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            n = len(y)
            progress.loss_sum += loss.detach().float() * n
            progress.correct += (logits.detach().argmax(1) == y).sum()
            progress.seen += n
            progress.batches += 1
            if reporter is not None:
                reporter.advance(progress.loss_sum, progress.correct, progress.seen)
            if stop is not None:
                stop.check()
    finally:
        progress.seconds += time.perf_counter() - start
    loss_sum, correct, seen = _totals(progress.loss_sum, progress.correct, progress.seen, world)  # the one read-back
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "examples": seen, "seconds": progress.seconds}


def _totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, world: World | None) -> tuple[float, int, int]:
    """(loss sum, correct, seen) as numbers, summed over the ranks under torchrun (one collective)."""
    if world is None or not world.distributed:
        return loss_sum.item(), int(correct.item()), seen
    local = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                            device=loss_sum.device)])
    total_loss, total_correct, total_seen = world.sum(local).tolist()
    return total_loss, round(total_correct), round(total_seen)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime,
    stop: StopSignals | None = None,
    world: World | None = None,
    confusion: bool = False,
    num_classes: int = 0,
) -> dict[str, Any]:
    """Mean cross-entropy (without label smoothing) and accuracy over ``batches`` (summed over the
    ranks' shards under torchrun); with ``confusion``, also the ``num_classes`` x ``num_classes``
    confusion matrix (rows: true class, columns: predicted) as a list of lists of counts."""
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    counts = torch.zeros(num_classes ** 2, device=runtime.device, dtype=torch.long) if confusion else None
    seen = 0
    for x, y in batches:
        with runtime.autocast():
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        predicted = logits.argmax(1)
        correct += (predicted == y).sum()
        if counts is not None:
            counts += torch.bincount(y * num_classes + predicted, minlength=num_classes ** 2)
        seen += len(y)
        if stop is not None:
            stop.check()
    loss_total, correct_total, seen = _totals(loss_sum, correct, seen, world)
    result: dict[str, Any] = {"loss": loss_total / max(seen, 1), "acc": correct_total / max(seen, 1)}
    if counts is not None:
        result["confusion"] = (world or World()).sum(counts).view(num_classes, -1).tolist()
    return result


# ---------------------------------------------------------------------------------------------
# Building what a run trains with


def check_model(model: nn.Module, cfg: Config, data: Data) -> None:
    """Run the model on two training images before anything is written: a model that cannot train
    on this data (wrong output shape, an error in its forward pass) is bad input, not a failed run.

    In eval mode and with the random generators put back afterwards, so that the check leaves no
    trace: BatchNorm's running statistics and dropout's random draws are as if it never ran.
    """
    x, _ = next(data.batches("train", 2))
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model.eval()(x)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # user code may even call sys.exit in its forward pass
        raise UserError(
            f"model {cfg.model.name!r} fails on a batch of training images (shape {tuple(x.shape)}): "
            f"{type(err).__name__}: {err}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (len(x), data.spec.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"model {cfg.model.name!r} must return logits of shape (batch, {data.spec.num_classes}); "
            f"for a batch of {len(x)} images it returned {got}"
        )


@dataclass
class Session:
    """Everything one run trains with, built and checked before its folder exists."""

    cfg: Config
    runtime: Runtime
    data: Data
    model: nn.Module
    forward: nn.Module  # the model, or its compiled form
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    order: torch.Generator  # the data order (shuffling) generator
    flops: int
    threads: int
    world: World = field(default_factory=World)
    sync_bn: bool = False
    static_step: Any = None  # capture.StaticStep when the step runs over static buffers (train.cuda_graphs)
    static_eval: Any = None  # capture.StaticEval for the per-epoch evaluation, alongside it
    step_note: str | None = None  # why it does not, when it was asked for

    @property
    def generators(self) -> dict[str, torch.Generator | None]:
        return {"order": self.order, "augment": self.data.augment_generator}

    def checkpoint(self, state: TrainState) -> Checkpoint:
        return Checkpoint(
            model=self.model.state_dict(),
            config=self.cfg.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.runtime.scaler.state_dict() if self.runtime.scaler is not None else None,
            state=state.state_dict(self.generators),
            data=self.data.spec.to_dict(),
        )

    def restore(self, checkpoint: Checkpoint, state: TrainState, path: Path) -> None:
        """Model, optimiser, schedule, scaler and generators as ``checkpoint`` left them."""
        try:
            self.model.load_state_dict(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.scheduler.load_state_dict(checkpoint.scheduler)
            follow_config(self.optimizer, self.scheduler, self.cfg.optim)
            if self.runtime.scaler is not None and checkpoint.scaler:
                self.runtime.scaler.load_state_dict(checkpoint.scaler)
            state.load_state_dict(checkpoint.state, self.generators)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
            raise UserError(f"{path}: does not fit this run's model, optimiser and training state "
                            f"({type(err).__name__}); "
                            "it belongs to another run or was changed") from None
        if state.current is not None:
            if not self.world.is_main:  # the epoch's sums so far are counted once, on rank 0, when summed over ranks
                current = state.current
                current.loss_sum, current.correct, current.seen = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
            if state.current.batches > self.steps_per_epoch:
                raise UserError(f"{path}: says {state.current.batches} batches of an epoch of "
                                f"{self.steps_per_epoch} were done; it belongs to another run or was changed")
            state.current.to(self.runtime.device)


def resolve_threads(threads: int | None) -> int:
    """Apply ``train.threads`` (validated against this machine) and return the count torch will use."""
    if threads:
        cpus = os.cpu_count() or 1
        if threads > cpus:
            raise UserError(f"train.threads: {threads} is more than this machine's {cpus} CPU(s), which only slows "
                            f"training down; use at most {cpus}, or null for torch's default")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def prepare(cfg: Config) -> Session:
    """Runtime, data, model, loss, optimiser and schedule for ``cfg``. Bad input raises ``UserError``.

    Under torchrun this process joins the group here and its model is wrapped in
    DistributedDataParallel (``forward``); ``model`` stays the plain module that checkpoints hold.
    """
    world = join_world(cfg)
    if cfg.output.loggers:
        from cnnlab.loggers import check_loggers

        check_loggers(cfg.output.loggers)
    warming = warm_imports()
    threads = resolve_threads(cfg.train.threads)
    runtime = make_runtime(world.device_name(cfg.train.device), cfg.train.precision, cfg.train.channels_last,
                           cfg.train.tf32)
    data = load_data(cfg.data, cfg.seed, runtime.device, channels_last=runtime.channels_last)
    model = build_model(cfg, runtime.device, spec=data.spec, channels_last=runtime.channels_last)
    check_model(model, cfg, data)
    if warming is not None:
        warming.join()
    flops = flops_per_image(model, data.spec.input_shape)
    model, sync_bn = use_sync_batchnorm(model, cfg.train.sync_bn, world, runtime.device)
    parallel = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        parallel = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    mode = cfg.train.compile if isinstance(cfg.train.compile, str) else None
    forward = torch.compile(parallel, mode=mode) if cfg.train.compile else parallel
    optimizer = make_optimizer(model, cfg.optim)
    steps_per_epoch = data.num_batches("train", cfg.train.batch_size, shuffle=True, min_last=world.min_last_batch)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.train.epochs, steps_per_epoch)
    session = Session(
        cfg, runtime, data, model, forward, nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing), optimizer,
        scheduler, steps_per_epoch, torch.Generator().manual_seed(cfg.seed), flops, threads, world, sync_bn,
    )
    choose_step(session)
    return session


def choose_step(session: Session) -> None:
    """The static (CUDA-graph) steps where ``train.cuda_graphs`` asks for them and the run allows it;
    otherwise the ordinary step, saying why in summary.json (and in one line when asked for by name)."""
    from cnnlab.capture import StaticEval, StaticStep, graph_kind, why_not

    wanted, device = session.cfg.train.cuda_graphs, session.runtime.device
    if wanted is False or (wanted == "auto" and device.type != "cuda"):
        return
    reason = why_not(session)
    if reason is not None:
        session.step_note = f"train.cuda_graphs: off: {reason}"
        if session.world.is_main and wanted != "auto":  # asked for by name: said; by default: in summary.json only
            warn(session.step_note)
        return
    graph = graph_kind(wanted, device)
    session.static_step = StaticStep(session, graph)
    session.static_eval = StaticEval(session, session.data.eval_split_name, graph)


def step_fields(session: Session) -> tuple[str, str | None]:
    """summary.json's train_step and train_step_note: how the steps ran, and why not as asked."""
    static = session.static_step
    if static is None:
        return "ordinary", session.step_note
    notes = [s.fallback for s in (static.step, session.static_eval.step) if s.fallback]
    return static.kind, "; ".join(notes) or session.step_note


def warm_imports() -> threading.Thread | None:
    """Import torch._dynamo in the background while the data is read and the model built: PyTorch's
    FLOP counter and optimisers import it on first use (0.7 s here). The caller joins the thread
    before anything of its own could import it, so two threads never import torch's modules at once."""
    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module("torch._dynamo")

    if "torch._dynamo" in sys.modules:
        return None
    thread = threading.Thread(target=load, name="cnnlab-warm-imports", daemon=True)
    thread.start()
    return thread


def join_world(cfg: Config) -> World:
    """This process's torchrun group (a world of one for a plain run), joined for ``cfg``'s device."""
    world = current_world()
    if world.distributed:
        world.check_batch_size(cfg.train.batch_size)
        world.join(resolve_device(world.device_name(cfg.train.device)).type)
    return world


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
        epochs=cfg.train.epochs,
        eval_split=data.eval_split_name,
        data_root=str(data.root),
        train_size=len(data.train),
        val_size=len(data.val) if data.val is not None else 0,
        test_size=len(data.test),
        pixel_mean=data.mean,
        pixel_std=data.std,
        data=data.spec,
        device=str(runtime.device),
        device_name=runtime.device_name,
        precision=runtime.precision,
        threads=session.threads,
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


# ---------------------------------------------------------------------------------------------
# A whole run


def fit(cfg: Config, *, quiet: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train and test one experiment; returns its summary (also written to ``summary.json``).

    Bad input raises ``UserError`` before the run folder exists. A failure during training is
    recorded in ``summary.json`` (status ``failed`` or ``interrupted``) and re-raised.
    """
    wall_start = time.perf_counter()
    with StopSignals() as stop:
        session = prepare(cfg)
        stop.check()  # asked to stop while setting up: leave before anything is written
        world = session.world
        run = RunDir.create(cfg.output.dir, cfg.name) if world.is_main else None
        path = world.broadcast(str(run.path) if run is not None else None)
        run = run or RunDir(Path(path), writer=False)
        summary = describe_run(session, run)
        open_new_run(run, dump_config(cfg), summary)
        return train(session, run, TrainState(), summary, reporter or make_reporter(quiet=quiet), wall_start, stop)


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


def train(
    session: Session,
    run: RunDir,
    state: TrainState,
    summary: RunSummary,
    reporter: Reporter,
    wall_start: float,
    stop: StopSignals,
) -> dict[str, Any]:
    """The epoch loop from wherever ``state`` stands, then the test; every ending is recorded.

    ``stop`` must be entered (its signal handlers installed) by the caller, before the run's folder
    was made, so that no moment of a run's life is left to the default, unrecorded death by signal.
    """
    cfg, data, runtime, model, optimizer = session.cfg, session.data, session.runtime, session.model, session.optimizer
    world = session.world
    reporter = listeners(session, run, reporter)
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
            reporter.start_epoch(epoch, session.steps_per_epoch, done=progress.batches)
            epoch_start = time.perf_counter() - progress.seconds
            if session.static_step is not None:
                train_metrics = train_epoch_static(session, progress, reporter, stop)
            else:
                batches = world.shard(data.batches("train", cfg.train.batch_size, shuffle=True, generator=session.order,
                                                   skip=progress.batches, min_last=world.min_last_batch))
                train_metrics = train_one_epoch(session.forward, batches, optimizer, session.scheduler, session.loss_fn,
                                                runtime, cfg.train.grad_clip, reporter, progress=progress, stop=stop,
                                                world=world)
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
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "lr": progress.lr,
                "epoch_seconds": time.perf_counter() - epoch_start,
                "train_examples_per_sec": train_metrics["examples"] / max(train_metrics["seconds"], 1e-9),
            }
            is_best = val["acc"] > state.best_acc
            if is_best:
                state.best_acc, state.best_epoch = val["acc"], epoch
            state.epoch, state.current = epoch, None
            state.train_seconds += train_metrics["seconds"]
            state.train_examples += train_metrics["examples"]
            state.metrics.append(row)  # written to metrics.csv by the run's record, a listener
            if cfg.train.patience and epoch - max(state.best_epoch, state.patience_start) >= cfg.train.patience:
                state.stopped_early = True
            state.wall_seconds = wall_before + time.perf_counter() - wall_start
            if cfg.output.checkpoints and run.writer:
                checkpoints.save(session.checkpoint(state), *(("best", "last") if is_best else ("last",)))
            reporter.end_epoch(row, is_best=is_best)
            if state.stopped_early:
                reporter.message(f"early stop: no better {data.eval_split_name} accuracy for {cfg.train.patience} epochs")

        checkpoints.flush()
        if cfg.output.checkpoints:
            if run.writer:
                model.load_state_dict(Checkpoint.load(run.checkpoint_dir / "best.pt", runtime.device).model)
            world.broadcast_module(model)  # the other ranks test the same weights without reading the folder
        test = evaluate(model, world.shard(data.batches("test", cfg.train.eval_batch_size)), runtime, stop, world,
                        confusion=True, num_classes=data.spec.num_classes)
        summary.test_acc, summary.test_loss = test["acc"], test["loss"]
        summary.test_confusion = test["confusion"]
        summary.test_checkpoint = "best" if cfg.output.checkpoints else "last"
        final = run.metrics[-1]
        summary.status = "completed"
        summary.epochs_completed = state.epoch
        summary.best_epoch, summary.best_val_acc = state.best_epoch, state.best_acc
        summary.final = {k: final[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
        summary.train_examples_per_sec = state.train_examples / max(state.train_seconds, 1e-9)
        summary.train_seconds = state.train_seconds
        summary.stopped_early = state.stopped_early
        summary.finished = utc_now()
        summary.train_step, summary.train_step_note = step_fields(session)
        summary.wall_seconds = wall_before + time.perf_counter() - wall_start
        summary.run_dir = str(run.path)
        reporter.finish(summary.to_dict(), run.path)  # the record first: summary.json, curves.png; then the rest
        world.barrier()  # under torchrun the others wait for rank 0's files, then all leave the group together
        world.leave()
    except BaseException as err:
        record = [listener for listener in reporter.listeners if isinstance(listener, RunRecord)]
        with stop.deferred():  # a second Ctrl-C must not leave summary.json saying "running": it waits for this
            with RunRecord.guarded(run):  # the epoch's checkpoint still being written: finished first
                checkpoints.flush()
            _record_ending(err, session, run, state, summary, wall_before + time.perf_counter() - wall_start, stop,
                           checkpoints)
            _tell_ending(record, summary, run)
        _tell_ending([listener for listener in reporter.listeners if listener not in record], summary, run)
        if summary.status == "failed" and isinstance(err, OSError) and _in_folder(err.filename, run.path):
            raise TrainingError(summary.error) from err  # one line naming the file, not an OSError's repr
        raise
    finally:
        checkpoints.close()
        run.unlock()
    return summary.to_dict()


class RunRecord(Reporter):
    """cnnlab's own record of a run as a listener, first among them: metrics.csv after every epoch,
    summary.json and curves.png at the end, however the run ended (the folder and its opening
    summary are made before the run starts, by ``fit`` or ``resume``)."""

    def __init__(self, run: RunDir) -> None:
        super().__init__(enabled=False)
        self.run = run

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self.run.write_metrics()

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.run.write_summary(RunSummary.model_validate(summary))
        if self.run.metrics and summary.get("status") != "pruned":  # a pruned trial's process is about to be ended
            _draw_curves(self.run)

    @staticmethod
    @contextlib.contextmanager
    def guarded(run: RunDir) -> Any:
        try:
            yield
        except Exception as second:
            warn(f"could not record the ending in {run.path}: {type(second).__name__}: {second}")


def listeners(session: Session, run: RunDir, reporter: Reporter) -> FanOut:
    """Everything that hears this run: its record, the console (or a launcher), and the loggers of
    ``output.loggers``; under torchrun, rank 0 alone."""
    if not session.world.is_main:
        return FanOut()
    loggers: list[Reporter] = []
    if session.cfg.output.loggers:
        from cnnlab.loggers import make_loggers

        loggers = make_loggers(session.cfg.to_dict(), run.path)
    return FanOut(RunRecord(run), reporter, *loggers)


def train_epoch_static(session: Session, progress: EpochProgress, reporter: Reporter, stop: StopSignals) -> dict[str, float]:
    """One epoch through the static step: the same permutation ``Data.batches`` draws, its full
    batches replayed (or run eagerly), a last short batch through the ordinary step."""
    cfg, data = session.cfg, session.data
    batch_size, n = cfg.train.batch_size, len(data.train)
    used = data.num_batches("train", batch_size, shuffle=True) * batch_size  # as Data.batches, a short last one counted
    full = min(n, used) // batch_size
    permutation = torch.randperm(n, generator=session.order).to(data.train.images.device)
    session.forward.train()
    start = time.perf_counter()
    try:
        session.static_step.run_epoch(progress, permutation, full, reporter, stop)
    finally:
        progress.seconds += time.perf_counter() - start
    session.order.set_state(progress.order_state)  # the same permutation again, for the short last batch
    rest = data.batches("train", batch_size, shuffle=True, generator=session.order, skip=full) if progress.batches < \
        session.steps_per_epoch else iter(())
    return train_one_epoch(session.forward, rest, session.optimizer, session.scheduler, session.loss_fn, session.runtime,
                           cfg.train.grad_clip, reporter, progress=progress, stop=stop)


def _tell_ending(listeners: list[Reporter], summary: RunSummary, run: RunDir) -> None:
    """Every listener hears the ending, each on its own: a record that cannot be written (the disk is
    full) is said, and the lock still tells that nobody trains; the others still close."""
    for listener in listeners:
        with RunRecord.guarded(run):
            listener.finish(summary.to_dict(), run.path)


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
    if isinstance(err, Interrupted) and session.cfg.output.checkpoints and not session.world.distributed:
        # Stopped between batches: everything agrees, so resume can continue from this very batch.
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
        summary.final = {k: rows[-1][k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
        best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -i))
        summary.best_epoch, summary.best_val_acc = int(rows[best]["epoch"]), rows[best]["val_acc"]
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


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up included), from /proc where there is one."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat, open("/proc/uptime", encoding="ascii") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return max(0.0, float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def for_rank(reporter: Reporter, world: World) -> Reporter:
    """Under torchrun only rank 0 reports (prints, tells a launcher); the others train in silence."""
    return reporter if world.is_main else Reporter(enabled=False)


def _draw_curves(run: RunDir) -> None:
    if not run.writer:
        return
    from cnnlab.plots import plot_curves  # matplotlib is slow to import; only load it when drawing

    plot_curves(run.path / "metrics.csv", run.path / "curves.png")
