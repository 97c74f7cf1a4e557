"""Usage: ``run = RunDir.create(Path("results"), "lenet")``; ``run.write_summary({...})``.

A run folder describes itself: ``config.yaml`` (resolved), ``metrics.csv`` (a row per epoch),
``summary.json``, ``curves.png`` and ``checkpoints/{best,last}.pt``. Every file is written to a
temporary name and renamed into place, so a crash never leaves half a file; a run folder is created
exclusively and never reused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cnnlab.errors import UserError

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "epoch_seconds",
    "train_examples_per_sec",
)


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes files private (0600); results are ordinary files
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def sanitize_name(name: str) -> str:
    """A run name as one safe path component: letters, digits, '.', '_', '=' and '-' only."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-.")
    if not safe:
        raise UserError(f"name: {name!r} has no letters or digits to name a results folder with; pick another name")
    return safe[:100]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the code being run, with '+dirty' when it has uncommitted changes; None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()} for row in csv.DictReader(handle)]


@dataclass
class RunDir:
    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, results_root: Path, name: str) -> RunDir:
        parent = Path(results_root) / sanitize_name(name)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the results folder {parent}: {err.strerror}; choose another with --results") from None
        for _ in range(5):
            path = parent / new_run_id()
            try:
                path.mkdir()  # exclusive: an existing run is never reused
            except FileExistsError:
                continue
            return cls(path)
        raise RuntimeError(f"could not create a fresh run folder under {parent}")

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.path / "config.yaml", yaml_text)

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        write_metrics_csv(self.path / "metrics.csv", self.metrics)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.checkpoint_dir / f"{name}.pt")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by cnnlab, loaded safely (``weights_only=True``: no pickled code runs)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_run(results_root: Path = Path("results")) -> Path:
    """The most recently finished completed run under ``results_root`` (sweeps included)."""
    finished = []
    for path in Path(results_root).rglob("summary.json"):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if summary.get("status") == "completed" and (path.parent / "checkpoints" / "best.pt").is_file():
            finished.append((summary.get("finished", ""), str(path.parent)))
    if not finished:
        raise UserError(
            f"no finished run in {results_root}/ to look at. Train one first, e.g. `cnnlab run configs/lenet.yaml` "
            "(or `make run`), or name a run folder"
        )
    return Path(max(finished)[1])
