"""Usage: ``cnnlab tune configs/tune/lenet_relu.yaml [--trials 20] [--resume]``: hyperparameter search.

A search space file names a base config, the metric, the number of trials and a distribution per
config key::

    base: ../lenet_relu.yaml          # relative to this file
    metric: val_acc                   # val_acc or train_acc (maximised), val_loss or train_loss (minimised);
                                      # val_acc_ema, val_loss_ema: the moving average's (train.ema)
    trials: 20
    space:
      optim.lr: {loguniform: [0.01, 0.5]}
      train.batch_size: {choice: [64, 128, 256]}
      model.dropout: {uniform: [0.0, 0.5]}
      model.channels: {choice: [[6, 16], [12, 32]]}
      train.epochs: {int: [5, 10]}    # both ends included

Ray Tune runs the trials (an optional extra: ``pip install 'cnnlab[ray]'``), Optuna's TPE sampler
proposes them and ASHA stops poor ones early on the metric, epoch by epoch. Every trial is an
ordinary run folder under ``<results>/tune/<name>/runs/``; each invocation writes
``<results>/tune/<name>/<timestamp>/`` with ``summary.csv``/``summary.md`` (pruned trials marked),
``progress.png`` (the best metric against trials) and ``best.yaml``, a complete config that
``cnnlab run`` reproduces. ``--resume`` continues the newest interrupted tune: Ray Tune restores the
search (Optuna's state included), and each unfinished trial continues its run from its checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.compare import aggregate, markdown_table, row_from_summary, run_config_or_none, write_trials
from cnnlab.config import Config, absolute_paths, dump_config, load_config, read_yaml, validate
from cnnlab.console import SafeConsole, printable
from cnnlab.errors import UserError
from cnnlab.listeners import Listener
from cnnlab.numtext import number_text
from cnnlab.results import (
    RunDir,
    RunSummary,
    atomic_write_text,
    check_output_dir,
    new_dated_dir,
    read_metrics_csv,
    read_regular_text,
    read_summary,
    run_state,
    sanitize_name,
)
from cnnlab.runs import runs_of
from cnnlab.stopping import Interrupted, Pruned, handling_signals, settle_signals, signal_name

SPACE_KEYS = {"name", "base", "metric", "mode", "trials", "space", "seed", "grace_period", "reduction_factor"}
METRICS = {"val_acc": "max", "train_acc": "max", "val_loss": "min", "train_loss": "min",
           "val_acc_ema": "max", "val_loss_ema": "min"}  # the last two: the moving average's (train.ema)
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
STATE_FOLDER = "ray"  # Ray Tune's experiment state, inside the tune folder
STOP_FILE = ".stop"  # in the tune folder while the tune stops on a signal: its number (see TuneSignals)
STOP_POLL_SECONDS = 0.5  # how often a trial looks for the stop file between batches
# How long the tune waits for its trials to checkpoint and stop before Ray Tune ends them: only a hung trial
# takes it all (a loaded machine may take a minute to write a checkpoint); a second signal ends the tune at once.
STOP_GRACE_SECONDS = 300
WORST_LOSS = 1e6  # what a failed trial scores on a loss metric (finite: Optuna's TPE takes it as a value)


@dataclass
class Dimension:
    key: str  # a config key, e.g. optim.lr
    kind: str  # one of DISTRIBUTIONS
    values: list[Any]  # [low, high] or the choices

    def domain(self) -> Any:
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "int":
            return tune.randint(self.values[0], self.values[1] + 1)  # Ray's upper bound is exclusive
        return tune.choice(list(range(len(self.values))))  # Optuna wants plain choices: an index, decoded below

    def decode(self, sampled: Any) -> Any:
        if self.kind == "choice":
            return self.values[int(sampled)]
        if self.kind == "int":
            return int(sampled)
        return float(sampled)

    def samples(self) -> list[Any]:
        """Values to check the space with before anything runs: the edges of a range, and for a
        continuous one a value inside it too (which an integer key refuses)."""
        if self.kind in ("choice", "int"):
            return list(self.values)
        low, high = (float(v) for v in self.values)
        inside = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        if inside == round(inside):  # still a whole number: nudge it off
            inside += (high - low) / 7
        return [low, high, inside]


@dataclass
class Space:
    name: str
    path: Path
    base: Path | None
    metric: str
    mode: str
    trials: int
    dimensions: list[Dimension]
    seed: int = 0
    grace_period: int = 1
    reduction_factor: int = 3
    overrides: list[str] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)  # where the tune was started: what relative paths mean
    values: dict[str, Any] = field(default_factory=dict)  # the run options (--epochs: train.epochs), in every trial

    def config(self, point: dict[str, Any], name: str | None = None) -> Config:
        """The config at ``point``, its paths as written (relative ones meaning ``cwd``)."""
        values = {**self.values, **point, **({"name": name} if name else {})}
        return load_config(self.base, self.overrides, values)

    def trial_config(self, point: dict[str, Any], name: str) -> Config:
        """The config a trial runs: Ray Tune runs each trial in a folder of its own, so its paths are
        made absolute against the folder the tune was started in."""
        return absolute_paths(self.config(point, name), self.cwd)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_space(path: Path, overrides: list[str], trials: int | None, values: dict[str, Any] | None = None) -> Space:
    """The search space file, every point it can propose checked as a config before anything runs; ``values`` (the
    run options, typed: ``{"train.epochs": 3}``) are set in every trial."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space file not found: {path}")
    spec = read_yaml(path)
    unknown = set(spec) - SPACE_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a search space file has "
                        f"{', '.join(sorted(SPACE_KEYS))}")
    metric = spec.get("metric", "val_acc")
    if metric not in METRICS:
        raise UserError(f"{path}: metric {metric!r}: choose one of {', '.join(METRICS)}")
    mode = spec.get("mode", METRICS[metric])
    if mode != METRICS[metric]:
        raise UserError(f"{path}: mode {mode!r}: {metric} is {'maximised' if METRICS[metric] == 'max' else 'minimised'}"
                        f" (mode {METRICS[metric]})")
    count = trials if trials is not None else spec.get("trials", 10)
    for key, value, low in (("trials", count, 1), ("grace_period", spec.get("grace_period", 1), 1),
                            ("reduction_factor", spec.get("reduction_factor", 3), 2), ("seed", spec.get("seed", 0), 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{path}: {key} must be an integer of at least {low} (got {value!r})")
    raw = spec.get("space")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: space must map config keys to distributions, e.g. "
                        "space: {optim.lr: {loguniform: [0.01, 0.5]}}")
    dimensions = [_dimension(path, key, value) for key, value in raw.items()]
    values = {key: str(value) if isinstance(value, Path) else value for key, value in (values or {}).items()}  # JSON
    for dimension in dimensions:
        if dimension.key == "name" or dimension.key.startswith("output."):
            raise UserError(f"{path}: space.{dimension.key}: cnnlab names each trial and places its run folder "
                            "itself; search over what a run computes")
        if dimension.key in values:
            raise UserError(f"{path}: space.{dimension.key} is searched over, and an option sets {dimension.key} in "
                            "every trial; leave out one of the two")
    cwd = Path.cwd()
    base = (cwd / path.parent / spec["base"]) if spec.get("base") else None  # relative to this file, wherever trials run
    space = Space(sanitize_name(str(spec.get("name") or path.stem)), path, base, metric, mode, count, dimensions,
                  spec.get("seed", 0), spec.get("grace_period", 1), spec.get("reduction_factor", 3), list(overrides), cwd,
                  values)
    for dimension in dimensions:  # every edge of every range makes a valid config
        for sample in dimension.samples():
            try:
                cfg = space.config({dimension.key: sample})
            except UserError as err:
                raise UserError(f"{path}: space.{dimension.key} = {sample!r} does not make a valid config: {err}") from None
            if metric.endswith("_ema") and cfg.train.ema is None:
                raise UserError(f"{path}: metric {metric} is the moving average's, and space.{dimension.key} = "
                                f"{sample!r} makes a config without train.ema; set train.ema in the base config")
    return space


def _dimension(path: Path, key: Any, value: Any) -> Dimension:
    where = f"{path}: space.{key}"
    if not isinstance(key, str) or not isinstance(value, dict) or len(value) != 1:
        raise UserError(f"{where}: give one distribution, e.g. {{loguniform: [0.01, 0.5]}} "
                        f"({', '.join(DISTRIBUTIONS)})")
    [(kind, values)] = value.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: {kind} takes a list, e.g. {kind}: [0.1, 0.5]")
    if kind != "choice":
        if len(values) != 2 or not all(_number(v) for v in values) or values[0] >= values[1]:
            raise UserError(f"{where}: {kind} takes [low, high] with low < high")
        if kind == "int" and not all(isinstance(v, int) for v in values):
            raise UserError(f"{where}: int takes two integers [low, high] (both included)")
        if kind == "loguniform" and values[0] <= 0:
            raise UserError(f"{where}: loguniform needs a positive low end")
    return Dimension(key, kind, values)


# ---------------------------------------------------------------------------------------------
# One trial, inside Ray Tune


class TuneReporter(Listener):
    """Reports each epoch's metrics to Ray Tune; when ASHA stops the trial, Ray raises SystemExit out
    of ``tune.report``, which becomes ``Pruned`` so that the run records it and ends at once.

    When the tune is stopped by a signal, its stop file appears: between two batches the trial then
    raises ``Interrupted`` with that signal, as a signal to ``cnnlab run`` would (the trial runs in a
    thread of a Ray worker, where no signal handler of cnnlab's can be), so that the run checkpoints
    where it stands, is recorded ``interrupted`` and a resumed tune continues it."""

    def __init__(self, box: dict[str, str], stop_file: Path) -> None:
        self.epochs = 0
        self.box = box
        self.stop_file = stop_file
        self.looked = 0.0

    def advance(self, loss_sum: Any, correct: Any, seen: int) -> None:
        if time.monotonic() - self.looked >= STOP_POLL_SECONDS:
            self.looked = time.monotonic()
            self._check_stop()

    def _check_stop(self) -> None:
        signum = stop_signal(self.stop_file)
        if signum is not None:
            raise Interrupted(signum)

    def start_run(self, name: str, run_dir: Path, epochs: int, resumed: bool = False,
                  config: dict[str, Any] | None = None) -> None:
        self.epochs = epochs
        self.box["run_dir"] = str(Path(run_dir).resolve())

    def end_epoch(self, row: dict[str, Any], is_best: bool) -> None:
        if row["epoch"] >= self.epochs:
            return  # the last epoch is reported with the test result, once the run has completed
        from ray import tune

        self._check_stop()
        try:
            tune.report(epoch_metrics(row, self.box["run_dir"]))
        except SystemExit:
            self._check_stop()  # Ray Tune ended the trial because the tune is stopping, not ASHA
            raise Pruned(f"stopped by ASHA after epoch {row['epoch']}") from None


def stop_signal(stop_file: Path) -> int | None:
    """The signal that is stopping the tune, from its stop file; None while there is none."""
    try:
        text = stop_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else signal.SIGTERM


def epoch_metrics(row: dict[str, Any], run_dir: str) -> dict[str, Any]:
    return {"epoch": int(row["epoch"]), **{k: float(row[k]) for k in METRICS if k in row}, "run_dir": run_dir}


class NotStarted(RuntimeError):
    """A trial that Ray Tune started while the tune was stopping: it runs nothing (and is run on resume)."""


def tune_trial(params: dict[str, Any], space: Space, runs_dir: str, shared: tuple[str, str], stop_file: str) -> None:
    """Ray Tune's function for one trial: the sampled point as a config, run (or continued) as an
    ordinary run folder, each epoch reported; the last report carries the test accuracy."""
    from ray import tune

    from cnnlab.trial import TrialResult, run_trial

    point = {d.key: d.decode(params[d.key]) for d in space.dimensions}
    name = trial_name(space, point)
    marker, token = Path(shared[0]), shared[1]
    signum = stop_signal(Path(stop_file))
    if signum is not None:  # an error in Ray Tune's eyes, so that --resume (resume_errored) runs it
        raise NotStarted(f"trial {name} did not start: the tune was stopped by {signal_name(signum)}")
    try:
        if not (marker.is_file() and marker.read_text(encoding="utf-8") == token):
            raise UserError(f"this Ray node does not see {marker.parent}: cnnlab tune needs the results folder "
                            "(--results or output.dir) on storage every node shares")
        cfg = space.trial_config(point, name)
    except (UserError, OSError) as err:
        result = TrialResult("failed", error=str(err), exit_code=2)
    else:
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": Path(runs_dir)})})
        if not isinstance(cfg.train.threads, int):
            from cnnlab.threads import take_share

            take_share(int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
        result = run_trial(cfg, TuneReporter({}, Path(stop_file)))
    if result.status == "pruned":
        return
    if result.status == "interrupted":  # an error in Ray Tune's eyes, so that --resume (resume_errored) continues it
        raise RuntimeError(f"trial {name} was interrupted: {result.error}")
    final: dict[str, Any] = {"epoch": result.epochs_done, "status": result.status, "error": result.error,
                             "run_dir": str(result.run_dir or "")}
    if result.metrics:
        final.update(epoch_metrics(result.metrics[-1], final["run_dir"]))
    if result.summary is not None and result.summary.test_acc is not None:
        final["test_acc"] = result.summary.test_acc
    if result.status != "completed":
        # A trial that failed (a diverging loss, a bad point of the space) is a finished trial with the
        # worst score: the search learns to avoid its region, and the run folder says what happened.
        final.update({key: 0.0 if mode == "max" else WORST_LOSS for key, mode in METRICS.items()})
    tune.report(final)


def trial_name(space: Space, point: dict[str, Any]) -> str:
    """A run name for a point of the space: the same point gets the same name, so a restored tune
    finds its unfinished runs (``--resume auto``) and continues them."""
    digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{space.name}-{digest}"


# ---------------------------------------------------------------------------------------------
# The whole search


@dataclass
class TuneOutcome:
    folder: Path
    rows: list[dict[str, Any]]
    best: Path | None  # best.yaml
    interrupted: bool = False
    stopped_by: int | None = None  # SIGTERM or SIGHUP, when one stopped the tune (Ctrl-C: interrupted only)


def run_tune(
    space_file: Path,
    overrides: list[str] | None = None,
    *,
    trials: int | None = None,
    results: Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    address: str | None = None,
    jobs: int | None = None,
    gpus_per_trial: float | None = None,
    cpus_per_trial: float | None = None,
    values: dict[str, Any] | None = None,
) -> TuneOutcome:
    from cnnlab.cluster import ray_session, require_ray, trial_resources

    require_ray("cnnlab tune")
    if resume and (overrides or trials is not None or jobs is not None or values):
        raise UserError("--resume continues a tune as it was started: leave out --set, --trials, --jobs and the run "
                        "options (--epochs, --device, --threads, --data-dir): they are kept in the tune folder's tune.json")
    space = read_space(space_file, list(overrides or []), trials, values)
    base = space.config({})
    root = (Path(results).expanduser() if results is not None else Path(base.output.dir)).absolute()
    if results is not None:
        check_output_dir(root, "--results")
    tune_root = root / "tune" / space.name
    check_output_dir(tune_root, "results folder")
    folder = None
    if resume:
        folder, record = _resumable(tune_root, space)
        space = read_space(space_file, record["overrides"], record["trials"], record.get("values") or {})
    console = SafeConsole()
    settle_signals()  # a signal that came while starting stops the command here (Interrupted)
    with ray_session(address, "cnnlab tune"), TuneSignals() as signals:  # after ray.init, which sets its own
        cpus, gpus, jobs = trial_resources(gpus_per_trial, cpus_per_trial, jobs if not resume else record["jobs"],
                                           space.trials)
        if folder is None:
            folder = new_dated_dir(tune_root, "tune")
            _write_record(folder, space, jobs, finished=False)
        console.print(f"tune {space.name}: {space.trials} trials, {jobs} at a time ({cpus:g} CPU, {gpus:g} GPU each), "
                      f"{space.metric} {'maximised' if space.mode == 'max' else 'minimised'} -> {folder}", soft_wrap=True)
        marker = folder / ".shared-storage"
        token = secrets.token_hex(16)
        atomic_write_text(marker, token)
        stop_file = (folder / STOP_FILE).resolve()
        stop_file.unlink(missing_ok=True)  # left by the invocation this one resumes
        try:
            with signals.fitting(stop_file):
                grid = _fit(space, folder, tune_root / "runs", (str(marker.resolve()), token), stop_file, cpus, gpus,
                            jobs, resume, quiet)
        finally:
            marker.unlink(missing_ok=True)
            stop_file.unlink(missing_ok=True)
    rows = tune_rows(space, grid, tune_root / "runs")
    best = write_tune_files(space, folder, rows)
    interrupted = len(rows) < space.trials or any(r["status"] in UNFINISHED for r in rows)
    if interrupted:
        console.print(f"tune stopped before all {space.trials} trials finished; continue it with --resume", soft_wrap=True)
    else:
        _write_record(folder, space, jobs, finished=True)
    return TuneOutcome(folder, rows, best, interrupted, signals.received)


UNFINISHED = ("interrupted", "running", "stale", "not started")
RECORD = "tune.json"  # how a tune was started: what --resume needs to continue it as it was


def _space_digest(space: Space) -> str:
    return hashlib.sha256(space.path.read_bytes()).hexdigest()


def _write_record(folder: Path, space: Space, jobs: int, finished: bool) -> None:
    record = {"space": str(space.path), "space_sha256": _space_digest(space), "trials": space.trials,
              "overrides": space.overrides, "values": space.values, "jobs": jobs, "finished": finished}
    atomic_write_text(folder / RECORD, json.dumps(record, indent=2) + "\n")


def _read_record(path: Path) -> dict[str, Any]:
    """A tune folder's tune.json, checked (it is read back, so not trusted)."""
    try:
        record = json.loads(read_regular_text(path))
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: not a cnnlab tune record ({err})") from None
    ok = isinstance(record, dict) and isinstance(record.get("trials"), int) and record["trials"] >= 1 \
        and isinstance(record.get("jobs"), int) and record["jobs"] >= 1 and isinstance(record.get("finished"), bool) \
        and isinstance(record.get("space_sha256"), str) and isinstance(record.get("overrides"), list) \
        and all(isinstance(o, str) for o in record["overrides"]) and isinstance(record.get("values", {}), dict) \
        and all(isinstance(key, str) for key in record.get("values", {}))
    if not ok:
        raise UserError(f"{path}: not a cnnlab tune record (needs trials, jobs, overrides, space_sha256, finished)")
    return record




def _resumable(tune_root: Path, space: Space) -> tuple[Path, dict[str, Any]]:
    """The newest unfinished tune of ``space`` (its folder and record), or a UserError saying why none."""
    from ray import tune

    for folder in sorted((p for p in tune_root.glob("2*") if p.is_dir() and (p / RECORD).is_file()), reverse=True):
        record = _read_record(folder / RECORD)
        if record["finished"] or not tune.Tuner.can_restore(str(folder / STATE_FOLDER)):
            continue
        if record["space_sha256"] != _space_digest(space):
            raise UserError(f"{space.path} changed since the tune in {folder} started; put it back as it was to resume, "
                            "or start a new tune without --resume")
        return folder, record
    raise UserError(f"nothing to resume: no unfinished tune of {space.name} under {tune_root}; run it without --resume")


class TuneSignals:
    """Signals during a tune. SIGINT, SIGTERM and SIGHUP stop it in order while it runs: the stop
    file (holding the signal's number) tells the running trials to checkpoint and stop (TuneReporter)
    and Ray Tune to start no more (tune_trial), and once they have stopped, Ray Tune is stopped
    (``StopWhenIdle``): it saves its state for --resume. A second signal stops Ray Tune at once.
    Before and after, a signal stops the command. The first one is remembered for the exit code
    (128 + N)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._stop_file: Path | None = None
        self._handlers = contextlib.ExitStack()

    def __enter__(self) -> TuneSignals:
        # No signal can be pending here: one that came while starting stopped the command (settle_signals).
        self._handlers.enter_context(handling_signals(self._handle))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handlers.close()

    @contextlib.contextmanager
    def fitting(self, stop_file: Path) -> Any:
        self._stop_file = stop_file
        try:
            yield
        finally:
            self._stop_file = None

    def _handle(self, signum: int) -> None:
        first = self.received is None
        self.received = self.received or signum
        if self._stop_file is None:
            raise Interrupted(signum)
        if first:
            SafeConsole(stderr=True).print(f"{signal_name(signum)}: stopping the running trials (they checkpoint; "
                                           "--resume continues them)", soft_wrap=True)
            atomic_write_text(self._stop_file, f"{signum}\n")
        else:
            os.kill(os.getpid(), TUNE_STOP)  # the user does not want to wait


TUNE_STOP = signal.SIGUSR1  # Ray Tune's own signal to end a tune gracefully (saving its state); SIGINT is cnnlab's


def stop_when_idle(stop_file: Path) -> Any:
    """A Ray Tune callback that, once the stop file exists and no trial runs any more (or after
    STOP_GRACE_SECONDS), ends the tune. Pickled with the tune's state: it holds only the file's path."""
    from ray.tune import Callback

    class StopWhenIdle(Callback):
        def __init__(self) -> None:
            self.stop_file = str(stop_file)
            self.since: float | None = None

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            if self.since is None:
                if not os.path.exists(self.stop_file):
                    return
                self.since = time.monotonic()
            elif self.since < 0:
                return  # already ended
            if all(trial.status != "RUNNING" for trial in trials) or time.monotonic() - self.since > STOP_GRACE_SECONDS:
                self.since = -1.0
                os.kill(os.getpid(), TUNE_STOP)

    return StopWhenIdle()


def _fit(space: Space, folder: Path, runs_dir: Path, shared: tuple[str, str], stop_file: Path, cpus: float, gpus: float,
         jobs: int, resume: bool, quiet: bool) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A resumed trial reports its epochs under Ray's restarted iteration count; Optuna keeps the first.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this", category=UserWarning)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C is cnnlab's (TuneSignals), as SIGTERM and SIGHUP are
    trainable = tune.with_resources(tune.with_parameters(tune_trial, space=space, runs_dir=str(runs_dir), shared=shared,
                                                         stop_file=str(stop_file)), {"cpu": cpus, "gpu": gpus})
    state = folder / STATE_FOLDER
    if resume:
        tuner = tune.Tuner.restore(str(state), trainable, resume_unfinished=True, resume_errored=True)
    else:
        epochs = max(space.config(point).train.epochs for point in _edge_points(space))
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: d.domain() for d in space.dimensions},
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, num_samples=space.trials, max_concurrent_trials=jobs,
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=space.seed)),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=space.grace_period,
                                        reduction_factor=space.reduction_factor),
            ),
            run_config=tune.RunConfig(name=STATE_FOLDER, storage_path=str(folder), verbose=0,
                                      callbacks=[stop_when_idle(stop_file), *([] if quiet else [trial_lines(stop_file, space)])],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    quiet_loggers = [logging.getLogger(name) for name in ("ray", "ray.tune", "ray.train")]
    levels = [logger.level for logger in quiet_loggers]
    for logger in quiet_loggers:  # Ray logs a trial's traceback itself; cnnlab says what failed, once
        logger.setLevel(logging.CRITICAL)
    try:
        return tuner.fit()
    finally:
        for logger, level in zip(quiet_loggers, levels):
            logger.setLevel(level)


def _edge_points(space: Space) -> list[dict[str, Any]]:
    return [{}] + [{d.key: sample} for d in space.dimensions for sample in d.samples()]


def trial_lines(stop_file: Path, space: Space) -> Any:
    """A Ray Tune callback that shows the trials as Ray reports them: on a terminal a live table (trial, its
    values, epoch, latest validation accuracy, state), otherwise a line per trial as it ends. It is pickled
    with the tune's state, so it holds the stop file's path and the space, and makes its console when it shows."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.stop_file = str(stop_file)
            self.table = TrialTable(space)
            self.live: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "live": None}  # a terminal display does not travel

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.show(trials.index(trial) + 1, trial.config, state="running")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.show(trials.index(trial) + 1, trial.config, result=result, state="running")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result, number = trial.last_result or {}, trials.index(trial) + 1
            if result.get("status") == "failed":
                self.show(number, trial.config, result=result, state="failed",
                          line=f"FAILED trial {number}: {result.get('error')}")
                return
            value = result.get("val_acc")
            word = "done  " if result.get("status") == "completed" else "PRUNED"
            self.show(number, trial.config, result=result, state=word.strip().lower(),
                      line=f"{word} trial {number}: epoch {result.get('epoch', '?')}"
                           + (f", val acc {value:.4f}" if isinstance(value, float) else ""))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            # While the tune stops, a trial that stops (or does not start) is an error in Ray Tune's eyes.
            word = "STOPPED" if os.path.exists(self.stop_file) else "FAILED"
            number = trials.index(trial) + 1
            self.show(number, trial.config, state=word.lower(), line=f"{word} trial {number}")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.live is not None:
                self.live.stop()
                self.live = None

        def show(self, number: int, config: dict, *, result: dict | None = None, state: str, line: str = "") -> None:
            self.table.update(number, config, result, state)
            console = SafeConsole()
            if not console.is_terminal:
                if line:
                    console.print(line, soft_wrap=True)
                return
            if self.live is None:
                from rich.live import Live

                self.live = Live(console=console, auto_refresh=False, transient=False)
                self.live.start()
            self.live.update(self.table.render(), refresh=True)

    return TrialLines()


class TrialTable:
    """The live table of a tune's trials: number, sampled values, epoch, latest validation accuracy, state."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self.rows: dict[int, dict[str, Any]] = {}

    def update(self, number: int, config: dict[str, Any], result: dict[str, Any] | None, state: str) -> None:
        row = self.rows.setdefault(number, {"epoch": None, "val_acc": None})
        row["values"] = {d.key: d.decode(config[d.key]) for d in self.space.dimensions if d.key in (config or {})}
        row["state"] = state
        for key in ("epoch", "val_acc"):
            if result and isinstance(result.get(key), (int, float)) and not isinstance(result.get(key), bool):
                row[key] = result[key]

    def render(self) -> Any:
        from rich.table import Table

        keys = [d.key for d in self.space.dimensions]
        table = Table("trial", *keys, "epoch", "val acc", "state", box=None, header_style="bold",
                      title=f"tune {self.space.name}: {len(self.rows)} of {self.space.trials} trials started")
        for number in sorted(self.rows):
            row = self.rows[number]
            values = [number_text(row["values"].get(k), significant=4) for k in keys]
            table.add_row(str(number), *map(printable, values), number_text(row["epoch"]),
                          number_text(row["val_acc"], 4), row["state"])
        return table


def tune_rows(space: Space, grid: Any, runs_dir: Path) -> list[dict[str, Any]]:
    """One row per trial, from its run folder (as a sweep's are), with its sampled values. A trial
    the tune did not finish (interrupted) is marked so, and its run folder says it can be continued."""
    rows = []
    for number, result in enumerate(grid, start=1):
        config = result.config or {}
        point = {d.key: d.decode(config[d.key]) for d in space.dimensions if d.key in config}
        metrics = result.metrics or {}
        run_dir = _trial_run_dir(space, point, metrics.get("run_dir"), runs_dir)
        summary = None
        if run_dir is not None:
            with contextlib.suppress(UserError):
                summary = read_summary(run_dir / "summary.json")
        swept = ", ".join(f"{k}={v}" for k, v in point.items())
        state = None
        if summary is None:
            state, error = _without_run(result.error, metrics)
            summary = RunSummary(name=trial_name(space, point), status="failed", error=error)
        if summary.status == "pruned" and not metrics.get("done") and run_dir is not None:
            # Ray Tune stops a trial the same way for ASHA and for an interrupted tune; only here is it
            # known which: a trial the tune did not finish was interrupted, and --resume continues it.
            summary.status, summary.stopped_at = "interrupted", f"after epoch {summary.epochs_completed}: the tune stopped"
            RunDir(run_dir).write_summary(summary)
        state = run_state(run_dir, summary) if run_dir is not None else state
        row = row_from_summary(summary, run_dir, swept, status=state, config=run_config_or_none(run_dir))
        row["trial"] = number
        row["swept"] = point
        rows.append(row)
    return rows


def _without_run(error: Any, metrics: dict[str, Any]) -> tuple[str, str]:
    """(status, error) of a trial that has no run folder: it failed before its run started (a bad
    point of the space, missing data: it reported why), or it never started (the tune stopped first)."""
    if metrics.get("status") == "failed":
        return "failed", str(metrics.get("error") or "the trial failed before its run started")
    said = str(error).strip().splitlines()[-1] if error is not None and str(error).strip() else ""  # Ray's: a traceback
    if error is None or isinstance(error, NotStarted):
        return "not started", said or "the tune stopped before this trial started"
    return "failed", said or type(error).__name__


def _trial_run_dir(space: Space, point: dict[str, Any], reported: Any, runs_dir: Path) -> Path | None:
    """The trial's run folder: the one it reported, if that lies in the tune's runs folder, else the
    newest run of its config there (a trial stopped before its first report)."""
    runs_dir = runs_dir.resolve()
    if isinstance(reported, str) and reported:
        path = Path(reported).resolve()
        if path.is_relative_to(runs_dir) and (path / "summary.json").is_file():
            return path
    try:
        cfg = space.trial_config(point, trial_name(space, point))
    except UserError:
        return None
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": runs_dir})})
    found = runs_of(cfg)
    return found[0][0] if found else None


def _column(run_dir: Path | None, key: str) -> list[float]:
    if run_dir is None or not (run_dir / "metrics.csv").is_file():
        return []
    try:
        return [float(r[key]) for r in read_metrics_csv(run_dir / "metrics.csv")]
    except (UserError, KeyError, ValueError):
        return []


def score(row: dict[str, Any], space: Space) -> float | None:
    """A trial's value of the metric at the epoch its run was tested at: the last epoch's where the run's
    train.select chose the last epoch (summary.json's selection), else its best epoch's."""
    run_dir = Path(row["run_dir"]) if row.get("run_dir") else None
    values = _column(run_dir, space.metric)
    if not values:
        return None
    try:
        selection = read_summary(run_dir / "summary.json").selection if run_dir is not None else None
    except UserError:
        selection = None
    if selection is not None and selection.rule == "last":
        return values[-1]
    return max(values) if space.mode == "max" else min(values)


def write_tune_files(space: Space, folder: Path, rows: list[dict[str, Any]]) -> Path | None:
    """summary.csv, summary.md, progress.png and best.yaml (the best completed trial's config)."""
    from cnnlab.plots import plot_tune_progress

    scores = [score(row, space) for row in rows]
    for row, value in zip(rows, scores):
        row["score"] = value  # the metric at the epoch the trial was tested at
    keys = list(dict.fromkeys(d.key for d in space.dimensions))
    write_trials(folder, rows, keys, extra=("trial", "score"))
    title = f"# Tune {space.name} ({folder.name}): {len(rows)} trials, {space.metric} ({space.mode})\n\n"
    atomic_write_text(folder / "summary.md", title + markdown_table(aggregate(rows)))
    plot_tune_progress(scores, space.metric, space.mode, folder / "progress.png", title=space.name)
    for row in rows:  # a pruned trial's process was ended before it could draw its curves
        run_dir = Path(row["run_dir"]) if row.get("run_dir") else None
        if run_dir is not None and not (run_dir / "curves.png").exists() and (run_dir / "metrics.csv").is_file():
            from cnnlab.plots import plot_curves

            with contextlib.suppress(Exception):
                plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
    completed = [(s, r) for s, r in zip(scores, rows) if r["status"] == "completed" and s is not None]
    if not completed:
        return None
    best_score, best_row = (max if space.mode == "max" else min)(completed, key=lambda pair: pair[0])
    cfg = validate(read_yaml(Path(best_row["run_dir"]) / "config.yaml"), "the best trial's config", trust_code=True)
    base_dir = space.config({}).output.dir
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": base_dir})})
    header = (f"# The best of {len(rows)} trials of {space.path} ({space.metric} {best_score:.4f}, trial "
              f"{best_row['trial']}: {best_row['params_swept']}).\n# Reproduce it with: cnnlab run {folder / 'best.yaml'}\n")
    atomic_write_text(folder / "best.yaml", header + dump_config(cfg))
    return folder / "best.yaml"
