"""Trains on the real Fashion-MNIST (installed by `make test`) and checks that the model learns."""

import csv
from pathlib import Path

import pytest
from conftest import requires_real_data

from cnnlab.config import load_config
from cnnlab.engine import fit

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.integration
@requires_real_data
def test_lenet_relu_learns_fashion_mnist_in_two_epochs(tmp_path):
    cfg = load_config(CONFIGS / "lenet_relu.yaml", ["train.epochs=2", "train.device=cpu", f"output.dir={tmp_path}"])
    summary = fit(cfg, quiet=True)
    assert summary["train_size"] == 55_000 and summary["val_size"] == 5_000 and summary["test_size"] == 10_000
    assert summary["best_val_acc"] >= 0.80
    assert summary["test_acc"] >= 0.78
    with open(Path(summary["run_dir"]) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"]) < 2.3  # below chance-level loss, falling
