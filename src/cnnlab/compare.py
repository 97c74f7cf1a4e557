"""Usage: ``rows = collect_rows([Path("results/sweeps/kernels")])``; ``print(markdown_table(aggregate(rows)))``.

Turns run folders into the report's comparison table: one row per run, then one row per variant
with mean +- std over seeds. Everything is read from the files runs wrote (summary.json).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from cnnlab.errors import UserError, warn
from cnnlab.results import RunSummary, read_regular_text, read_summary, run_state

ROW_COLUMNS = (
    "name", "params_swept", "seed", "train_loss", "train_acc", "val_acc", "test_acc",
    "examples_per_sec", "wall_seconds", "params", "status", "error", "run_dir",
)
METRICS = ("train_loss", "train_acc", "val_acc", "test_acc", "examples_per_sec", "wall_seconds")


DONE = ("completed", "skipped")  # statuses whose results count in the means


def row_from_summary(summary: RunSummary, run_dir: Path | None, swept: str = "", status: str | None = None) -> dict[str, Any]:
    final = summary.final or {}
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
    }


def run_row(run_dir: Path, swept: str = "") -> dict[str, Any]:
    """The comparison row of one run folder, its status ``stale`` when its process died unrecorded."""
    summary = read_summary(run_dir / "summary.json")
    return row_from_summary(summary, run_dir, swept, status=run_state(run_dir, summary))


def _run_dirs_under(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob("summary.json"))


def collect_rows(targets: list[Path]) -> list[dict[str, Any]]:
    """Rows for runs, sweeps (their latest ``trials.json``) or folders holding runs, in the order given.

    A run or sweep file that cannot be read is left out with a warning naming it; the rest is shown.
    """
    rows: list[dict[str, Any]] = []
    for target in targets:
        target = Path(target)
        if not target.exists():
            raise UserError(f"{target}: no such run or sweep folder")
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
                rows += trials
                continue
        runs = [target] if (target / "summary.json").is_file() else _run_dirs_under(target)
        if not runs:
            raise UserError(f"{target}: holds no cnnlab runs (no summary.json below it)")
        readable = 0
        for run in runs:
            try:
                rows.append(run_row(run))
                readable += 1
            except UserError as err:
                if len(runs) == 1:
                    raise
                warn(f"{err}; skipped")
        if not readable:
            raise UserError(f"{target}: none of its {len(runs)} runs could be read (see the warnings above)")
    return rows


TRIAL_NUMBERS = ("seed", "train_loss", "train_acc", "val_acc", "test_acc", "examples_per_sec", "wall_seconds", "params")


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
        run_dir = row.get("run_dir") or ""
        if not isinstance(run_dir, str):
            raise UserError(f"{path}: trial {i} ({row['name']}): run_dir is not a path")
        swept = row.get("swept") if isinstance(row.get("swept"), dict) else {}
        clean.append({**{c: row.get(c) for c in ROW_COLUMNS}, "params_swept": str(row.get("params_swept") or ""),
                      "error": str(row.get("error") or ""), "swept": swept,
                      "run_dir": str(path.parent / run_dir) if run_dir else ""})
    return clean


def latest_trials_file(folder: Path) -> Path | None:
    """A sweep's ``trials.json``: in ``folder`` itself, or in its newest timestamped sub-folder."""
    if (folder / "trials.json").is_file():
        return folder / "trials.json"
    stamped = sorted(p for p in folder.glob("*/trials.json") if p.parent.name[:1].isdigit())
    return stamped[-1] if stamped else None


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (name, swept values): metric -> (mean, std) over its completed seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["name"], row.get("params_swept", "")), []).append(row)
    table = []
    for (name, swept), members in groups.items():
        done = [r for r in members if r["status"] in DONE]
        unfinished: dict[str, int] = {}
        for r in members:
            if r["status"] not in DONE:
                unfinished[r["status"]] = unfinished.get(r["status"], 0) + 1
        entry: dict[str, Any] = {
            "name": name,
            "params_swept": swept,
            "seeds": [r["seed"] for r in done],
            "runs": len(members),
            "failed": len(members) - len(done),
            "unfinished": unfinished,  # status -> count: failed, interrupted, running, stale
            "params": next((r["params"] for r in members if r.get("params")), None),
        }
        for metric in METRICS:
            entry[metric] = mean_std([r[metric] for r in done])
        table.append(entry)
    return table


def _fmt(value: tuple[float, float], kind: str) -> str:
    mean, std = value
    if math.isnan(mean):
        return "–"
    if kind in ("examples_per_sec", "wall_seconds"):
        if kind == "examples_per_sec":
            return f"{mean:,.0f}" + (f" ± {std:,.0f}" if std else "")
        return f"{mean:,.1f}" + (f" ± {std:,.1f}" if std else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std else "")


HEADERS = ("variant", "seeds", "train loss", "train acc", "val acc", "test acc", "examples/s", "wall s", "params", "status")


def table_cells(entry: dict[str, Any]) -> list[str]:
    label = entry["name"]
    unfinished = entry.get("unfinished") or ({"failed": entry["failed"]} if entry["failed"] else {})
    status = "ok" if not unfinished else \
        ", ".join(f"{n} {state}" for state, n in sorted(unfinished.items())) + f" of {entry['runs']}"
    return [
        label,
        ",".join(map(str, entry["seeds"])) or "–",
        *(_fmt(entry[m], m) for m in METRICS),
        f"{entry['params']:,}" if entry["params"] else "–",
        status,
    ]


def markdown_table(table: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(table_cells(entry)) + " |" for entry in table]
    return "\n".join(lines) + "\n"


def write_trials(folder: Path, rows: list[dict[str, Any]], keys: list[str], extra: tuple[str, ...] = ()) -> None:
    """A sweep's or tune's trials.json and summary.csv, naming run folders relative to ``folder`` so
    that it can be moved or copied whole, together with its ``runs/`` beside it."""
    from cnnlab.results import atomic_write_text

    portable = [{**row, "run_dir": os.path.relpath(row["run_dir"], folder) if row.get("run_dir") else ""} for row in rows]
    atomic_write_text(folder / "trials.json", json.dumps(portable, indent=2, default=str) + "\n")
    atomic_write_text(folder / "summary.csv", rows_csv(portable, keys, extra))


def rows_csv(rows: list[dict[str, Any]], swept_keys: list[str], extra: tuple[str, ...] = ()) -> str:
    """summary.csv: a row per trial with each swept key as its own column (and ``extra`` columns after them)."""
    buffer = io.StringIO()
    columns = ["name", *swept_keys, *extra, *(c for c in ROW_COLUMNS if c not in ("name", "params_swept"))]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **row.get("swept", {})})
    return buffer.getvalue()
