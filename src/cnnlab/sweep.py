"""Usage: ``run_sweep(Path("configs/kernels"), jobs=2)``: a family of experiments, run and compared.

A target is a folder (every ``*.yaml`` in it, sorted, one trial each) or a sweep file::

    base: ../lenet.yaml                     # relative to the sweep file
    grid: {model.kernel_size: [3, 5, 7], optim.lr: [0.1, 0.3]}
    seeds: [0, 1, 2]

Each trial runs as its own ``cnnlab run --resume auto`` process (``jobs`` at a time, CPU threads
divided among them unless a config sets ``train.threads``, one GPU each when there are several), so
one crashing trial cannot take the others down. Runs go to
``<results>/sweeps/<sweep>/runs/<variant>/<run id>/``; each invocation writes
``<results>/sweeps/<sweep>/<timestamp>/`` with ``trials.json``, ``summary.csv``, ``summary.md``,
``curves.png`` and ``bars.png`` (run folders named relative to it, so the sweep folder can move).
A trial whose exact config already completed is skipped unless ``force``; one that was interrupted
continues from its checkpoint. SIGINT, SIGTERM or SIGHUP to the sweep is passed on to its running
trials, which checkpoint and stop; the sweep then writes its files for what ran and exits 128 + N.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cnnlab.compare import aggregate, markdown_table, row_from_summary, write_trials
from cnnlab.config import (
    Config,
    absolute_paths,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    split_values,
    with_values,
)
from cnnlab.console import SafeConsole
from cnnlab.cpus import usable_cpus
from cnnlab.errors import UserError
from cnnlab.events import EVENTS_FD_ENV, read_events
from cnnlab.launch import EventSink, Launcher, Trial
from cnnlab.numtext import duration_text, number_text
from cnnlab.results import (
    MAX_NAME_CHARS,
    TEST_ACC_BESIDE,
    RunSummary,
    atomic_write_text,
    check_output_dir,
    figure_label,
    new_dated_dir,
    read_summary,
    sanitize_name,
)
from cnnlab.runs import runs_of
from cnnlab.stopping import PARENT_ENV, handling_signals, signal_name
from cnnlab.trial import TrialRecorder, TrialResult

SWEEP_KEYS = {"name", "base", "grid", "seeds"}


# ---------------------------------------------------------------------------------------------
# Expanding a target into trials


def one_line(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).splitlines())


def _value_label(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def multirun(overrides: list[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """(plain overrides, grid): each ``--set KEY=A,B,C`` becomes a grid axis of the values A, B and C (each read as
    YAML), as Hydra's multirun does; the others stay overrides of every trial."""
    plain, grid = [], {}
    for text in overrides:
        parts, _ = parse_override(text)
        values = split_values(text.partition("=")[2])
        if len(values) == 1:
            plain.append(text)
            continue
        if any(not v.strip() for v in values):
            raise UserError(f"--set {text!r}: an empty value between commas; give KEY=A,B (quote a value that holds a comma: "
                            f"KEY='\"a,b\"')")
        grid[".".join(parts)] = [parse_override(f"x={v.strip()}")[1] for v in values]
    return plain, grid


def is_sweep_file(path: Path) -> bool:
    """Whether a YAML file is a sweep file (base/grid/seeds) rather than one experiment's config: it has a base or
    a grid, or none of a config's sections (so that a misspelt sweep key is named as such)."""
    keys = set(read_yaml(path))
    return bool(keys & {"base", "grid"}) or not keys & (set(Config.model_fields) | {"extends"})


def expand(target: Path, overrides: list[str], seeds: list[int] | None = None,
           values: dict[str, Any] | None = None) -> tuple[str, list[Trial]]:
    """(sweep name, trials) of a folder of configs, a sweep file or one config, each crossed with the grid of the
    ``--set KEY=A,B`` overrides (``multirun``), with ``values`` (the run options: ``{"train.epochs": 3}``) set in
    every trial. A config that fails to load becomes a failed trial, not an error."""
    target = Path(target)
    overrides, grid = multirun(overrides)
    values = dict(values or {})
    if target.is_dir():
        files = sorted(p for p in target.glob("*.yaml") if not p.name.startswith("_"))
        if not files:
            raise UserError(f"{target}: no *.yaml configs in this folder")
        trials = []
        for path, name in zip(files, unique_names([p.stem for p in files], [p.name for p in files])):
            trials += grid_trials(path, name, grid, overrides, seeds or [None], prefix=bool(grid), values=values)
        return target.name or "sweep", trials
    if is_sweep_file(target):
        return expand_sweep_file(target, overrides, seeds, grid, values)
    load_config(target, overrides, values)  # the config itself must be valid: bad input, not a trial that failed
    name = sanitize_name(target.stem)
    return name, grid_trials(target, name, grid, overrides, seeds or [None], values=values)


# The command-line option that sets each key of the run options (cnnlab sweep --epochs 3: train.epochs).
OPTION_OF = {"train.epochs": "--epochs", "train.device": "--device", "train.threads": "--threads", "data.root": "--data-dir"}


def grid_trials(base: Path | None, name: str, grid: dict[str, list[Any]], overrides: list[str], seeds: list[int | None],
                prefix: bool = False, values: dict[str, Any] | None = None) -> list[Trial]:
    """A trial per point of ``grid`` and seed, of the config ``base`` (None: the defaults) with ``overrides`` and
    ``values`` (the run options); each variant named after its point (``kernel_size=3-lr=0.1``), after ``name``
    first with ``prefix``. A key both swept and set by an option is a ``UserError``."""
    fixed = dict(values or {})
    both = [key for key in grid if key in fixed]
    if both:
        raise UserError(f"{', '.join(both)}: swept by the grid and set in every trial by "
                        f"{', '.join(OPTION_OF.get(key, key) for key in both)}; leave out one of the two")
    points = [dict(zip(grid, point)) for point in itertools.product(*grid.values())]
    trials = []
    for swept, variant in zip(points, variant_names(points, name, prefix)):
        for seed in seeds:
            values = {**fixed, **swept, "name": variant, **({"seed": seed} if seed is not None else {})}
            try:
                cfg = load_config(base, overrides, values)
                trials.append(Trial(variant, cfg.seed, swept, config=cfg))
            except UserError as err:
                trials.append(Trial(variant, seed or 0, swept, error=one_line(err), status="failed"))
    return trials


def expand_sweep_file(path: Path, overrides: list[str], seeds: list[int] | None,
                      more_grid: dict[str, list[Any]] | None = None,
                      values: dict[str, Any] | None = None) -> tuple[str, list[Trial]]:
    spec = read_yaml(path)
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise UserError(
            f"{path}: unknown sweep key(s) {', '.join(sorted(unknown))}; a sweep file has {', '.join(sorted(SWEEP_KEYS))}. "
            "(To run one experiment use `cnnlab run`.)"
        )
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise UserError(f"{path}: grid must map config keys to non-empty lists, e.g. grid: {{optim.lr: [0.1, 0.3]}}")
    seed_list = seeds or spec.get("seeds") or [None]
    if not isinstance(seed_list, list) or not all(s is None or isinstance(s, int) for s in seed_list):
        raise UserError(f"{path}: seeds must be a list of integers, e.g. seeds: [0, 1, 2]")
    base = (path.parent / spec["base"]) if spec.get("base") else None
    name = sanitize_name(str(spec.get("name") or path.stem))
    return name, grid_trials(base, name, {**grid, **(more_grid or {})}, overrides, seed_list, values=values)


def variant_names(points: list[dict[str, Any]], default: str, prefix: bool = False) -> list[str]:
    """A folder name per grid point, from its values (``kernel_size=3-lr=0.1``; ``default`` for a point of no
    values, and before the values with ``prefix``), unique (see unique_names)."""
    names = ["-".join([default] * prefix + [f"{k.split('.')[-1]}={_value_label(v)}" for k, v in p.items()]) or default
             for p in points]
    return unique_names(names, [json.dumps([default, p] if prefix else p, sort_keys=True, default=str) for p in points])


def unique_names(names: list[str], identities: list[str]) -> list[str]:
    """``names`` sanitised into folder names; where sanitising or the length limit makes two equal
    (``a b`` and ``a-b``), each gets a short hash of its identity, so no two trials share a folder,
    a config file or a log."""
    safe = [sanitize_name(n) for n in names]
    result = []
    for name, identity in zip(safe, identities):
        if safe.count(name) > 1:
            digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
            name = sanitize_name(f"{name[: MAX_NAME_CHARS - 9]}-{digest}")
        result.append(name)
    return result


# ---------------------------------------------------------------------------------------------
# Running trials


def finished_run(trial: Trial) -> Path | None:
    """The newest completed earlier run of exactly this trial's config, if there is one."""
    return next((run_dir for run_dir, _, state in runs_of(trial.config) if state == "completed"), None)


def placement(index: int, jobs: int) -> tuple[str | None, int]:
    """(device, CPU threads) for the ``index``-th concurrent trial: one GPU each when there are several, and a
    share of the CPUs this process may use (the affinity mask and cgroup quota, not ``os.cpu_count()``)."""
    threads = max(1, usable_cpus().count // jobs)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (f"cuda:{index % gpus}" if gpus > 1 else None), threads


class SweepDisplay:
    """What a sweep shows while it runs: an overall bar (trials ended, with the time left from those finished so
    far) and a bar per running trial counting its batches on a terminal (``live``), otherwise a line per trial
    start and end; each end says the trial's accuracy and time. Fed with the trials' events."""

    def __init__(self, console: Console, live: bool, jobs: int = 1, clock: Any = time.monotonic) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}", markup=False), TimeElapsedColumn(),
            console=console, disable=not live,
        )
        self.overall: Any = None
        self.jobs, self.clock = jobs, clock
        self.left = 0  # trials still to run
        self.seconds: list[float] = []  # wall seconds of each trial this sweep ran to its end
        self.started: dict[int, float] = {}
        self.epoch_batches: dict[int, int] = {}  # a running trial's batches an epoch
        self.summaries: dict[int, dict[str, Any]] = {}  # a trial's summary, from its run_end event

    def __enter__(self) -> SweepDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def begin(self, total: int, done: int) -> None:
        self.left = total - done
        self.overall = self.progress.add_task("sweep", total=total, completed=done, note="")

    def trial_started(self, trial: Trial) -> Any:
        self.say(f"start {trial.label}")
        self.started[id(trial)] = self.clock()
        return self.progress.add_task(f"  {trial.label}", total=trial.config.train.epochs, note="epochs")

    def on_event(self, task: Any, trial: Trial, event: dict[str, Any]) -> None:
        kind, epoch = event["event"], event.get("epoch")
        if kind == "run_start" and event.get("resumed"):
            self.say(f"resume {trial.label} in {event.get('run_dir')}")
        elif kind == "run_end" and isinstance(event.get("summary"), dict):
            self.summaries[id(trial)] = event["summary"]
        elif kind == "epoch_start" and isinstance(epoch, int) and _count(event.get("batches")):
            batches = self.epoch_batches[id(trial)] = event["batches"]  # from here on the bar counts batches
            done = event.get("done") if _count(event.get("done")) else 0
            self.progress.update(task, total=trial.config.train.epochs * batches, completed=(epoch - 1) * batches + done,
                                 note=f"epoch {epoch}/{trial.config.train.epochs}")
        elif kind == "batches" and isinstance(epoch, int) and _count(event.get("done")) and id(trial) in self.epoch_batches:
            self.progress.update(task, completed=(epoch - 1) * self.epoch_batches[id(trial)] + event["done"])
        elif kind == "epoch_end" and isinstance(epoch, int):
            batches = self.epoch_batches.get(id(trial), 1)
            self.progress.update(task, completed=epoch * batches)

    def trial_finished(self, task: Any, trial: Trial) -> None:
        if task is not None:
            self.progress.remove_task(task)
        summary = self.summaries.pop(id(trial), {})
        started = self.started.pop(id(trial), None)
        if trial.status in ("completed", "failed"):  # ended: counted; a stopped or unstarted trial is still to run
            self.progress.advance(self.overall)
            self.left -= 1
        if trial.status == "completed" and started is not None:
            self.seconds.append(self.clock() - started)
        word = {"completed": "done ", "interrupted": "STOPPED", "not started": "SKIPPED"}.get(trial.status, "FAILED")
        self.say(f"{word} {trial.label}" + (f": {trial.error}" if trial.error else _metrics(summary, started, self.clock())))
        if self.seconds and self.left > 0:
            per_trial = sum(self.seconds) / len(self.seconds)
            left = per_trial * math.ceil(self.left / max(self.jobs, 1))
            self.progress.update(self.overall, note=f"about {duration_text(left)} left")

    def say(self, text: str) -> None:
        if self.progress.disable:
            self.console.print(text, soft_wrap=True)
        else:
            self.progress.console.print(text, soft_wrap=True)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _metrics(summary: dict[str, Any], started: float | None, now: float) -> str:
    """``": test acc 0.8812, val acc 0.8790 (best epoch 7), 3.2 min"``: what a finished trial's summary says, led by
    its headline where that is another figure (``": ema test acc, flip TTA 0.8901, test acc 0.8812, ..."``)."""
    parts = [f"test acc {number_text(summary['test_acc'], 4)}"] if "test_acc" in summary else []
    headline = summary.get("headline")
    if isinstance(headline, str) and headline != "test_acc" and headline in TEST_ACC_BESIDE and headline in summary:
        tta = summary.get("test_tta") if isinstance(summary.get("test_tta"), list) else None
        parts.insert(0, f"{figure_label(headline, [str(name) for name in tta or ()])} {number_text(summary[headline], 4)}")
    if "best_val_acc" in summary:
        parts.append(f"{summary.get('eval_split', 'val')} acc {number_text(summary['best_val_acc'], 4)}"
                     + (f" (best epoch {summary['best_epoch']})" if _count(summary.get("best_epoch")) else ""))
    if started is not None:
        parts.append(duration_text(now - started))
    return ": " + ", ".join(parts) if parts else ""


class LocalLauncher(Launcher):
    """Each trial is a ``cnnlab run CONFIG --resume auto`` process on this machine, in its own session
    (so a terminal's Ctrl-C reaches it once, through the sweep), its output in ``logs/``, its events
    on an inherited pipe. ``jobs`` at a time share the CPUs (or get a GPU each when there are several)."""

    name = "local"

    def __init__(self, sweep_dir: Path, jobs: int) -> None:
        self.sweep_dir = sweep_dir
        self.jobs = jobs
        self.processes: dict[int, subprocess.Popen] = {}
        self.stop_signal: int | None = None

    def stop(self, signum: int) -> None:
        self.stop_signal = self.stop_signal or signum
        for process in list(self.processes.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def launch(self, trial: Trial, config_path: Path, slot: int, on_event: EventSink) -> TrialResult:
        device, threads = placement(slot, self.jobs)
        if device:  # the trial's copy of its config says where it runs
            cfg = with_values(trial.config, {"train.device": device}, f"{config_path} placed on {device}")
            atomic_write_text(config_path, dump_config(cfg))
        # A config's own train.threads is part of what it computes (results differ with the thread count)
        # and is kept; otherwise the trial gets its share of the CPUs through OMP_NUM_THREADS, which torch
        # reads at start-up, and summary.json records the count it used.
        own = trial.config.train.threads
        threads = own if isinstance(own, int) else threads
        log_path = self.sweep_dir / "logs" / config_path.with_suffix(".log").name
        command = [sys.executable, "-m", "cnnlab", "run", str(config_path), "--quiet", "--resume", "auto"]
        recorder = TrialRecorder()
        read_fd, write_fd = os.pipe()
        try:
            with open(log_path, "w", encoding="utf-8") as log:
                try:
                    process = subprocess.Popen(
                        command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(write_fd,),
                        env={**os.environ, "OMP_NUM_THREADS": str(threads), PARENT_ENV: str(os.getpid()),
                             EVENTS_FD_ENV: str(write_fd)},
                        start_new_session=True,
                    )
                finally:
                    os.close(write_fd)  # the trial holds the only writing end: the pipe ends when it does
                self.processes[process.pid] = process
                if self.stop_signal is not None:  # the signal came while this trial was starting
                    process.send_signal(self.stop_signal)
                try:
                    with open(read_fd, encoding="utf-8", errors="replace", closefd=False) as events:
                        for event in read_events(events):
                            recorder.on_event(event)
                            on_event(event)
                    code = process.wait()
                finally:
                    self.processes.pop(process.pid, None)
        finally:
            os.close(read_fd)
        result = recorder.result(code)
        if result.status == "failed" and not recorder.error and result.summary is None:
            result.error = f"{result.error}; see {log_path}"
        return result


class Runner:
    """Runs a sweep's pending trials through a ``launcher``, ``jobs`` at a time, shown on ``display``.

    Used as a context manager around ``run_all``: inside it, SIGINT/SIGTERM/SIGHUP stop the sweep
    (no new trial starts; the launcher asks the running ones to checkpoint and stop).
    """

    def __init__(self, sweep_dir: Path, launcher: Launcher, jobs: int, display: SweepDisplay) -> None:
        self.sweep_dir = sweep_dir
        self.launcher = launcher
        self.jobs = jobs
        self.display = display
        self.slots = list(range(jobs))
        self.lock = threading.Lock()
        self.stop_signal: int | None = None
        self._handlers = contextlib.ExitStack()

    def __enter__(self) -> Runner:
        # asked to stop while the sweep was starting: start nothing
        self.stop_signal = self._handlers.enter_context(handling_signals(self._on_signal))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handlers.close()

    def _on_signal(self, signum: int) -> None:
        if self.stop_signal is None:
            self.display.say(f"{signal_name(signum)}: stopping the running trials (they checkpoint and can be resumed)")
        self.stop_signal = self.stop_signal or signum
        self.launcher.stop(signum)

    def run_all(self, trials: list[Trial]) -> None:
        pending = [t for t in trials if t.status == "pending"]
        self.display.begin(len(trials), len(trials) - len(pending))
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(self.run_one, pending))

    def run_one(self, trial: Trial) -> None:
        if self.stop_signal is not None:
            trial.status, trial.error = "not started", f"the sweep was stopped by {signal_name(self.stop_signal)}"
            self.display.trial_finished(None, trial)
            return
        with self.lock:
            slot = self.slots.pop(0)
        task = None
        try:
            config_path = self.sweep_dir / "configs" / f"{sanitize_name(trial.name)}-seed{trial.seed}.yaml"
            atomic_write_text(config_path, dump_config(trial.config))
            task = self.display.trial_started(trial)
            result = self.launcher.launch(trial, config_path, slot,
                                          lambda event: self.display.on_event(task, trial, event))
            trial.status, trial.run_dir, trial.error = result.status, result.run_dir, result.error
        except UserError as err:  # the launcher refused the trial (e.g. it asks for more than the cluster has)
            trial.status, trial.error = "failed", str(err)
        except Exception as err:  # the trial could not even start (e.g. no disk space for its log)
            trial.status, trial.error = "failed", f"{type(err).__name__}: {err}"
        finally:
            with self.lock:
                self.slots.append(slot)
            self.display.trial_finished(task, trial)


# ---------------------------------------------------------------------------------------------
# A whole sweep


def trial_row(trial: Trial) -> dict[str, Any]:
    summary = RunSummary(name=trial.name, seed=trial.seed, status="failed", error=trial.error or None)
    if trial.run_dir is not None and (trial.run_dir / "summary.json").is_file():
        try:
            summary = read_summary(trial.run_dir / "summary.json").model_copy(update={"name": trial.name})
            if trial.status != "completed" and not summary.error:
                summary.error = trial.error or None
        except UserError as err:
            summary.error = str(err)
    row = row_from_summary(summary, trial.run_dir, trial.swept_text,
                           config=trial.config.to_dict() if trial.config is not None else None)
    row["status"] = trial.status
    row["swept"] = trial.swept
    return row


@dataclass
class RayOptions:
    """Where and with what a sweep's trials run on Ray (``--launcher ray``)."""

    address: str | None = None  # None: an embedded Ray instance on this machine; auto, or ray://HEAD:10001
    gpus_per_trial: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_trial: float | None = None  # None: the CPUs divided among the trials that run at once
    ship_runs: bool | None = None  # None: ship run folders back only when the driver's storage is not shared


def plan_sweep(target: Path, overrides: list[str] | None = None, *, seeds: list[int] | None = None,
               results: Path | None = None, force: bool = False,
               values: dict[str, Any] | None = None) -> tuple[str, list[Trial], Path]:
    """(sweep name, trials, the sweep's results folder): ``target`` expanded, each trial's config as it will run
    (its paths absolute, its runs under the sweep's folder; ``values``, the run options, set in each), and those
    done before marked skipped unless ``force``. Nothing is written."""
    if not Path(target).exists():
        raise UserError(f"sweep target not found: {target}; give a folder of configs, a sweep file or a config")
    if results is not None:
        check_output_dir(Path(results).expanduser(), "--results")
    name, trials = expand(Path(target), list(overrides or []), seeds, values)
    root = Path(results).expanduser() if results is not None else None
    sweep_root = ((root or _results_root(trials)) / "sweeps" / sanitize_name(name)).absolute()
    check_output_dir(sweep_root, "results folder")
    cwd = Path.cwd()
    for trial in trials:
        if trial.config is not None:
            # Trials run in processes of their own, on Ray in folders of its own: the paths they are
            # given are fixed here, against the folder the sweep was started in.
            cfg = absolute_paths(trial.config, cwd)
            trial.config = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": sweep_root / "runs"})})
            previous = None if force else finished_run(trial)
            if previous is not None:
                trial.status, trial.run_dir = "skipped", previous
    return name, trials, sweep_root


def run_sweep(
    target: Path,
    overrides: list[str] | None = None,
    *,
    jobs: int | None = None,
    seeds: list[int] | None = None,
    results: Path | None = None,
    force: bool = False,
    quiet: bool = False,
    ray: RayOptions | None = None,
    values: dict[str, Any] | None = None,
) -> SweepOutcome:
    """Run every trial of ``target`` (on Ray when ``ray`` is given, else as local processes);
    returns the sweep folder, one row per trial, and the signal that stopped the sweep, if one did."""
    if jobs is not None and jobs < 1:
        raise UserError("--jobs must be at least 1")
    name, trials, sweep_root = plan_sweep(target, overrides, seeds=seeds, results=results, force=force, values=values)
    pending = sum(t.status == "pending" for t in trials)
    with contextlib.ExitStack() as stack:
        if ray is not None:
            from cnnlab.cluster import RayLauncher, ray_session, trial_resources

            stack.enter_context(ray_session(ray.address, "--launcher ray"))
            cpus, gpus, jobs = trial_resources(ray.gpus_per_trial, ray.cpus_per_trial, jobs, pending)
            where = f"on Ray ({cpus:g} CPU, {gpus:g} GPU per trial)"
        else:
            jobs = jobs or 1
            where = "as local processes"
        sweep_dir = new_dated_dir(sweep_root, "sweep")
        _make_dir(sweep_dir / "logs")
        console = SafeConsole()
        skipped = sum(t.status == "skipped" for t in trials)
        console.print(
            f"sweep {name}: {len(trials)} trials ({skipped} done before, {sum(t.status == 'failed' for t in trials)} "
            f"invalid), {jobs} at a time {where} -> {sweep_dir}", soft_wrap=True,
        )
        for trial in trials:
            if trial.status == "failed":
                console.print(f"FAILED {trial.label}: {trial.error}", soft_wrap=True)
        launcher = RayLauncher(sweep_dir, sweep_root / "runs", cpus, gpus, ray.ship_runs) if ray is not None \
            else LocalLauncher(sweep_dir, jobs)
        with SweepDisplay(console, live=not quiet and console.is_terminal, jobs=jobs) as display, launcher, \
                Runner(sweep_dir, launcher, jobs, display) as runner:
            runner.run_all(trials)
            rows = [trial_row(t) for t in trials]
            write_sweep_files(sweep_dir, rows, list(dict.fromkeys(k for t in trials for k in t.swept)))
    if runner.stop_signal is not None:
        counts = {status: sum(t.status == status for t in trials) for status in ("completed", "interrupted", "not started")}
        console.print(f"sweep stopped by {signal_name(runner.stop_signal)}: {counts['completed']} of {pending} trials "
                      f"completed, {counts['interrupted']} stopped (checkpointed), {counts['not started']} not started; "
                      "rerun the same command to resume it", soft_wrap=True)
    return SweepOutcome(sweep_dir, rows, runner.stop_signal)


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir()
    except OSError as err:
        raise UserError(f"cannot create {folder}: {err.strerror}; choose another results folder with --results") from None


@dataclass
class SweepOutcome:
    folder: Path
    rows: list[dict[str, Any]]
    stopped_by: int | None = None  # the signal that stopped the sweep


def _results_root(trials: list[Trial]) -> Path:
    dirs = {Path(t.config.output.dir) for t in trials if t.config is not None}
    return dirs.pop() if len(dirs) == 1 else Path("results")


def write_sweep_files(sweep_dir: Path, rows: list[dict[str, Any]], swept_keys: list[str]) -> None:
    """trials.json and summary.csv name run folders relative to ``sweep_dir``: the sweep folder can be
    moved or copied whole, together with its ``runs/`` beside it."""
    from cnnlab.plots import plot_accuracy_bars, plot_sweep_curves

    write_trials(sweep_dir, rows, swept_keys)
    title = f"# Sweep {sweep_dir.parent.name} ({sweep_dir.name})\n\n"
    atomic_write_text(sweep_dir / "summary.md", title + markdown_table(aggregate(rows)))
    plot_sweep_curves(aggregate(rows), sweep_dir / "curves.png", title=sweep_dir.parent.name)
    plot_accuracy_bars(aggregate(rows), sweep_dir / "bars.png", title=sweep_dir.parent.name)
