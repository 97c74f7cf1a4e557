"""Usage: ``output: {loggers: [tensorboard, mlflow]}`` in a config: runs watched in TensorBoard or MLflow.

The loggers are listeners of a run like the console (``listeners.py``): they hear the run
start with its resolved config, every epoch's metrics row, and the end with the summary; cnnlab's
own files are written whatever they do. Under torchrun only rank 0 has them.

- ``tensorboard``: event files in ``<run>/tb/``: every metric per epoch (the row's own names), the
  learning rate, the hyperparameters with the final metrics (TensorBoard's HPARAMS tab compares a
  sweep's trials), and the curves as an image. ``tensorboard --logdir results`` shows every run.
- ``mlflow``: a run in the tracking store ``output.mlflow_uri`` (default: SQLite ``mlflow.db`` in
  ``output.dir``), in the experiment named after the sweep or tune (else the config's name): the
  flattened config as params, the metrics per epoch, the final metrics, and the run folder's files
  and best checkpoint as artifacts. ``mlflow ui --backend-store-uri sqlite:///results/mlflow.db``.

A logger that fails (a server gone, a full disk) says so once and stops; the run goes on. An http(s)
tracking server that does not accept a connection within ``PROBE_SECONDS`` is given up at the start,
before MLflow's client would retry it for minutes.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.console import printable
from cnnlab.errors import UserError, warn
from cnnlab.listeners import Listener

if TYPE_CHECKING:
    from cnnlab.results import RunSummary

LOGGERS = {"tensorboard": ("tensorboard", "pip install 'cnnlab[tensorboard]'"),
           "mlflow": ("mlflow", "pip install 'cnnlab[mlflow]'")}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
OPEN_ATTEMPTS = 5
# How long a tracking server may take to accept a connection. A refused one fails at once; this bounds
# an address that never answers, which MLflow's client retries for about 250 s (7 retries, backoff 2).
PROBE_SECONDS = 3.0


def check_loggers(names: list[str]) -> None:
    """A UserError naming the install command for a logger whose package is missing."""
    import importlib

    for name in names:
        package, install = LOGGERS[name]
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"output.loggers: {name} needs the {package} package, which is not installed; "
                            f"install it with: {install}") from None


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def experiment_name(config: dict[str, Any]) -> str:
    """The sweep's or tune's name for their trials (their runs live in <root>/sweeps|tune/<name>/runs),
    else the config's name."""
    output = Path(str(config.get("output", {}).get("dir", "results")))
    if output.name == "runs" and output.parent.parent.name in ("sweeps", "tune"):
        return output.parent.name
    return str(config.get("name", "cnnlab"))


def make_loggers(config: dict[str, Any], run_dir: Path) -> list[Listener]:
    names = config.get("output", {}).get("loggers") or []
    made: list[Listener] = []
    if "tensorboard" in names:
        made.append(TensorBoardLogger())
    if "mlflow" in names:
        made.append(MLflowLogger(config.get("output", {}).get("mlflow_uri") or default_mlflow_uri(config)))
    return made


def default_mlflow_uri(config: dict[str, Any]) -> str:
    folder = Path(str(config.get("output", {}).get("dir", "results"))).expanduser().absolute()
    if folder.name == "runs" and folder.parent.parent.name in ("sweeps", "tune"):
        folder = folder.parent.parent.parent  # a sweep's trials share the results folder's store
    return f"sqlite:///{folder / 'mlflow.db'}"


class Logger(Listener):
    """A listener that must never stop a run: its first failure is said once and it stops logging."""

    name = "logger"

    def __init__(self) -> None:
        self.failed = False

    def _safely(self, action: Any, *args: Any) -> None:
        if self.failed:
            return
        try:
            action(*args)
        except Exception as err:
            self.give_up(f"stopped logging this run: {type(err).__name__}: {err}")

    def give_up(self, why: str) -> None:
        """Say once why this logger stops (the run goes on without it)."""
        self.failed = True
        warn(printable(f"output.loggers: {self.name} {why}"))

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.run_dir, self.config = Path(run_dir), config or {}
        self._safely(self.open, name, resumed)

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self._safely(self.epoch, row)

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        self._safely(self.close, summary.to_dict())

    def open(self, name: str, resumed: bool) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def close(self, summary: dict[str, Any]) -> None: ...


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


FINAL_METRICS = ("test_acc", "test_loss", "best_val_acc", "train_examples_per_sec", "wall_seconds")


class TensorBoardLogger(Logger):
    name = "tensorboard"

    def open(self, name: str, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def epoch(self, row: dict[str, Any]) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def close(self, summary: dict[str, Any]) -> None:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flatten(self.config).items() if v is not None}
        final = {f"final/{k}": float(summary[k]) for k in FINAL_METRICS if isinstance(summary.get(k), (int, float))}
        if final:
            self.writer.add_hparams(hparams, final, run_name=".")  # in this run's own folder, beside its scalars
        curves = self.run_dir / "curves.png"
        if curves.is_file():
            from matplotlib import image

            self.writer.add_image("curves", image.imread(str(curves))[..., :3], dataformats="HWC")
        if summary.get("test_confusion"):
            from cnnlab.plots import confusion_figure

            accuracy = summary.get("test_acc") or 0.0
            self.writer.add_figure("confusion", confusion_figure(summary["test_confusion"], f"test set: accuracy {accuracy:.4f}",
                                                                 summary["data"]["classes"]))
        self.writer.close()


class MLflowLogger(Logger):
    name = "mlflow"

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri

    def open(self, name: str, resumed: bool) -> None:
        why = unreachable(self.uri)
        if why is not None:
            return self.give_up(f"is not logging this run: the tracking server {without_credentials(self.uri)} cannot "
                                f"be reached ({why}); the run goes on without it")
        # A sweep's trials start together, and two processes creating one SQLite store (or one
        # experiment) at once collide ("table experiments already exists"): the loser tries again.
        attempts = OPEN_ATTEMPTS if self.uri.startswith("sqlite:") else 1  # a server has its own retries
        for attempt in range(attempts):
            try:
                return self._open(name)
            except Exception:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def _open(self, name: str) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = experiment_name(self.config)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = None
            if self.uri.startswith("sqlite:///"):  # artifacts beside the store, not in the current folder
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()
            experiment_id = self.client.create_experiment(  # shown as training runs, not as a GenAI app
                experiment, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"})
        run_dir = str(self.run_dir.resolve())
        earlier = self.client.search_runs([experiment_id], filter_string=f"tags.`cnnlab.run_dir` = '{_quoted(run_dir)}'")
        if earlier:  # a resumed run goes on in its MLflow run
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=f"{name} {self.run_dir.name}",
                                     tags={"cnnlab.run_dir": run_dir, "cnnlab.name": name})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(self.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params a call
            self.client.log_batch(self.run_id, params=params[start:start + 100], tags=[RunTag("cnnlab", "run")])

    def epoch(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(row["epoch"])) for k, v in _numbers(row).items()])

    def close(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        final = [Metric(k, float(summary[k]), now, 0) for k in FINAL_METRICS if isinstance(summary.get(k), (int, float))]
        if final:
            self.client.log_batch(self.run_id, metrics=final)
        for file in ("config.yaml", "metrics.csv", "summary.json", "curves.png"):
            if (self.run_dir / file).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / file))
        best = self.run_dir / "checkpoints" / "best.pt"
        if best.is_file():
            self.client.log_artifact(self.run_id, str(best), artifact_path="checkpoints")
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(summary.get("status"), "FAILED")
        self.client.set_terminated(self.run_id, status=status)


def unreachable(uri: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why the http(s) server of ``uri`` does not accept a TCP connection (to it, or to the proxy that
    leads to it) within ``timeout``; None when it does, and for other URIs (files, databases)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(host):  # MLflow's requests goes through it too
            via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            host, port = via.hostname or host, via.port or 80
    except ValueError as err:  # a port that is not a number
        return str(err)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or str(err) or type(err).__name__)

    # In a thread: the name lookup before the connection is not bound by the socket's timeout.
    thread = threading.Thread(target=connect, name="cnnlab-mlflow-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def without_credentials(uri: str) -> str:
    """``uri`` without a user name and password (``http://user:token@host`` -> ``http://host``), to be shown."""
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
