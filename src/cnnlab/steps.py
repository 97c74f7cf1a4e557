"""Usage: ``figures = train_one_epoch(model, batches, optimizer, scheduler, loss_fn, runtime)``;
``result = evaluate(model, batches, runtime, confusion=True, num_classes=10)``.

The ordinary training step and the one evaluation loop, plain functions over batches. The hot loop
never reads a value back to the host: losses and correct counts add up on the device and are read
once per epoch (``totals``; and by the progress bar a few times a second at most). ``evaluate``
serves the per-epoch validation, the test pass (with the confusion matrix) and ``cnnlab eval``
(with each example's predicted class as well). The per-batch bookkeeping (``add_train_batch``,
``batch_done``, ``add_eval_batch``) is shared with the static steps of capture.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cnnlab.averaging import WeightAverage
from cnnlab.config import Config
from cnnlab.data import Data
from cnnlab.distributed import World
from cnnlab.listeners import Listener
from cnnlab.runtime import Runtime
from cnnlab.state import EpochProgress
from cnnlab.stopping import StopSignals


@dataclass(kw_only=True)
class Trainables:
    """What a run's steps train with, built by ``session.prepare`` (whose ``Session`` adds the rest): the
    ordinary step takes its parts as arguments, the static steps of capture.py take this whole."""

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
    world: World = field(default_factory=World)
    average: WeightAverage | None = None  # the moving average of the weights (train.ema)


# ---------------------------------------------------------------------------------------------
# One batch's figures, shared by the ordinary and the static steps


def add_train_batch(loss_sum: torch.Tensor, correct: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor,
                    y: torch.Tensor, n: int) -> None:
    """Add a training batch of ``n`` examples into the running sums, in place (the static step's sums
    are buffers a graph writes)."""
    loss_sum += loss.detach().float() * n
    correct += (logits.detach().argmax(1) == y).sum()


def batch_done(progress: EpochProgress, n: int, reporter: Listener | None, stop: StopSignals | None) -> None:
    """Count a trained batch of ``n`` examples into ``progress`` (its sums hold it already), show it, and
    stop here if asked: between batches, where ``progress`` is all a checkpoint needs."""
    progress.seen += n
    progress.batches += 1
    if reporter is not None:
        reporter.advance(progress.loss_sum, progress.correct, progress.seen)
    if stop is not None:
        stop.check()


def add_eval_batch(loss_sum: torch.Tensor, correct: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Add an evaluated batch's summed cross-entropy (without label smoothing) and correct count into
    the running sums, in place; returns the predicted classes."""
    loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
    predicted = logits.argmax(1)
    correct += (predicted == y).sum()
    return predicted


def totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, world: World | None) -> tuple[float, int, int]:
    """(loss sum, correct, seen) as numbers, summed over the ranks under torchrun (one collective)."""
    if world is None or not world.distributed:
        return loss_sum.item(), int(correct.item()), seen
    local = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                            device=loss_sum.device)])
    total_loss, total_correct, total_seen = world.sum(local).tolist()
    return total_loss, round(total_correct), round(total_seen)


# ---------------------------------------------------------------------------------------------
# One epoch of training


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    runtime: Runtime,
    grad_clip: float | None = None,
    *,
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    accumulate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch: the forward pass and loss under the runtime's autocast, the backward pass
    (scaled under fp16's gradient scaler), optional clipping of the global gradient norm, the update.
    Returns (loss, logits), still on the device. The learning-rate schedule is the caller's.

    ``mix`` (``data.augment.mixup``/``cutmix``) turns the batch and its labels into mixed images and target
    probabilities, which the loss takes. ``accumulate`` (``train.accumulate``) runs the forward and backward
    passes in that many parts of the batch, each part's mean loss weighted by its share of the batch, so
    that the gradients add up to the whole batch's (one collective under torchrun, with the last part)."""
    target = y
    if mix is not None:
        x, target = mix(x, y)
    optimizer.zero_grad(set_to_none=True)
    if accumulate == 1:
        with runtime.autocast():
            logits = model(x)
            loss = loss_fn(logits, target)
        _backward(loss, runtime)
    else:
        losses, outputs = [], []
        parts = batch_parts(len(x), accumulate)
        for i, (xs, targets) in enumerate(zip(x.split(parts), target.split(parts))):
            with _no_sync(model, last=i == len(parts) - 1), runtime.autocast():
                part_logits = model(xs)
                part_loss = loss_fn(part_logits, targets) * (len(xs) / len(x))
            _backward(part_loss, runtime)
            losses.append(part_loss.detach())
            outputs.append(part_logits.detach())
        loss, logits = torch.stack(losses).sum(), torch.cat(outputs)
    if runtime.scaler is not None:
        runtime.scaler.unscale_(optimizer)
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if runtime.scaler is not None:
        runtime.scaler.step(optimizer)
        runtime.scaler.update()
    else:
        optimizer.step()
    return loss, logits


def _backward(loss: torch.Tensor, runtime: Runtime) -> None:
    if runtime.scaler is not None:
        runtime.scaler.scale(loss).backward()
    else:
        loss.backward()


def batch_parts(n: int, accumulate: int) -> list[int]:
    """The sizes of the parts a batch of ``n`` is trained in under ``train.accumulate``: as equal as can be, at
    most ``accumulate`` of them, none of a single image (BatchNorm cannot train on one) unless ``n`` is 1."""
    size = min(max(-(-n // accumulate), 2), n)
    parts = [size] * (n // size) + ([n % size] if n % size else [])
    if len(parts) > 1 and parts[-1] == 1:
        parts[-2:] = [parts[-2] + 1]
    return parts


def _no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Under torchrun, a part's gradients kept on this rank until the batch's last part (DDP's ``no_sync``)."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None and not last else contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    runtime: Runtime,
    grad_clip: float | None = None,
    reporter: Listener | None = None,
    *,
    progress: EpochProgress | None = None,
    stop: StopSignals | None = None,
    world: World | None = None,
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    accumulate: int = 1,
    average: WeightAverage | None = None,
) -> dict[str, float]:
    """Train over ``batches``, adding into ``progress`` (the epoch so far; a fresh one if None).

    ``progress`` is complete after every batch, so when ``stop`` raises between batches it holds
    exactly what a checkpoint needs to continue the epoch later. Under torchrun (``world``) the
    returned figures are summed over every rank's shard. ``mix`` and ``accumulate``: as ``train_step``;
    ``average`` (``train.ema``) is updated after every optimiser step. The training accuracy counts each
    image's own label, mixed or not.
    """
    model.train()
    progress = progress if progress is not None else EpochProgress().to(runtime.device)
    start = time.perf_counter()
    try:
        for x, y in batches:
            loss, logits = train_step(model, x, y, optimizer, loss_fn, runtime, grad_clip, mix=mix, accumulate=accumulate)
            scheduler.step()
            if average is not None:
                average.update()
            add_train_batch(progress.loss_sum, progress.correct, loss, logits, y, len(y))
            batch_done(progress, len(y), reporter, stop)
    finally:
        progress.seconds += time.perf_counter() - start
    loss_sum, correct, seen = totals(progress.loss_sum, progress.correct, progress.seen, world)  # the one read-back
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "examples": seen, "seconds": progress.seconds}


# ---------------------------------------------------------------------------------------------
# The evaluation loop


@dataclass
class Evaluation:
    """What ``evaluate`` found: mean cross-entropy (without label smoothing), accuracy, the examples
    seen; where asked for, the confusion matrix (rows: true class, columns: predicted, as counts) and
    each example's predicted class (this process's examples, in the order of its batches)."""

    loss: float
    acc: float
    examples: int
    confusion: list[list[int]] | None = None
    predictions: torch.Tensor | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime,
    stop: StopSignals | None = None,
    world: World | None = None,
    *,
    confusion: bool = False,
    predictions: bool = False,
    num_classes: int | None = None,
    tta: Sequence[str] = (),
) -> Evaluation:
    """Evaluate ``model`` over ``batches`` under the runtime's autocast, as it trained (summed over the
    ranks' shards under torchrun). ``confusion`` needs ``num_classes``, the data's number of classes.
    ``tta`` (``eval.tta``): each image's logits are the mean of those of its views (``tta_views``), the loss
    and accuracy taken from those."""
    if confusion and num_classes is None:
        raise ValueError("evaluate(confusion=True) needs num_classes")
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    counts = torch.zeros(num_classes ** 2, device=runtime.device, dtype=torch.long) if confusion else None
    predicted_batches: list[torch.Tensor] = []
    seen = 0
    for x, y in batches:
        with runtime.autocast():
            if tta:
                views = tta_views(x, tta)
                logits = model(views[0]).float()
                for view in views[1:]:
                    logits = logits + model(view).float()
                logits = logits / len(views)
            else:
                logits = model(x)
        predicted = add_eval_batch(loss_sum, correct, logits, y)
        if counts is not None:
            counts += torch.bincount(y * num_classes + predicted, minlength=num_classes ** 2)
        if predictions:
            predicted_batches.append(predicted)
        seen += len(y)
        if stop is not None:
            stop.check()
    loss_total, correct_total, seen = totals(loss_sum, correct, seen, world)
    result = Evaluation(loss_total / max(seen, 1), correct_total / max(seen, 1), seen)
    if counts is not None:
        result.confusion = (world or World()).sum(counts).view(num_classes, -1).tolist()
    if predictions:
        result.predictions = torch.cat(predicted_batches) if predicted_batches else \
            torch.zeros(0, dtype=torch.long, device=runtime.device)
    return result


def tta_views(x: torch.Tensor, tta: Sequence[str]) -> list[torch.Tensor]:
    """The views of a batch that test-time augmentation ``tta`` averages over: the batch itself; with ``"crop"``
    also shifted by one pixel up-left and down-right (zero-filled, as a random crop of a padded image);
    with ``"flip"`` each of those and its mirror image (left-right)."""
    views = [x, shifted(x, -1), shifted(x, 1)] if "crop" in tta else [x]
    return [*views, *(view.flip(-1) for view in views)] if "flip" in tta else views


def shifted(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x`` (N, C, H, W) moved ``d`` pixels down and right (up and left for negative ``d``), zero-filled."""
    p = abs(d)
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (p, p, p, p))
    return padded[..., p - d:p - d + h, p - d:p - d + w]
