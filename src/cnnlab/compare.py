"""Usage: ``found = collect_rows([Path("results/sweeps/kernels")])``; ``print(markdown_table(aggregate(found.rows)))``.

Turns run folders into the report's comparison table: one row per run, then one row per experiment
with mean +- std over seeds. Runs are averaged together only when they are the same experiment
(identity.py: the same config but for the seed and placement, on the same data); variants of one
name are labelled by the keys in which they differ. Everything is read from the files runs wrote
(summary.json, config.yaml), and a file that cannot be read is named and skipped, never fatal to
the rest of the table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from cnnlab.config import HEADLINES
from cnnlab.data import DEFAULT
from cnnlab.errors import UserError, warn
from cnnlab.identity import ExperimentKey, experiment_key, fingerprint, variant_labels
from cnnlab.numtext import MISSING, finite, number_text
from cnnlab.results import TEST_ACC_BESIDE, RunSummary, read_regular_text, read_summary, run_state

# summary.csv's columns after the swept keys. Newer columns come last (``data``, the run's data set, then the test
# accuracies reported beside the plain one), so that the columns of CSVs written before them keep their places for
# programs that read them by position.
ROW_COLUMNS = (
    "name", "params_swept", "seed", "train_loss", "train_acc", "val_acc", "test_acc",
    "examples_per_sec", "wall_seconds", "params", "status", "error", "run_dir", "data", *TEST_ACC_BESIDE,
    "epochs", "headline", "headline_acc",
)
METRICS = ("train_loss", "train_acc", "val_acc", "test_acc", "examples_per_sec", "wall_seconds")
# The tables' headers of the test accuracies beside the plain one: a column each, after "test acc", only where
# an experiment shown has that figure (a run with eval.tta, train.ema or train.swa).
BESIDE_HEADERS = {"test_acc_tta": "test acc TTA", "test_acc_ema": "ema test acc", "test_acc_ema_tta": "ema TTA",
                  "test_acc_swa": "swa test acc", "test_acc_swa_tta": "swa TTA"}
FIGURE_SHORT = {"test_acc": "test acc", **BESIDE_HEADERS}  # a headline figure's name in a table (eval.headline)


DONE = ("completed", "skipped")  # statuses whose results count in the means


def row_from_summary(summary: RunSummary, run_dir: Path | None, swept: str = "", status: str | None = None,
                     config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A table row of one run; ``config`` (the run's resolved config) says which experiment it is."""
    final = summary.final or {}
    experiment = experiment_key(config, summary) if config is not None else None
    headline, headline_acc = summary.headline_figure()
    return {
        "name": summary.name,
        "params_swept": swept,
        "seed": summary.seed,
        "train_loss": final.get("train_loss"),
        "train_acc": final.get("train_acc"),
        "val_acc": final.get("val_acc"),
        "test_acc": summary.test_acc,
        "examples_per_sec": summary.train_examples_per_sec,
        "wall_seconds": summary.wall_seconds,
        "params": summary.params,
        "status": status or summary.status,
        "error": summary.error or "",
        "run_dir": str(run_dir) if run_dir else "",
        "data": data_name(summary, config),
        "experiment": experiment,
        "fingerprint": fingerprint(experiment),
        **{key: getattr(summary, key) for key in TEST_ACC_BESIDE},
        "epochs": summary.epochs_completed,
        # the run's answer (eval.headline; the plain test accuracy for runs that declared none): the tables lead with it
        "headline": headline,
        "headline_acc": headline_acc,
    }


def data_name(summary: RunSummary, config: dict[str, Any] | None) -> str:
    """The data set a run trained on: as its summary records it, else as its config names it (a trial that
    failed before recording any); Fashion-MNIST for runs of cnnlab versions that knew no other."""
    if summary.data is not None:
        return summary.data.name
    named = config.get("data") if config is not None else None
    return named["name"] if isinstance(named, dict) and isinstance(named.get("name"), str) else DEFAULT


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run folder's config.yaml as a plain mapping (read safely, never validated into code)."""
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(read_regular_text(path))
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: not a readable cnnlab config.yaml (nested too deeply or too large)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path}: not a readable cnnlab config.yaml ({type(err).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
        raise UserError(f"{path}: not a cnnlab config.yaml (expected the run's resolved config)")
    return data


def run_config_or_none(run_dir: Path | None) -> dict[str, Any] | None:
    """``read_run_config``, or None where there is no readable one (a trial that never started a run)."""
    try:
        return read_run_config(run_dir) if run_dir is not None else None
    except UserError:
        return None


def run_row(run_dir: Path, swept: str = "") -> dict[str, Any]:
    """The comparison row of one run folder, its status ``stale`` when its process died unrecorded."""
    summary = read_summary(run_dir / "summary.json")
    return row_from_summary(summary, run_dir, swept, status=run_state(run_dir, summary), config=read_run_config(run_dir))


def _run_dirs_under(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob("summary.json"))


@dataclass
class Collected:
    """The rows that could be read, and a line per run, sweep or folder that could not (already warned)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def collect_rows(targets: list[Path]) -> Collected:
    """Rows for runs, sweeps (their latest ``trials.json``) or folders holding runs, in the order given.

    Whatever cannot be read (a missing target, a broken summary.json or config.yaml) is named in a
    warning and skipped; the rest is shown. Only when nothing at all can be read is it an error.
    """
    found = Collected()

    def skip(message: str) -> None:
        warn(f"{message}; skipped")
        found.skipped.append(message)

    for target in map(Path, targets):
        if not target.exists():
            skip(f"{target}: no such run or sweep folder")
            continue
        sweep_file = latest_trials_file(target)
        if sweep_file is not None:
            try:
                trials = read_trials(sweep_file)
            except UserError as err:
                warn(f"{err}; reading the run folders below {target} instead")
            else:
                missing = [r for r in trials if r["status"] in DONE and r["run_dir"]
                           and not Path(r["run_dir"], "summary.json").is_file()]
                if missing:
                    warn(f"{sweep_file}: {len(missing)} of its run folders are missing (a sweep folder moved without "
                         f"the runs/ beside it?), e.g. {missing[0]['run_dir']}; their numbers come from trials.json")
                found.rows += trials
                continue
        runs = [target] if (target / "summary.json").is_file() else _run_dirs_under(target)
        if not runs:
            skip(f"{target}: holds no cnnlab runs (no summary.json below it)")
        for run in runs:
            try:
                found.rows.append(run_row(run))
            except UserError as err:
                skip(str(err))
    if not found.rows:
        raise UserError("nothing to compare: " + "; ".join(found.skipped))
    return found


TRIAL_NUMBERS = ("seed", "train_loss", "train_acc", "val_acc", "test_acc", "examples_per_sec", "wall_seconds", "params",
                 *TEST_ACC_BESIDE, "epochs", "headline_acc")


def read_trials(path: Path) -> list[dict[str, Any]]:
    """A sweep's trials.json, validated; ``run_dir`` entries are relative to the file's folder."""
    try:
        rows = json.loads(read_regular_text(path))
    except (RecursionError, MemoryError):
        raise UserError(f"{path}: not a readable trials.json (nested too deeply or too large)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not a readable trials.json ({type(err).__name__})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: not a cnnlab trials.json (expected a list of trials)")
    clean = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not isinstance(row.get("status"), str):
            raise UserError(f"{path}: trial {i} is not a cnnlab trial (needs a name and a status)")
        for key in TRIAL_NUMBERS:
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"{path}: trial {i} ({row['name']}): {key} is not a number")
        if row.get("headline") is not None and row["headline"] not in HEADLINES:
            raise UserError(f"{path}: trial {i} ({row['name']}): headline is not one of {', '.join(HEADLINES)}")
        run_dir = row.get("run_dir") or ""
        if not isinstance(run_dir, str):
            raise UserError(f"{path}: trial {i} ({row['name']}): run_dir is not a path")
        swept = row.get("swept") if isinstance(row.get("swept"), dict) else {}
        run_path = str(path.parent / run_dir) if run_dir else ""
        experiment = _trial_experiment(row.get("experiment"), run_path)
        data = row.get("data") if isinstance(row.get("data"), str) else DEFAULT  # trials.json before data sets: Fashion-MNIST
        clean.append({**{c: row.get(c) for c in ROW_COLUMNS}, "params_swept": str(row.get("params_swept") or ""),
                      "error": str(row.get("error") or ""), "swept": swept, "run_dir": run_path, "data": data,
                      "experiment": experiment, "fingerprint": fingerprint(experiment)})
    return clean


def _trial_experiment(recorded: Any, run_dir: str) -> ExperimentKey | None:
    """A trial's experiment key as trials.json recorded it; for a file written before cnnlab recorded
    it, from the run folder's config.yaml and summary.json (None when neither can be read)."""
    if isinstance(recorded, dict) and all(isinstance(k, str) for k in recorded):
        return recorded
    if not run_dir:
        return None
    try:
        return experiment_key(read_run_config(Path(run_dir)), read_summary(Path(run_dir) / "summary.json"))
    except UserError:
        return None


def latest_trials_file(folder: Path) -> Path | None:
    """A sweep's ``trials.json``: in ``folder`` itself, or in its newest timestamped sub-folder."""
    if (folder / "trials.json").is_file():
        return folder / "trials.json"
    stamped = sorted(p for p in folder.glob("*/trials.json") if p.parent.name[:1].isdigit())
    return stamped[-1] if stamped else None


def in_order(seeds: list[Any]) -> list[Any]:
    """The seeds in increasing order, whichever run came first (as read, where one is not a whole number)."""
    return sorted(seeds) if all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds) else seeds


Stat = tuple[Optional[float], Optional[float]]  # (mean, std) over seeds; (None, None) where nothing was measured


def mean_std(values: list[Any]) -> Stat:
    """Mean and sample std of the values given (None: not measured, left out). A NaN or an infinity
    is a real outcome (a diverged run), so it is not dropped: the mean becomes NaN or infinite too."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    if not all(map(finite, values)):
        with_inf = [v for v in values if not math.isnan(v)]
        if len(with_inf) < len(values) or (math.inf in with_inf and -math.inf in with_inf):
            return math.nan, math.nan
        return math.fsum(with_inf), math.nan  # +inf or -inf: the sign the infinities share
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per experiment (name, swept values and experiment key): metric -> (mean, std) over its
    completed seeds. Variants of one name are told apart in ``label`` by the keys that differ."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["name"], row.get("params_swept", ""), row.get("fingerprint") or ""), []).append(row)
    labels = _labels(groups)
    table = []
    for group, members in groups.items():
        name, swept, _ = group
        done = [r for r in members if r["status"] in DONE]
        unfinished: dict[str, int] = {}
        for r in members:
            if r["status"] not in DONE:
                unfinished[r["status"]] = unfinished.get(r["status"], 0) + 1
        entry: dict[str, Any] = {
            "name": labels[group],
            "params_swept": swept,
            "seeds": in_order([r["seed"] for r in done]),
            "runs": len(members),
            "failed": len(members) - len(done),
            "unfinished": unfinished,  # status -> count: failed, interrupted, running, stale
            "params": next((r["params"] for r in members if r.get("params")), None),
            "data": next((r["data"] for r in members if r.get("data")), DEFAULT),
            "run_dirs": [r["run_dir"] for r in members if r.get("run_dir")],
            "epochs": sorted({r["epochs"] for r in done if isinstance(r.get("epochs"), int)}),
            "headline": next((r["headline"] for r in done if r.get("headline")), "test_acc"),  # one experiment: one rule
        }
        for metric in (*METRICS, *TEST_ACC_BESIDE):
            entry[metric] = mean_std([r.get(metric) for r in done])
        # a trials.json written before runs declared a headline: its figure, the plain test accuracy
        entry["headline_acc"] = mean_std([r["headline_acc"] if r.get("headline_acc") is not None
                                          else r.get(r.get("headline") or "test_acc") for r in done])
        table.append(entry)
    return table


def _labels(groups: dict[tuple[str, str, str], list[dict[str, Any]]]) -> dict[tuple[str, str, str], str]:
    """The shown name of each group: the experiment's name, and where one name (and swept point)
    holds several experiments, the keys that set each apart from the one with the most runs."""
    by_name: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for group in groups:
        by_name.setdefault(group[:2], []).append(group)
    labels = {}
    for (name, _), variants in by_name.items():
        ordered = sorted(variants, key=lambda g: -len(groups[g]))  # stable: ties keep the order first seen
        keys = [groups[g][0].get("experiment") for g in ordered]
        labels.update(zip(ordered, variant_labels(name, keys)))
    return labels


def metric_text(value: Any, kind: str) -> str:
    """A number of the ``kind`` column (METRICS) as the tables show it: examples/s whole, seconds to a
    tenth (both with thousands separated), accuracies and losses to three decimals."""
    decimals, grouped = {"examples_per_sec": (0, True), "wall_seconds": (1, True)}.get(kind, (3, False))
    return number_text(value, decimals, grouped=grouped)


def stat_text(value: Stat, kind: str) -> str:
    """A mean over seeds with its spread: ``0.912 ± 0.004``; the mean alone where there is no spread."""
    mean, std = value
    spread = f" ± {metric_text(std, kind)}" if finite(mean) and finite(std) and std else ""
    return metric_text(mean, kind) + spread




def shows_data(table: list[dict[str, Any]]) -> bool:
    """Whether the table needs a data-set column: only where the experiments in it differ in their data set."""
    return len({entry.get("data") or DEFAULT for entry in table}) > 1


def shown_beside(table: list[dict[str, Any]]) -> tuple[str, ...]:
    """The test accuracies beside the plain one (``TEST_ACC_BESIDE``) that some experiment in the table has."""
    return tuple(key for key in TEST_ACC_BESIDE if any((entry.get(key) or (None,))[0] is not None for entry in table))


METRIC_HEADERS = {"train_loss": "train loss", "train_acc": "train acc", "val_acc": "val acc", "test_acc": "test acc",
                  **BESIDE_HEADERS, "examples_per_sec": "examples/s", "wall_seconds": "wall s"}


def one_headline(table: list[dict[str, Any]]) -> str | None:
    """The headline figure every experiment shown gives as its answer, when they all give the same one."""
    names = {entry.get("headline") or "test_acc" for entry in table}
    return names.pop() if len(names) == 1 else None


def metric_columns(table: list[dict[str, Any]]) -> tuple[str, ...]:
    """The figures after the headline, in the tables' order: each test accuracy beside the plain one that some
    experiment shown has (``shown_beside``) right after it; the shared headline figure not again."""
    beside, shared = shown_beside(table), one_headline(table)
    at = METRICS.index("test_acc") + 1
    return tuple(m for m in (*METRICS[:at], *beside, *METRICS[at:]) if m != shared)


def table_headers(table: list[dict[str, Any]]) -> tuple[str, ...]:
    """``HEADERS``: the variant (and ``data`` where the experiments shown differ in it), the runs, then the headline
    figure (named in the header where every experiment shown has the same one, which then has no column of its own),
    then the other figures (``metric_columns``)."""
    shared = one_headline(table)
    return ("variant", *(("data",) if shows_data(table) else ()), "seeds", "epochs",
            f"headline: {FIGURE_SHORT[shared]}" if shared else "headline",
            *(METRIC_HEADERS[m] for m in metric_columns(table)), "params", "status")


def table_rows(table: list[dict[str, Any]]) -> list[list[str]]:
    """Each experiment's cells, under ``table_headers(table)``."""
    with_data, metrics, named = shows_data(table), metric_columns(table), one_headline(table) is None
    return [table_cells(entry, with_data, metrics, named) for entry in table]


def seeds_text(seeds: list[Any]) -> str:
    """How many runs a row's figures come from, and their seeds: "n=1 (seed 0)", "n=3 (seeds 0,1,2)"."""
    if not seeds:
        return MISSING
    return f"n={len(seeds)} (seed{'s' * (len(seeds) > 1)} {','.join(map(str, seeds))})"


def epochs_text(epochs: list[int] | None) -> str:
    """The epochs its runs trained: "20", or "5-20" where they differ."""
    if not epochs:
        return MISSING
    return str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"


def table_cells(entry: dict[str, Any], with_data: bool = False, metrics: tuple[str, ...] = METRICS,
                name_headline: bool = False) -> list[str]:
    """An experiment's cells; ``name_headline``: its headline figure's name beside its value (where the experiments
    shown give different ones)."""
    label = entry["name"]
    unfinished = entry.get("unfinished") or ({"failed": entry["failed"]} if entry["failed"] else {})
    status = "ok" if not unfinished else \
        ", ".join(f"{n} {state}" for state, n in sorted(unfinished.items())) + f" of {entry['runs']}"
    headline = stat_text(entry.get("headline_acc") or (None, None), "test_acc")
    if name_headline and headline != MISSING:
        headline += f" ({FIGURE_SHORT.get(entry.get('headline') or 'test_acc', 'test acc')})"
    return [
        label,
        *([entry.get("data") or DEFAULT] if with_data else []),
        seeds_text(entry["seeds"]),
        epochs_text(entry.get("epochs")),
        headline,
        *(stat_text(entry.get(m) or (None, None), m) for m in metrics),
        number_text(entry["params"], grouped=True) if entry["params"] else MISSING,
        status,
    ]


def markdown_table(table: list[dict[str, Any]]) -> str:
    headers = table_headers(table)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(table)]
    return "\n".join(lines) + "\n"


def write_trials(folder: Path, rows: list[dict[str, Any]], keys: list[str], extra: tuple[str, ...] = ()) -> None:
    """A sweep's or tune's trials.json and summary.csv, naming run folders relative to ``folder`` so
    that it can be moved or copied whole, together with its ``runs/`` beside it."""
    from cnnlab.results import atomic_write_text

    portable = [{**row, "run_dir": os.path.relpath(row["run_dir"], folder) if row.get("run_dir") else ""} for row in rows]
    atomic_write_text(folder / "trials.json", json.dumps(portable, indent=2, default=str) + "\n")
    atomic_write_text(folder / "summary.csv", rows_csv(portable, keys, extra))


def rows_csv(rows: list[dict[str, Any]], swept_keys: list[str], extra: tuple[str, ...] = ()) -> str:
    """summary.csv: a row per trial with each swept key as its own column (and ``extra`` columns after them),
    then ``ROW_COLUMNS``' own: ``data`` among them whether or not the runs differ in it, unlike the tables."""
    buffer = io.StringIO()
    columns = ["name", *swept_keys, *extra, *(c for c in ROW_COLUMNS if c not in ("name", "params_swept"))]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **row.get("swept", {})})
    return buffer.getvalue()
