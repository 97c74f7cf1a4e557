"""Usage: ``key = experiment_key(cfg.to_dict(), summary)``; ``labels = variant_labels(keys)``.

The one rule for "are these runs the same experiment?", used by every table that averages over
seeds (``compare``, ``report``, a sweep's and a tune's summary): two runs are averaged together only
when their configs differ in nothing but the seed and placement (where a run trains and where its
results go: keys that change how fast it runs or float rounding, never what it computes), and when
they trained on the same data (the same ``data.root``, however it was written, and the same split
sizes in their summaries). The pixel statistics are not compared: the validation split, and so the
training split's mean, changes with the seed.

A config read back from a run folder is untrusted: it is only flattened, never validated or
imported. Keys that a run's (older) config lacks take today's defaults, so a cnnlab version that
adds a key with a default that keeps the old behaviour does not split old runs from new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from typing import Any

# Placement: how and where a run is computed, not what. (seed is what the mean is taken over.)
PLACEMENT_KEYS = frozenset({
    "name", "seed",
    "train.device", "train.threads", "train.eval_batch_size", "train.compile", "train.channels_last",
    "train.cuda_graphs", "train.tf32",
    "data.download", "model.download",  # how the files got there, not which files
    "output.dir", "output.checkpoints", "output.loggers", "output.mlflow_uri", "output.log_every_n_steps",
})
# What the summary says of the data a run saw, besides where it was (data.root).
DATA_KEYS = ("train_size", "val_size", "test_size")

ExperimentKey = dict[str, Any]  # dotted key -> value, placement dropped; compared as a whole


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 5}}`` -> ``{"train.epochs": 5}``; lists and other values are leaves."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


@cache
def _default_keys() -> dict[str, Any]:
    from cnnlab.config import Config

    return flatten(Config().to_dict())


def _model_defaults(name: Any) -> dict[str, Any]:
    """A built-in model's option defaults (config.yaml holds only the options that were given).
    Only names in the registry are looked up: nothing named by a file is imported."""
    from cnnlab.models.registry import option_defaults

    return {f"model.{k}": v for k, v in option_defaults(name, from_data=True).items()}


def experiment_key(config: dict[str, Any], summary: Any = None) -> ExperimentKey:
    """The experiment a run belongs to: its config's keys but placement, and its data's statistics."""
    flat = flatten(config)
    defaults = {k: v for k, v in _default_keys().items() if not k.startswith("model.")}
    defaults.update(_model_defaults(flat.get("model.name", _default_keys()["model.name"])))
    key = {k: v for k, v in {**defaults, **flat}.items() if k not in PLACEMENT_KEYS}
    if isinstance(key.get("data.root"), str):  # the same folder, however it was written
        key["data.root"] = os.path.abspath(os.path.expanduser(key["data.root"]))
    for name in DATA_KEYS:
        value = getattr(summary, name, None) if summary is not None else None
        if isinstance(value, int):
            key[f"data.{name}"] = value
    return key


def fingerprint(key: ExperimentKey | None) -> str:
    """A short stable name for an experiment key ('' for a run whose config could not be read)."""
    if key is None:
        return ""
    text = json.dumps(key, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_value_text, value)) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def variant_labels(name: str, keys: list[ExperimentKey | None]) -> list[str]:
    """A label per distinct experiment sharing ``name``, in the order given: the one given first is
    ``name`` itself, every other ``name[key=value,...]`` with the keys in which it differs from that
    one (``lenet[model.pool=max,optim.lr=0.5]``). Callers pass the most-run variant first."""
    if not keys:
        return []
    reference = keys[0]
    labels = []
    for i, key in enumerate(keys):
        if i == 0:
            labels.append(name if key is not None or len(keys) == 1 else f"{name}[config unknown]")
        elif key is None:
            labels.append(f"{name}[config unknown]")
        elif reference is None:
            labels.append(f"{name}[{fingerprint(key)}]")
        else:
            labels.append(name + "[" + ",".join(f"{k}={_value_text(key.get(k))}" for k in _differing(key, reference)) + "]")
    return labels


_MISSING = object()


def _differing(key: ExperimentKey, reference: ExperimentKey) -> list[str]:
    """The keys that set ``key`` apart from ``reference``, as a label names them: those it sets otherwise, and of
    those only it has (another model's options) the ones set to other than their model's default; only where that
    leaves none, the keys only the reference has (an option left out, which then shows as null)."""
    defaults = _model_defaults(key.get("model.name"))
    own = sorted(k for k in key if (key[k] != reference[k] if k in reference else key[k] != defaults.get(k, None)))
    return own or sorted(k for k in set(key) ^ set(reference) if k in reference)
