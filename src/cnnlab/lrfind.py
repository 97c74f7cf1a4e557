"""Usage: ``found = find_lr(load_config("configs/lenet_relu.yaml"))``; ``found.suggestion``; ``write(found, folder)``.

The learning-rate range test (Smith, "Cyclical learning rates", 2017; fastai's and Lightning's
``lr_find``): the configured model, data, optimiser and loss, trained for ``steps`` batches while the
learning rate grows exponentially from ``start`` to ``end`` (``optim.backbone_lr``'s groups keep their
ratio), the loss of every batch recorded and smoothed (a bias-corrected moving average). It stops early
once the smoothed loss passes ``stop_factor`` times its lowest, or is not finite: the rates beyond are
too high. The suggestion is Lightning's: the rate where the smoothed loss falls most steeply per step of
the ramp (so per factor of the rate), the first ``SKIP_START`` batches and the last left out. The model
trained here is thrown away; what is written is the curve (CSV and PNG) and the suggestion as a config
snippet, into a folder of its own (``write``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from cnnlab.config import Config
from cnnlab.errors import UserError
from cnnlab.optim import lr_scales
from cnnlab.results import atomic_write_text
from cnnlab.session import prepare
from cnnlab.steps import train_step
from cnnlab.stopping import StopSignals

SMOOTHING = 0.98  # weight of the past in the moving average of the loss (fastai's and Lightning's)
SKIP_START = 10  # batches left out of the suggestion at the start (the average has not settled)
MIN_STEPS = 2 * SKIP_START


@dataclass(frozen=True)
class RangeTest:
    """What the ramp found: per batch, its learning rate (the first group's), loss and smoothed loss."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    planned: int  # batches the ramp had, had it not stopped early
    stop_factor: float  # it stops once the smoothed loss passes this many times its lowest
    suggestion: float | None  # None when the loss never fell

    @property
    def stopped_early(self) -> bool:
        return len(self.lrs) < self.planned

    @property
    def lowest(self) -> float:
        """The learning rate of the lowest smoothed loss."""
        return self.lrs[min(range(len(self.smoothed)), key=self.smoothed.__getitem__)]


def ramp(start: float, end: float, steps: int) -> list[float]:
    """``steps`` learning rates from ``start`` to ``end``, each the last one times the same factor."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of ``losses`` (the first value is the first loss)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The learning rate where ``smoothed`` falls most steeply (central differences, the first ``SKIP_START``
    points and the last left out); None when it falls nowhere or there are too few points."""
    if len(smoothed) < SKIP_START + 3:
        return None
    slopes = {i: (smoothed[i + 1] - smoothed[i - 1]) / 2 for i in range(SKIP_START, len(smoothed) - 1)}
    steepest = min(slopes, key=slopes.__getitem__)
    return lrs[steepest] if slopes[steepest] < 0 else None


def check_range(steps: int, start: float, end: float) -> None:
    if steps < MIN_STEPS:
        raise UserError(f"--steps {steps}: the range test needs at least {MIN_STEPS} batches (100 is usual)")
    if not (0 < start < end) or not math.isfinite(end):
        raise UserError(f"--start {start:g} --end {end:g}: give 0 < start < end, e.g. --start 1e-6 --end 10")
    # The ramp multiplies start by powers of end/start: a ratio past the largest float is inf, and so is every rate after
    # the first (and one of a tiny start may round to 0)
    if not math.isfinite(end / start) or not all(0 < lr < math.inf for lr in ramp(start, end, steps)):
        raise UserError(f"--start {start:g} --end {end:g}: end/start is too large for a number to hold, so the rates "
                        "between cannot be computed; give a narrower range, e.g. --start 1e-6 --end 10")


def find_lr(cfg: Config, steps: int = 100, start: float = 1e-6, end: float = 10.0, stop_factor: float = 4.0) -> RangeTest:
    """Train ``cfg``'s model for ``steps`` batches on an exponential learning-rate ramp; see the module's text."""
    check_range(steps, start, end)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError("cnnlab lr-find runs in one process; start it without torchrun")
    session = prepare(cfg)
    model, optimizer, runtime = session.forward, session.optimizer, session.runtime
    scales = lr_scales(cfg.optim, len(optimizer.param_groups))
    lrs = ramp(start, end, steps)
    losses: list[float] = []
    batches = _endless(session, cfg.train.batch_size)
    model.train()
    with StopSignals() as stop:  # Ctrl-C, SIGTERM, SIGHUP: stopped after the batch, nothing written
        for lr in lrs:
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale
            x, y = next(batches)
            loss, _ = train_step(model, x, y, optimizer, session.loss_fn, runtime, cfg.train.grad_clip,
                                 mix=session.data.mix, accumulate=cfg.train.accumulate)
            losses.append(float(loss.item()))
            stop.check()
            smoothed = smooth(losses)  # again from the start: a few hundred values at most
            if not math.isfinite(smoothed[-1]) or smoothed[-1] > stop_factor * min(smoothed):
                break
    smoothed = smooth(losses)
    finite = [i for i in range(len(losses)) if math.isfinite(smoothed[i])]
    kept_lrs = [lrs[i] for i in finite]
    kept_smoothed = [smoothed[i] for i in finite]
    if not kept_smoothed:
        raise UserError(f"the loss was not finite from the first batch on (lr {start:g}); check the data and model, "
                        "or give a lower --start")
    return RangeTest(lrs=kept_lrs, losses=[losses[i] for i in finite], smoothed=kept_smoothed, planned=steps,
                     stop_factor=stop_factor, suggestion=suggest(kept_lrs, kept_smoothed))


def _endless(session, batch_size: int):
    """Shuffled training batches, epoch after epoch (the ramp may be longer than an epoch)."""
    while True:
        empty = True
        for batch in session.data.batches("train", batch_size, shuffle=True, generator=session.order):
            empty = False
            yield batch
        if empty:
            raise UserError("the training split holds no batch to train on; give the data more images")


def write(found: RangeTest, folder: Path, name: str) -> None:
    """``lr_find.csv`` (lr, loss, smoothed loss per batch), ``lr_find.png`` and ``suggestion.yaml`` into ``folder``."""
    rows = "".join(f"{lr!r},{loss!r},{avg!r}\n" for lr, loss, avg in zip(found.lrs, found.losses, found.smoothed))
    atomic_write_text(folder / "lr_find.csv", "lr,loss,smoothed_loss\n" + rows)
    from cnnlab.plots import plot_lr_find  # matplotlib is slow to import; only when drawing

    plot_lr_find(found.lrs, found.losses, found.smoothed, found.suggestion, folder / "lr_find.png", title=f"{name}: lr-find")
    if found.suggestion is None:
        text = f"# cnnlab lr-find: {describe(found)}\n"
    else:
        lr = f"{found.suggestion:.3g}"
        text = f"# cnnlab lr-find: the loss fell fastest at this learning rate; use it with --set optim.lr={lr}\n" \
               f"optim:\n  lr: {lr}\n"
    atomic_write_text(folder / "suggestion.yaml", text)


def describe(found: RangeTest) -> str:
    """The result in one line."""
    end = (f"stopped at lr {found.lrs[-1]:.3g} after {len(found.lrs)} of {found.planned} batches: the loss rose past "
           f"{found.stop_factor:g}x its lowest" if found.stopped_early else f"{found.planned} batches")
    if found.suggestion is None and len(found.lrs) < SKIP_START + 3:
        return (f"no suggestion: too few batches before the loss diverged ({end}); give a lower --end or more --steps "
                "(the first 10 batches are not judged)")
    if found.suggestion is None:
        return f"no suggestion: the smoothed loss fell nowhere on the ramp ({end}); try a wider range (--start, --end)"
    return (f"suggested optim.lr: {found.suggestion:.3g} (where the loss fell fastest; its lowest at lr {found.lowest:.3g}; "
            f"{end})")

