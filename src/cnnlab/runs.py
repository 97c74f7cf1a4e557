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
from cnnlab.models.registry import option_defaults
from cnnlab.results import (
    Checkpoint,
    RunSummary,
    figure_weights,
    read_metrics_csv,
    read_summary,
    run_state,
    sanitize_name,
)

# Where a run trains and where its results go, not what it computes: ignored when matching runs.
PLACEMENT_KEYS = (("train", "device"), ("train", "threads"), ("output", "dir"))


@dataclass
class OpenedRun:
    path: Path
    cfg: Config
    summary: RunSummary
    state: str  # the summary's status, or "stale" for a run whose process died without a word
    model: nn.Module | None = None  # in eval mode, with the chosen checkpoint's weights
    checkpoint: str | None = None  # best or last
    weights: str | None = None  # raw, ema or swa
    epoch: int | None = None  # the epoch those weights are from

    @property
    def spec(self) -> DataSpec:
        """What the run trained on, as its summary records it; for a run of an older cnnlab, which recorded
        none, its data set as known by name (Fashion-MNIST), without reading any file."""
        return self.summary.data or described(self.cfg.data.name)

    def used(self) -> dict[str, Any]:
        """Which model a command used, for its JSON: the run folder, the weights and the epoch they are from, and the
        run's own answer (its headline figure, named and in words)."""
        from cnnlab.results import figure_label

        name, value = self.summary.headline_figure()
        return {"run": str(self.path), "checkpoint": self.checkpoint, "weights": self.weights, "epoch": self.epoch,
                "epochs": self.summary.epochs_completed, "headline": name,
                "headline_label": figure_label(name, self.summary.test_tta), "headline_value": value}

    def used_line(self) -> str:
        return used_line(self.used())

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


def used_line(used: dict[str, Any]) -> str:
    """``OpenedRun.used()`` in words: "run results/x/ID: the moving average of the weights of epoch 50 of 50 (last
    checkpoint); its ema test acc, flip+crop TTA 0.9492"."""
    from cnnlab.numtext import number_text

    weights = {"raw": "the weights", "ema": "the moving average of the weights",
               "swa": "the average of the last epochs' weights"}.get(used["weights"] or "raw")
    value = used["headline_value"]
    answer = f"; its {used['headline_label']} {number_text(value, 4)}" if value is not None else ""
    return f"run {used['run']}: {weights} of epoch {used['epoch']} of {used['epochs']} ({used['checkpoint']} checkpoint){answer}"


def tested_weights(summary: RunSummary) -> str:
    """The weights of the run's declared answer (eval.headline): raw, ema or swa; raw for runs that declared none."""
    return figure_weights(summary.headline_figure()[0])


def tested_checkpoint(summary: RunSummary, weights: str) -> str:
    """best or last: the checkpoint the run's test pass took ``weights`` from (train.select, as summary.json's
    selection records it); best for runs that recorded none, but last for swa, whose average only the last holds."""
    tested = getattr(summary.selection, weights, None) if summary.selection is not None else None
    if tested is None:
        return "last" if weights == "swa" else "best"
    return "last" if tested.checkpoint == "last" else "best"


def open_run(
    run_dir: Path, device: str | torch.device = "cpu", *, checkpoint: str | None = "auto", trust_code: bool = False,
    weights: str = "auto",
) -> OpenedRun:
    """A run's config, summary and state, and (unless ``checkpoint`` is None) its trained model: the weights
    themselves (``raw``), their moving average (``ema``, from a run with ``train.ema``) or the average of its last
    epochs' (``swa``, ``train.swa``: a completed run's last checkpoint, its BatchNorm statistics measured again);
    ``auto``: those of the run's headline figure (eval.headline). ``checkpoint``: best (those weights' own best
    epoch on the validation split), last, or ``auto``: the one the run's test pass took them from (train.select)."""
    from cnnlab.models.build import build_model

    run_dir = require_run_dir(run_dir)
    cfg = load_run_config(run_dir / "config.yaml", trust_code)
    summary = read_summary(run_dir / "summary.json")
    state = run_state(run_dir, summary)
    opened = OpenedRun(run_dir, cfg, summary, state)
    if checkpoint is None:
        return opened
    if checkpoint not in ("auto", "best", "last"):
        raise UserError(f"--checkpoint {checkpoint!r}: choose best, last or auto (the one the run was tested with)")
    if weights not in ("auto", "raw", "ema", "swa"):
        raise UserError(f"--weights {weights!r}: choose raw (the weights themselves), ema (their moving average), swa "
                        "(the average of the last epochs') or auto (those of the run's headline figure)")
    weights = tested_weights(summary) if weights == "auto" else weights
    checkpoint = tested_checkpoint(summary, weights) if checkpoint == "auto" else checkpoint
    if weights == "swa" and checkpoint != "last":
        raise UserError("--weights swa: the average of the last epochs is in the last checkpoint; "
                        "add --checkpoint last")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if checkpoint == "best" and weights == "ema" and (run_dir / "checkpoints" / "best_ema.pt").is_file():
        path = run_dir / "checkpoints" / "best_ema.pt"  # the average's own best epoch (older runs: best.pt's)
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
    opened.model, opened.checkpoint, opened.weights, opened.epoch = model.to(device).eval(), checkpoint, weights, saved.epoch
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
    model = config.get("model")
    if isinstance(model, dict):  # a registered model's options, whether its config.yaml spelled out their defaults
        config["model"] = {**option_defaults(model.get("name")), **model}
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
