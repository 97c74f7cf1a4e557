"""Sweeps on Ray: a real local Ray cluster (``ray start``) that the tests start and stop."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'cnnlab[ray]')")

from conftest import HANG_SECONDS, wait_for, write_dataset

from cnnlab.cli import app
from cnnlab.cluster import pack_run, unpack_run
from cnnlab.errors import UserError
from cnnlab.results import Checkpoint, read_summary
from cnnlab.sweep import RayOptions, run_sweep

RAY = str(Path(sys.executable).parent / "ray")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster with 2 CPUs, started with `ray start` and stopped after the tests;
    cnnlab finds it with `--address auto`, as on a cluster's node. Only this cluster's processes are
    ended after (`ray stop` would end every Ray cluster on the machine, another person's tests' too)."""
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    for _ in range(3):  # a port free when chosen may be taken before Ray binds it: then another is tried
        with open(log, "w") as output:
            head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
                                     "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
                                    stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for(lambda: "block forever" in log.read_text() or head.poll() is not None, "ray start")
        if head.poll() is None:
            break
    assert head.poll() is None, log.read_text()
    try:
        yield "auto"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` and every process of its cluster
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=3)
        # Ray's graceful stop waits about 30 s for its GCS server and raylet; this cluster ran nothing but the tests'
        # trials, which have ended, so what is left of it is killed.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=HANG_SECONDS)


def family(tmp_path: Path, data: Path) -> Path:
    folder = tmp_path / "family"
    folder.mkdir()
    common = (f"extends: {CONFIGS / 'lenet.yaml'}\ndata: {{root: {data}, check_counts: false, val_size: 100}}\n"
              "train: {epochs: 2, batch_size: 64, device: cpu}\nmodel: {activation: relu}\noptim: {lr: 0.1}\n")
    (folder / "small.yaml").write_text(common + "model: {activation: relu, channels: [4, 8]}\n")
    (folder / "wide.yaml").write_text(common + "model: {activation: relu, channels: [8, 16]}\n")
    # A valid config whose trial fails at run time (no data there): recorded, the others finish.
    (folder / "nodata.yaml").write_text(common.replace(str(data), str(tmp_path / "missing")))
    return folder


def summary_rows(sweep_folder: Path) -> dict[str, dict[str, str]]:
    [sweep_dir] = sweep_folder.glob("2*")
    with open(sweep_dir / "summary.csv") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_ray_sweep_gives_the_local_launchers_rows_and_records_a_failing_trial(tmp_path, tiny_data, ray_cluster):
    folder = family(tmp_path, tiny_data)
    local = runner.invoke(app, ["sweep", str(folder), "--results", str(tmp_path / "local"), "--jobs", "2", "--quiet"])
    assert local.exit_code == 1, local.output  # the failing trial
    on_ray = runner.invoke(app, ["sweep", str(folder), "--results", str(tmp_path / "ray"), "--launcher", "ray",
                                 "--address", ray_cluster, "--jobs", "2", "--quiet"])
    assert on_ray.exit_code == 1, on_ray.output
    assert "2 at a time on Ray (1 CPU, 0 GPU per trial)" in on_ray.output
    local_rows = summary_rows(tmp_path / "local" / "sweeps" / "family")
    ray_rows = summary_rows(tmp_path / "ray" / "sweeps" / "family")
    assert set(ray_rows) == set(local_rows) == {"small", "wide", "nodata"}
    assert ray_rows["nodata"]["status"] == "failed" and "missing" in ray_rows["nodata"]["error"]
    for name in ("small", "wide"):
        assert ray_rows[name]["status"] == local_rows[name]["status"] == "completed"
        for column in ("train_loss", "train_acc", "val_acc", "test_acc", "params"):  # one thread each: same numbers
            assert float(ray_rows[name][column]) == pytest.approx(float(local_rows[name][column]), abs=1e-6), column
        [sweep_dir] = (tmp_path / "ray" / "sweeps" / "family").glob("2*")
        assert (sweep_dir / ray_rows[name]["run_dir"] / "checkpoints" / "best.pt").is_file()
    # A rerun on Ray skips what completed, as the local launcher does.
    again = runner.invoke(app, ["sweep", str(folder), "--results", str(tmp_path / "ray"), "--launcher", "ray",
                                "--address", ray_cluster, "--quiet"])
    assert "3 trials (2 done before" in again.output


def test_without_shared_storage_run_folders_come_back_as_archives(tmp_path, tiny_overrides, ray_cluster):
    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text(f"base: {CONFIGS / 'lenet.yaml'}\ngrid: {{optim.lr: [0.1]}}\n")
    outcome = run_sweep(sweep_file, [*tiny_overrides, "model.activation=relu"], results=tmp_path / "results", quiet=True,
                        ray=RayOptions(address=ray_cluster, ship_runs=True))
    [row] = outcome.rows
    assert row["status"] == "completed", row
    run_dir = Path(row["run_dir"])
    assert run_dir.parent.parent == (tmp_path / "results" / "sweeps" / "lr" / "runs").absolute()
    summary = read_summary(run_dir / "summary.json")
    assert summary.run_dir == str(run_dir) and summary.test_acc > 0.5
    assert Checkpoint.load(run_dir / "checkpoints" / "best.pt").epoch == summary.best_epoch
    assert not (run_dir / ".lock").exists()


def archive(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


@pytest.mark.parametrize("name,kind", [("../escape.txt", tarfile.REGTYPE), ("/etc/evil", tarfile.REGTYPE),
                                       ("link", tarfile.SYMTYPE), ("fifo", tarfile.FIFOTYPE)])
def test_a_shipped_folder_that_reaches_outside_is_refused_and_nothing_is_left(tmp_path, name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    payload = archive([(tarfile.TarInfo("summary.json"), b"{}"), (info, b"x" if kind == tarfile.REGTYPE else b"")])
    target = tmp_path / "runs" / "lenet" / "20261128T000000Z-abcdef"
    target.parent.mkdir(parents=True)
    with pytest.raises(UserError, match="not a plain file inside the folder"):
        unpack_run(payload, target)
    assert list(target.parent.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_pack_and_unpack_keep_a_run_folder(trained, tmp_path):
    run_dir, _ = trained
    copy = tmp_path / "copy" / run_dir.name
    unpack_run(pack_run(run_dir), copy)
    originals = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock")
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == originals
    assert json.loads((copy / "summary.json").read_text()) == json.loads((run_dir / "summary.json").read_text())
    with pytest.raises(UserError, match="already exists"):
        unpack_run(pack_run(run_dir), copy)
    with pytest.raises(UserError, match="cannot be unpacked"):
        unpack_run(b"not an archive", tmp_path / "copy" / "other")


def test_asking_for_more_than_the_cluster_has_is_refused_before_anything_runs(tmp_path, tiny_data, ray_cluster):
    folder = family(tmp_path, tiny_data)
    result = runner.invoke(app, ["sweep", str(folder), "--results", str(tmp_path / "results"), "--launcher", "ray",
                                 "--address", ray_cluster, "--gpus-per-trial", "1"])
    assert result.exit_code == 2
    assert "--gpus-per-trial 1: no node of this Ray cluster has that many GPUs" in result.output
    assert not list((tmp_path / "results").rglob("summary.json"))
    bad = runner.invoke(app, ["sweep", str(folder), "--address", "auto"])
    assert bad.exit_code == 2 and "are for --launcher ray" in bad.output


def test_without_ray_installed_the_command_says_how_to_install_it(tmp_path, tiny_data):
    blocker = tmp_path / "noray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    folder = family(tmp_path, tiny_data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "cnnlab", "sweep", str(folder), "--launcher", "ray", "--results",
                             str(tmp_path / "results")], capture_output=True, text=True, env=env, timeout=HANG_SECONDS)
    assert result.returncode == 2, result.stderr
    assert "needs Ray, which is not installed; install it with: pip install 'cnnlab[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_ray_sweep_started_elsewhere_takes_every_relative_path_as_meant(tmp_path, monkeypatch, ray_cluster):
    """The sweep file's base (relative to it), a config's data.root and --results (relative to where
    the command runs) mean the same in the trials, which the cluster's workers run in its own folder."""
    work = tmp_path / "project"
    write_dataset(work / "data", n_train=400, n_test=100)
    (work / "configs" / "sweeps").mkdir(parents=True)
    (work / "configs" / "base.yaml").write_text(
        f"extends: {CONFIGS / 'lenet_relu.yaml'}\ndata: {{root: data, check_counts: false, val_size: 100}}\n"
        "train: {epochs: 1, batch_size: 64, device: cpu}\n")
    (work / "configs" / "sweeps" / "lr.yaml").write_text("base: ../base.yaml\ngrid: {optim.lr: [0.1]}\n")
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["sweep", "configs/sweeps/lr.yaml", "--launcher", "ray", "--address", ray_cluster,
                                 "--results", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    row = summary_rows(work / "out" / "sweeps" / "lr")["lr=0.1"]
    assert row["status"] == "completed", row


def test_a_stopped_trial_without_shared_storage_still_comes_back_with_its_checkpoint(tmp_path, ray_cluster):
    data = write_dataset(tmp_path / "data", n_train=3000, n_test=200)
    sweep_file = tmp_path / "long.yaml"
    sweep_file.write_text(f"base: {CONFIGS / 'lenet.yaml'}\ngrid: {{optim.lr: [0.1]}}\n")
    script = (
        "import sys\nfrom pathlib import Path\nfrom cnnlab.sweep import RayOptions, run_sweep\n"
        f"out = run_sweep(Path({str(sweep_file)!r}), ['data.root={data}', 'data.check_counts=false', 'data.val_size=100',"
        " 'train.epochs=30', 'train.batch_size=64', 'train.device=cpu', 'train.threads=1', 'model.activation=relu'],"
        f" results=Path({str(tmp_path / 'results')!r}), quiet=True, ray=RayOptions(address='auto', ship_runs=True))\n"
        "print('STOPPED_BY', out.stopped_by)\n"
    )
    # One thread: on a loaded machine a trial given both cores' threads is ten times slower (they wait for each other).
    scratch_before = set(Path(tempfile.gettempdir()).glob("cnnlab-trial-*"))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def first_epoch_done() -> bool:  # in this test's trial: the temporary folder holds other runs' trials too
        fresh = set(Path(tempfile.gettempdir()).glob("cnnlab-trial-*")) - scratch_before
        for metrics in (m for d in fresh for m in d.glob("*/*/metrics.csv")):
            with contextlib.suppress(OSError):  # another trial's folder, removed as it ends
                if str(data) in (metrics.parent / "config.yaml").read_text() and len(metrics.read_text().splitlines()) >= 2:
                    return True
        return False

    wait_for(first_epoch_done, "the trial finishing its first epoch on the worker's side", process)
    process.send_signal(signal.SIGTERM)  # the trial has (or is writing) a checkpoint on the worker's side
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert "STOPPED_BY 15" in output, output
    [sweep_dir] = (tmp_path / "results" / "sweeps" / "long").glob("2*")
    [row] = json.loads((sweep_dir / "trials.json").read_text())
    shipped = list((tmp_path / "results" / "sweeps" / "long" / "runs").glob("*/2*"))
    assert len(shipped) == 1, (row, output)  # shipped back, not lost
    summary = read_summary(shipped[0] / "summary.json")
    assert summary.status == "interrupted" and summary.epochs_completed >= 1
    assert summary.error == "interrupted by SIGTERM"  # the sweep's signal, not the SIGINT of Ray's cancellation
    assert Checkpoint.load(shipped[0] / "checkpoints" / "last.pt").epoch >= 1
    assert row["status"] == "interrupted" and row["error"] == "interrupted by SIGTERM"
