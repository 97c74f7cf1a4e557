"""Usage: ``opened = open_run(Path("results/lenet/20261128T..."))``; ``resume(run_dir, settings=["optim.lr=0.1"])``.

Opening a run folder that already exists: one ``open_run`` for eval, visualize and report (config,
summary, liveness and a verified checkpoint, with a warning when the run did not complete), and
``resume``, which continues an interrupted, failed or killed run in its own folder. A run folder
may come from anyone, so nothing in it is trusted: files are validated, and a config that names
Python code is refused unless the user passes ``trust_code``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnlab.config import Config, dump_config, parse_override, read_yaml, set_value, validate
from cnnlab.data import Data, DataSpec, described, load_data
from cnnlab.errors import UserError, warn
from cnnlab.progress import Reporter, make_reporter
from cnnlab.results import (
    Checkpoint,
    RunDir,
    RunSummary,
    read_metrics_csv,
    read_summary,
    run_state,
    sanitize_name,
    utc_now,
)

if TYPE_CHECKING:  # engine imports this module's callers; only the type names are needed here
    from cnnlab.engine import Session
    from cnnlab.state import TrainState
    from cnnlab.stopping import StopSignals

RESUMABLE = ("interrupted", "failed", "stale")
# What a resumed run may change (`cnnlab resume RUN --set KEY=VALUE`): how the optimiser steps from the
# checkpoint on and how long and how patiently it trains. The checkpoint's state stays right under each:
# the weights, the optimiser's buffers (SGD's momentum is kept, and optim.name, whose state Adam's moments
# are, is not here), the position in the epoch and the data order. Not the model or the data (the weights
# and the split belong to them), nor train.batch_size (it makes the epoch's batches, where a checkpoint
# stands inside one), nor the loss (label_smoothing) or the precision.
RESUME_SETTABLE = ("optim.lr", "optim.momentum", "optim.weight_decay", "schedule.*", "train.grad_clip",
                   "train.epochs", "train.patience")
# Where a run trains and where its results go, not what it computes: ignored when matching runs.
PLACEMENT_KEYS = (("train", "device"), ("output", "dir"))


@dataclass
class OpenedRun:
    path: Path
    cfg: Config
    summary: RunSummary
    state: str  # the summary's status, or "stale" for a run whose process died without a word
    model: nn.Module | None = None  # in eval mode, with the chosen checkpoint's weights
    checkpoint: str | None = None

    @property
    def spec(self) -> DataSpec:
        """What the run trained on, as its summary records it; for a run of an older cnnlab, which recorded
        none, its data set as known by name (Fashion-MNIST), without reading any file."""
        return self.summary.data or described(self.cfg.data.name)

    def load_data(self, device: str | torch.device = "cpu") -> Data:
        """The run's data, split exactly as it was for training (same seed, same validation images)."""
        return load_data(self.cfg.data, self.cfg.seed, torch.device(device))


def require_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a cnnlab run folder (no config.yaml)")
    return run_dir


def open_run(
    run_dir: Path, device: str | torch.device = "cpu", *, checkpoint: str | None = "best", trust_code: bool = False
) -> OpenedRun:
    """A run's config, summary and state, and (unless ``checkpoint`` is None) its trained model."""
    from cnnlab.models.build import build_model

    run_dir = require_run_dir(run_dir)
    cfg = load_run_config(run_dir / "config.yaml", trust_code)
    summary = read_summary(run_dir / "summary.json")
    state = run_state(run_dir, summary)
    opened = OpenedRun(run_dir, cfg, summary, state)
    if checkpoint is None:
        return opened
    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint {checkpoint!r}: choose best or last")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{path} is missing: the run wrote no checkpoints (output.checkpoints: false) or did not "
                        "finish an epoch")
    if state != "completed":
        warn(f"{run_dir} is {describe_state(opened)}; using its {checkpoint} checkpoint anyway")
    weights = Checkpoint.load(path)
    model = build_model(cfg, spec=opened.spec)
    try:
        model.load_state_dict(weights.model)
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit the model described by {run_dir / 'config.yaml'} "
                        "(the file belongs to another run, or config.yaml was changed)") from None
    opened.model, opened.checkpoint = model.to(device).eval(), checkpoint
    return opened


def load_run_config(path: Path, trust_code: bool) -> Config:
    """A run folder's config.yaml: the complete, resolved config cnnlab wrote there (no ``extends``,
    every section present), validated; anything else is refused rather than filled in with defaults."""
    data = read_yaml(path)
    missing = [key for key in Config.model_fields if key not in data]
    if "extends" in data or missing:
        why = "it extends another file" if "extends" in data else f"it lacks {', '.join(missing)}"
        raise UserError(f"{path}: not the resolved config cnnlab writes into a run folder ({why}); put back the "
                        "config.yaml this run was written with")
    return validate(data, str(path), trust_code)


def describe_state(opened: OpenedRun) -> str:
    summary = opened.summary
    if opened.state == "stale":
        return (f"stale: its process (pid {summary.pid} on {summary.host}) died without recording an ending, "
                f"after {_epochs_done(opened.path)} epoch(s)")
    if opened.state == "running":
        return f"still training (pid {summary.pid} on {summary.host})"
    where = f" ({summary.stopped_at})" if summary.stopped_at else ""
    return f"{opened.state}{where}" + (f": {summary.error}" if summary.error else "")


def _epochs_done(run_dir: Path) -> str:
    try:
        return str(len(read_metrics_csv(run_dir / "metrics.csv")))
    except UserError:
        return "an unknown number of"


# ---------------------------------------------------------------------------------------------
# Resuming


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings."""
    keys = []
    for key in sorted(set(saved) | set(current), key=str):
        path = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as a mapping with the placement keys dropped: two runs of it compute the same thing.
    Keys an older cnnlab did not write (data.name) take today's defaults, as in identity.experiment_key."""
    defaults = Config().to_dict()
    config = {k: {**defaults[k], **v} if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
              for k, v in config.items()}
    for section, key in PLACEMENT_KEYS:
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str):  # the same folder, however it was written
        data["root"] = os.path.abspath(os.path.expanduser(data["root"]))
    return config


def resume(
    run_dir: Path,
    *,
    epochs: int | None = None,
    settings: list[str] | None = None,
    device: str | None = None,
    data_root: Path | None = None,
    quiet: bool = False,
    reporter: Reporter | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Continue ``run_dir`` from ``checkpoints/last.pt`` in the same folder; returns the summary.

    ``epochs`` extends (or, for an unfinished run, changes) the total; ``settings`` (``--set``
    strings) change the keys of ``RESUME_SETTABLE``, in config.yaml too, from the next batch on;
    ``device`` and ``data_root`` may change because a run can move to another machine. Anything
    else that differs between ``config.yaml`` and the checkpoint is refused.
    """
    from cnnlab.engine import prepare
    from cnnlab.state import TrainState
    from cnnlab.stopping import StopSignals

    wall_start = time.perf_counter()
    changed = settable_overrides(settings or [], run_dir)
    opened = open_run(run_dir, checkpoint=None, trust_code=trust_code)
    run_dir = opened.path
    if opened.state == "running":
        raise UserError(f"{run_dir} is {describe_state(opened)}; stop it before resuming it")
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise UserError(f"{run_dir} has no checkpoints/last.pt to resume from (output.checkpoints was false, or it "
                        f"stopped before its first epoch ended); start it again with `cnnlab run {run_dir / 'config.yaml'}`")
    checkpoint = Checkpoint.load(last)
    if checkpoint.state is None:
        raise UserError(f"{last} was written by an older cnnlab without the training state a resume needs; it can "
                        "still be evaluated, but the run must be started again to train further")
    try:
        trained = validate(checkpoint.config, "its config", trust_code)
    except UserError as err:
        raise UserError(f"{last}: the config stored in it is not a valid cnnlab config ({err})") from None
    # config.yaml may differ in what a resume may change: an earlier `resume --set` wrote it, and its session
    # may have ended before its first checkpoint. Each such difference is recorded as a change below.
    differing = [key for key in config_differences(comparable(trained.to_dict()), comparable(opened.cfg.to_dict()))
                 if not resume_settable(key)]
    if differing:
        raise UserError(f"{run_dir / 'config.yaml'} differs from the config its checkpoint was trained with, in "
                        f"{', '.join(differing)}; put config.yaml back as it was, or start a new run with the new config "
                        f"(a resume may change only {', '.join(RESUME_SETTABLE)}, with --set)")

    values = opened.cfg.to_dict()
    for key, value in changed:
        values = set_value(values, key, value)
    if epochs is not None:
        values["train"]["epochs"] = epochs
    if device is not None:
        values["train"]["device"] = device
    if data_root is not None:
        values["data"]["root"] = str(data_root)
    source = f"resuming {run_dir}" + (" with --set " + " ".join(settings) if settings else "")
    cfg = validate(values, source, trust_code=trust_code)

    done, total = checkpoint.epoch, cfg.train.epochs
    if total < done or (total == done and checkpoint.state.get("current") is not None):
        asked = f"--epochs {total}" if epochs is not None else f"train.epochs {total}"
        raise UserError(f"{asked}: the run has already trained {done} epoch(s); give a larger number")
    extending = epochs is not None or any(key == "train.epochs" for key, _ in changed)
    if opened.state == "completed" and (not extending or total <= done):
        raise UserError(f"{run_dir} has completed ({done} epochs"
                        + (", stopped early" if checkpoint.state.get("stopped_early") else "")
                        + f"); to train it further pass --epochs N with N > {done}")
    changes = [{"key": key, "old": old, "new": new, "epoch": done + 1}
               for key, old, new in setting_changes(trained, cfg)]

    with StopSignals() as stop:
        session = prepare(cfg)
        check_same_data(session.data, opened.summary, run_dir)
        state = TrainState()
        session.restore(checkpoint, state, last)
        if opened.state == "completed":  # extended: it trains on, and patience counts afresh
            state.stopped_early, state.patience_start = False, done
        stop.check()
        world = session.world
        world.barrier()  # under torchrun: every rank has read the folder before rank 0 writes to it
        run = RunDir(run_dir, writer=world.is_main)
        refusal = None
        try:
            run.lock()
            if run.writer and read_summary(run_dir / "summary.json") != opened.summary:  # another resume got here first
                run.unlock()
                raise UserError(f"{run_dir} changed while this resume was starting (another process resumed it); "
                                "look at it again before resuming")
        except UserError as err:
            refusal = str(err)
        refusal = world.broadcast(refusal)  # rank 0's verdict, for every rank: none waits for a rank that left
        if refusal is not None:
            raise UserError(refusal)
        return _continue(run, session, state, opened, cfg, done, changes, reporter or make_reporter(quiet=quiet),
                         wall_start, stop)


def resume_settable(key: str) -> bool:
    """Whether a resumed run may change the dotted config ``key`` (``RESUME_SETTABLE``)."""
    return key in RESUME_SETTABLE or any(p.endswith(".*") and key.startswith(p[:-1]) for p in RESUME_SETTABLE)


def settable_overrides(settings: list[str], run_dir: Path) -> list[tuple[str, Any]]:
    """``resume --set`` strings as (dotted key, value); a key a resumed run may not change is refused."""
    parsed = []
    for text in settings:
        parts, value = parse_override(text)
        key = ".".join(parts)
        if not resume_settable(key):
            raise UserError(f"--set {key}: a resumed run cannot change {key} (its checkpoint's weights, optimiser state "
                            f"and data belong to the config it was trained with); a resume may change "
                            f"{', '.join(RESUME_SETTABLE)}. To train with another {key}, start a new run: "
                            f"cnnlab run {Path(run_dir) / 'config.yaml'} --set {text}")
        parsed.append((key, value))
    return parsed


def setting_changes(trained: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, value the checkpoint was trained with, value from now on) for each settable key that differs."""
    before, after = trained.to_dict(), cfg.to_dict()
    return [(key, _lookup(before, key), _lookup(after, key))
            for key in config_differences(before, after) if resume_settable(key)]


def _lookup(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def check_same_data(data: Data, summary: RunSummary, run_dir: Path) -> None:
    """Refuse to continue a run on other data than it was trained on (sizes and pixel statistics)."""
    now = {"train_size": len(data.train), "val_size": len(data.val) if data.val is not None else 0,
           "test_size": len(data.test), "pixel_mean": data.mean, "pixel_std": data.std}
    differs = [f"{key} {getattr(summary, key)} then, {value} now" for key, value in now.items()
               if getattr(summary, key) is not None and getattr(summary, key) != value]
    if differs:
        raise UserError(f"the data in {data.root} is not the data {run_dir} was trained on ({'; '.join(differs)}); "
                        f"point --data-dir at the original files (the run used {summary.data_root})")


def _continue(run: RunDir, session: Session, state: TrainState, opened: OpenedRun, cfg: Config, done: int,
              changes: list[dict[str, Any]], reporter: Reporter, wall_start: float, stop: StopSignals) -> dict[str, Any]:
    """Rewrite the folder's config, metrics and summary for the resumed run, then train (holding its lock).
    ``changes``: the settings that differ from the checkpoint's, recorded in this resume's entry."""
    from cnnlab.engine import describe_run, for_rank, train

    run_dir, summary = run.path, opened.summary
    reporter = for_rank(reporter, session.world)
    if cfg != opened.cfg:
        run.write_config(dump_config(cfg))
    run.metrics = state.metrics
    run.write_metrics()  # rows past the checkpoint are redone
    fresh = describe_run(session, run)
    resumed = summary.model_copy(update={k: getattr(fresh, k) for k in (
        "status", "epochs", "device", "device_name", "precision", "threads", "torch_version", "git_commit", "pid",
        "host", "data_root", "data")})
    for key in ("error", "stopped_at", "finished", "test_acc", "test_loss", "test_checkpoint", "final"):
        setattr(resumed, key, None)
    at = state.current.batches if state.current is not None else 0
    resumed.resumes = [*summary.resumes, {
        "at": utc_now(), "from_status": opened.state, "from_epoch": done, "from_batch": at, "epochs": cfg.train.epochs,
        "device": str(session.runtime.device), "host": socket.gethostname(), "pid": os.getpid(), "changes": changes,
    }]
    run.write_summary(resumed)
    where = f"epoch {done + 1} of {cfg.train.epochs}" + (f", batch {at}" if at else "")
    with_changes = "".join(f", {c['key']} {c['old']} -> {c['new']}" for c in changes)
    reporter.message(f"resuming {run_dir} ({opened.state}) at {where}{with_changes}")
    return train(session, run, state, resumed, reporter, wall_start, stop)


def runs_of(cfg: Config) -> list[tuple[Path, RunSummary, str]]:
    """Every readable run of exactly ``cfg`` (where it trained and where its results go aside), newest
    first, with its state (``run_state``). Folders that cannot be read are passed over."""
    folder = Path(cfg.output.dir) / sanitize_name(cfg.name)
    wanted = comparable(cfg.to_dict())
    found = []
    candidates = (p.parent for p in folder.glob("*/summary.json") if not p.parent.name.startswith("."))  # .incoming-*
    for run_dir in sorted(candidates, reverse=True):  # run ids start with the time
        try:
            summary = read_summary(run_dir / "summary.json")
            if comparable(read_yaml(run_dir / "config.yaml")) == wanted:
                found.append((run_dir, summary, run_state(run_dir, summary)))
        except UserError:
            continue
    return found


def find_resumable(cfg: Config) -> Path | None:
    """The newest unfinished run (interrupted, failed, stale) of exactly ``cfg`` whose checkpoint loads."""
    for run_dir, _, state in runs_of(cfg):
        last = run_dir / "checkpoints" / "last.pt"
        if state not in RESUMABLE or not last.is_file():
            continue
        try:
            if Checkpoint.load(last).state is not None:
                return run_dir
        except UserError as err:
            warn(f"{err}; not resuming that run")
    return None


def run_or_resume(cfg: Config, *, quiet: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    """``cnnlab run CONFIG --resume auto``: continue the newest unfinished run of this config, or start one."""
    from cnnlab.engine import fit, join_world

    world = join_world(cfg)  # under torchrun, rank 0 decides for every rank
    previous = world.broadcast(find_resumable(cfg) if world.is_main else None)
    if previous is None:
        return fit(cfg, quiet=quiet, reporter=reporter)
    return resume(previous, device=cfg.train.device, quiet=quiet, reporter=reporter, trust_code=True)
