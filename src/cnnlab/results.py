"""Usage: ``run = RunDir.create(Path("results"), "lenet")``; ``run.write_summary(summary)``.

A run folder describes itself: ``config.yaml`` (resolved), ``metrics.csv`` (a row per epoch),
``summary.json``, ``curves.png`` and ``checkpoints/{best,last}.pt`` (each with a ``.sha256`` beside
it). Every file is written to a temporary name and renamed into place, so a crash never leaves half a
file; a run folder is created exclusively and never reused. The process training a run holds an
exclusive lock on ``<run>/.lock``; the kernel drops it when the process dies however it dies, which
is how a dead run (``stale``) is told from a live one.

Everything here that reads a file back treats it as untrusted: it is validated, never executed, and
a bad file is a ``UserError`` that names it.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import socket
import stat
import subprocess
import tempfile
import unicodedata
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnnlab.config import Headline
from cnnlab.data.spec import DataSpec
from cnnlab.errors import UserError
from cnnlab.numtext import number_text
from cnnlab.state import AVERAGE_COLUMNS, METRIC_COLUMNS, check_state_dict


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, then rename it over ``path``."""
    tmp = staged_write(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def staged_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> str:
    """The path of a temporary file beside ``path`` holding what ``write(file)`` wrote, synced to the disk;
    the caller renames it into place. An ``OSError`` names ``path`` (a full disk fails on a bare descriptor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes files private (0600); results are ordinary files
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise
    return tmp


TEMP_SUFFIX = ".tmp"


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """Delete the temporary files ``staged_write`` left beside ``names`` in ``folder`` when its process was
    killed mid-write (``.last.pt.k2j4x9_q.tmp``: up to a checkpoint's size each). Only call it while no
    process can be writing them (the run's lock held); any other file is left alone."""
    pattern = re.compile("|".join(rf"\.{re.escape(name)}\.[a-z0-9_]+{re.escape(TEMP_SUFFIX)}" for name in names))
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(OSError):
                entry.unlink()


def check_output_file(path: Path, option: str, *, folder: bool = False) -> None:
    """A ``UserError`` before any work unless ``path`` is missing or a regular file (a real folder, with
    ``folder``) in a place cnnlab may write: the one rule for every output the user names.

    Outputs are renamed over ``path``, which would swap a device node, FIFO or symbolic link for a
    file (as root, ``-o /dev/null`` would replace the system's device): those are refused, never followed.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as err:
        raise UserError(f"{option} {path}: cannot look at it ({err.strerror or err}); choose another place") from None
    if mode is None or (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        pass
    elif stat.S_ISLNK(mode):
        raise UserError(f"{option} {path}: is a symbolic link (to {os.readlink(path)}); give the real path instead")
    elif stat.S_ISDIR(mode):
        example = path / ("out" + (path.suffix or ".png"))
        raise UserError(f"{option} {path}: is a folder; give a file name inside it, e.g. {example}")
    elif folder:
        raise UserError(f"{option} {path}: is {file_kind(mode)}, but cnnlab writes a folder there; move it or choose another "
                        "name")
    else:
        raise UserError(f"{option} {path}: is {file_kind(mode)}, not a regular file; give the name of a new or regular file")
    _check_writable_parent(path.parent, option, path)


def file_kind(mode: int) -> str:
    """What ``os.stat`` says a path is, in words: "a file", "a FIFO (named pipe)", "a character device"..."""
    kinds = {stat.S_IFREG: "a file", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
             stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket"}
    return kinds.get(stat.S_IFMT(mode), "a special file")


def check_output_dir(path: Path, option: str) -> None:
    """A ``UserError`` before anything is written if ``path`` cannot be (or be created as) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is {file_kind(path.stat().st_mode)}, not a folder; give a folder")
    _check_writable_parent(path, option, path)


def _check_writable_parent(folder: Path, option: str, target: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {target}: no permission to write in {existing}; choose another place")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


MAX_NAME_CHARS, MAX_NAME_BYTES = 100, 200  # file systems allow 255 bytes per name; leave room for suffixes


def sanitize_name(name: str) -> str:
    """A run name as one safe path component: letters and digits of any script, '.', '_', '=' and '-'.

    Unicode is kept (``café`` stays ``café``, in NFC form); path separators, spaces and control or
    punctuation characters become '-'; the result is cut to 100 characters and 200 UTF-8 bytes.
    """
    text = unicodedata.normalize("NFC", str(name))
    safe = re.sub(r"[^\w.=-]+", "-", text).strip("-.")
    if not safe:
        raise UserError(f"name: {name!r} has no letters or digits to name a results folder with; pick another name")
    safe = safe[:MAX_NAME_CHARS]
    while len(safe.encode("utf-8")) > MAX_NAME_BYTES:
        safe = safe[:-1]
    return safe.rstrip("-.") or "run"


def utc_stamp() -> str:
    """The UTC time as folder and file names carry it: 20261128T093241Z (sorts as it reads)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def new_run_id() -> str:
    return utc_stamp() + "-" + secrets.token_hex(3)


def new_dated_dir(parent: Path, what: str) -> Path:
    """A new folder under ``parent`` named by the time (``-1``, ``-2`` ... when taken), made
    exclusively, so two commands started in the same second never share one (a sweep's, a tune's)."""
    stamp = utc_stamp()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            folder = parent / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as err:
        raise UserError(f"cannot create the {what} folder in {parent}: {_reason(err)}; choose another with --results") from None
    raise UserError(f"{parent} already holds 1000 {what} folders from this second; wait a second and run it again")


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
    columns = (*METRIC_COLUMNS, *(k for k in AVERAGE_COLUMNS if any(k in row for row in rows)))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: number_text(row.get(k), significant=6, missing="") for k in columns})
    atomic_write_text(path, buffer.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv as numbers; a file that is not one is a ``UserError`` naming it."""
    if not Path(path).is_file():
        raise UserError(f"{path}: missing, or not a regular file")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in METRIC_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"its header lacks the column(s) {', '.join(missing)}")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append({str(k): float(v) if v not in ("", None) else math.nan for k, v in row.items() if k})
                except (TypeError, ValueError):
                    raise ValueError(f"line {line} holds a value that is not a number") from None
            return rows
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, MemoryError) as err:
        raise UserError(f"{path}: not a readable cnnlab metrics.csv ({_reason(err)})") from None


def read_regular_text(path: Path) -> str:
    """The UTF-8 text of a file read back from a results folder. Only a regular file is opened (a FIFO
    or a device planted there would block or never end): anything else is a ``UserError``."""
    if not Path(path).is_file():
        raise UserError(f"{path}: missing, or not a regular file")
    return Path(path).read_text(encoding="utf-8")


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# ---------------------------------------------------------------------------------------------
# The run summary, typed

RunStatus = Literal["running", "completed", "failed", "interrupted", "pruned"]  # pruned: stopped early by a tuner


class WeightsRecord(BaseModel):
    """summary.json's ``weights``: where a run's starting weights came from and what became of the model's tensors."""

    model_config = ConfigDict(extra="allow")

    source: str
    loaded: int = Field(ge=0)
    adapted: list[str] = []
    new: list[str] = []
    unused: list[str] = []


class CpusRecord(BaseModel):
    """summary.json's ``cpus``: how the CPU thread count was chosen (threads.py), and how busy the machine was."""

    model_config = ConfigDict(extra="allow")

    setting: str  # train.threads as written: auto, fastest or a number
    reason: str  # what set the count
    usable: int = Field(ge=1)  # CPUs this process may use (affinity mask, cgroup quota, physical cores)
    usable_reason: str | None = None  # which of those set it
    logical: int = Field(ge=1)  # what os.cpu_count() said
    busy_cpus: float | None = Field(None, ge=0)  # other processes' use while the run started, in CPUs
    openmp_wait_policy: str | None = None  # PASSIVE when cnnlab found the machine busy before loading torch (or the user's)
    probe: dict[str, float] = {}  # a training step's images a second at each thread count tried (a busy machine)


class StartupRecord(BaseModel):
    """summary.json's ``startup``: where the seconds from the command to the first trained batch went."""

    model_config = ConfigDict(extra="allow")

    imports: float | None = Field(None, ge=0)  # the interpreter, cnnlab, torch and the config, to set-up's start
    data: float | None = Field(None, ge=0)  # reading the data set (and its statistics) onto the training device
    model: float | None = Field(None, ge=0)  # building it, its weights, the two-image check and its FLOP count
    setup: float | None = Field(None, ge=0)  # threads, optimiser, schedule, step, run folder and listeners
    first_step: float | None = Field(None, ge=0)  # the first batch's step (first calls are slow: kernels, allocations)


# The test accuracies a run may report beside its plain one (eval.tta, train.ema, train.swa), never instead of it.
TEST_ACC_BESIDE = ("test_acc_tta", "test_acc_ema", "test_acc_ema_tta", "test_acc_swa", "test_acc_swa_tta")


def figure_weights(name: str) -> Literal["raw", "ema", "swa"]:
    """Whose test figure ``name`` (test_acc, test_acc_ema_tta, ...) is: the weights themselves, or an average's."""
    return "ema" if "_ema" in name else "swa" if "_swa" in name else "raw"


def figure_label(name: str, tta: list[str] | None = None) -> str:
    """A test figure's name in words: "test acc", "ema test acc, flip+crop TTA" (``tta``: the augmentations, when known)."""
    weights = figure_weights(name)
    label = "test acc" if weights == "raw" else f"{weights} test acc"
    if name.endswith("_tta"):
        label += f", {'+'.join(tta)} TTA" if tta else ", TTA"
    return label


# What a run's test pass says of its averaged weights (train.ema, train.swa): redone when a run resumes.
AVERAGE_FIGURES = ("test_acc_ema", "test_loss_ema", "test_acc_ema_tta", "test_loss_ema_tta", "swa_epochs", "val_acc_swa",
                   "val_loss_swa", "test_acc_swa", "test_loss_swa", "test_acc_swa_tta", "test_loss_swa_tta")


class TestedWeights(BaseModel):
    """Which epoch one set of weights was tested at (summary.json's selection.raw, .ema, .swa)."""

    model_config = ConfigDict(extra="allow")

    epoch: int = Field(ge=1)
    checkpoint: Literal["best", "best_ema", "last"]  # the file in checkpoints/ that holds them
    val_acc: float | None = None  # their accuracy on the validation split


class Selection(BaseModel):
    """train.select as the run applied it: the rule (best or last), why, and each tested weight set's epoch."""

    model_config = ConfigDict(extra="allow")

    rule: Literal["best", "last"]
    why: str
    raw: TestedWeights
    ema: TestedWeights | None = None
    swa: TestedWeights | None = None


class RunSummary(BaseModel):
    """summary.json. Unknown keys are kept (newer cnnlab versions may add some)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=True)

    status: RunStatus
    name: str
    run_id: str | None = None
    model: str | None = None
    seed: int | None = None
    params: int | None = None
    flops_per_image: int | None = None
    weights: WeightsRecord | None = None  # what model.weights gave the model
    frozen_params: int | None = Field(None, ge=0)  # parameters train.freeze kept as they were
    epochs: int | None = None
    eval_split: str | None = None
    data_root: str | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    pixel_mean: float | None = None  # of the training split: with the sizes, tells whether resumed data is the same
    pixel_std: float | None = None
    skipped_images: int | None = None  # pictures passed over as undecodable (data.skip_bad: true); None: none
    skipped_examples: list[str] | None = None  # the first few of them, "file: problem"
    data: DataSpec | None = None  # what the data set is (classes, channels, size, mean/std); None: Fashion-MNIST (older runs)
    device: str | None = None
    device_name: str | None = None
    precision: str | None = None
    threads: int | None = None
    cpus: CpusRecord | None = None  # why that many threads
    channels_last: bool | None = None  # the memory layout used (train.channels_last resolved for the device)
    tf32: bool | None = None  # TF32 matmuls and convolutions allowed (CUDA runs only)
    train_step: str | None = None  # ordinary, static (the static steps, eagerly), cuda-graph or emulated-graph (replayed)
    train_step_note: str | None = None  # why train.cuda_graphs did not apply, or a step could not be captured
    world_size: int = Field(1, ge=1, le=2**31 - 1)  # processes training this run together (torchrun); 1 for a plain `cnnlab run`
    backend: str | None = None  # their collective backend: nccl (GPUs) or gloo (CPUs)
    sync_bn: bool | None = None  # whether BatchNorm statistics were synchronised over the processes
    torch_version: str | None = None
    git_commit: str | None = None
    pid: int | None = Field(None, ge=1, le=2**31 - 1)
    host: str | None = None
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    epochs_completed: int | None = None
    stopped_at: str | None = None  # where an interrupted run stopped, e.g. "epoch 3, batch 12 of 215"
    best_epoch: int | None = None
    best_val_acc: float | None = None
    final: dict[str, float] | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    test_tta: list[str] | None = None  # eval.tta: the test-time augmentation of the figures below, beside the plain ones
    test_acc_tta: float | None = None
    test_loss_tta: float | None = None
    # train.ema: the moving average of the weights tested beside them (with eval.tta too)
    test_acc_ema: float | None = None
    test_loss_ema: float | None = None
    test_acc_ema_tta: float | None = None
    test_loss_ema_tta: float | None = None
    # train.swa: the equal average of the last epochs' weights (how many), on the validation and test splits
    swa_epochs: int | None = None
    val_acc_swa: float | None = None
    val_loss_swa: float | None = None
    test_acc_swa: float | None = None
    test_loss_swa: float | None = None
    test_acc_swa_tta: float | None = None
    test_loss_swa_tta: float | None = None
    better_weights: Literal["ema", "swa", "raw"] | None = None  # of those tested, the best on the validation split
    best_val_weights: Literal["ema", "raw"] | None = None  # with train.ema: whose figure best_val_acc is
    test_checkpoint: str | None = None
    selection: Selection | None = None  # which epoch each set of weights was tested at, and why (train.select)
    # the run's answer, declared by its config (eval.headline): the name of one of the test figures above
    headline: Headline | None = None
    test_confusion: list[list[int]] | None = None  # test set counts: rows the true class, columns the predicted one
    train_examples_per_sec: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    startup_seconds: float | None = None  # from the command's start to the first batch (imports, data, model)
    startup: StartupRecord | None = None  # those seconds by stage, and the first batch's step
    stopped_early: bool | None = None
    resumes: list[dict[str, Any]] = []  # one entry per `cnnlab resume`: when, from where, on what

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def headline_figure(self) -> tuple[str, float | None]:
        """(the name of the run's answer, its value): the declared headline, or the plain test accuracy for runs that
        declared none."""
        name = self.headline or "test_acc"
        return name, getattr(self, name)


def read_summary(path: Path) -> RunSummary:
    """A run's summary.json, validated; a missing or malformed one is a ``UserError`` naming the file."""
    try:
        data = json.loads(read_regular_text(path))
        return RunSummary.model_validate(data)
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: not a readable cnnlab summary.json (nested too deeply or too large)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, ValidationError):
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])) or "summary"
            reason = f"{where}: {first['msg'].removeprefix('Value error, ')}"  # the validator's own words
        else:
            reason = _reason(err)
        raise UserError(f"{path}: not a readable cnnlab summary.json ({reason})") from None


# ---------------------------------------------------------------------------------------------
# Checkpoints

ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes begins
CHECKPOINT_FORMAT = 2  # 1: model/optimizer/scheduler/epoch only (cnnlab 0.1); 2: full training state


@dataclass
class Checkpoint:
    """One checkpoint file: the model and everything needed to continue training from this point."""

    model: dict[str, Any]
    config: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    state: dict[str, Any] | None = None  # TrainState.state_dict(); None in format-1 checkpoints
    format: int = CHECKPOINT_FORMAT
    torch_version: str = str(torch.__version__)
    data: dict[str, Any] | None = None  # DataSpec.to_dict() of the data it was trained on; None in older checkpoints
    ema: dict[str, Any] | None = None  # the moving average of the weights (train.ema), a state dict like model's
    swa: dict[str, Any] | None = None  # the equal average of the last epochs' weights (train.swa), the same

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"]) if self.state else 0

    @property
    def spec(self) -> DataSpec | None:
        return DataSpec.model_validate(self.data) if self.data is not None else None

    def snapshot(self) -> Checkpoint:
        """A copy that training cannot change: every tensor copied to the CPU, every container rebuilt
        (a state dict holds the live parameters, the optimiser's buffers and the metrics list)."""
        from torch.utils._pytree import tree_map

        copies: dict[int, torch.Tensor] = {}  # a tensor held twice (tied weights) is copied once

        def copied(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) not in copies:
                copies[id(value)] = value.detach().to("cpu", copy=True)
            return copies[id(value)]

        def rebuilt(value: Any) -> Any:
            result = tree_map(copied, value)
            if hasattr(value, "_metadata"):  # a module state dict's version numbers, which load_state_dict reads
                result._metadata = copy.deepcopy(value._metadata)
            return result

        return Checkpoint(**{name: rebuilt(value) for name, value in self.__dict__.items()})

    def save(self, *paths: Path) -> None:
        """Serialise once and write to each path, with its SHA-256 in ``<path>.sha256``; a crash at any
        point leaves pairs that verify. All or nothing: every file is written (and synced) under a
        temporary name before the first is renamed into place, so a full disk fails the save with
        each path as it was (best.pt never from a newer epoch than last.pt)."""
        buffer = io.BytesIO()
        torch.save({**self.__dict__}, buffer)
        payload = buffer.getvalue()
        digest = hashlib.sha256(payload).hexdigest()
        staged: list[tuple[str, Path]] = []
        try:
            for path in paths:
                sidecar = digest_path(path)
                old = _recorded_digests(sidecar)
                # The sidecar accepts both files while the checkpoint is being replaced, then only the new one.
                for target, text in ((sidecar, "\n".join([digest, *old[:1]]) + "\n"), (path, None), (sidecar, digest + "\n")):
                    data = payload if text is None else text.encode("ascii")
                    staged.append((staged_write(target, lambda f, data=data: f.write(data)), target))
            while staged:
                tmp, target = staged[0]
                os.replace(tmp, target)
                staged.pop(0)
        finally:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Verify and load (``weights_only=True``: no pickled code runs). Bad files are a ``UserError``."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        try:
            payload = path.read_bytes()
        except OSError as err:
            raise UserError(f"{path}: cannot read the checkpoint ({_reason(err)})") from None
        sidecar = digest_path(path)
        recorded = _recorded_digests(sidecar)
        if sidecar.exists() and not recorded:
            raise UserError(f"{sidecar}: holds no SHA-256 digest, so {path.name} cannot be checked; restore the file, "
                            "or delete it to load the checkpoint unchecked (as for runs of cnnlab 0.1)")
        if recorded and hashlib.sha256(payload).hexdigest() not in recorded:
            raise UserError(
                f"{path} fails its SHA-256 check ({sidecar.name}): the file is corrupt, truncated or was "
                "changed after cnnlab wrote it. Restore it from a backup; `cnnlab eval --checkpoint best|last` can "
                "use the run's other checkpoint, and `cnnlab run` on the run's config.yaml trains it afresh"
            )
        damaged = "it is truncated, corrupt or not a PyTorch checkpoint"
        if not payload.startswith(ZIP_MAGIC):  # torch.save writes zip archives; anything else would reach the unpickler
            raise UserError(f"{path}: not a readable cnnlab checkpoint: {damaged}")
        try:
            with warnings.catch_warnings():  # torch warns about what it meets in odd files; the error below says it all
                warnings.simplefilter("ignore")
                data = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises many types here; none of their texts is fit to show
            unsafe = "weights_only" in str(err) or "Unsupported global" in str(err)
            why = ("it holds pickled Python objects, which cnnlab does not load (only tensors and plain values, "
                   "so that opening a file cannot run code)") if unsafe else damaged
            raise UserError(f"{path}: not a readable cnnlab checkpoint: {why}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> Checkpoint:
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or not isinstance(data.get("config"), dict):
            raise UserError(f"{path}: not a cnnlab checkpoint (no model weights and config inside)")
        for entry in ("model", "ema", "swa"):
            weights = data.get(entry)
            if (entry != "model" and weights is None) or (isinstance(weights, dict) and
                                                         all(isinstance(v, torch.Tensor) for v in weights.values())):
                continue
            raise UserError(f"{path}: not a cnnlab checkpoint (its {entry} entry is not a state dict of tensors)")
        fmt = data.get("format", 1)
        state = data.get("state")
        if fmt == 1:  # cnnlab 0.1: epoch and metrics beside the weights, no generator states
            state = None
        else:
            try:
                check_state_dict(state)
            except ValueError as err:
                raise UserError(f"{path}: not a cnnlab checkpoint, or one that was changed ({err})") from None
        spec = DataSpec.read(data["data"], str(path)).to_dict() if data.get("data") is not None else None
        return cls(model=data["model"], config=data["config"], optimizer=data.get("optimizer"),
                   scheduler=data.get("scheduler"), scaler=data.get("scaler"), state=state,
                   format=fmt if isinstance(fmt, int) else 0, torch_version=str(data.get("torch_version", "")), data=spec,
                   ema=data.get("ema"), swa=data.get("swa"))


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded_digests(sidecar: Path) -> list[str]:
    if not sidecar.is_file():  # missing, or something that is not a file (a FIFO would block)
        return []
    try:
        lines = sidecar.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return []
    return [line for line in lines if re.fullmatch(r"[0-9a-f]{64}", line)]


@dataclass
class RunDir:
    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    _lock: Any = None
    writer: bool = True  # False on torchrun's other ranks: they train with the folder, only rank 0 writes it
    rows_written: int = 0  # the rows of ``metrics`` the last write of metrics.csv that succeeded holds

    @classmethod
    def create(cls, results_root: Path, name: str) -> RunDir:
        parent = Path(results_root) / sanitize_name(name)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                path = parent / new_run_id()
                try:
                    path.mkdir()  # exclusive: an existing run is never reused
                except FileExistsError:
                    continue
                return cls(path)
        except OSError as err:
            raise UserError(
                f"cannot create a run folder in {parent}: {_reason(err)}; choose another results folder with --results"
            ) from None
        raise RuntimeError(f"could not create a fresh run folder under {parent}")

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def lock(self) -> None:
        """Hold ``.lock`` for as long as this process lives; a ``UserError`` if another process holds it."""
        if not self.writer:
            return
        lock_path = self.path / LOCK_FILE
        if lock_path.exists() and (lock_path.is_symlink() or not lock_path.is_file()):
            raise UserError(f"{lock_path}: not a regular file; remove it (cnnlab makes a new one)")
        try:
            handle = open(lock_path, "a+", encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write in the run folder {self.path} ({_reason(err)}); copy it somewhere "
                            "writable first") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{self.path} is being trained right now ({holder}); wait for it, or stop it first") from None
        except OSError:
            pass  # a file system without locks (some network mounts): liveness falls back to pid and host
        else:  # held: no other process writes here, so what a killed one left half-written can go
            self.remove_stale_temporaries()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def remove_stale_temporaries(self) -> None:
        """The temporaries of the files only training writes (a killed run's: up to a checkpoint's size each)."""
        remove_stale_temporaries(self.path, TRAINING_FILES)
        remove_stale_temporaries(self.checkpoint_dir, CHECKPOINT_FILES)

    def discard(self) -> None:
        """Remove a folder this process has just created and could not fill (no config, no summary):
        nothing half-written is left. Only cnnlab's own files are expected there; anything else stays."""
        if not self.writer:
            return
        self.unlock()
        for name in (LOCK_FILE, *TRAINING_FILES, "summary.json"):
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def write_config(self, yaml_text: str) -> None:
        if self.writer:
            atomic_write_text(self.path / "config.yaml", yaml_text)

    def write_metrics(self) -> None:
        if self.writer:
            rows = len(self.metrics)
            write_metrics_csv(self.path / "metrics.csv", self.metrics)
            self.rows_written = rows

    def write_summary(self, summary: RunSummary) -> None:
        if self.writer:
            atomic_write_text(self.path / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")

    def save_checkpoint(self, checkpoint: Checkpoint, *names: str) -> None:
        """``checkpoint`` as ``checkpoints/<name>.pt`` for each name (serialised once)."""
        if self.writer:
            checkpoint.save(*(self.checkpoint_dir / f"{name}.pt" for name in names))


class CheckpointWriter:
    """A run's epoch checkpoints written in the background, one at a time: ``save`` takes a snapshot
    (the only part the loop waits for: a copy to the CPU) and the next epoch trains while the file is
    serialised, written and synced. ``flush`` waits for the write under way and raises what it
    raised, so a failed write (a full disk) still ends the run, at the next epoch's save or at the
    end. The files are replaced atomically either way: a run killed mid-write keeps the last pair.

    ``on_disk`` is the training state (``TrainState.state_dict()``) of the checkpoint the folder holds:
    the last save that completed, or ``on_disk`` as given (the checkpoint a resumed run started from).
    """

    def __init__(self, run: RunDir, on_disk: dict[str, Any] | None = None) -> None:
        self.run = run
        self.on_disk = on_disk
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def save(self, checkpoint: Checkpoint, *names: str) -> None:
        self.flush()
        snapshot = checkpoint.snapshot()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlab-checkpoint")
        self._pending = self._pool.submit(self._write, snapshot, names)

    def _write(self, snapshot: Checkpoint, names: tuple[str, ...]) -> None:
        self.run.save_checkpoint(snapshot, *names)
        if "last" in names:
            self.on_disk = snapshot.state

    def flush(self) -> None:
        if self._pending is None:
            return
        try:
            self._pending.result()  # a second Ctrl-C while waiting leaves it pending, its error still to hear
        except Exception:
            self._pending = None
            raise
        self._pending = None

    def close(self) -> None:
        """Wait for the write under way (its error is not raised here: ``flush`` first to hear it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


LOCK_FILE = ".lock"
TRAINING_FILES = ("config.yaml", "metrics.csv")  # in the run folder, written by the process that trains it alone
# in its checkpoints/ folder: the weights' best epoch, their moving average's best epoch (train.ema), the last epoch
CHECKPOINT_FILES = ("best.pt", "best_ema.pt", "last.pt", "best.pt.sha256", "best_ema.pt.sha256", "last.pt.sha256")


def is_locked(run_dir: Path) -> bool | None:
    """True while a live process holds the run's lock (flock: released by the kernel when it dies);
    None where there is no lock file or its file system cannot lock."""
    if not (Path(run_dir) / LOCK_FILE).is_file():  # opening a FIFO planted there would block
        return None
    try:
        handle = open(Path(run_dir) / LOCK_FILE, encoding="utf-8")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def run_state(run_dir: Path, summary: RunSummary) -> str:
    """The summary's status, except that a "running" run no live process holds is ``stale``."""
    if summary.status != "running":
        return summary.status
    locked = is_locked(run_dir)
    if locked is not None:
        return "running" if locked else "stale"
    # No usable lock (a run from cnnlab 0.1, or a file system without locks): trust a live pid on this host only.
    if summary.pid and summary.host == socket.gethostname():
        try:
            os.kill(summary.pid, 0)
        except PermissionError:
            return "running"  # alive, another user's
        except (OSError, OverflowError, ValueError):
            return "stale"
        return "running"
    return "stale"


RESUMABLE = ("interrupted", "failed", "stale")  # the states a run can be continued from (`cnnlab resume`)


def pick_run(target: Path | None, results_root: Path = Path("results"), *, unfinished: bool = False) -> Path:
    """The run a command takes: ``target`` when it is a run folder; else the newest finished run (with
    ``unfinished``: the newest one that stopped before the end, to resume) in the folder ``target`` names (an
    experiment's, a sweep's), or under ``results_root`` without one."""
    if target is not None and ((Path(target) / "summary.json").is_file() or (Path(target) / "config.yaml").is_file()):
        return Path(target)
    folder = Path(target) if target is not None else Path(results_root)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run folder" if target is not None else
                        f"no {folder}/ folder here: run this where your results are, pass --results DIR, or name a run folder")
    found = newest_run(folder, RESUMABLE if unfinished else ("completed",), "last.pt" if unfinished else "best.pt",
                       own_first=target is None)
    if found is not None:
        return found
    if unfinished:
        raise UserError(f"no unfinished run (interrupted, failed or killed) in {folder}/ to resume; name a run folder "
                        "(a completed run trains on with --epochs N)")
    raise UserError(f"no finished run in {folder}/ to look at. Train one first, e.g. `cnnlab run configs/lenet.yaml` "
                    "(or `make run`), or name a run folder")


def is_trial(run_dir: Path) -> bool:
    """Whether a run folder is a trial of a sweep or tune: ``<sweep>/runs/<name>/<run id>``, with the sweep's
    ``<sweep>/<time>/trials.json`` beside its ``runs/``."""
    runs = Path(run_dir).parent.parent
    return runs.name == "runs" and any(runs.parent.glob("*/trials.json"))


def newest_run(folder: Path, states: tuple[str, ...], checkpoint: str, *, own_first: bool = False) -> Path | None:
    """The run under ``folder`` in one of ``states`` (``run_state``'s) with ``checkpoints/<checkpoint>`` that
    finished (or else started) last; runs whose summary cannot be read are passed over, as someone else's
    broken run must not hide the good ones. With ``own_first``, a sweep's or tune's trials (``is_trial``: often a
    short run of one grid point) only where there is no other run."""
    found = []
    for path in Path(folder).rglob("summary.json"):
        if any(part.startswith(".incoming-") for part in path.parts):  # a shipped folder being unpacked
            continue
        try:
            summary = read_summary(path)
        except UserError:
            continue
        if run_state(path.parent, summary) in states and (path.parent / "checkpoints" / checkpoint).is_file():
            found.append((not (own_first and is_trial(path.parent)), summary.finished or summary.started or "",
                          str(path.parent)))
    return Path(max(found)[2]) if found else None
