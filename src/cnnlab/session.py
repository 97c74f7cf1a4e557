"""Usage: ``session = prepare(load_config("configs/lenet.yaml"))``.

Everything one run trains with, built and checked before its folder exists (``prepare``): the
torchrun group it joins, the runtime, the data, the model (tried on two training images first),
the loss, the optimiser and schedule, and the step it runs: the ordinary one or the static
(CUDA-graph) one of capture.py (``choose_step``). ``Session`` holds them, and writes and reads them
as a checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from cnnlab.averaging import WeightAverage
from cnnlab.capture import StaticEval, StaticStep, graph_kind, why_not
from cnnlab.config import Config
from cnnlab.data import Data, load_data
from cnnlab.distributed import World, current_world, use_sync_batchnorm
from cnnlab.errors import UserError, warn
from cnnlab.modelinfo import countable, flops_per_image
from cnnlab.models.anatomy import select
from cnnlab.models.build import build_model
from cnnlab.models.registry import list_models
from cnnlab.models.weights import WeightsReport, load_weights, stats_for_channels, weights_stats
from cnnlab.optim import follow_config, make_optimizer, make_scheduler
from cnnlab.results import Checkpoint
from cnnlab.runtime import make_runtime, process_age, resolve_device, warm_imports
from cnnlab.state import TrainState
from cnnlab.steps import Trainables
from cnnlab.threads import PROBE_BATCH, PROBE_MIN_WORK, ThreadChoice, choose_threads, probe_if_busy, scratch_step


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


@dataclass(kw_only=True)
class Session(Trainables):
    """Everything one run trains with (``Trainables``: config, runtime, data, model, loss, optimiser,
    schedule, data order, torchrun group) and what it says of itself, built and checked before its folder
    exists."""

    flops: int
    threads: ThreadChoice
    sync_bn: bool = False
    swa: WeightAverage | None = None  # the equal average of the last epochs' weights (train.swa)
    static_step: StaticStep | None = None  # when the step runs over static buffers (train.cuda_graphs)
    static_eval: StaticEval | None = None  # the per-epoch evaluation over static buffers, alongside it
    step_note: str | None = None  # why it does not, when it was asked for
    weights: WeightsReport | None = None  # what model.weights gave the model
    frozen_params: int = 0  # parameters kept as they are (train.freeze)
    startup: dict[str, float | None] = field(default_factory=dict)  # seconds of each stage of the start (StartupRecord)

    @property
    def generators(self) -> dict[str, torch.Generator | None]:
        return {"order": self.order, "augment": self.data.augment_generator,
                "mix": self.data.mix.generator if self.data.mix is not None else None}

    def checkpoint(self, state: TrainState) -> Checkpoint:
        saved = state.state_dict(self.generators)
        if self.average is not None:
            saved["ema_updates"] = self.average.updates
        if self.swa is not None:
            saved["swa_updates"] = self.swa.updates
        return Checkpoint(
            model=self.model.state_dict(),
            ema=self.average.state_dict() if self.average is not None else None,
            swa=self.swa.state_dict() if self.swa is not None else None,
            config=self.cfg.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.runtime.scaler.state_dict() if self.runtime.scaler is not None else None,
            state=saved,
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
            if self.average is not None:
                if checkpoint.ema is None:
                    raise KeyError("ema")
                self.average.load_state_dict(checkpoint.ema, int(checkpoint.state.get("ema_updates", 0)))
            if self.swa is not None:
                if checkpoint.swa is None:
                    raise KeyError("swa")
                self.swa.load_state_dict(checkpoint.swa, int(checkpoint.state.get("swa_updates", 0)))
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


def prepare(cfg: Config, *, pretrained: bool = True) -> Session:
    """Runtime, data, model, loss, optimiser and schedule for ``cfg``. Bad input raises ``UserError``.

    The model gets ``model.weights`` when ``pretrained``; a resumed run's come from its checkpoint instead, so
    it is not asked to read them (the file may be gone).

    Under torchrun this process joins the group here and its model is wrapped in
    DistributedDataParallel (``forward``); ``model`` stays the plain module that checkpoints hold.
    """
    imports, clock = process_age(), time.perf_counter()
    world = join_world(cfg)
    if cfg.output.loggers:
        from cnnlab.loggers import check_loggers

        check_loggers(cfg.output.loggers)
    # PyTorch's FLOP counter and torch.compile import torch._dynamo: in the background while the data is read,
    # for the runs that will need it (the optimisers do not: optim.without_compiler)
    warming = warm_imports() if cfg.train.compile or cfg.model.name not in list_models() else None
    threads = choose_threads(cfg.train.threads)
    runtime = make_runtime(world.device_name(cfg.train.device), cfg.train.precision, cfg.train.channels_last,
                           cfg.train.tf32)
    data = load_data(cfg.data, cfg.seed, runtime.device, channels_last=runtime.channels_last)
    if cfg.data.normalize == "weights":
        data = normalized_for_weights(data, cfg)
    data_seconds, clock = time.perf_counter() - clock, time.perf_counter()
    model = build_model(cfg, runtime.device, spec=data.spec, channels_last=runtime.channels_last)
    weights = load_weights(model, cfg.model.name, cfg.model.weights, download=cfg.model.download) \
        if cfg.model.weights is not None and pretrained else None
    frozen = freeze(model, cfg.train.freeze)
    check_model(model, cfg, data)
    if warming is not None and not countable(model):  # PyTorch's FLOP counter would import torch._dynamo here too
        warming.join()
    flops = flops_per_image(model, data.spec.input_shape)
    model_seconds = time.perf_counter() - clock
    if warming is not None:  # done before anything else of this thread could import torch's modules
        warming.join()
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
    average = WeightAverage(model, ema_decay(cfg, steps_per_epoch)) if cfg.train.ema is not None else None
    session = Session(
        cfg=cfg, runtime=runtime, data=data, model=model, forward=forward, average=average,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing), optimizer=optimizer, scheduler=scheduler,
        steps_per_epoch=steps_per_epoch, order=torch.Generator().manual_seed(cfg.seed), world=world, flops=flops,
        threads=threads, sync_bn=sync_bn, swa=WeightAverage(model) if cfg.train.swa is not None else None,
        weights=weights, frozen_params=frozen,
        startup={"imports": imports, "data": data_seconds, "model": model_seconds},
    )
    work = 3 * flops * steps_per_epoch * cfg.train.batch_size * cfg.train.epochs  # forward and backward, all epochs
    if runtime.device.type == "cpu" and world.is_main:
        session.threads = probe_if_busy(threads, lambda: scratch_step(model, next(data.batches("train", min(
            cfg.train.batch_size, PROBE_BATCH))), session.loss_fn), worth=not flops or work >= PROBE_MIN_WORK)
    choose_step(session)
    return session


def ema_decay(cfg: Config, steps_per_epoch: int) -> float:
    """``train.ema``'s decay per optimiser step; a half-life too short or too long to average anything is bad input."""
    decay = cfg.train.ema.decay_per_step(steps_per_epoch)
    if not 0 < decay < 1:
        raise UserError(f"train.ema.half_life: {cfg.train.ema.half_life} epochs of {steps_per_epoch} optimiser steps "
                        f"leaves a decay of {decay} per step, which averages nothing; give a half-life between "
                        "a few steps and a few hundred epochs (0.5, say)")
    return decay


def normalized_for_weights(data: Data, cfg: Config) -> Data:
    """``data`` normalised by the mean and std of the data ``model.weights`` were trained on (``data.normalize:
    weights``), for its channel count; the description records them, as it records a training split's own."""
    mean, std = stats_for_channels(*weights_stats(cfg.model.name, cfg.model.weights), data.spec.channels)
    return replace(data, spec=data.spec.model_copy(update={"mean": mean, "std": std}))


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Keep the parameters ``train.freeze`` names as they are; how many numbers that keeps. Freezing all is bad input."""
    if not prefixes:
        return 0
    names = set(select(model, prefixes))
    params = dict(model.named_parameters())
    if len(names) == len(params):
        raise UserError(f"train.freeze: {', '.join(prefixes)} covers every parameter of the model, which leaves nothing "
                        "to train; name fewer parts")
    for name in names:
        params[name].requires_grad_(False)
    return sum(params[name].numel() for name in names)


def choose_step(session: Session) -> None:
    """The static (CUDA-graph) steps where ``train.cuda_graphs`` asks for them and the run allows it;
    otherwise the ordinary step, saying why in summary.json (and in one line when asked for by name)."""
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


def join_world(cfg: Config) -> World:
    """This process's torchrun group (a world of one for a plain run), joined for ``cfg``'s device."""
    world = current_world()
    if world.distributed:
        world.check_batch_size(cfg.train.batch_size)
        world.join(resolve_device(world.device_name(cfg.train.device)).type)
    return world
