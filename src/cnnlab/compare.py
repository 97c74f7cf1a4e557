"""Usage: ``rows = collect_rows([Path("results/sweeps/kernels")])``; ``print(markdown_table(aggregate(rows)))``.

Turns run folders into the report's comparison table: one row per run, then one row per variant
with mean +- std over seeds. Everything is read from the files runs wrote (summary.json).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from cnnlab.errors import UserError

ROW_COLUMNS = (
    "name", "params_swept", "seed", "train_loss", "train_acc", "val_acc", "test_acc",
    "examples_per_sec", "wall_seconds", "params", "status", "error", "run_dir",
)
METRICS = ("train_loss", "train_acc", "val_acc", "test_acc", "examples_per_sec", "wall_seconds")


def row_from_summary(summary: dict[str, Any], run_dir: Path | None, swept: str = "") -> dict[str, Any]:
    final = summary.get("final") or {}
    return {
        "name": summary.get("name", ""),
        "params_swept": swept,
        "seed": summary.get("seed"),
        "train_loss": final.get("train_loss"),
        "train_acc": final.get("train_acc"),
        "val_acc": final.get("val_acc"),
        "test_acc": summary.get("test_acc"),
        "examples_per_sec": summary.get("train_examples_per_sec"),
        "wall_seconds": summary.get("wall_seconds"),
        "params": summary.get("params"),
        "status": summary.get("status", "unknown"),
        "error": summary.get("error", ""),
        "run_dir": str(run_dir) if run_dir else "",
    }


def _run_dirs_under(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob("summary.json"))


def collect_rows(targets: list[Path]) -> list[dict[str, Any]]:
    """Rows for runs, sweeps (their latest ``trials.json``) or folders holding runs, in the order given."""
    rows: list[dict[str, Any]] = []
    for target in targets:
        target = Path(target)
        if not target.exists():
            raise UserError(f"{target}: no such run or sweep folder")
        sweep_file = latest_trials_file(target)
        if sweep_file is not None:
            rows += json.loads(sweep_file.read_text(encoding="utf-8"))
            continue
        runs = [target] if (target / "summary.json").is_file() else _run_dirs_under(target)
        if not runs:
            raise UserError(f"{target}: holds no cnnlab runs (no summary.json below it)")
        for run in runs:
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
            rows.append(row_from_summary(summary, run))
    return rows


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
        done = [r for r in members if r["status"] in ("completed", "skipped")]
        entry: dict[str, Any] = {
            "name": name,
            "params_swept": swept,
            "seeds": [r["seed"] for r in done],
            "runs": len(members),
            "failed": len(members) - len(done),
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
    status = "ok" if not entry["failed"] else f"{entry['failed']} of {entry['runs']} failed"
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


def rows_csv(rows: list[dict[str, Any]], swept_keys: list[str]) -> str:
    """summary.csv: a row per trial with each swept key as its own column."""
    buffer = io.StringIO()
    columns = ["name", *swept_keys, *(c for c in ROW_COLUMNS if c not in ("name", "params_swept"))]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **row.get("swept", {})})
    return buffer.getvalue()
