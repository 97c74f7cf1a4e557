"""Weights & Biases as a listener of a run, offline: its run files read back record by record (W&B's
``.wandb`` transaction log, a LevelDB-format log of ``wandb_internal.Record`` protobufs), across a
resume, with no network and no service process left behind."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'cnnlab[wandb]')")

from conftest import HANG_SECONDS, write_dataset

from cnnlab.engine import resume

BLOCK = 32768  # the LevelDB log's block; a record's 7-byte header never straddles one
FULL, LAST = 1, 4


def records(path: Path) -> list:
    """The records of a ``.wandb`` file, each checked against its CRC-32."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]  # the file's header: ident, magic, version
    found, pending, at = [], b"", 7
    while at + 7 <= len(data):
        if BLOCK - at % BLOCK < 7:  # the block's trailer
            at += BLOCK - at % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[at:at + 7])
        chunk = data[at + 7:at + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: a damaged record at {at}"
        at += 7 + length
        pending += chunk
        if kind in (FULL, LAST):
            found.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return found


def history(path: Path) -> list[dict]:
    """Each ``run.log`` call of the file, as a dict."""
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for record in records(path) if record.WhichOneof("record_type") == "history"]


def sessions(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def wandb_core_children() -> list[int]:
    """The processes whose parent is this one and whose name says W&B (its service, ``wandb-core``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # a process that ended while being read
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 1:].split()
        if int(fields[1]) == os.getpid() and "wandb" in name:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run on tiny data logged to W&B (a point every 4 steps): 1 epoch by the CLI, as a user runs it
    (its output kept), then resumed in this process for a 2nd. WANDB_MODE unset, as on a user's machine:
    offline is cnnlab's default. Returns (run folder, summary, the CLI's output)."""
    root = tmp_path_factory.mktemp("wandb")
    data = write_dataset(root / "data")
    config = root / "wandb-test.yaml"
    config.write_text("name: wandb-test\noutput: {loggers: [wandb], log_every_n_steps: 4}\n")
    sets = [f"data.root={data}", "data.check_counts=false", "data.val_size=100", "train.epochs=1", "train.batch_size=32",
            "train.device=cpu", "optim.lr=0.1", f"output.dir={root / 'results'}"]
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    env["WANDB_ERROR_REPORTING"] = "false"  # no crash report sent anywhere, should one happen
    argv = [sys.executable, "-m", "cnnlab", "run", str(config), "--quiet", *[a for s in sets for a in ("--set", s)]]
    first = subprocess.run(argv,
                           capture_output=True, text=True, timeout=HANG_SECONDS, env=env)
    assert first.returncode == 0, first.stderr
    [run_dir] = (root / "results" / "wandb-test").iterdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WANDB_MODE", raising=False)
        patch.setenv("WANDB_ERROR_REPORTING", "false")
        summary = resume(run_dir, epochs=2, quiet=True)
    return run_dir, summary, first.stdout + first.stderr


def test_every_epochs_metrics_are_in_the_offline_run_files(logged):
    run_dir, summary, _ = logged
    files = sessions(run_dir)
    assert len(files) == 2  # one folder per session, both of the one W&B run
    rows = [row for file in files for row in history(file) if "epoch" in row]
    assert [row["epoch"] for row in rows] == [1, 2]
    written = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
    header = written[0]
    for row, values in zip(rows, written[1:]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert row[key] == pytest.approx(float(values[header.index(key)]), rel=1e-5), key  # metrics.csv: 6 digits
    [run] = [r.run for r in records(files[0]) if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_dir.name and run.display_name == run_dir.name and run.project == "wandb-test"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["optim"]["lr"] == 0.1 and config["output"]["loggers"] == ["wandb"]
    final = {item.key: json.loads(item.value_json) for r in records(files[-1]) if r.WhichOneof("record_type") == "summary"
             for item in r.summary.update if item.key}
    assert final["test_acc"] == pytest.approx(summary["test_acc"]) and final["best_val_acc"] == summary["best_val_acc"]


def test_a_point_every_n_steps_at_the_global_step_across_the_resume(logged):
    run_dir, summary, _ = logged
    per_epoch = math.ceil(summary["train_size"] / 32)
    points = [row for file in sessions(run_dir) for row in history(file) if "global_step" in row]
    assert [row["global_step"] for row in points] == list(range(4, 2 * per_epoch + 1, 4))
    assert all(0 <= row["step/train_acc"] <= 1 and row["step/lr"] == pytest.approx(0.1) for row in points)
    metrics = {r.metric.name or r.metric.glob_name: r.metric.step_metric for r in records(sessions(run_dir)[0])
               if r.WhichOneof("record_type") == "metric"}
    assert metrics["step/*"] == "global_step" and metrics["val_acc"] == "epoch"  # W&B's x axes


def test_the_resumed_session_continues_the_same_run(logged):
    run_dir, _, _ = logged
    runs = [r.run for file in sessions(run_dir) for r in records(file) if r.WhichOneof("record_type") == "run"]
    assert [run.run_id for run in runs] == [run_dir.name] * 2


def test_wandb_says_nothing_in_the_terminal_and_leaves_no_service_process(logged):
    _, _, output = logged
    assert not [line for line in output.splitlines() if "wandb:" in line or "W&B" in line], output  # its "wandb: ..." lines
    assert wandb_core_children() == []  # the resumed session ran in this process: its service has ended
