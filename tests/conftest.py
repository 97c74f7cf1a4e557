"""Shared fixtures: tiny, generated Fashion-MNIST-format IDX files, and configs that train on them."""

from __future__ import annotations

import gzip
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from cnnlab.config import load_config
from cnnlab.data.fashion_mnist import FILES, find_data_dir
from cnnlab.engine import fit
from cnnlab.errors import UserError
from cnnlab.listeners import Listener
from cnnlab.results import Checkpoint
from cnnlab.stopping import Interrupted

# How long a test waits for a process or a condition before calling it a hang. Never a measure of
# speed: a loaded machine (another suite, a CPU hog beside this one) may be many times slower.
HANG_SECONDS = 900
T = TypeVar("T")


def idx_bytes(array: torch.Tensor, kind: str) -> bytes:
    """IDX-encode uint8 images [N, 28, 28] or labels [N], as the real files are."""
    if kind == "images":
        header = struct.pack(">IIII", 0x803, array.shape[0], array.shape[1], array.shape[2])
    else:
        header = struct.pack(">II", 0x801, array.shape[0])
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def make_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Learnable images: class c lights a 6x6 block at a class-specific place, over noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (len(labels), 28, 28), generator=generator)
    for i, c in enumerate(labels.tolist()):
        row, col = 2 + 8 * (c // 3), 2 + 8 * (c % 3)
        images[i, row : row + 6, col : col + 6] += 180
    return images.clamp(0, 255).to(torch.uint8)


def write_dataset(folder: Path, n_train: int = 400, n_test: int = 200, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = torch.arange(n) % 10
        images = make_images(labels, seed=n)
        for stem, payload in zip(FILES[split], (idx_bytes(images, "images"), idx_bytes(labels, "labels"))):
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)
    return folder


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


@pytest.fixture
def tiny_overrides(tiny_data: Path, tmp_path: Path) -> list[str]:
    """--set overrides that make any config train in seconds on the tiny data set."""
    return [
        f"data.root={tiny_data}",
        "data.check_counts=false",
        "data.val_size=100",
        "train.epochs=2",
        "train.batch_size=32",
        "train.device=cpu",
        f"output.dir={tmp_path / 'results'}",
    ]


def real_data_dir() -> Path | None:
    try:
        return find_data_dir()
    except Exception:
        return None


requires_real_data = pytest.mark.skipif(
    real_data_dir() is None, reason="Fashion-MNIST not installed (make data installs it)"
)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small LeNet trained for 3 epochs on tiny data: (run folder, summary)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data")
    cfg = load_config(None, [f"data.root={data}", "data.check_counts=false", "data.val_size=100", "train.epochs=3",
                             "train.batch_size=32", "train.device=cpu", "model.activation=relu", "optim.lr=0.1",
                             f"output.dir={root / 'results'}"])
    summary = fit(cfg, quiet=True)
    return Path(summary["run_dir"]), summary


def wait_for(condition: Callable[[], T], what: str, process: subprocess.Popen | None = None) -> T:
    """Poll ``condition`` until it returns something true, and return that: how a test waits for a
    process to reach a point (never a fixed sleep). Fails when ``process`` ends first (with its
    output) or after HANG_SECONDS; either way ``process`` is ended, so that it does not linger."""
    deadline = time.monotonic() + HANG_SECONDS
    while True:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            output = process.communicate()[0] if process.stdout is not None else ""
            raise AssertionError(f"{what}: the process ended first (exit {process.returncode}):\n{output}")
        if time.monotonic() > deadline:
            if process is not None:
                process.kill()
            raise AssertionError(f"{what}: not within {HANG_SECONDS} s (a hang)")
        time.sleep(0.02)


def checkpoint_epoch(run_dir: Path) -> int:
    """The epoch of ``run_dir``'s checkpoints/last.pt as it stands on disk (0 for none, or while it is
    being replaced): checkpoints are written in the background, after metrics.csv has the epoch."""
    try:
        return Checkpoint.load(run_dir / "checkpoints" / "last.pt").epoch
    except UserError:
        return 0


class StopAfter(Listener):
    """Asks the run to stop (as SIGTERM would) after ``batches`` batches."""

    def __init__(self, batches: int) -> None:
        self.left = batches

    def advance(self, loss_sum, correct, seen) -> None:
        self.left -= 1
        if self.left == 0:
            raise Interrupted(signal.SIGTERM)


_IMPORT_PROBE = """
import sys
from cnnlab.entry import main
module, sys.argv = sys.argv[1], ["cnnlab", *sys.argv[2:]]
try:
    main()
except SystemExit as stop:
    code = stop.code
print("exit", code, module, "imported" if module in sys.modules else "not imported", file=sys.stderr)
"""


def command_imports(module: str, args: list[str], cwd: Path | None = None) -> str:
    """Run ``cnnlab ARGS`` in a fresh interpreter; "exit CODE MODULE imported" or "... not imported" (whether
    ``module`` was in ``sys.modules`` when the command ended), with the command's stderr before it."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, module, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return done.stderr
