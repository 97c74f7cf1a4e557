"""Usage: ``state = TrainState()``; ``ckpt["state"] = state.state_dict()``; ``state.load_state_dict(ckpt["state"])``.

Everything the epoch loop knows that is not a module, optimiser or scheduler: how far it got (epochs
done, batches done in the epoch under way and that epoch's running sums), the best accuracy so far,
the timers, the metrics rows, and the state of every random generator that decides what comes next
(Python's, torch's global CPU and CUDA generators, the data-order and augmentation generators).
Saved in every checkpoint, so a resumed run draws the same batches and the same dropout masks as an
uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EpochProgress:
    """The epoch under way: batches done and its running sums (on the training device)."""

    batches: int = 0
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    seen: int = 0
    seconds: float = 0.0
    lr: float | None = None  # the learning rate the epoch started with (the metrics row reports it)
    order_state: torch.Tensor | None = None  # the data-order generator before this epoch's permutation

    def to(self, device: torch.device) -> EpochProgress:
        self.loss_sum = self.loss_sum.to(device)
        self.correct = self.correct.to(device)
        return self


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_acc: float = -1.0  # best validation accuracy so far, of the weights or their average (epoch_score; -1: none yet)
    best_epoch: int = 0
    train_seconds: float = 0.0  # time spent in training steps, completed epochs
    train_examples: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv, a row per completed epoch
    current: EpochProgress | None = None  # the epoch under way, when a run stopped inside it
    stopped_early: bool = False
    patience_start: int = 0  # early-stopping patience counts from here or the best epoch (an extended run resets it)
    wall_seconds: float = 0.0  # wall time of the run up to this state, every session of it together

    def state_dict(self, generators: dict[str, torch.Generator | None]) -> dict[str, Any]:
        current = None
        if self.current is not None:
            c = self.current
            current = {"batches": c.batches, "loss_sum": c.loss_sum.detach().cpu(), "correct": c.correct.detach().cpu(),
                       "seen": c.seen, "seconds": c.seconds, "lr": c.lr, "order_state": c.order_state}
        return {
            "epoch": self.epoch,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds,
            "train_examples": self.train_examples,
            "metrics": [dict(row) for row in self.metrics],
            "current": current,
            "stopped_early": self.stopped_early,
            "patience_start": self.patience_start,
            "wall_seconds": self.wall_seconds,
            "rng": capture_rng(generators),
        }

    def load_state_dict(self, state: dict[str, Any], generators: dict[str, torch.Generator | None]) -> None:
        """Restore from ``state_dict()`` output (from a checkpoint file: ``check_state_dict`` it first)."""
        self.epoch = int(state["epoch"])
        self.best_acc = float(state["best_acc"])
        self.best_epoch = int(state["best_epoch"])
        self.train_seconds = float(state["train_seconds"])
        self.train_examples = int(state["train_examples"])
        self.metrics = [dict(row) for row in state["metrics"]]
        self.stopped_early = bool(state.get("stopped_early", False))
        self.patience_start = int(state.get("patience_start", 0))
        self.wall_seconds = float(state.get("wall_seconds", 0.0))
        current = state.get("current")
        self.current = None if current is None else EpochProgress(
            batches=int(current["batches"]), loss_sum=current["loss_sum"], correct=current["correct"],
            seen=int(current["seen"]), seconds=float(current["seconds"]), lr=current["lr"],
            order_state=current["order_state"],
        )
        restore_rng(state["rng"], generators)


# A metrics row's keys, in the order of metrics.csv's columns (results.py writes them).
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                  "train_examples_per_sec")


# Columns a run adds when it has what they measure: train.ema's averaged weights on the validation split.
AVERAGE_COLUMNS = ("val_loss_ema", "val_acc_ema")


def epoch_score(row: dict[str, Any]) -> float:
    """What the best epoch is chosen by: the validation accuracy of the weights, or of their moving average
    (train.ema) where that is higher."""
    return max(row["val_acc"], row.get("val_acc_ema", row["val_acc"]))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_state_dict(state: Any) -> None:
    """A checkpoint's training state, checked field by field: a checkpoint may come from anyone."""
    if not isinstance(state, dict):
        raise ValueError("its training state is not a mapping")
    for key in ("epoch", "best_epoch", "train_examples"):
        if not _count(state.get(key)):
            raise ValueError(f"state.{key} is not a count")
    if not _number(state.get("best_acc")) or not -1 <= state["best_acc"] <= 1:
        raise ValueError("state.best_acc is not an accuracy")
    if not _number(state.get("train_seconds")) or state["train_seconds"] < 0:
        raise ValueError("state.train_seconds is not a duration")
    for key in ("ema_updates", "swa_updates"):
        if not _count(state.get(key, 0)):
            raise ValueError(f"state.{key} is not a count")
    if not _count(state.get("patience_start", 0)) or not _number(state.get("wall_seconds", 0.0)):
        raise ValueError("state.patience_start or state.wall_seconds is not a number")
    if state["best_epoch"] > state["epoch"]:
        raise ValueError("state.best_epoch is after state.epoch")
    metrics = state.get("metrics")
    if not isinstance(metrics, list) or len(metrics) != state["epoch"]:
        raise ValueError("state.metrics does not hold one row per completed epoch")
    for i, row in enumerate(metrics, start=1):
        if not isinstance(row, dict) or not all(_number(row.get(k)) for k in METRIC_COLUMNS) or row["epoch"] != i \
                or not all(_number(row[k]) for k in AVERAGE_COLUMNS if k in row):
            raise ValueError(f"state.metrics row {i} is not a metrics row of epoch {i}")
    current = state.get("current")
    if current is not None:
        if not isinstance(current, dict):
            raise ValueError("state.current is not a mapping")
        for key in ("batches", "seen"):
            if not _count(current.get(key)):
                raise ValueError(f"state.current.{key} is not a count")
        for key in ("loss_sum", "correct", "order_state"):
            if not isinstance(current.get(key), torch.Tensor):
                raise ValueError(f"state.current.{key} is not a tensor")
        if current["loss_sum"].numel() != 1 or current["correct"].numel() != 1:
            raise ValueError("state.current's running sums are not single numbers")
        if not _number(current.get("seconds")) or not (current.get("lr") is None or _number(current["lr"])):
            raise ValueError("state.current.seconds or .lr is not a number")
    rng = state.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) \
            or not isinstance(rng.get("generators"), dict) or not isinstance(rng.get("python"), list):
        raise ValueError("state.rng does not hold the generator states")


def capture_rng(generators: dict[str, torch.Generator | None]) -> dict[str, Any]:
    """Every generator's state: Python's ``random``, torch's global CPU (and CUDA) ones, and ``generators``."""
    python_state = random.getstate()
    return {
        # Python's state as plain lists and ints, which weights_only loading accepts.
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "generators": {name: g.get_state() for name, g in generators.items() if g is not None},
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator | None]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        if generator is not None and name in state["generators"]:
            generator.set_state(state["generators"][name])
