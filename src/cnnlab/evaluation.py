"""Usage: ``report = evaluate_run(run_dir, split="test")``: where a trained model goes wrong.

Accuracy and loss on a split, per-class accuracy, the confusion matrix (``confusion.csv``,
``confusion.png``), the most-confused pairs of classes and a grid of misclassified images
(``errors.png``), written to ``<run>/eval/<split>-<checkpoint>/`` with ``eval.json``. With test-time
augmentation (the run's ``eval.tta``, or ``tta``), its accuracy and loss too, beside the plain ones
(which the rest describes).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnlab.config import TTA_NAMES
from cnnlab.data.splits import Split
from cnnlab.errors import UserError
from cnnlab.results import atomic_write_text, check_output_dir
from cnnlab.runs import open_run
from cnnlab.runtime import make_runtime
from cnnlab.steps import evaluate

MAX_ERROR_TILES = 36
BATCH_SIZE = 1024


@dataclass
class EvalReport:
    split: str
    checkpoint: str
    images: int
    accuracy: float
    loss: float
    per_class: dict[str, float]
    confused_pairs: list[tuple[str, str, int]]  # (true, predicted, count), most frequent first
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    folder: str
    weights: str = "raw"  # raw: the weights themselves; ema: their moving average (train.ema); swa: train.swa's
    tta: list[str] | None = None  # the test-time augmentation of the two figures below (eval.tta), if any
    accuracy_tta: float | None = None
    loss_tta: float | None = None
    used: dict[str, Any] = field(default_factory=dict)  # the run, checkpoint, weights and epoch evaluated (OpenedRun.used)


def evaluate_run(run_dir: Path, split: str = "test", checkpoint: str = "auto", trust_code: bool = False,
                 tta: list[str] | None = None, weights: str = "auto") -> EvalReport:
    """``tta``: test-time augmentation reported beside the plain figures (None: the run's own ``eval.tta``);
    ``weights``: ``raw``, ``ema`` (the moving average of a run with ``train.ema``), ``swa`` (``train.swa``) or
    ``auto`` (the run's headline's); ``checkpoint``: best, last or ``auto`` (the one the run tested them at)."""
    if split not in ("test", "val"):
        raise UserError(f"--split {split!r}: choose test or val")
    unknown = sorted(set(tta or ()) - set(TTA_NAMES))
    if unknown:
        raise UserError(f"--tta {unknown[0]}: the test-time augmentations are {' and '.join(TTA_NAMES)}; "
                        f"e.g. --tta {TTA_NAMES[0]}")
    opened = open_run(run_dir, checkpoint=checkpoint, trust_code=trust_code, weights=weights)
    checkpoint, weights = opened.checkpoint, opened.weights
    folder = Path(run_dir) / "eval" / (f"{split}-{checkpoint}" + (f"-{weights}" if weights in ("ema", "swa") else ""))
    check_output_dir(folder, "eval output")
    data = opened.load_data()
    labels = data.split(split).labels
    runtime = make_runtime("cpu", opened.cfg.train.precision, channels_last=False)  # autocast as the run trained
    classes = opened.spec.classes
    result = evaluate(opened.model, data.batches(split, BATCH_SIZE), runtime, confusion=True, predictions=True,
                      num_classes=len(classes))
    preds, matrix = result.predictions, torch.tensor(result.confusion)
    per_class = {name: (matrix[i, i] / matrix[i].sum()).item() for i, name in enumerate(classes) if matrix[i].sum()}
    off = matrix.clone()
    off.fill_diagonal_(0)
    order = torch.argsort(off.flatten(), descending=True)[:5]
    pairs = [(classes[int(i) // len(classes)], classes[int(i) % len(classes)], int(off.flatten()[i]))
             for i in order if off.flatten()[i] > 0]
    report = EvalReport(split, checkpoint, len(labels), result.acc, result.loss, per_class, pairs, result.confusion,
                        str(folder), weights, used=opened.used())
    augment = list(dict.fromkeys(tta if tta is not None else opened.cfg.eval.tta))
    if augment:
        augmented = evaluate(opened.model, data.batches(split, BATCH_SIZE), runtime, tta=augment)
        report.tta, report.accuracy_tta, report.loss_tta = augment, augmented.acc, augmented.loss
    write_outputs(report, folder, data.split(split), labels, preds, classes)
    return report


def write_outputs(report: EvalReport, folder: Path, split: Split, labels: torch.Tensor, preds: torch.Tensor,
                  classes: tuple[str, ...]) -> None:
    from cnnlab.plots import confusion_figure, error_grid_figure, picture, save_figure

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, report.confusion):
        writer.writerow([name, *row])
    atomic_write_text(folder / "confusion.csv", buffer.getvalue())
    atomic_write_text(folder / "eval.json", json.dumps(asdict(report), indent=2) + "\n")

    fig = confusion_figure(report.confusion,
                           f"{report.split} set: accuracy {report.accuracy:.4f} ({report.checkpoint} checkpoint"
                           + (f", {report.weights} weights)" if report.weights != "raw" else ")"), classes)
    save_figure(fig, folder / "confusion.png")

    wrong = (preds != labels).nonzero().flatten()[:MAX_ERROR_TILES].tolist()
    tiles = [(picture(split.window(i, i + 1)[0]), (f"#{i}", classes[int(labels[i])], f"-> {classes[int(preds[i])]}"))
             for i in wrong]
    title = f"first {len(wrong)} misclassified {report.split} images (true -> predicted)" if wrong else \
        f"no misclassified {report.split} images"
    fig = error_grid_figure(tiles, title)
    save_figure(fig, folder / "errors.png")
