"""Usage: ``plot_curves(run / "metrics.csv", run / "curves.png")``: figures drawn from result files.

Plots read the files a run wrote, never live training state, so they can be redrawn for old runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
matplotlib.rcParams["text.parse_math"] = False  # run names are printed literally: '$x$' is not a formula
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from cnnlab.console import printable
from cnnlab.errors import UserError, warn
from cnnlab.numtext import finite
from cnnlab.results import atomic_write, read_metrics_csv


def save_figure(fig, out: Path, tight: bool = True) -> Path:
    """Write ``fig`` to ``out`` as PNG, atomically, and free it."""
    try:
        if tight:
            fig.tight_layout()
        atomic_write(out, lambda f: fig.savefig(f, format="png", bbox_inches="tight" if not tight else None))
    finally:
        plt.close(fig)
    return out


def plot_curves(metrics_csv: Path, out: Path, title: str | None = None) -> Path:
    """Train loss, train accuracy and validation accuracy against epoch, as the report's d2l plots."""
    rows = read_metrics_csv(metrics_csv)
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    ax.plot(epochs, [r["train_acc"] for r in rows], label="train acc", linestyle="--")
    ax.plot(epochs, [r["val_acc"] for r in rows], label="val acc", linestyle="-.")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(printable(title or Path(metrics_csv).parent.parent.name))
    return save_figure(fig, out)


def plot_sweep_curves(rows: list[dict], out: Path, title: str = "") -> Path:
    """Every trial's validation accuracy per epoch, overlaid (one colour per variant)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours: dict[str, str] = {}
    for row in rows:
        metrics = Path(row["run_dir"]) / "metrics.csv" if row.get("run_dir") else None
        if metrics is None or not metrics.is_file():
            continue
        try:
            data = read_metrics_csv(metrics)
        except UserError as err:
            warn(f"{err}; left out of the curves")
            continue
        label = printable(row["name"])
        first = label not in colours
        line = ax.plot([r["epoch"] for r in data], [r["val_acc"] if finite(r["val_acc"]) else math.nan for r in data], marker=".",
                       color=colours.get(label), label=label if first else None, alpha=0.85)[0]
        colours.setdefault(label, line.get_color())
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    if colours:
        ax.legend(fontsize="small", loc="lower right")
    ax.set_title(printable(title))
    return save_figure(fig, out)


def plot_accuracy_bars(table: list[dict], out: Path, title: str = "") -> Path:
    """Test accuracy per variant (validation accuracy where there is no test result), error bars over seeds."""
    labels, means, stds = [], [], []
    for entry in table:
        mean, std = entry["test_acc"]
        if mean is None:  # no test result; fall back to validation accuracy
            mean, std = entry["val_acc"]
        if not finite(mean):  # no completed run of this variant, or a NaN/infinite one: the table says which
            continue
        labels.append(printable(entry["name"]))
        means.append(mean)
        stds.append(std if finite(std) else 0.0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 4.2), dpi=120)
    bars = ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], fontsize="small", padding=2)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel("test accuracy")
    low = min([m for m in means if m > 0] or [0.0])
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(printable(title))
    return save_figure(fig, out)


def plot_tune_progress(scores: list[float | None], metric: str, mode: str, out: Path, title: str = "") -> Path:
    """Each trial's metric (dots) and the best so far (a step line) against the trial number."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    points = [(i, s) for i, s in enumerate(scores, start=1) if finite(s)]
    if points:
        ax.scatter(*zip(*points), s=18, color="tab:gray", label="trial")
        best, steps = None, []
        for i, s in points:
            best = s if best is None else (max(best, s) if mode == "max" else min(best, s))
            steps.append((i, best))
        ax.step(*zip(*steps), where="post", color="tab:blue", label=f"best {metric}")
        ax.legend()
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title(printable(f"{title}: best {metric} against trials" if title else f"best {metric} against trials"))
    return save_figure(fig, out)


def confusion_figure(confusion: list[list[int]], title: str, classes: Sequence[str]):
    """The confusion matrix (rows: true class, columns: predicted), shaded by the fraction of each
    true class, with the counts written in; ``classes`` names its rows and columns."""
    import torch

    names = [printable(name) for name in classes]
    matrix = torch.tensor(confusion, dtype=torch.float)
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=110)
    shown = ax.imshow((matrix / matrix.sum(1, keepdim=True).clamp(min=1)).numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            value = int(matrix[i, j])
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > 0.5 * matrix[i].sum() else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(printable(title))
    fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the true class")
    return fig


def picture(image):
    """A uint8 or float image [C, H, W] as ``imshow`` draws it: [H, W] for one channel (give it a grey
    colour map), [H, W, C] for colour."""
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
