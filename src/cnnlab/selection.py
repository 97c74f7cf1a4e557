"""Usage: ``rule = selection_rule(cfg)``; ``improved(rows, "ema")``; ``tested = tested_epochs(rule, rows, ...)``.

Which epoch's weights a run's test pass takes, for each set of weights it tests: the weights themselves
(``raw``), their moving average (``ema``, train.ema) and the average of the last epochs (``swa``, train.swa).

``train.select``:

- ``best``: each set at its own best validation accuracy (the first epoch that reached it), so the weights
  and their average may come from different epochs; ``checkpoints/best.pt`` holds the weights' best epoch,
  ``checkpoints/best_ema.pt`` the average's.
- ``last``: every set at the final epoch (``checkpoints/last.pt``).
- ``auto`` (the default): ``last`` when the learning-rate schedule ends within 1% of zero and nothing stops
  training early (``train.patience``), ``best`` otherwise. A schedule that anneals to zero (one-cycle,
  cosine) settles the weights in its last epochs: picking the maximum of many noisy epochs on a validation
  split of a few thousand images picks a dip's lucky neighbour as often as a real peak, and is biased up by
  a few thousandths (a one-cycle ResNet-9 run measured 0.9248 raw validation accuracy at the epoch its
  average peaked, 0.9506 at its end). A constant or step schedule, or early stopping, does not settle, and
  the best epoch is the better answer there. The average of the last epochs is always the last epoch's.

The rule and what it chose are recorded in summary.json's ``selection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cnnlab.config import Config
from cnnlab.optim import lr_factor

SETTLED = 0.01  # a schedule ending at or below this fraction of optim.lr has settled the weights: test the last epoch
COLUMNS = {"raw": "val_acc", "ema": "val_acc_ema"}  # the validation accuracy each weight set is chosen by
BEST_CHECKPOINTS = {"raw": "best", "ema": "best_ema"}  # checkpoints/<name>.pt: each set's best epoch


@dataclass(frozen=True)
class Rule:
    select: Literal["best", "last"]
    why: str


def selection_rule(cfg: Config) -> Rule:
    """``train.select`` resolved for ``cfg``, and why."""
    if cfg.train.select != "auto":
        return Rule(cfg.train.select, f"train.select: {cfg.train.select}")
    if cfg.train.patience:
        return Rule("best", f"auto: train.patience ({cfg.train.patience}) may stop training before its schedule ends")
    end = lr_factor(cfg.schedule, cfg.train.epochs)(cfg.train.epochs)
    shape = f"the {cfg.schedule.name} schedule ends at {end:.3g} x optim.lr"
    if end <= SETTLED:
        return Rule("last", f"auto: {shape}")
    return Rule("best", f"auto: {shape}")


def best_epoch(rows: list[dict[str, Any]], weights: str) -> int | None:
    """The first epoch (1-based) with the highest validation accuracy of ``weights`` (raw or ema); None without one."""
    column = COLUMNS[weights]
    scored = [(row[column], row["epoch"]) for row in rows if row.get(column) is not None]
    if not scored:
        return None
    top = max(score for score, _ in scored)
    return next(epoch for score, epoch in scored if score == top)


def improved(rows: list[dict[str, Any]], weights: str) -> bool:
    """Whether the newest row is the best epoch of ``weights`` so far (strictly better than every earlier one)."""
    return bool(rows) and rows[-1].get(COLUMNS[weights]) is not None and best_epoch(rows, weights) == rows[-1]["epoch"]


def best_checkpoints(rows: list[dict[str, Any]], has_ema: bool) -> tuple[str, ...]:
    """The best-epoch checkpoints the newest row should be saved as: ``best`` and/or ``best_ema``."""
    return tuple(BEST_CHECKPOINTS[weights] for weights in ("raw", "ema") if (weights == "raw" or has_ema)
                 and improved(rows, weights))


def tested_epoch(rule: Rule, rows: list[dict[str, Any]], weights: str, checkpoints: bool) -> tuple[int, str]:
    """(epoch, checkpoint name) at which ``weights`` are tested. Without checkpoints, only the last epoch's weights
    are there to test."""
    last = rows[-1]["epoch"]
    if weights == "swa" or rule.select == "last" or not checkpoints:
        return last, "last"
    epoch = best_epoch(rows, weights)
    return (last, "last") if epoch is None else (epoch, BEST_CHECKPOINTS[weights])
