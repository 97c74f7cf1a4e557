"""Usage: ``cnnlab run configs/lenet.yaml --set train.epochs=5`` (``cnnlab --help`` lists commands).

A thin typer CLI: each command parses its arguments, calls one library function and prints.
Exit codes: 0 success, 1 a failure during training, 2 bad input (one message, no traceback unless
``--debug``), 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP). Everything the user
or a file supplies is printed literally: the consoles never interpret rich markup.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from cnnlab.console import SafeConsole, cell, literal, one_line
from cnnlab.errors import TrainingError, UserError

app = typer.Typer(
    name="cnnlab",
    help="Run, compare and look inside CNN experiments on image classification data.",
    # Help is printed as written: no rich markup (which ate "[ray]" in "pip install 'cnnlab[ray]'"), flags shown as
    # they are typed ("-q, --quiet"), each command's example line kept whole.
    rich_markup_mode=None,
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped or logged output is never squeezed: rich would otherwise fit tables into 80 columns.
out = SafeConsole(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
err = SafeConsole(stderr=True, soft_wrap=True)
RED = "bold red"

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="Override a config key: --set train.epochs=5 (repeatable; values are YAML)."),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
DataDirOption = Annotated[
    Optional[Path], typer.Option("--data-dir", help="Folder with the data set's files (IDX: .gz or not); sets data.root.")
]
TrustCodeOption = Annotated[
    bool, typer.Option("--trust-code", help="Allow a run whose config names a Python model (module:function) to "
                                            "import that module. Only for runs from people you trust.")
]
AddressOption = Annotated[
    Optional[str], typer.Option(help="Ray cluster: auto (on one of its nodes) or ray://HEAD:10001; default: a Ray "
                                     "instance started on this machine for the command.")
]
GpusOption = Annotated[Optional[float], typer.Option(
    "--gpus-per-trial", min=0, metavar="N", help="GPUs each trial gets on Ray (default: 1 where the cluster has GPUs, else 0).")]
CpusOption = Annotated[Optional[float], typer.Option(
    "--cpus-per-trial", min=0.01, metavar="N", help="CPUs each trial gets on Ray (default: the CPUs divided among the trials).")]
RunArgument = Annotated[Optional[Path], typer.Argument(
    metavar="RUN", show_default=False, help="A run folder, or a folder of runs (an experiment's, a sweep's) for its newest "
                                            "finished run (default: the newest under --results).")]
ResultsOption = Annotated[Path, typer.Option(metavar="DIR", help="Where to look for the newest run.")]
CheckpointOption = Annotated[str, typer.Option(help="best (the chosen weights' best epoch on the validation split), last, "
                                                    "or auto: the one the run's own test took them from (train.select).")]
WeightsOption = Annotated[str, typer.Option(help="raw (the weights themselves), ema (their moving average, from a run "
                                                 "with train.ema), swa (the average of the last epochs', from a run "
                                                 "with train.swa; with --checkpoint last), or auto: those of the run's "
                                                 "headline figure (eval.headline).")]
PrintConfigOption = Annotated[bool, typer.Option(
    "--print-config", help="Print the resolved config as YAML (what would run, every default filled in) and exit.")]
DryRunOption = Annotated[bool, typer.Option(
    "--dry-run", help="Check everything a run needs (config, data, model) and time a few steps, then exit: "
                      "nothing is written.")]
DownloadOption = Annotated[
    bool, typer.Option("--download", help="Fetch the data set, and the model's named weights, if no local copy is found.")
]
# The run options every command that trains takes (run, sweep, tune, resume), each setting its config key: one
# definition, so that each means, and is written, the same everywhere (run_values maps them to their keys).
EpochsOption = Annotated[Optional[int], typer.Option(
    metavar="N", help="Train for N epochs in all (sets train.epochs; a resumed run trains on to N).")]
DeviceOption = Annotated[Optional[str], typer.Option(
    help="auto, cpu, cuda, cuda:N or mps (sets train.device; a resumed run may move).")]
ThreadsOption = Annotated[Optional[str], typer.Option(
    metavar="N|auto|fastest", help="CPU threads (sets train.threads): auto fits the machine; fastest also trades "
                                   "bit-identical reruns for speed on a busy one.")]


def run_values(epochs: int | None = None, device: str | None = None, threads: str | None = None,
               data_dir: Path | None = None) -> dict[str, Any]:
    """The shared run options given, as the config keys they set (typed values, never reread as YAML)."""
    values = {"train.epochs": epochs, "train.device": device, "train.threads": threads, "data.root": data_dir}
    return {key: value for key, value in values.items() if value is not None}


def example(line: str) -> str:
    """A command's example line, as its help shows it (kept whole: click rewraps paragraphs, not one after \\b)."""
    return f"\b\nExample: {line}"


@contextlib.contextmanager
def cli_errors(debug: bool, trains: bool = False, starting: str | None = None) -> Iterator[None]:
    """Map failures to one message and an exit code; ``--debug`` re-raises with the traceback.

    Commands that train (``trains``) keep signals recorded until the training loop takes them over;
    the others get the usual signal behaviour back at once (a Ctrl-C is then "interrupted", exit 130).
    PyTorch is imported by what needs it, after the config is read: a config error is said without it.
    ``starting`` is said at once on a terminal, before PyTorch's seconds of importing: the command has
    been heard.
    """
    from cnnlab.stopping import Interrupted, settle_signals

    if starting is not None and err.is_terminal:
        err.print(f"{starting}: starting (loading PyTorch)", style="dim")
    if trains:
        from cnnlab.cpus import calm_openmp_if_busy

        calm_openmp_if_busy()
    try:
        if not trains:
            settle_signals()
        yield
    except (UserError, TrainingError) as error:
        if debug:
            raise
        say_error("error" if isinstance(error, UserError) else "training failed", str(error), error.exit_code)
        raise typer.Exit(error.exit_code) from None
    except typer.Exit:
        raise
    except Interrupted as stop:
        err.print(str(stop))
        raise typer.Exit(stop.exit_code) from None
    except SystemExit as exit_:  # only user code (a model) raises this inside cnnlab
        if debug:
            raise
        say_error("training failed", f"the model's code called sys.exit({exit_.code!r})")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as error:  # an unexpected failure: still one line, unless debugging
        if debug:
            raise
        say_error("error", f"{type(error).__name__}: {error} (rerun with --debug for the traceback)")
        raise typer.Exit(1) from None


def say_error(label: str, message: str, exit_code: int = 1) -> None:
    from cnnlab.events import event_channel

    err.print(Text.assemble((f"{label}:", RED), " ", message))
    channel = event_channel()  # a launching sweep hears why, without reading this text
    if channel is not None:
        channel.error(label, message, exit_code)


def run_reporter(quiet: bool):
    """What a training command reports to: the console, and a launcher's event pipe when it has one."""
    from cnnlab.events import event_channel
    from cnnlab.listeners import FanOut
    from cnnlab.progress import make_reporter

    channel = event_channel()
    console = make_reporter(quiet=quiet)
    return console if channel is None else FanOut(console, channel)


@app.command(epilog=example("cnnlab run configs/lenet_relu.yaml --epochs 5 --set optim.lr=0.05"))
def run(
    config: Annotated[Path, typer.Argument(metavar="CONFIG",
                                           help="Experiment config (YAML), e.g. configs/lenet.yaml.", show_default=False)],
    set_: SetOption = None,
    epochs: EpochsOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    data_dir: DataDirOption = None,
    download: DownloadOption = False,
    results: Annotated[Optional[Path], typer.Option(help="Results folder (sets output.dir).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (sets seed).")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="auto: continue the newest unfinished run of exactly this config, or start a new one "
                         "(a command a cluster job can repeat blindly).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="One line per epoch instead of a progress bar.")] = False,
    print_config: PrintConfigOption = False,
    dry_run: DryRunOption = False,
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """Train and test one experiment; results go to <output.dir>/<name>/<run id>/."""
    with cli_errors(debug, trains=True, starting=f"cnnlab run {config}"):
        from cnnlab.config import load_config, split_values

        if resume not in (None, "auto"):
            raise UserError(f"--resume {resume!r}: the only choice is auto; to continue one run folder use "
                            "`cnnlab resume RUN`")
        if resume is None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
            resume = "auto"  # torchrun restarted its workers (--max-restarts): continue the run they were training

        options = {**run_values(epochs, device, threads, data_dir), "output.dir": results, "seed": seed,
                   "data.download": download or None, "model.download": download or None}
        values = {key: value for key, value in options.items() if value is not None}  # they win over --set
        try:
            cfg = load_config(config, set_, values, trust_code=trust_code or None)
        except UserError as error:
            if not set_:
                raise
            several = next((text for text in set_ if len(split_values(text.partition("=")[2])) > 1), None)
            if several is None:
                raise
            raise UserError(f"{error}\n  (to run once with each value of --set {several}, sweep them: "
                            f"cnnlab sweep {config} --set {several})") from None
        if print_config or dry_run:
            show_plan([("", cfg)], print_config)
            return
        if resume == "auto":
            from cnnlab.engine import run_or_resume

            run_or_resume(cfg, reporter=run_reporter(quiet))
        else:
            from cnnlab.engine import fit

            fit(cfg, reporter=run_reporter(quiet))


@app.command("resume", epilog=example("cnnlab resume results/lenet_relu/RUN_ID --epochs 30"))
def resume_(
    run_dir: Annotated[Optional[Path], typer.Argument(
        metavar="RUN", show_default=False, help="The run folder to continue, or a folder of runs for its newest unfinished "
                                                "one (default: the newest unfinished run under --results).")] = None,
    epochs: EpochsOption = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="Change a setting from here on: optim.lr, optim.momentum, optim.weight_decay, schedule.*, "
                            "train.grad_clip, train.epochs, train.patience or train.threads, e.g. --set optim.lr=0.1 "
                            "(repeatable).")] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    data_dir: DataDirOption = None,
    results: Annotated[Path, typer.Option(metavar="DIR", help="Where to look for the newest unfinished run.")] = Path("results"),
    trust_code: TrustCodeOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="One line per epoch instead of a progress bar.")] = False,
    debug: DebugOption = False,
) -> None:
    """Continue an interrupted, failed or killed run in its own folder, from its last checkpoint."""
    with cli_errors(debug, trains=True, starting="cnnlab resume"):
        from cnnlab.engine import resume
        from cnnlab.results import pick_run

        if epochs is not None and epochs < 1:
            raise UserError(f"--epochs {epochs}: give a positive number of epochs")
        resume(pick_run(run_dir, results, unfinished=True), epochs=epochs, settings=set_, device=device, data_root=data_dir,
               threads=threads, reporter=run_reporter(quiet), trust_code=trust_code)


def show_plan(configs: list[tuple[str, Any]], print_config: bool, jobs: int = 1) -> int:
    """``--print-config``: each config as YAML (a trial's headed by a comment naming it); ``--dry-run``: each one
    prepared as its run would be, described and timed (a sweep's total at the end); a trial that cannot be prepared
    is named with its problem and passed over. Nothing is written. How many trials could not be prepared."""
    from cnnlab.config import dump_config

    if print_config:
        for label, cfg in configs:
            sys.stdout.write((f"---\n# {label}\n" if label else "") + dump_config(cfg))
        return 0
    from cnnlab.dryrun import measure, prepared, total_text

    estimates = []
    for label, cfg in configs:
        try:
            session = prepared(cfg)
        except UserError as error:
            if not label:
                raise
            out.print(literal(f"{label}: invalid: {error}"))
            continue
        if label:
            out.print(Text(f"{label}:", style="bold"))
        data, spec = session.data, session.data.spec
        splits = f"{len(data.train):,} training / {len(data.val) if data.val is not None else 0:,} validation / " \
                 f"{len(data.test):,} test"
        out.print(f"data: {spec.title}, {splits} images of {spec.shape_text}, {spec.num_classes} classes, from {data.root}")
        out.print(literal(data.placement_line))
        if session.weights is not None:
            out.print(literal(session.weights.line()))
        print_model(cfg, session.model, spec, rows=not label)
        estimates.append(measure(cfg, session))
        out.print(estimates[-1].line())
    if len(estimates) > 1:
        out.print(f"{len(estimates)} runs: {total_text(estimates, jobs)}")
    out.print("dry run: nothing written")
    return len(configs) - len(estimates)


def print_model(cfg: Any, model: Any, spec: Any, rows: bool = True) -> None:
    """A model's per-layer shapes, parameters and FLOPs for one image of ``spec`` (its totals only without ``rows``)."""
    from cnnlab.modelinfo import count_params, profile

    layers, total_flops = profile(model, spec.input_shape)
    args = ", ".join(f"{k}={v}" for k, v in cfg.model.kwargs.items())
    out.print(literal(f"{cfg.model.name}({args})  input {spec.shape_text}"))
    if rows:
        table = Table("#", "layer", "output shape", "params", "FLOPs", box=None, header_style="bold")
        for row in layers:
            shape = "x".join(map(str, row.output_shape))
            table.add_row(literal(row.name), literal(row.layer), shape, f"{row.params:,}", f"{row.flops:,}")
        out.print(table)
    trainable = count_params(model, trainable_only=True)
    frozen = f" ({count_params(model) - trainable:,} frozen)" if trainable != count_params(model) else ""
    out.print(f"total: {count_params(model):,} parameters{frozen}, {total_flops:,} FLOPs per image")


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None


@app.command(epilog=example("cnnlab sweep configs/lenet_relu.yaml --set optim.lr=0.05,0.1 --seeds 0,1,2 --jobs 2"))
def sweep(
    target: Annotated[Path, typer.Argument(
        metavar="TARGET", show_default=False,
        help="A folder of configs (every *.yaml), a sweep file (base/grid/seeds), or one config.")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a config key in every trial (repeatable; values are YAML); "
                                                 "KEY=A,B,C sweeps the values (a grid axis).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", metavar="N", help="Trials run at once (default: 1 locally; "
                                                                              "on Ray as many as the cluster holds).")] = None,
    seeds: Annotated[Optional[str], typer.Option(metavar="0,1,2", help="Run every trial with each seed: --seeds 0,1,2.")] = None,
    epochs: EpochsOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    data_dir: DataDirOption = None,
    results: Annotated[Optional[Path], typer.Option(help="Results folder (default: the configs' output.dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun trials that already completed.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="A line per trial instead of live progress.")] = False,
    launcher: Annotated[str, typer.Option(metavar="local|ray", help="local: trials as processes on this machine; ray: as "
                                                                    "Ray tasks (pip install 'cnnlab[ray]').")] = "local",
    address: AddressOption = None,
    gpus_per_trial: GpusOption = None,
    cpus_per_trial: CpusOption = None,
    print_config: PrintConfigOption = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check every trial (config, data, model), time a few steps of each that would run, and say "
                          "how long the sweep would take; nothing is written.")] = False,
    debug: DebugOption = False,
) -> None:
    """Run a family of experiments and compare them: summary.csv, summary.md, curves.png, bars.png.

    A failed trial is recorded and the others go on; the exit code is 1 if any failed. Rerunning
    skips trials whose exact config already completed (--force reruns them).
    """
    with cli_errors(debug, trains=True, starting=f"cnnlab sweep {target}"):
        from cnnlab.compare import aggregate
        from cnnlab.sweep import RayOptions, run_sweep

        if launcher not in ("local", "ray"):
            raise UserError(f"--launcher {launcher!r}: choose local or ray")
        if launcher == "local" and (address or gpus_per_trial is not None or cpus_per_trial is not None):
            raise UserError("--address, --gpus-per-trial and --cpus-per-trial are for --launcher ray")
        ray = RayOptions(address, gpus_per_trial, cpus_per_trial) if launcher == "ray" else None
        values = run_values(epochs, device, threads, data_dir)
        if print_config or dry_run:
            show_sweep_plan(target, set_, parse_seeds(seeds), results, force, print_config, jobs or 1, values)
            return
        outcome = run_sweep(
            target, set_, jobs=jobs, seeds=parse_seeds(seeds), results=results, force=force, quiet=quiet, ray=ray,
            values=values,
        )
        print_table(aggregate(outcome.rows))
        out.print(f"sweep results: {outcome.folder}")
        if outcome.stopped_by is not None:
            raise typer.Exit(128 + outcome.stopped_by)
        failed = [r for r in outcome.rows if r["status"] == "failed"]
        if failed:
            err.print(f"{len(failed)} of {len(outcome.rows)} trials failed; see {outcome.folder / 'summary.csv'}")
            raise typer.Exit(1)


def show_sweep_plan(target: Path, overrides: list[str] | None, seeds: list[int] | None, results: Path | None,
                    force: bool, print_config: bool, jobs: int, values: dict[str, Any] | None = None) -> None:
    """A sweep's ``--print-config`` or ``--dry-run``: its trials, those done before and the invalid ones named."""
    from cnnlab.sweep import plan_sweep

    name, trials, _ = plan_sweep(target, overrides, seeds=seeds, results=results, force=force, values=values)
    say = (lambda text: sys.stdout.write(f"# {text}\n")) if print_config else (lambda text: out.print(literal(text)))
    say(f"sweep {name}: {len(trials)} trials")
    for trial in trials:
        if trial.status == "failed":
            say(f"{trial.label}: invalid: {trial.error}")
        elif trial.status == "skipped":
            say(f"{trial.label}: done before ({trial.run_dir}); --force runs it again")
    invalid = show_plan([(trial.label, trial.config) for trial in trials if trial.status == "pending"], print_config, jobs)
    invalid += sum(trial.status == "failed" for trial in trials)
    if invalid and not print_config:
        raise UserError(f"{invalid} of {len(trials)} trials {'is' if invalid == 1 else 'are'} invalid (named above); "
                        f"fix {'it' if invalid == 1 else 'them'} or leave {'it' if invalid == 1 else 'them'} out of the sweep")


@app.command(epilog=example("cnnlab tune configs/tune/lenet_relu.yaml --trials 20"))
def tune(
    space: Annotated[Path, typer.Argument(metavar="SPACE",
                                          help="A search space file: base config, metric, trials and a distribution per "
                                               "key, e.g. configs/tune/lenet_relu.yaml.", show_default=False)],
    set_: SetOption = None,
    trials: Annotated[Optional[int], typer.Option(min=1, help="Number of trials (overrides the file's).")] = None,
    epochs: EpochsOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    data_dir: DataDirOption = None,
    results: Annotated[Optional[Path], typer.Option(help="Results folder (default: the base config's output.dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest interrupted tune of this space.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per finished trial.")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, metavar="N", help="Trials run at once (default: as "
                                                                                    "many as the Ray cluster holds).")] = None,
    address: AddressOption = None,
    gpus_per_trial: GpusOption = None,
    cpus_per_trial: CpusOption = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the base config (YAML) and the search space, and exit.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the space and the base config, time a few steps of it, and exit; nothing is "
                          "written.")] = False,
    debug: DebugOption = False,
) -> None:
    """Search hyperparameters with Ray Tune (Optuna's TPE, ASHA early stopping); writes best.yaml.

    Every trial is an ordinary run folder under <results>/tune/<name>/runs/; the tune folder gets
    summary.csv, summary.md, progress.png and best.yaml, which `cnnlab run` reproduces.
    """
    with cli_errors(debug, trains=True, starting=f"cnnlab tune {space}"):
        from cnnlab.compare import aggregate
        from cnnlab.tune import read_space, run_tune

        values = run_values(epochs, device, threads, data_dir)
        if print_config or dry_run:
            space = read_space(space, list(set_ or []), trials, values)
            if print_config:
                sys.stdout.write(f"# tune {space.name}: {space.trials} trials, {space.metric} ({space.mode}), over\n" +
                                 "".join(f"#   {d.key}: {d.kind} {d.values}\n" for d in space.dimensions))
            else:
                out.print(literal(f"tune {space.name}: {space.trials} trials of the base config, each with a point of "
                                  f"{', '.join(d.key for d in space.dimensions)} (ASHA stops the poor ones early: "
                                  "the time below is the most a trial takes)"))
            show_plan([("", space.config({}))], print_config)
            return

        outcome = run_tune(space, set_, trials=trials, results=results, resume=resume, quiet=quiet, address=address,
                           jobs=jobs, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, values=values)
        print_table(aggregate(outcome.rows))
        out.print(f"tune results: {outcome.folder}")
        if outcome.best is not None:
            out.print(f"best config: {outcome.best}  (reproduce it: cnnlab run {outcome.best})")
        else:
            err.print("no trial completed: no best.yaml; see summary.csv")
        if outcome.stopped_by is not None:
            raise typer.Exit(128 + outcome.stopped_by)
        if outcome.interrupted:
            raise typer.Exit(130)
        if outcome.best is None:
            raise typer.Exit(1)


@app.command("lr-find", epilog=example("cnnlab lr-find configs/lenet_relu.yaml"))
def lr_find(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="Experiment config (YAML): its model, data, optimiser "
                                                                  "and loss are used.", show_default=False)],
    set_: SetOption = None,
    steps: Annotated[int, typer.Option(metavar="N", help="Batches of the ramp (one learning rate each).")] = 100,
    start: Annotated[float, typer.Option(help="The ramp's first learning rate.")] = 1e-6,
    end: Annotated[float, typer.Option(help="The ramp's last learning rate (it stops early once the loss diverges).")] = 10.0,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    data_dir: DataDirOption = None,
    results: Annotated[Optional[Path], typer.Option(help="Results folder (sets output.dir); the curve goes to "
                                                         "<DIR>/lr-find/<name>/<time>/.")] = None,
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """Find a learning rate: train briefly while it grows exponentially, and suggest where the loss falls fastest."""
    with cli_errors(debug, trains=True, starting=f"cnnlab lr-find {config}"):
        from cnnlab.config import load_config
        from cnnlab.lrfind import check_range

        check_range(steps, start, end)
        values = {**run_values(device=device, threads=threads, data_dir=data_dir),
                  **({"output.dir": results} if results is not None else {})}
        cfg = load_config(config, set_, values, trust_code=trust_code or None)
        from cnnlab.lrfind import describe, find_lr, write
        from cnnlab.results import check_output_dir, new_dated_dir, sanitize_name

        parent = cfg.output.dir / "lr-find" / sanitize_name(cfg.name)
        check_output_dir(parent, "--results")  # before the ramp, not after it
        out.print(f"lr-find {cfg.name}: {steps} batches of {cfg.train.batch_size}, lr {start:g} -> {end:g}, {cfg.optim.name}")
        found = find_lr(cfg, steps, start, end)
        folder = new_dated_dir(parent, "lr-find")
        write(found, folder, cfg.name)
        out.print(describe(found))
        out.print(f"-> {folder} (lr_find.png, lr_find.csv, suggestion.yaml)")


@app.command(epilog=example("cnnlab bench configs/lenet.yaml --no-commands"))
def bench(
    config: Annotated[Optional[Path], typer.Argument(metavar="CONFIG",
                                                     help="Experiment config (default: configs/lenet.yaml when it "
                                                          "exists here, else the built-in defaults: LeNet).",
                                                     show_default=False)] = None,
    set_: SetOption = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = "cpu",
    data_dir: DataDirOption = None,
    batches: Annotated[int, typer.Option(help="Batches timed per pipeline, in this process.")] = 150,
    commands: Annotated[bool, typer.Option("--commands/--no-commands", help="Also time the whole commands "
                                           "(cnnlab run against the d2l replica) as their own processes.")] = True,
    epochs: Annotated[int, typer.Option(help="Epochs of each whole command.")] = 3,
    pairs: Annotated[int, typer.Option(metavar="N", help="Pairs of whole commands run; their medians are reported.")] = 5,
    hog: Annotated[bool, typer.Option("--hog", help="Run the pairs again beside a process that keeps one CPU busy, "
                                      "and report cnnlab's slowdown there.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="JSON file to write (default: results/bench/bench-<time>.json).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing; just write the JSON.")] = False,
    debug: DebugOption = False,
) -> None:
    """Time cnnlab's trainer against the lab report's d2l pipeline: img/s, start-up, memory, ratios."""
    with cli_errors(debug):
        from cnnlab.bench import run_bench

        if config is None and Path("configs/lenet.yaml").is_file():
            config = Path("configs/lenet.yaml")
        run_bench(config, list(set_ or []), device=device, data_dir=data_dir, batches=batches, commands=commands,
                  epochs=epochs, out=out, quiet=quiet, pairs=pairs, hog=hog)


@app.command(epilog=example("cnnlab predict results/lenet_relu/RUN_ID shoe.jpg --top 3"))
def predict(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        metavar="[RUN] PICTURE...", show_default=False,
        help="A run folder or a folder of runs (default: the newest finished run under --results), then picture files "
             "(PNG, JPEG, WEBP, TIFF, ...): any size or colour.")] = None,
    split: Annotated[str, typer.Option(help="With --image: test or val.")] = "test",
    image: Annotated[Optional[int], typer.Option(help="Classify image N of --split instead of files.")] = None,
    top: Annotated[int, typer.Option(help="How many classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    show: Annotated[bool, typer.Option("--show", help="Also draw each picture as the network received it beside its "
                                                      "top classes: <run>/predict/<picture>.png.")] = False,
    checkpoint: CheckpointOption = "auto",
    weights: WeightsOption = "auto",
    results: ResultsOption = Path("results"),
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """Classify your own pictures (or a data-set image) with a trained run: top classes and probabilities."""
    with cli_errors(debug):
        import json

        from cnnlab.data.pictures import extensions
        from cnnlab.inference import predict as classify
        from cnnlab.inference import show_predictions
        from cnnlab.runs import used_line

        if split not in ("test", "val"):
            raise UserError(f"--split {split!r}: choose test or val")
        from cnnlab.results import pick_run

        # A folder first names the run (pictures are files, with a picture's ending); without one, the newest finished run.
        paths = list(paths or [])
        names_run = paths and (paths[0].is_dir() or not (paths[0].exists() or paths[0].suffix.lower() in extensions()))
        run_dir = pick_run(paths.pop(0) if names_run else None, results)
        answers = classify(run_dir, paths, split=split, index=image, top=top, trust_code=trust_code,
                           checkpoint=checkpoint, weights=weights)
        drawn = show_predictions(run_dir, answers) if show else [None] * len(answers)
        if as_json:
            out.print(json.dumps([{"image": r.source, "label": r.label,
                                   "top": [{"class": c, "probability": p} for c, p in r.top], "model": r.used,
                                   **({"shown": str(d)} if d is not None else {})} for r, d in zip(answers, drawn)],
                                 indent=2), soft_wrap=True)
            return
        if answers:
            out.print(literal(used_line(answers[0].used)))
        for result, picture in zip(answers, drawn):
            label = f"  (true: {one_line(result.label)})" if result.label else ""
            out.print(Text.assemble(Text(one_line(result.source), "bold"), label))
            for name, probability in result.top:
                out.print(f"  {probability:7.2%}  {one_line(name)}")
            if picture is not None:
                out.print(f"  as the model saw it: {picture}")


@app.command(epilog=example("cnnlab export results/lenet_relu/RUN_ID --format onnx"))
def export(
    run_dir: RunArgument = None,
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript.")] = "onnx",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (default: "
                                                   "<run>/model.onnx or <run>/model.pt; model-last-ema.onnx with "
                                                   "--checkpoint last --weights ema).")] = None,
    checkpoint: CheckpointOption = "auto",
    weights: WeightsOption = "auto",
    results: ResultsOption = Path("results"),
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """Export the trained model (normalisation folded in: it takes raw [0, 1] pixels), checked against PyTorch."""
    with cli_errors(debug):
        from cnnlab.inference import export as write_export
        from cnnlab.results import pick_run

        done = write_export(pick_run(run_dir, results), format_, output, trust_code=trust_code, checkpoint=checkpoint,
                            weights=weights)
        out.print(literal(done.used))
        out.print(f"{format_} model -> {done.path}  (max abs difference of logits against PyTorch on "
                  f"{done.images} test images: {done.max_difference:.2e})")


@app.command(epilog=example("cnnlab compare results/lenet_relu results/sweeps"))
def compare(
    targets: Annotated[Optional[list[Path]], typer.Argument(
        metavar="[FOLDER]...", help="Run folders, sweep folders, or folders holding runs (default: --results).",
        show_default=False)] = None,
    results: ResultsOption = Path("results"),
    debug: DebugOption = False,
) -> None:
    """Print the comparison table (mean ± std over seeds) for existing runs and sweeps, each led by its headline
    figure (eval.headline).

    Runs are averaged only with runs of the same experiment (the same config but for the seed and
    where it ran); variants of one name show the keys that set them apart. What cannot be read is
    named, left out, and makes the exit status 2.
    """
    with cli_errors(debug):
        from cnnlab.compare import aggregate, collect_rows

        found = collect_rows(targets or [results])
        print_table(aggregate(found.rows))
        say_skipped(found.skipped)


def say_skipped(skipped: list[str]) -> None:
    """After a table or report made from what could be read: exit 2 if anything was left out."""
    if skipped:
        err.print(f"{len(skipped)} of the runs or folders given could not be read and were left out (see the "
                  "warnings above)")
        raise typer.Exit(2)


def print_table(table: list[dict]) -> None:
    from cnnlab.compare import table_headers, table_rows

    headers, rows = table_headers(table), table_rows(table)
    grid = Table(box=None, header_style="bold")
    widths = []
    for i, header in enumerate(headers):
        # Numbers are never cut or wrapped: their columns are as wide as their widest cell. A variant name too long
        # for the terminal folds onto more lines. (Piped output has no width limit at all: see `out`.)
        widest = max([len(header), *(len(cells[i]) for cells in rows)])
        widths.append(widest if i > 0 else min(widest, 30))
        grid.add_column(header, no_wrap=i > 0, overflow="fold", min_width=widths[-1])
    for cells in rows:
        grid.add_row(*map(literal, cells))
    # A terminal too narrow even for the numbers gets the table at the width it needs (the terminal wraps its
    # lines) rather than squeezed, which would cut numbers short and drop columns. Each column is padded by a
    # space either side.
    shown = out.width
    out.width = max(shown, sum(widths) + 2 * len(widths))  # rich prints no wider than its console
    try:
        out.print(grid)
    finally:
        out.width = shown


@app.command(epilog=example("cnnlab visualize --layer 3 --class 'Ankle boot'"))
def visualize(
    run_dir: RunArgument = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", "-l", help="Top-level layer index (0 = first conv, 3 = LeNet's second conv) or dotted module name.")] = None,
    image: Annotated[Optional[int], typer.Option(
        help="Index of the image in the split (with --class: the N-th image of that class).")] = None,
    class_name: Annotated[Optional[str], typer.Option(
        "--class", help="Use an image of this class, e.g. 'Ankle boot' or 9.")] = None,
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    out_file: Annotated[Optional[Path], typer.Option("--out", help="PNG file to write (default: <run>/visualize/...).")] = None,
    filters: Annotated[bool, typer.Option("--filters", help="Draw the layer's learned kernels instead of its output.")] = False,
    cam: Annotated[bool, typer.Option("--cam", help="Draw a Grad-CAM heat map of the predicted class.")] = False,
    list_layers: Annotated[bool, typer.Option("--list-layers", help="List the model's layers with their output shapes.")] = False,
    results: ResultsOption = Path("results"),
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """Feature maps of a trained model's layer for one image (or its kernels, or a Grad-CAM map)."""
    with cli_errors(debug):
        from cnnlab.results import pick_run

        run_dir = pick_run(run_dir, results)
        if list_layers:
            from cnnlab.runs import open_run
            from cnnlab.visualize import layer_rows

            opened = open_run(run_dir, trust_code=trust_code)
            grid = Table("layer", "module", "output shape", box=None, header_style="bold")
            for row in layer_rows(opened.model, opened.spec.input_shape):
                grid.add_row(*map(literal, row))
            out.print(literal(opened.used_line()))
            out.print(grid)
            return
        if filters and cam:
            raise UserError("--filters and --cam draw different pictures; pass one of them")
        from cnnlab.visualize import visualize as draw

        picture = draw(run_dir, layer, image=image, class_name=class_name, split=split, out=out_file,
                       mode="filters" if filters else "cam" if cam else "maps", trust_code=trust_code)
        out.print(literal(picture.used))
        out.print(f"{split} image {picture.image_index} ({one_line(picture.true_label)}, predicted "
                  f"{one_line(picture.predicted_label)}), "
                  f"layer {picture.layer}: {picture.tiles or 'heat map'}{' tiles' if picture.tiles else ''}")
        out.print(str(picture.path))


@app.command("eval", epilog=example("cnnlab eval --checkpoint last"))
def eval_(
    run_dir: RunArgument = None,
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    checkpoint: CheckpointOption = "auto",
    weights: WeightsOption = "auto",
    tta: Annotated[Optional[list[str]], typer.Option(
        metavar="flip|crop", help="Also report accuracy with test-time augmentation: flip averages each image's logits "
                                  "with its mirror image's, crop with the image shifted a pixel up-left and down-right; "
                                  "both: all six (default: the run's eval.tta).")] = None,
    results: ResultsOption = Path("results"),
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """Accuracy, per-class accuracy, confusion matrix and misclassified examples of a trained run."""
    with cli_errors(debug):
        from cnnlab.evaluation import evaluate_run
        from cnnlab.results import pick_run
        from cnnlab.runs import used_line

        report = evaluate_run(pick_run(run_dir, results), split, checkpoint, trust_code=trust_code, tta=tta,
                              weights=weights)
        augmented = f"; with {'+'.join(report.tta)} TTA: accuracy {report.accuracy_tta:.4f}, loss {report.loss_tta:.4f}" \
            if report.tta else ""
        averaged = {"ema": ", its moving average of the weights", "swa": ", the average of its last epochs' weights"
                    }.get(report.weights, "")
        out.print(literal(used_line(report.used)))
        out.print(f"{report.split} ({report.images:,} images, {report.checkpoint} checkpoint{averaged}): "
                  f"accuracy {report.accuracy:.4f}, loss {report.loss:.4f}{augmented}")
        grid = Table("class", "accuracy", box=None, header_style="bold")
        for name, acc in report.per_class.items():
            grid.add_row(cell(name), f"{acc:.3f}")
        out.print(grid)
        out.print("most confused (true -> predicted): " +
                  "; ".join(f"{one_line(t)} -> {one_line(p)} ({n})" for t, p, n in report.confused_pairs))
        out.print(f"confusion.csv, confusion.png, errors.png, eval.json in {report.folder}")


@app.command(epilog=example("cnnlab report results/ --html"))
def report(
    targets: Annotated[list[Path], typer.Argument(metavar="FOLDER...",
                                                  help="Runs, sweeps, or folders holding runs.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Markdown file to write; images go to <name>_files/ beside it.",
    )] = Path("results/report/report.md"),
    html: Annotated[bool, typer.Option("--html", help="Also write one self-contained HTML file (images embedded).")] = False,
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """A lab report from results: setup, structure tables, curves, results table, comparisons, feature maps."""
    with cli_errors(debug):
        from cnnlab.report import write_report

        written = write_report(targets, output, html_too=html, trust_code=trust_code)
        for path in written.paths:
            out.print(str(path))
        say_skipped(written.skipped)


@app.command(epilog=example("cnnlab models --source torchvision 'resnet*'"))
def models(
    pattern: Annotated[Optional[str], typer.Argument(metavar="PATTERN",
                                                     help="With --source: a glob (resnet*) or a part of the names.",
                                                     show_default=False)] = None,
    source: Annotated[Optional[str], typer.Option(
        "--source", help="List a library's models instead: torchvision or timm (named torchvision.NAME, timm.NAME).")] = None,
    debug: DebugOption = False,
) -> None:
    """List the registered models: name, parameters (for the default data set's images), description."""
    with cli_errors(debug):
        from cnnlab.data import described
        from cnnlab.modelinfo import count_params
        from cnnlab.models import ModelArgumentError, get_entry, get_model, list_models
        from cnnlab.models.build import model_arguments
        from cnnlab.models.library import COUNT_AT_MOST, SOURCES, library_names, library_params

        if source is None and pattern:
            raise UserError(f"a PATTERN ({pattern!r}) lists a library's models: add --source torchvision or --source timm")
        if source is not None and source not in SOURCES:
            raise UserError(f"--source: {source!r} is not a library cnnlab knows; use {' or '.join(SOURCES)}")
        spec = described()
        names = library_names(source, pattern) if source else list_models()
        if source and len(names) > COUNT_AT_MOST:
            err.print(f"{len(names)} models: parameter counts are shown for at most {COUNT_AT_MOST}; "
                      "give a PATTERN that matches fewer")
        table = Table("model", "params", "description", box=None, header_style="bold")
        unknown = 0
        for name in names:
            entry = get_entry(name)
            arguments = model_arguments(name, {}, spec)
            if source and len(names) > COUNT_AT_MOST:
                shown = ""
            elif source:
                params = library_params(name, **arguments)
                unknown += params is None
                shown = "?" if params is None else f"{params:,}"
            elif any(f.is_required() for f in entry.options.model_fields.values()):
                shown = "(yours)"
            else:
                try:
                    shown = f"{count_params(get_model(name, **arguments)):,}"
                except ModelArgumentError:  # built for larger images (the textbook's alexnet: 224 pixels)
                    shown = f"(not for {spec.shape_text})"
            table.add_row(literal(name), shown, literal(entry.description))
        out.print(table)
        if unknown:
            err.print(f"?: {unknown} model(s) could not be built for {spec.shape_text} images, or not without allocating "
                      "their weights (torchvision's regnets); `cnnlab summary NAME` says why")


@app.command(epilog=example("cnnlab summary configs/resnet9.yaml"))
def summary(
    target: Annotated[str, typer.Argument(metavar="TARGET",
                                          help="A model name (see `cnnlab models`) or a config file.", show_default=False)],
    set_: SetOption = None,
    trust_code: TrustCodeOption = False,
    debug: DebugOption = False,
) -> None:
    """Per-layer output shapes, parameters and FLOPs of a model, for one image of the config's data set."""
    with cli_errors(debug):
        from cnnlab.config import load_config
        from cnnlab.data import describe
        from cnnlab.models.build import build_model

        is_file = Path(target).suffix in (".yaml", ".yml") or Path(target).is_file()
        cfg = load_config(target, set_, trust_code=trust_code or None) if is_file else \
            load_config(None, set_, start={"model.name": target})
        spec = describe(cfg.data)
        print_model(cfg, build_model(cfg, spec=spec), spec)


@app.command(epilog=example("cnnlab data cifar10 --verify"))
def data(
    name: Annotated[Optional[str], typer.Argument(metavar="NAME",
        help="A data set (fashion-mnist, mnist, kmnist, ...): describe it as a run reads it (images per class in the "
             "train, val and test splits a run makes, size, channels, the mean/std a run normalises with, where its "
             "files are). Without it: list every data set, found or missing and where cnnlab looked, and check those "
             "found.", show_default=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", "--root", help="Folder with the data set's files "
                                                     "(without NAME: look for every data set there alone).")] = None,
    download: DownloadOption = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also compare the files' checksums with the known ones.")] = False,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Describe a data set, or list every data set cnnlab knows: where it looked, what it found (checked), how to
    get the others. Exit 2 if the data set a run reads by default (data.name) is missing, or a file found is bad."""
    with cli_errors(debug):
        from cnnlab.config import load_config

        options = {"data.name": name, "data.root": data_dir, "data.download": download or None}
        config = load_config(None, set_, {key: value for key, value in options.items() if value is not None})
        cfg = config.data
        if name is not None:
            describe_data(cfg, config.seed)
            if verify:
                check_data(cfg.name, cfg, verify)
            return
        list_data(cfg, verify)


def check_data(name: str, cfg, verify: bool, download: bool = False) -> None:
    """The lines of a data set's check of its files (where they are, what each split holds, with ``verify`` their
    checksums)."""
    from cnnlab.data import data_set

    for line in data_set(name).check(cfg.root, download, verify, check_counts=cfg.check_counts):
        out.print(literal(line))


def list_data(cfg, verify: bool) -> None:
    """``cnnlab data``: every data set with where it was looked for, then the check of each one found and of the one
    a run reads (``data.name``; downloaded with ``data.download``); a check that fails is said and makes it exit 2."""
    from cnnlab.data.overview import survey

    listed = survey(cfg.root)
    width = max(len(entry.name) for entry in listed) + 2
    where = f"in {cfg.root} alone (--data-dir)" if cfg.root is not None else "in their usual places"
    out.print(literal(f"data sets (data.name), looked for {where}:"))
    for entry in listed:
        out.print(literal(f"{entry.name:<{width}}{entry.text()}"))
    failed = 0
    for entry in listed:
        if entry.name == cfg.name or (entry.where is not None and entry.where.found is not None):
            try:
                check_data(entry.name, cfg, verify, download=cfg.download and entry.name == cfg.name)
            except UserError as error:
                say_error("error", str(error), 2)
                failed += 1
    if failed:
        raise typer.Exit(2)


def describe_data(cfg, seed: int) -> None:
    """What ``cnnlab data NAME`` prints of a ``DataConfig``: the description, folder and cache, the statistics a run
    normalises with, images per class in the splits a run with ``seed`` makes."""
    from cnnlab.data.overview import overview

    view = overview(cfg, seed)
    spec = view.spec
    out.print(Text.assemble(literal(spec.title), f" ({spec.name}): {spec.num_classes} classes, {spec.shape_text} "
                            "(channels x height x width)"))
    out.print(Text.assemble("files: ", literal(spec.source or "?")))
    if view.cache is not None:
        out.print(Text.assemble("cache: ", literal(view.cache)))
    channels = ", ".join(f"{m:.4f} / {s:.4f}" for m, s in zip(spec.mean, spec.std))
    instead = {False: " (with data.normalize: false a run leaves them as they are)",
               "weights": " (with data.normalize: weights a run uses its weights' instead)"}.get(cfg.normalize, "")
    out.print(f"mean / std per channel (of the training split a run normalises with{instead}; pixels in [0, 1]): "
              f"{channels}")
    splits = list(view.counts)
    table = Table("label", "class", *splits, box=None, header_style="bold")
    for label, class_name in enumerate(spec.classes):
        table.add_row(str(label), cell(class_name), *(f"{view.counts[split][label]:,}" for split in splits))
    table.add_row("", "all", *(f"{view.total(split):,}" for split in splits))
    out.print(table)
    if view.val_problem is not None:
        out.print(literal(f"no validation split: a run would stop here ({view.val_problem})"))
    elif "val" in view.counts:
        out.print(literal(f"the splits a run makes: the validation split held out of the training images by "
                          f"data.val_size {cfg.val_size} (stratified), drawn by seed {seed}"))
    else:
        out.print("no validation split (data.val_size 0): a run evaluates on the test split every epoch")


def main() -> None:
    app(prog_name="cnnlab")


if __name__ == "__main__":
    sys.exit(main())
