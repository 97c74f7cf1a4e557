"""Usage: ``opened = open_run(Path("results/lenet/20261128T..."))``; ``found = runs_of(cfg)``.

Opening and finding run folders that already exist: one ``open_run`` for eval, visualize, report
and resume (config, summary, liveness and a verified checkpoint, with a warning when the run did
not complete), and ``runs_of``, the runs of exactly one config (with ``comparable`` and
``config_differences``, which say when two configs compute the same thing). A run folder may come
from anyone, so nothing in it is trusted: files are validated, and a config that names Python code
is refused unless the user passes ``trust_code``. Continuing a run is the engine's (engine.resume).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.config import Config, deep_merge, read_yaml, validate
from cnnlab.data import Data, DataSpec, described, load_data
from cnnlab.errors import UserError, hushed, warn
from cnnlab.results import (
    Checkpoint,
    RunSummary,
    read_metrics_csv,
    read_summary,
    run_state,
    sanitize_name,
)

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
    run_dir: Path, device: str | torch.device = "cpu", *, checkpoint: str | None = "best", trust_code: bool = False,
    weights: str = "raw",
) -> OpenedRun:
    """A run's config, summary and state, and (unless ``checkpoint`` is None) its trained model: the weights
    themselves (``raw``), their moving average (``ema``, from a run with ``train.ema``) or the average of its last
    epochs' (``swa``, ``train.swa``: a completed run's last checkpoint, its BatchNorm statistics measured again)."""
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
    if weights not in ("raw", "ema", "swa"):
        raise UserError(f"--weights {weights!r}: choose raw (the weights themselves), ema (their moving average) or swa "
                        "(the average of the last epochs')")
    if weights == "swa" and checkpoint != "last":
        raise UserError("--weights swa: the average of the last epochs is in the last checkpoint; "
                        "add --checkpoint last")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise UserError(f"{path} is missing: the run wrote no checkpoints (output.checkpoints: false) or did not "
                        "finish an epoch")
    saved = Checkpoint.load(path)
    if weights == "swa":
        check_swa(saved, path, opened)
    elif state != "completed":
        warn(f"{run_dir} is {describe_state(opened)}; using its {checkpoint} checkpoint anyway")
    if weights == "ema" and saved.ema is None:
        raise UserError(f"{path} holds no moving average of the weights (the run trained without train.ema); "
                        "leave out --weights ema")
    with hushed():  # what building the model says (a library model's rebuilt first layer) its training said already
        model = build_model(cfg, spec=opened.spec)
    try:
        model.load_state_dict({"raw": saved.model, "ema": saved.ema, "swa": saved.swa}[weights])
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit the model described by {run_dir / 'config.yaml'} "
                        "(the file belongs to another run, or config.yaml was changed)") from None
    opened.model, opened.checkpoint = model.to(device).eval(), checkpoint
    return opened


def check_swa(saved: Checkpoint, path: Path, opened: OpenedRun) -> None:
    """That ``saved`` (a run's last checkpoint) holds a finished average of the last epochs (``train.swa``)."""
    if saved.swa is None:
        raise UserError(f"{path} holds no average of the last epochs' weights (the run trained without train.swa); "
                        "leave out --weights swa")
    if opened.state != "completed":
        raise UserError(f"{opened.path} is {describe_state(opened)}: the average of its last epochs is finished "
                        "(its BatchNorm statistics measured) only when training ends; wait for it to finish, or "
                        "resume it if it stopped")
    if not (saved.state or {}).get("swa_updates"):
        raise UserError(f"{opened.path}: early stopping ended training before the last "
                        f"{opened.cfg.train.swa.epochs if opened.cfg.train.swa else 'few'} epochs that train.swa "
                        "averages; there is no average to evaluate")


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
# Finding the runs of a config


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
    defaults = Config().to_dict()  # merged at every depth: a key added inside data.augment is missing there
    config = {k: deep_merge(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
              for k, v in config.items()}
    for section, key in PLACEMENT_KEYS:
        if isinstance(config.get(section), dict):
            config[section].pop(key, None)
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str):  # the same folder, however it was written
        data["root"] = os.path.abspath(os.path.expanduser(data["root"]))
    return config


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
