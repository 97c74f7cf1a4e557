"""Usage: ``summary = fit(load_config("configs/lenet.yaml"))``.

The one train/evaluate loop every experiment shares: ``fit`` reads as a table of contents (runtime,
data, model, loss, optimiser, schedule, epoch loop, test, summary); ``train_one_epoch`` and
``evaluate`` are plain functions returning dicts. Device, precision and compile are resolved once in
``Runtime``; the hot loop never reads a value back to the host: losses and correct counts add up on
the device and are read once per epoch (and by the progress bar a few times a second at most).
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.config import Config, OptimConfig, ScheduleConfig, dump_config, load_config
from cnnlab.data import Data, load_data
from cnnlab.errors import TrainingError, UserError
from cnnlab.modelinfo import count_params, flops_per_image
from cnnlab.models import get_model
from cnnlab.progress import Reporter, make_reporter
from cnnlab.results import RunDir, git_commit, load_checkpoint, utc_now

# ---------------------------------------------------------------------------------------------
# Runtime: resolved once


@dataclass
class Runtime:
    device: torch.device
    precision: str
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None

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


def make_runtime(device_name: str, precision: str) -> Runtime:
    device = resolve_device(device_name)
    if precision == "fp32":
        return Runtime(device, precision, contextlib.nullcontext, None)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None
    return Runtime(device, precision, lambda: torch.autocast(device.type, dtype=dtype), scaler)


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def init_weights(model: nn.Module, scheme: str) -> None:
    """``xavier_uniform`` (the report) or ``kaiming`` on every Conv2d/Linear weight; biases untouched."""
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")


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
) -> dict[str, float]:
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
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
        loss_sum += loss.detach().float() * n
        correct += (logits.detach().argmax(1) == y).sum()
        seen += n
        if reporter is not None:
            reporter.advance(loss_sum, correct, seen)
    total_loss, total_correct = loss_sum.item(), correct.item()  # the epoch's one read-back
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "acc": total_correct / max(seen, 1),
        "examples": seen,
        "seconds": seconds,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime
) -> dict[str, float]:
    """Mean cross-entropy (without label smoothing) and accuracy over ``batches``."""
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        with runtime.autocast():
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1)}


# ---------------------------------------------------------------------------------------------
# A whole run


def build_model(cfg: Config, runtime: Runtime | None = None) -> nn.Module:
    """The configured model with the configured initial weights (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model.name, **cfg.model.kwargs)
    init_weights(model, cfg.init)
    if runtime is not None:
        model = model.to(runtime.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
    return model


def load_trained(run_dir: Path, checkpoint: str = "best", device: str = "cpu") -> tuple[Config, nn.Module]:
    """The config and the trained model of a finished run, in eval mode (weights loaded safely)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a cnnlab run folder (no config.yaml)")
    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint {checkpoint!r}: choose best or last")
    cfg = load_config(run_dir / "config.yaml")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{path} is missing: the run wrote no checkpoints (output.checkpoints: false) or did not finish an epoch")
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(path)["model"])
    return cfg, model.to(device).eval()


def checkpoint_state(model: nn.Module, optimizer, scheduler, epoch: int, cfg: Config, metrics: dict) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "config": cfg.to_dict(),
        "torch_version": str(torch.__version__),
    }


def describe_run(
    cfg: Config, run: RunDir, data: Data, model: nn.Module, runtime: Runtime, flops: int
) -> dict[str, Any]:
    """The summary.json of a run that has just started: what is trained, on what, where."""
    return {
        "status": "running",
        "name": cfg.name,
        "run_id": run.run_id,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "params": count_params(model),
        "flops_per_image": flops,
        "epochs": cfg.train.epochs,
        "eval_split": data.eval_split_name,
        "data_root": str(data.root),
        "train_size": len(data.train),
        "val_size": len(data.val) if data.val is not None else 0,
        "test_size": len(data.test),
        "device": str(runtime.device),
        "device_name": runtime.device_name,
        "precision": runtime.precision,
        "torch_version": str(torch.__version__),
        "git_commit": git_commit(),
        "started": utc_now(),
    }


def fit(cfg: Config, *, quiet: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train and test one experiment; returns its summary (also written to ``summary.json``).

    Bad input raises ``UserError`` before the run folder exists. A failure during training is
    recorded in ``summary.json`` (status ``failed`` or ``interrupted``) and re-raised.
    """
    wall_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    runtime = make_runtime(cfg.train.device, cfg.train.precision)
    data = load_data(cfg.data, cfg.seed, runtime.device, channels_last=cfg.train.channels_last)
    model = build_model(cfg, runtime)
    flops = flops_per_image(model)  # before the run folder exists: a model that cannot run fails here
    forward = torch.compile(model) if cfg.train.compile else model
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    optimizer = make_optimizer(model, cfg.optim)
    steps_per_epoch = data.num_batches("train", cfg.train.batch_size)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.train.epochs, steps_per_epoch)
    order = torch.Generator().manual_seed(cfg.seed)

    run = RunDir.create(cfg.output.dir, cfg.name)
    run.write_config(dump_config(cfg))
    summary = describe_run(cfg, run, data, model, runtime, flops)
    run.write_summary(summary)
    reporter = reporter or make_reporter(quiet=quiet)
    reporter.start_run(cfg.name, run.path, cfg.train.epochs)

    best_acc, best_epoch, epochs_done = -1.0, 0, 0
    train_seconds, train_examples = 0.0, 0
    try:
        for epoch in range(1, cfg.train.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            reporter.start_epoch(epoch, steps_per_epoch)
            epoch_start = time.perf_counter()
            train = train_one_epoch(
                forward,
                data.batches("train", cfg.train.batch_size, shuffle=True, generator=order),
                optimizer,
                scheduler,
                loss_fn,
                runtime,
                cfg.train.grad_clip,
                reporter,
            )
            if not math.isfinite(train["loss"]):
                raise TrainingError(
                    f"the training loss diverged ({train['loss']}) in epoch {epoch}; lower optim.lr "
                    f"(now {cfg.optim.lr}) or set train.grad_clip"
                )
            val = evaluate(forward, data.batches(data.eval_split_name, cfg.train.eval_batch_size), runtime)
            row = {
                "epoch": epoch,
                "train_loss": train["loss"],
                "train_acc": train["acc"],
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "lr": lr,
                "epoch_seconds": time.perf_counter() - epoch_start,
                "train_examples_per_sec": train["examples"] / train["seconds"],
            }
            run.append_metrics(row)
            train_seconds += train["seconds"]
            train_examples += train["examples"]
            epochs_done = epoch
            if cfg.output.checkpoints:
                state = checkpoint_state(model, optimizer, scheduler, epoch, cfg, row)
                if val["acc"] > best_acc:
                    run.save_checkpoint("best", state)
                run.save_checkpoint("last", state)
            if val["acc"] > best_acc:
                best_acc, best_epoch = val["acc"], epoch
            reporter.end_epoch(row, is_best=best_epoch == epoch)
            if cfg.train.patience and epoch - best_epoch >= cfg.train.patience:
                reporter.message(f"early stop: no better {data.eval_split_name} accuracy for {cfg.train.patience} epochs")
                summary["stopped_early"] = True
                break

        if cfg.output.checkpoints:
            model.load_state_dict(load_checkpoint(run.checkpoint_dir / "best.pt", runtime.device)["model"])
        test = evaluate(model, data.batches("test", cfg.train.eval_batch_size), runtime)
    except BaseException as err:
        summary.update(
            status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
            error=f"{type(err).__name__}: {err}",
            epochs_completed=epochs_done,
            finished=utc_now(),
            wall_seconds=time.perf_counter() - wall_start,
        )
        run.write_summary(summary)
        if run.metrics:
            _draw_curves(run)
        reporter.finish(summary, run.path)
        raise

    final = run.metrics[-1]
    summary.update(
        status="completed",
        epochs_completed=epochs_done,
        best_epoch=best_epoch,
        best_val_acc=best_acc,
        final={k: final[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
        test_acc=test["acc"],
        test_loss=test["loss"],
        test_checkpoint="best" if cfg.output.checkpoints else "last",
        train_examples_per_sec=train_examples / train_seconds,
        train_seconds=train_seconds,
        finished=utc_now(),
        wall_seconds=time.perf_counter() - wall_start,
        run_dir=str(run.path),
    )
    summary.setdefault("stopped_early", False)
    _draw_curves(run)
    run.write_summary(summary)
    reporter.finish(summary, run.path)
    return summary


def _draw_curves(run: RunDir) -> None:
    from cnnlab.plots import plot_curves  # matplotlib is slow to import; only load it when drawing

    plot_curves(run.path / "metrics.csv", run.path / "curves.png")
