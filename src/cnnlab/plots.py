"""Usage: ``plot_curves(run / "metrics.csv", run / "curves.png")``: figures drawn from result files.

Plots read the files a run wrote, never live training state, so they can be redrawn for old runs. Every name
a figure draws (class names, run names, variant labels, titles made of them) passes through
``safetext.plot_label``: one line, control characters shown as escapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
matplotlib.rcParams["text.parse_math"] = False  # run names are printed literally: '$x$' is not a formula
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from cnnlab.errors import UserError, warn
from cnnlab.numtext import finite
from cnnlab.results import atomic_write, read_metrics_csv
from cnnlab.safetext import plot_label

# Up to this many points a line also marks each point: one epoch drawn as a bare line is invisible.
FEW_POINTS = 30
TRAIN, VAL = "tab:blue", "tab:orange"  # one colour per split in every panel, so a legend reads once


def save_figure(fig, out: Path, tight: bool = True) -> Path:
    """Write ``fig`` to ``out`` as PNG, atomically, and free it. A figure built with its own layout
    engine (``layout="constrained"``) keeps it; ``tight`` lays out the others."""
    try:
        if tight and fig.get_layout_engine() is None:
            fig.tight_layout()
        atomic_write(out, lambda f: fig.savefig(f, format="png", bbox_inches="tight" if not tight else None))
    finally:
        plt.close(fig)
    return out


def point_markers(points: int) -> dict:
    """Line keyword arguments that mark every point of a line of ``points`` points, when they are few."""
    return {"marker": "o", "markersize": 4} if points <= FEW_POINTS else {}


def whole_number_axis(ax, last: int) -> None:
    """An x axis of epochs or trial numbers 1..``last``: ticks at whole numbers only, even for one point
    (matplotlib's default ticks a single epoch as 0.95, 0.975, 1.0...), half a step of margin either side."""
    ax.set_xlim(0.5, max(last, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def curves_figure(rows: list[dict[str, float]], title: str):
    """Loss (train and validation) beside accuracy (train and validation) against epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120, layout="constrained")
    for ax, metric, name in ((loss, "loss", "loss"), (acc, "acc", "accuracy")):
        for split, colour, style in (("train", TRAIN, "-"), ("val", VAL, "--")):
            values = [r[f"{split}_{metric}"] if finite(r[f"{split}_{metric}"]) else math.nan for r in rows]
            ax.plot(epochs, values, color=colour, linestyle=style, label=f"{split} {name}", **point_markers(len(rows)))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        whole_number_axis(ax, int(max(epochs, default=1)))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(plot_label(title))
    return fig


def plot_curves(metrics_csv: Path, out: Path, title: str | None = None) -> Path:
    """``curves_figure`` of a run's metrics.csv, written to ``out``."""
    rows = read_metrics_csv(metrics_csv)
    return save_figure(curves_figure(rows, title or Path(metrics_csv).parent.parent.name), out)


def sweep_curves_figure(table: list[dict], title: str = ""):
    """Every run's validation accuracy per epoch, overlaid: one colour and one legend entry per experiment of
    ``table`` (``compare.aggregate``'s: its ``name`` is the label the tables show, ``run_dirs`` its runs), so that
    runs of one name but different configs or data are as far apart here as in the tables."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120, layout="constrained")
    labelled = False
    last = 1
    for entry in table:
        label, colour = plot_label(entry["name"]), None
        for run_dir in entry.get("run_dirs") or ():
            metrics = Path(run_dir) / "metrics.csv"
            if not metrics.is_file():
                continue
            try:
                data = read_metrics_csv(metrics)
            except UserError as err:
                warn(f"{err}; left out of the curves")
                continue
            epochs = [r["epoch"] for r in data]
            last = max([last, *map(int, epochs)])
            line = ax.plot(epochs, [r["val_acc"] if finite(r["val_acc"]) else math.nan for r in data], color=colour,
                           label=label if colour is None else None, alpha=0.85, **point_markers(len(data)))[0]
            colour, labelled = line.get_color(), True
    ax.set_xlabel("epoch")
    whole_number_axis(ax, last)
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    if labelled:
        ax.legend(fontsize="small", loc="lower right")
    ax.set_title(plot_label(title))
    return fig


def plot_sweep_curves(table: list[dict], out: Path, title: str = "") -> Path:
    """``sweep_curves_figure`` written to ``out``."""
    return save_figure(sweep_curves_figure(table, title), out)


def accuracy_bars_figure(table: list[dict], title: str = ""):
    """Test accuracy per variant (validation accuracy where there is no test result), error bars over seeds.

    Bars start at 0: a bar's length is its value, so a cut axis would make 0.53 against 0.55 look like a
    doubling. Each bar carries its value written in, which tells close accuracies apart. Each bar's name is
    written under it on lines of at most ``LABEL_CHARACTERS`` (``wrapped``), and each bar is as wide as its
    name's longest line, so that long variant names never run into each other."""
    labels, means, stds, fell_back = [], [], [], False
    for entry in table:
        mean, std = entry["test_acc"]
        if mean is None:  # no test result; fall back to validation accuracy
            mean, std = entry["val_acc"]
            fell_back = True
        if not finite(mean):  # no completed run of this variant, or a NaN/infinite one: the table says which
            continue
        labels.append(wrapped(plot_label(entry["name"])))
        means.append(mean)
        stds.append(std if finite(std) else 0.0)
    longest = max((len(line) for label in labels for line in label.split("\n")), default=0)
    lines = max((label.count("\n") + 1 for label in labels), default=1)
    slot = max(0.9, LABEL_INCHES_PER_CHARACTER * longest + 0.15)  # inches a bar and its name take across
    fig, ax = plt.subplots(figsize=(max(4.0, slot * len(labels) + 1.5), 4.2 + 0.17 * (lines - 1)), dpi=120,
                           layout="constrained")
    # error bars only where some variant ran several seeds: a cap at every bar's top is noise for single runs
    bars = ax.bar(range(len(labels)), means, yerr=stds if any(stds) else None, capsize=4, color="#4c72b0")
    for bar, mean in zip(bars, means):
        # inside the bar, at its middle, clear of the error bar and the title; above a bar too short to hold it
        inside = mean >= 0.15
        ax.text(bar.get_x() + bar.get_width() / 2, mean / 2 if inside else mean + 0.02, f"{mean:.3f}", ha="center",
                va="center" if inside else "bottom", fontsize="small", color="white" if inside else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.5, len(labels) - 0.5)  # each name's slot is the bar's: no margin that a name could not use
    ax.set_ylabel("test accuracy (validation where no test)" if fell_back else "test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(plot_label(title))
    return fig


LABEL_CHARACTERS = 20  # the longest line of a bar's name
LABEL_INCHES_PER_CHARACTER = 0.085  # of matplotlib's 10-point tick labels, a little over their mean width
BREAK_AFTER = re.compile(r"(?<=[,\[=_ /-])")


def wrapped(label: str, width: int = LABEL_CHARACTERS) -> str:
    """``label`` on lines of at most ``width`` characters, broken after a comma, bracket, equals sign, underscore,
    space, slash or hyphen where it can, anywhere where it cannot. Only newlines are added."""
    lines = [""]
    for piece in BREAK_AFTER.split(label):
        while piece:
            if lines[-1] and len(lines[-1]) + len(piece) > width:
                lines.append("")
            room = width - len(lines[-1])
            lines[-1] += piece[:room]
            piece = piece[room:]
    return "\n".join(lines)


def plot_accuracy_bars(table: list[dict], out: Path, title: str = "") -> Path:
    """``accuracy_bars_figure`` written to ``out``."""
    return save_figure(accuracy_bars_figure(table, title), out)


def tune_progress_figure(scores: list[float | None], metric: str, mode: str, title: str = ""):
    """Each trial's metric (dots) and the best so far (a step line) against the trial number."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120, layout="constrained")
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
    whole_number_axis(ax, len(scores))
    ax.grid(True, alpha=0.3)
    ax.set_title(plot_label(f"{title}: best {metric} against trials" if title else f"best {metric} against trials"))
    return fig


def plot_tune_progress(scores: list[float | None], metric: str, mode: str, out: Path, title: str = "") -> Path:
    """``tune_progress_figure`` written to ``out``."""
    return save_figure(tune_progress_figure(scores, metric, mode, title), out)


def confusion_figure(confusion: list[list[int]], title: str, classes: Sequence[str]):
    """The confusion matrix (rows: true class, columns: predicted), shaded by the fraction of each
    true class, with the counts written in; ``classes`` names its rows and columns."""
    import torch

    names = [plot_label(name) for name in classes]
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
    ax.set_title(plot_label(title))
    fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the true class")
    return fig


def error_grid_figure(tiles: Sequence[tuple[object, str | Sequence[str]]], title: str, columns: int = 6):
    """(image as ``picture`` gives it, caption) pairs as a grid of grey tiles, each captioned above. A caption is
    its lines: a sequence of them (each a ``plot_label``, so a name from a file is one line however it is
    spelled), or one text whose newlines part them.

    Each row is an image plus its caption's height, and the layout engine spaces the rows by what the
    captions take, so no caption reaches into the image above it."""
    captions = [[plot_label(line) for line in (caption.split("\n") if isinstance(caption, str) else caption)]
                for _, caption in tiles]
    rows = max(1, -(-len(tiles) // columns))
    lines = max(map(len, captions), default=1)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * (1.5 + 0.14 * lines) + 0.4), dpi=110,
                             squeeze=False, layout="constrained")
    for k, axis in enumerate(axes.flat):
        axis.axis("off")
        if k < len(tiles):
            axis.imshow(tiles[k][0], cmap="gray")
            axis.set_title("\n".join(captions[k]), fontsize=7)
    fig.suptitle(plot_label(title), fontsize=9)
    return fig


def prediction_figure(image, top: Sequence[tuple[str, float]], title: str):
    """What the network received (``image``, uint8 [C, H, W], each pixel a square) beside the bar of its top
    classes' probabilities: the model's-eye view of one prediction."""
    fig, (seen, bars) = plt.subplots(1, 2, figsize=(8, 3.2), width_ratios=(1, 1.6), layout="constrained")
    seen.imshow(picture(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    seen.set_title(f"what the model got ({image.shape[1]}x{image.shape[2]})", fontsize=9)
    seen.set_xticks([])
    seen.set_yticks([])
    names = [plot_label(name) for name, _ in top][::-1]
    values = [probability for _, probability in top][::-1]
    bars.barh(names, values, color=["tab:blue"] * (len(values) - 1) + ["tab:orange"])
    bars.set_xlim(0, 1)
    bars.set_xlabel("probability")
    for y, value in enumerate(values):
        bars.text(min(value + 0.02, 0.85), y, f"{value:.1%}", va="center", fontsize=8)
    fig.suptitle(plot_label(title), fontsize=9)
    return fig


def picture(image):
    """A uint8 or float image [C, H, W] as ``imshow`` draws it: [H, W] for one channel (give it a grey
    colour map), [H, W, C] for colour."""
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float | None,
                   title: str):
    """The range test's loss against the learning rate (log scale): each batch's, the smoothed curve, the suggestion."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(lrs, losses, color="0.75", linewidth=0.8, label="loss of the batch")
    ax.plot(lrs, smoothed, color="C0", linewidth=1.8, label="smoothed")
    if suggestion is not None:
        ax.axvline(suggestion, color="C3", linestyle="--", linewidth=1.2, label=f"suggested lr {suggestion:.3g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # no mathtext: parse_math is off
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:  # the divergence at the end would flatten the interesting part
        low, first = min(finite), finite[0]
        ax.set_ylim(low - 0.1 * max(first - low, 1e-3), max(first, low) + 0.5 * max(first - low, 1e-3))
    ax.set_title(plot_label(title))
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float | None,
                 out: Path, title: str = "") -> Path:
    return save_figure(lr_find_figure(lrs, losses, smoothed, suggestion, title), out)
