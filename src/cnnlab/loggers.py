"""Usage: ``output: {loggers: [tensorboard, mlflow, wandb], log_every_n_steps: 50}`` in a config: runs watched
in TensorBoard, MLflow or Weights & Biases.

The loggers are listeners of a run like the console (``listeners.py``): they hear the run
start with its resolved config, every epoch's metrics row, and the end with the summary; cnnlab's
own files are written whatever they do. Under torchrun only rank 0 has them. With
``output.log_every_n_steps`` each also records ``step/train_loss``, ``step/train_acc`` and ``step/lr``
every N training steps, at the run's global step (``StepPoints``).

- ``tensorboard``: event files in ``<run>/tb/``: every metric per epoch (the row's own names), the
  learning rate, a custom-scalars layout that charts train and validation (and the test's point at the
  end) of each metric together, the hyperparameters (the flattened config) with the final metrics
  (TensorBoard's HPARAMS tab compares a sweep's trials), and the curves as an image.
  ``tensorboard --logdir results`` shows every run.
- ``mlflow``: a run in the tracking store ``output.mlflow_uri`` (default: SQLite ``mlflow.db`` in
  ``output.dir``), in the experiment named after the sweep or tune (else the config's name): the
  flattened config as params, the metrics per epoch, the final metrics, and the run folder's files
  and best checkpoint as artifacts. ``mlflow ui --backend-store-uri sqlite:///results/mlflow.db``.
- ``wandb``: a W&B run, offline unless ``WANDB_MODE`` says otherwise, its files in ``<run>/wandb/``
  (``wandb sync <run>/wandb`` uploads them later): the project named like MLflow's experiment, the
  run id and name the cnnlab run's id, the resolved config, the metrics per epoch (x axis ``epoch``)
  and the final metrics as the run's summary.

A logger that fails (a server gone, a full disk) says so once and stops; the run goes on. An http(s)
tracking server that does not accept a connection within ``PROBE_SECONDS`` is given up at the start,
before MLflow's client would retry it for minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.console import printable
from cnnlab.errors import UserError, warn
from cnnlab.listeners import Listener
from cnnlab.results import TEST_ACC_BESIDE

if TYPE_CHECKING:
    import torch

    from cnnlab.results import RunSummary

LOGGERS = {"tensorboard": ("tensorboard", "pip install 'cnnlab[tensorboard]'"),
           "mlflow": ("mlflow", "pip install 'cnnlab[mlflow]'"),
           "wandb": ("wandb", "pip install 'cnnlab[wandb]'")}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
OPEN_ATTEMPTS = 5
# How long a tracking server may take to accept a connection. A refused one fails at once; this bounds
# an address that never answers, which MLflow's client retries for about 250 s (7 retries, backoff 2).
PROBE_SECONDS = 3.0
# MLflow writes a batch of metrics in one transaction, about 25 ms on a busy 2-core machine's SQLite store:
# per-step points are held and written together, at most this many seconds apart (and at each epoch's end).
STEP_FLUSH_SECONDS = 10.0
MAX_BATCH_METRICS = 1000  # MLflow's limit for one log_batch


def mlflow_telemetry_off() -> None:
    """MLflow's usage telemetry off unless the user set it (``MLFLOW_DISABLE_TELEMETRY=false`` turns it on): MLflow 3
    sends usage records and writes ``~/.config/mlflow/telemetry.json`` on import otherwise, and a run (or a dry run,
    which writes nothing) asked for neither. Before MLflow is first imported."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def check_loggers(names: list[str]) -> None:
    """A UserError naming the install command for a logger whose package is missing."""
    import importlib

    for name in names:
        package, install = LOGGERS[name]
        if name == "mlflow":
            mlflow_telemetry_off()
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
    if "wandb" in names:
        made.append(WandbLogger())
    return made


def default_mlflow_uri(config: dict[str, Any]) -> str:
    folder = Path(str(config.get("output", {}).get("dir", "results"))).expanduser().absolute()
    if folder.name == "runs" and folder.parent.parent.name in ("sweeps", "tune"):
        folder = folder.parent.parent.parent  # a sweep's trials share the results folder's store
    return f"sqlite:///{folder / 'mlflow.db'}"


class StepPoints:
    """Every ``every`` training steps, a point at the run's global step: the mean training loss and accuracy
    of the steps since the previous point or the epoch's start, whichever is later (after a resume in the
    middle of an epoch, the first point covers the epoch from its start), and the learning rate the step
    trained with. The epoch's running sums stay on the device between points: reading them is a sync."""

    def __init__(self, every: int, lr_at: Callable[[float], float]) -> None:
        self.every, self.lr_at = every, lr_at
        self.step, self.batches, self.last = 0, 1, (0.0, 0.0, 0)

    def start_epoch(self, epoch: int, batches: int, done: int) -> None:
        self.step, self.batches = (epoch - 1) * batches + done, max(batches, 1)
        self.last = (0.0, 0.0, 0)  # the epoch's sums start again from zero

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> dict[str, float] | None:
        """After a training step: the point it makes, or None between points (without touching the device)."""
        self.step += 1
        if self.step % self.every:
            return None
        loss, right = float(loss_sum), float(correct)
        last_loss, last_right, last_seen = self.last
        self.last = (loss, right, seen)
        examples = max(seen - last_seen, 1)
        return {"step/train_loss": (loss - last_loss) / examples, "step/train_acc": (right - last_right) / examples,
                "step/lr": self.lr_at((self.step - 1) / self.batches)}


def learning_rate(config: dict[str, Any]) -> Callable[[float], float]:
    """The learning rate (of the first parameter group) at a fractional epoch ``t``: what the scheduler,
    stepped once per batch from ``t`` = 0, sets (``optim.make_scheduler``)."""
    from cnnlab.config import ScheduleConfig
    from cnnlab.optim import lr_factor

    factor = lr_factor(ScheduleConfig.model_validate(config["schedule"]), int(config["train"]["epochs"]))
    lr = float(config["optim"]["lr"])
    return lambda t: lr * factor(t)


class Logger(Listener):
    """A listener that must never stop a run: its first failure is said once and it stops logging."""

    name = "logger"

    def __init__(self) -> None:
        self.failed = False
        self.points: StepPoints | None = None

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
        every = self.config.get("output", {}).get("log_every_n_steps")
        if every:
            self.points = StepPoints(every, learning_rate(self.config))
        self._safely(self.open, name, resumed)

    def start_epoch(self, epoch: int, batches: int, done: int = 0, lr: float | None = None) -> None:
        if self.points is not None:
            self.points.start_epoch(epoch, batches, done)

    def advance(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        if self.points is None or self.failed:
            return
        point = self.points.advance(loss_sum, correct, seen)
        if point is not None:
            self._safely(self.step, self.points.step, point)

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        self._safely(self.epoch, row)

    def finish(self, summary: RunSummary, run_dir: Path) -> None:
        self._safely(self.close, summary.to_dict())

    def open(self, name: str, resumed: bool) -> None: ...
    def step(self, step: int, values: dict[str, float]) -> None: ...
    def epoch(self, row: dict[str, Any]) -> None: ...
    def close(self, summary: dict[str, Any]) -> None: ...


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


FINAL_METRICS = ("test_acc", "test_loss", "best_val_acc", "train_examples_per_sec", "wall_seconds", *TEST_ACC_BESIDE)
# TensorBoard's custom-scalars layout: each metric's train and validation curves on one chart, with the test's
# figure as a point at the last epoch (tag regexes, anchored: "train_loss" would also match "step/train_loss").
CHARTS = {"loss": ("train_loss", "val_loss", "test_loss"), "accuracy": ("train_acc", "val_acc", "test_acc")}
# The test's figures and the best validation accuracy, written at the last epoch trained (not at step 0, where
# they would stand apart from every curve); with the last epoch's, the metrics of the HPARAMS tab.
END_METRICS = ("test_acc", "test_loss", "best_val_acc")
HPARAMS_METRICS = (*END_METRICS, "val_acc", "val_loss", "train_acc", "train_loss")


class TensorBoardLogger(Logger):
    name = "tensorboard"

    def open(self, name: str, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        # Once per run: TensorBoard reads a tag's first layout or session start only, so a resumed session's
        # would be ignored (the first session's are in the folder).
        if not resumed:
            self.writer.add_custom_scalars({"epochs": {title: ["Multiline", [f"^{tag}$" for tag in tags]]
                                                       for title, tags in CHARTS.items()}})
            experiment, session_start, _ = self._hparams()
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session_start)

    def _hparams(self) -> tuple[Any, Any, Any]:
        """The HPARAMS tab's summaries: the experiment (hyperparameters and metrics), this run's session start
        (the flattened config's values) and its end (success)."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                  for k, v in flatten(self.config).items() if v is not None}
        return hparams(values, dict.fromkeys(HPARAMS_METRICS, 0.0))

    def step(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def epoch(self, row: dict[str, Any]) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def close(self, summary: dict[str, Any]) -> None:
        last = int(summary.get("epochs_completed") or 0)
        for key in END_METRICS:
            if isinstance(summary.get(key), (int, float)):
                self.writer.add_scalar(key, float(summary[key]), last)
        if summary.get("status") == "completed":  # a stopped run may be resumed: its session has not ended
            self.writer.file_writer.add_summary(self._hparams()[2])
        curves = self.run_dir / "curves.png"
        if curves.is_file():
            from matplotlib import image

            self.writer.add_image("curves", image.imread(str(curves))[..., :3], last, dataformats="HWC")
        if summary.get("test_confusion"):
            from cnnlab.plots import confusion_figure

            accuracy = summary.get("test_acc") or 0.0
            self.writer.add_figure("confusion", confusion_figure(summary["test_confusion"], f"test set: accuracy {accuracy:.4f}",
                                                                 summary["data"]["classes"]), last)
        self.writer.close()


class MLflowLogger(Logger):
    name = "mlflow"

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.held: list[Any] = []  # step points not yet written (mlflow.entities.Metric)
        self.written = time.monotonic()

    def open(self, name: str, resumed: bool) -> None:
        why = unreachable(self.uri)
        if why is not None:
            return self.give_up(f"is not logging this run: the tracking server {without_credentials(self.uri)} cannot "
                                f"be reached ({why}); the run goes on without it")
        # A sweep's trials start together, and two processes creating one SQLite store (or one
        # experiment) at once collide ("table experiments already exists"): the loser tries again.
        attempts = OPEN_ATTEMPTS if self.uri.startswith("sqlite:") else 1  # a server has its own retries
        mlflow_telemetry_off()
        import mlflow  # noqa: F401  (first: importing it sets its loggers' levels, which are quieted below)

        for attempt in range(attempts):
            try:
                with quieted(("mlflow", "alembic")):  # its INFO lines ("Creating initial MLflow database tables")
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

    def step(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.held += [Metric(k, v, now, step) for k, v in values.items()]
        if len(self.held) + len(values) > MAX_BATCH_METRICS or time.monotonic() - self.written >= STEP_FLUSH_SECONDS:
            self._write()

    def epoch(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.held += [Metric(k, v, now, int(row["epoch"])) for k, v in _numbers(row).items()]
        self._write()

    def _write(self) -> None:
        """Write the held metrics, a batch at a time."""
        for start in range(0, len(self.held), MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=self.held[start:start + MAX_BATCH_METRICS])
        self.held, self.written = [], time.monotonic()

    def close(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, last = int(time.time() * 1000), int(summary.get("epochs_completed") or 0)
        self.held += [Metric(k, float(summary[k]), now, last) for k in FINAL_METRICS if isinstance(summary.get(k), (int, float))]
        self._write()  # with the points of an epoch that was stopped
        for file in ("config.yaml", "metrics.csv", "summary.json", "curves.png"):
            if (self.run_dir / file).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / file))
        best = self.run_dir / "checkpoints" / "best.pt"
        if best.is_file():
            self.client.log_artifact(self.run_id, str(best), artifact_path="checkpoints")
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(summary.get("status"), "FAILED")
        self.client.set_terminated(self.run_id, status=status)


class WandbLogger(Logger):
    """One W&B run per cnnlab run (its id is the run's): a resumed run goes on in it, each session in a
    folder of its own (``<run>/wandb/offline-run-*``), which ``wandb sync`` uploads in turn as one run."""

    name = "wandb"

    def open(self, name: str, resumed: bool) -> None:
        import wandb

        from cnnlab.results import sanitize_name

        run_id = self.run_dir.name
        self.run = wandb.init(
            dir=self.run_dir, project=sanitize_name(experiment_name(self.config)), id=run_id, name=run_id,
            config=self.config, resume="allow", mode=os.environ.get("WANDB_MODE") or "offline",  # online when asked
            # cnnlab's console stays its own: no copy of the terminal into the run, no "wandb:" lines in it
            settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("epoch")
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        self.per_epoch: set[str] = set()

    def step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"global_step": step, **values})

    def epoch(self, row: dict[str, Any]) -> None:
        values = _numbers(row)
        for key in values.keys() - self.per_epoch:  # charted against the epoch, not W&B's count of log calls
            self.run.define_metric(key, step_metric="epoch")
        self.per_epoch |= values.keys()
        self.run.log({"epoch": int(row["epoch"]), **values})

    def close(self, summary: dict[str, Any]) -> None:
        import wandb

        self.run.summary.update({k: float(summary[k]) for k in FINAL_METRICS if isinstance(summary.get(k), (int, float))})
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
        wandb.teardown()  # its service process ends with the run, not with the process (a test, a program calling fit)


@contextlib.contextmanager
def quieted(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """The Python loggers ``names`` below ``level`` silenced for a while, then as they were."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for logger, before in zip(loggers, levels):
            logger.setLevel(before)


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
