"""One run on several processes: torchrun with gloo on the CPU, on tiny data (real processes, real
collectives), against the same run in one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_SECONDS, checkpoint_epoch, wait_for, write_dataset

from cnnlab.distributed import World
from cnnlab.errors import UserError
from cnnlab.results import read_metrics_csv

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write_config(tmp_path: Path, data: Path, name: str, epochs: int, batch_size: int = 64) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"extends: {CONFIGS / 'lenet.yaml'}\nname: {name}\n"
        f"data: {{root: {data}, check_counts: false, val_size: 100}}\n"
        f"train: {{epochs: {epochs}, batch_size: {batch_size}, device: cpu}}\n"
        "model: {activation: relu}\noptim: {lr: 0.1}\n"
        f"output: {{dir: {tmp_path / 'results'}}}\n"
    )
    return path


# One thread a process: two processes of two threads on two cores wait for each other, ten times slower on a loaded machine.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", *args], env=env or ONE_THREAD, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def only_run(results: Path, name: str) -> Path:
    [run_dir] = (results / name).iterdir()
    return run_dir


def test_two_processes_train_one_run_like_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=800, n_test=200)
    config = write_config(tmp_path, data, "ddp", epochs=3)
    process = torchrun("-m", "cnnlab", "run", str(config), "--quiet")
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 0, output
    assert output.count("done: test acc") == 1  # only rank 0 speaks
    ddp_run = only_run(tmp_path / "results", "ddp")  # one folder, written by rank 0 only
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["sync_bn"] is False  # PyTorch has no SyncBatchNorm on the CPU
    assert summary["train_size"] == 700 and {p.name for p in (ddp_run / "checkpoints").iterdir()} >= {"best.pt", "last.pt"}

    single = subprocess.run([sys.executable, "-m", "cnnlab", "run", str(config), "--quiet", "--results",
                             str(tmp_path / "single")], capture_output=True, text=True, env=ONE_THREAD, timeout=HANG_SECONDS)
    assert single.returncode == 0, single.stderr
    one = read_metrics_csv(only_run(tmp_path / "single", "ddp") / "metrics.csv")
    two = read_metrics_csv(ddp_run / "metrics.csv")
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == [1, 2, 3]
    # The same global batches, gradients averaged over two halves: the same training up to float
    # rounding (the sums run in another order), not merely "within noise".
    for a, b in zip(one, two):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert abs(a[key] - b[key]) < 2e-3, (key, a, b)
    single_summary = json.loads((only_run(tmp_path / "single", "ddp") / "summary.json").read_text())
    assert abs(single_summary["test_acc"] - summary["test_acc"]) < 0.02
    assert single_summary["world_size"] == 1


def test_the_moving_average_and_accumulated_parts_train_under_torchrun_as_in_one_process(tmp_path):
    """train.ema and train.accumulate under two processes: each updates its average from the same
    all-reduced weights, and a part's gradients wait for the batch's last part (DDP's no_sync)."""
    data = write_dataset(tmp_path / "data", n_train=800, n_test=200)
    config = write_config(tmp_path, data, "recipe", epochs=2)
    config.write_text(config.read_text().replace("device: cpu}", "device: cpu, accumulate: 2, ema: {decay: 0.9}}"))
    process = torchrun("-m", "cnnlab", "run", str(config), "--quiet")
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 0, output
    single = subprocess.run([sys.executable, "-m", "cnnlab", "run", str(config), "--quiet", "--results",
                             str(tmp_path / "single")], capture_output=True, text=True, env=ONE_THREAD, timeout=HANG_SECONDS)
    assert single.returncode == 0, single.stderr
    one = read_metrics_csv(only_run(tmp_path / "single", "recipe") / "metrics.csv")
    two = read_metrics_csv(only_run(tmp_path / "results", "recipe") / "metrics.csv")
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "val_acc", "val_acc_ema", "val_loss_ema"):
            assert abs(a[key] - b[key]) < 2e-3, (key, a, b)
    summary = json.loads((only_run(tmp_path / "results", "recipe") / "summary.json").read_text())
    assert summary["world_size"] == 2 and 0 <= summary["test_acc_ema"] <= 1 and summary["better_weights"] in ("ema", "raw")


def test_under_torchrun_the_averages_evaluated_are_the_ones_saved_batchnorm_statistics_too(tmp_path):
    """Without SyncBatchNorm (the CPU) each rank's running statistics follow its own shard: the average every rank
    evaluates is rank 0's, which the checkpoint holds, so `cnnlab eval --weights ema` gives the epoch's figure."""
    data = write_dataset(tmp_path / "data", n_train=800, n_test=200)
    config = write_config(tmp_path, data, "bn", epochs=2)
    config.write_text(config.read_text().replace("device: cpu}", "device: cpu, ema: {decay: 0.9}, swa: {epochs: 2}}")
                      .replace("model: {activation: relu}", "model: {activation: relu, batch_norm: true}"))
    process = torchrun("-m", "cnnlab", "run", str(config), "--quiet")
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 0, output
    run = only_run(tmp_path / "results", "bn")
    last = read_metrics_csv(run / "metrics.csv")[-1]
    checked = subprocess.run([sys.executable, "-m", "cnnlab", "eval", str(run), "--checkpoint", "last", "--split", "val",
                              "--weights", "ema"], capture_output=True, text=True, env=ONE_THREAD, timeout=HANG_SECONDS)
    assert checked.returncode == 0, checked.stderr
    report = json.loads((run / "eval" / "val-last-ema" / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(last["val_acc_ema"], abs=1e-9)
    assert report["loss"] == pytest.approx(last["val_loss_ema"], rel=1e-4)
    summary = json.loads((run / "summary.json").read_text())  # and the average of the last epochs', measured again
    checked = subprocess.run([sys.executable, "-m", "cnnlab", "eval", str(run), "--checkpoint", "last", "--split", "val",
                              "--weights", "swa"], capture_output=True, text=True, env=ONE_THREAD, timeout=HANG_SECONDS)
    assert checked.returncode == 0, checked.stderr
    report = json.loads((run / "eval" / "val-last-swa" / "eval.json").read_text())
    assert summary["swa_epochs"] == 2 and report["accuracy"] == pytest.approx(summary["val_acc_swa"], abs=1e-9)


def worker_pids(parent: int, rank: int) -> list[int]:
    """torchrun's workers of ``rank`` (its children, told apart by the RANK torchrun gave them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_worker_restarts_with_the_others_and_continues_from_the_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=3000, n_test=200)
    config = write_config(tmp_path, data, "restart", epochs=10)
    # No --resume auto: a restart by torchrun implies it (the first attempt starts the run afresh).
    process = torchrun("--max-restarts", "1", "-m", "cnnlab", "run", str(config), "--quiet")
    runs = tmp_path / "results" / "restart"

    def checkpointed_twice() -> bool:  # metrics.csv has an epoch before its checkpoint, written in the background, is on disk
        return any(len(m.read_text().splitlines()) >= 3 and checkpoint_epoch(m.parent) >= 2 for m in runs.glob("*/metrics.csv"))

    wait_for(checkpointed_twice, "epoch 2's checkpoint", process)
    os.kill(wait_for(lambda: worker_pids(process.pid, rank=1), "rank 1's worker", process)[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 0, output
    run_dir = only_run(tmp_path / "results", "restart")  # continued in its own folder, not started anew
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 10
    [resumed] = summary["resumes"]
    assert resumed["from_status"] in ("failed", "interrupted", "stale") and resumed["from_epoch"] >= 2
    assert [r["epoch"] for r in read_metrics_csv(run_dir / "metrics.csv")] == list(range(1, 11))
    assert f"resuming {run_dir}" in output


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=400, n_test=100)
    config = write_config(tmp_path, data, "uneven", epochs=1, batch_size=63)
    process = torchrun("-m", "cnnlab", "run", str(config), "--quiet")
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode != 0
    # One message from cnnlab (before torchrun's own traceback of a failed child)
    assert "train.batch_size: 63 images cannot be split evenly over 2 processes" in output.split("Traceback")[0]
    assert not (tmp_path / "results").exists()


def test_world_of_one_changes_nothing_and_shards_cover_each_batch():
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    assert list(World().shard([(x, y)]))[0][0] is x
    shards = [next(World(rank=r, size=2).shard([(x, y)])) for r in (0, 1)]
    assert torch.equal(torch.cat([s[1] for s in shards]), y)  # every image in exactly one shard
    assert World().sum(torch.ones(2)).tolist() == [1.0, 1.0]
    assert World().broadcast("x") == "x"
    with pytest.raises(UserError, match="multiple of 4"):
        World(rank=0, size=4).check_batch_size(30)
    with pytest.raises(UserError, match="local rank"):
        World(rank=1, size=2).device_name("cuda:1")
    assert World(rank=1, size=2, local_rank=1).device_name("cpu") == "cpu"


def test_a_short_last_batch_that_would_leave_a_process_one_image_is_dropped(tmp_path):
    # 800 images, 97 held out: 703 train = 7 batches of 100 and a last one of 3, which two
    # processes cannot share with BatchNorm (one image on one of them) - dropped, as in one process
    # a last batch of one image is.
    data = write_dataset(tmp_path / "data", n_train=800, n_test=200)
    config = write_config(tmp_path, data, "short", epochs=1, batch_size=100)
    config.write_text(config.read_text().replace("val_size: 100", "val_size: 97")
                      .replace("model: {activation: relu}", "model: {activation: relu, batch_norm: true}"))
    process = torchrun("-m", "cnnlab", "run", str(config), "--quiet")
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 0, output
    summary = json.loads((only_run(tmp_path / "results", "short") / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train_size"] == 703


# Loaded by every Python process started with its folder first on PYTHONPATH: it notes, per rank, whether the
# process ran its exit handlers and whether the interpreter was torn down (its objects freed).
EXIT_NOTES = '''
import atexit, os

notes = os.open(os.environ["CNNLAB_EXIT_NOTES"] + "." + os.environ.get("RANK", "plain"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
atexit.register(os.write, notes, b"exit handlers\\n")


class TornDown:
    def __init__(self, fd, write=os.write):
        self.fd, self.write = fd, write  # held here: the module's names may be gone when the teardown frees it

    def __del__(self):
        self.write(self.fd, b"teardown\\n")


torn_down = TornDown(notes)
'''


def test_a_torchrun_process_ends_after_its_exit_handlers_without_tearing_down(tmp_path):
    # The gloo threads of the group live to the process's end; a teardown beside them aborted now and then
    # (SIGABRT, "terminate called without an active exception") after a completed run, and torchrun failed it.
    data = write_dataset(tmp_path / "data", n_train=300, n_test=100)
    config = write_config(tmp_path, data, "ends", epochs=1)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(EXIT_NOTES)
    notes = tmp_path / "notes"
    path = os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)
    process = torchrun("-m", "cnnlab", "run", str(config), "--quiet",
                       env={**ONE_THREAD, "PYTHONPATH": path, "CNNLAB_EXIT_NOTES": str(notes)})
    output, _ = process.communicate(timeout=HANG_SECONDS)
    assert process.returncode == 0, output
    assert output.count("done: test acc") == 1  # rank 0's last line, flushed before the end
    for rank in ("0", "1"):
        assert Path(f"{notes}.{rank}").read_text() == "exit handlers\n"
    assert Path(f"{notes}.plain").read_text() == "exit handlers\nteardown\n"  # torchrun itself: an ordinary exit


@pytest.mark.parametrize(("joined", "code", "status", "says"), [
    (True, "0", 0, ""), (True, "3", 3, ""), (True, "None", 0, ""), (True, "'no data'", 1, "no data\n"),
    (False, "3", 0, "went on\n"),  # never in a group: the process goes on to Python's ordinary exit
])
def test_a_group_member_ends_with_the_status_it_was_given(joined, code, status, says):
    # As Python's own exit would: a number is the status, None 0, a message is said and 1.
    script = ("import sys\nfrom cnnlab.distributed import current_world\nfrom cnnlab.entry import end_group_member\n"
              f"current_world().joined = {joined}\nend_group_member({code})\nsys.stderr.write('went on\\n')\n")
    env = {**ONE_THREAD, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=HANG_SECONDS)
    assert (ended.returncode, ended.stdout, ended.stderr) == (status, "", says)
