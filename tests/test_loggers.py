"""TensorBoard and MLflow as listeners of a run: read back with their own readers (a real SQLite
MLflow store, not a mock), and the MLflow UI rendered in headless Chromium; the per-step points
(``output.log_every_n_steps``) against a real scheduler."""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'cnnlab[mlflow]')")
pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'cnnlab[tensorboard]')")

from conftest import HANG_SECONDS, wait_for

from cnnlab.config import load_config
from cnnlab.engine import fit
from cnnlab.loggers import StepPoints
from cnnlab.optim import make_scheduler

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 2-epoch run on tiny data with both loggers, a point every 3 steps, a learning rate that warms up over
    half an epoch then decays, and flip TTA: (run folder, summary, MLflow store URI)."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("logged")
    data = write_dataset(root / "data")
    cfg = load_config(None, [f"data.root={data}", "data.check_counts=false", "data.val_size=100", "train.epochs=2",
                             "train.batch_size=32", "train.device=cpu", "model.activation=relu", "optim.lr=0.1",
                             "schedule.name=cosine", "schedule.warmup_epochs=0.5", "output.log_every_n_steps=3",
                             f"output.dir={root / 'results'}", "output.loggers=[tensorboard, mlflow]",
                             "eval.tta=[flip]"])
    summary = fit(cfg, quiet=True)
    return Path(summary["run_dir"]), summary, f"sqlite:///{root / 'results' / 'mlflow.db'}"


def tensorboard_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()


def steps_per_epoch(summary: dict) -> int:
    return math.ceil(summary["train_size"] / 32)


def test_tensorboard_reads_back_every_epoch_and_the_hparams(logged):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, summary, _ = logged
    events = tensorboard_events(run_dir)
    for tag in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2]
    assert events.Scalars("val_acc")[-1].value == pytest.approx(summary["final"]["val_acc"], abs=1e-6)
    assert {"curves", "confusion"} <= set(events.Tags()["images"])
    # The final figures sit at the last epoch, beside the curves, not alone at step 0.
    for tag, key in (("test_acc", "test_acc"), ("test_loss", "test_loss"), ("best_val_acc", "best_val_acc")):
        assert [(e.step, pytest.approx(e.value, abs=1e-6)) for e in events.Scalars(tag)] == [(2, summary[key])]
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("final/")]
    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)  # what TensorBoard's HPARAMS tab reads
               for tag, content in events.PluginTagToContent("hparams").items()}
    assert hparams["_hparams_/session_start_info"].session_start_info.hparams["optim.lr"].number_value == 0.1
    metrics = {m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos}
    assert {"test_acc", "test_loss", "best_val_acc", "val_acc"} <= metrics <= set(events.Tags()["scalars"])
    assert hparams["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS


def test_tensorboard_charts_train_and_validation_of_each_metric_together(logged):
    from tensorboard.plugins.custom_scalar import layout_pb2

    run_dir, _, _ = logged
    [config] = tensorboard_events(run_dir).Tensors("custom_scalars__config__")  # written once
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts == {"loss": ["^train_loss$", "^val_loss$", "^test_loss$"],
                      "accuracy": ["^train_acc$", "^val_acc$", "^test_acc$"]}


def test_tensorboard_has_a_point_every_n_steps_with_the_schedules_learning_rate(logged):
    """log_every_n_steps=3: loss, accuracy and the learning rate at global steps 3, 6, ...; the learning
    rate is the one the real scheduler gave that step (warm-up over 5 steps, then the cosine)."""
    run_dir, summary, _ = logged
    events = tensorboard_events(run_dir)
    total = 2 * steps_per_epoch(summary)
    points = list(range(3, total + 1, 3))
    for tag in ("step/train_loss", "step/train_acc", "step/lr"):
        assert [e.step for e in events.Scalars(tag)] == points
    assert all(0 <= e.value <= 1 for e in events.Scalars("step/train_acc"))
    assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars("step/train_loss"))
    cfg = load_config(run_dir / "config.yaml")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.train.epochs, steps_per_epoch(summary))
    trained_with = []
    for _ in range(total):
        trained_with.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [e.value for e in events.Scalars("step/lr")] == pytest.approx([trained_with[s - 1] for s in points], rel=1e-5)


def test_a_point_is_the_mean_of_its_steps_and_the_device_is_read_only_at_points():
    """Every 2 steps: the mean over the steps since the last point, restarting with each epoch's sums."""

    class Counted(torch.Tensor):  # a tensor that counts its reads back to the host
        reads = 0

        def __float__(self):
            Counted.reads += 1
            return super().__float__()

    points = StepPoints(2, lambda t: 0.1 * (1 + t))
    sums = [(1.0, 1, 4), (3.0, 2, 8), (4.0, 2, 12)]  # the epoch's running loss sum, correct, seen after each step
    made = []
    for epoch in (1, 2):
        points.start_epoch(epoch, 3, 0)
        for loss_sum, correct, seen in sums:
            made.append(points.advance(torch.tensor(loss_sum).as_subclass(Counted),
                                       torch.tensor(correct).as_subclass(Counted), seen))
    lr = [pytest.approx(0.1 * (1 + t)) for t in (1 / 3, 3 / 3, 5 / 3)]  # the lr of global steps 2, 4, 6
    assert made == [None, {"step/train_loss": 3.0 / 8, "step/train_acc": 2 / 8, "step/lr": lr[0]}, None,
                    {"step/train_loss": 1.0 / 4, "step/train_acc": 1 / 4, "step/lr": lr[1]}, None,
                    {"step/train_loss": 3.0 / 8, "step/train_acc": 1 / 8, "step/lr": lr[2]}]
    assert Counted.reads == 2 * 3  # loss and correct, at each of the 3 points


def test_mlflow_has_the_run_its_params_metrics_and_artifacts(logged):
    from mlflow.tracking import MlflowClient

    run_dir, summary, uri = logged
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(summary["name"])
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["cnnlab.run_dir"] == str(run_dir.resolve())
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["model.activation"] == "relu"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test_acc"])
    assert run.data.metrics["test_acc_tta"] == pytest.approx(summary["test_acc_tta"])  # beside it (eval.tta)
    assert "test_acc_ema" not in run.data.metrics  # not measured: no train.ema
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [2]  # at the last epoch
    points = list(range(3, 2 * steps_per_epoch(summary) + 1, 3))
    for key in ("step/train_loss", "step/train_acc", "step/lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == points
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.csv", "summary.json", "curves.png", "checkpoints"} <= files
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_the_mlflow_ui_shows_the_run_in_a_real_browser(logged, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, summary, uri = logged
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(summary["name"])
    port, server = mlflow_ui(uri, tmp_path)
    try:
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs"
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                              "--dump-dom", page], capture_output=True, text=True, timeout=HANG_SECONDS).stdout
        assert run_dir.name in dom, dom[-2000:]  # the run's name, rendered by MLflow's own UI
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=HANG_SECONDS)


def mlflow_ui(uri: str, cwd: Path) -> tuple[int, subprocess.Popen]:
    """`mlflow ui` on a free port, answering: (port, its process). A port free when chosen may be taken
    before the server binds it (another process on a busy machine); the server then exits, and
    another port is tried."""
    log = cwd / "mlflow-ui.log"  # a file, not a pipe: nobody reads the server's output while it serves
    for _ in range(3):
        port = free_port()
        with open(log, "w") as output:
            server = subprocess.Popen([MLFLOW, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
                                      stdout=output, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        try:
            wait_for(lambda: healthy(port) or server.poll() is not None, "mlflow ui answering")
        except BaseException:
            os.killpg(server.pid, signal.SIGKILL)
            raise
        if server.poll() is None:
            return port, server
    raise AssertionError(f"mlflow ui did not start:\n{log.read_text()}")


def healthy(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
        return True
    except OSError:
        return False


def test_a_logger_whose_package_is_missing_is_a_config_error(tmp_path, tiny_overrides):
    config = tmp_path / "logged.yaml"
    config.write_text("name: logged\noutput: {loggers: [mlflow]}\n")
    hide_mlflow = "import sys; sys.modules['mlflow'] = None; from cnnlab.entry import main; main()"
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-c", hide_mlflow, "run", str(config), *sets], capture_output=True,
                            text=True, timeout=HANG_SECONDS)
    assert result.returncode == 2, result.stderr
    assert "output.loggers: mlflow needs the mlflow package, which is not installed; install it with: " \
           "pip install 'cnnlab[mlflow]'" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.rglob("summary.json"))


def test_mlflow_keeps_its_own_log_lines_out_of_the_terminal(tmp_path, tiny_overrides):
    """A fresh SQLite store: MLflow logs "Creating initial MLflow database tables..." and "Updating
    database tables" at INFO, to the terminal, unless cnnlab quiets it."""
    config = tmp_path / "logged.yaml"
    config.write_text("name: logged\noutput: {loggers: [mlflow]}\n")
    sets = [a for o in [*tiny_overrides, "train.epochs=1"] for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "cnnlab", "run", str(config), "--quiet", *sets],
                            capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results" / "mlflow.db").is_file()  # made by this run
    assert "INFO" not in result.stderr and "database tables" not in result.stderr + result.stdout, result.stderr


def test_an_unreachable_mlflow_server_is_said_once_and_the_run_trains_on(tmp_path, tiny_overrides):
    """The warning is the reachability probe's, before MLflow's client (which retries a dead server for
    about 250 s) is ever made: the client's own failure, after its retries, would say something else.
    The timeout only catches a hang; it does not time the run."""
    config = tmp_path / "logged.yaml"
    config.write_text("name: logged\noutput: {loggers: [mlflow]}\n")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound but never listening: a connection to it is refused
        port = closed.getsockname()[1]
        sets = [a for o in [*tiny_overrides, "train.epochs=1", f"output.mlflow_uri=http://me:secret@127.0.0.1:{port}"]
                for a in ("--set", o)]
        result = subprocess.run([sys.executable, "-m", "cnnlab", "run", str(config), "--quiet", *sets],
                                capture_output=True, text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: output.loggers: mlflow is not logging this run: the tracking server "
                        f"http://127.0.0.1:{port} cannot be reached (Connection refused); the run goes on without it"]
    assert "secret" not in result.stderr + result.stdout
    [summary] = tmp_path.rglob("summary.json")
    assert '"status": "completed"' in summary.read_text()


def test_the_probe_passes_a_listening_server_and_other_stores():
    from cnnlab.loggers import unreachable, without_credentials

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None
    assert unreachable("sqlite:///results/mlflow.db") is None and unreachable("file:///tmp/mlruns") is None
    assert unreachable("http://127.0.0.1:notaport") is not None
    assert without_credentials("https://me:token@mlflow.example.org:5000/path") == "https://mlflow.example.org:5000/path"
