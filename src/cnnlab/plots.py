"""Usage: ``plot_curves(run / "metrics.csv", run / "curves.png")``: figures drawn from result files.

Plots read the files a run wrote, never live training state, so they can be redrawn for old runs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from cnnlab.results import atomic_write, read_metrics_csv  # noqa: E402


def plot_curves(metrics_csv: Path, out: Path, title: str | None = None) -> Path:
    """Train loss, train accuracy and validation accuracy against epoch, as the report's d2l plots."""
    rows = read_metrics_csv(metrics_csv)
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    ax.plot(epochs, [r["train_acc"] for r in rows], label="train acc", linestyle="--")
    ax.plot(epochs, [r["val_acc"] for r in rows], label="val acc", linestyle="-.")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or Path(metrics_csv).parent.parent.name)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out
