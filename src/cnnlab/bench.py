"""Usage: ``cnnlab bench [configs/lenet.yaml] [--device cuda] [--no-commands]`` (``make bench``).

cnnlab's trainer against a faithful replica of the lab report's d2l pipeline (``d2l_replica``), on
the same model, initial weights and data, in one run so the ratios mean something:

- in this process, for ``batches`` batches each: end-to-end images/s (data loading included: the
  report's DataLoader with 4 workers and its per-batch host reads, against cnnlab's on-device
  batches) and training-step images/s (batches made beforehand, the step alone); where the run takes
  the static step (``train.cuda_graphs``: by default on CUDA), its end-to-end images/s as well;
- with ``commands``: each whole command as its own process, ``cnnlab run CONFIG --epochs N`` against
  ``python -m cnnlab.d2l_replica CONFIG --epochs N`` (start-up, data, training, evaluation), with
  wall seconds, cnnlab's start-up seconds (process start to first batch, and by stage) and each one's
  peak memory: ``pairs`` pairs, one after the other, and their medians; with ``hog``, as many again
  beside a process that keeps one CPU busy, and cnnlab's slowdown there against its own quiet time.

Everything goes into a JSON file (``--out``, default ``results/bench/bench-<time>.json``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.config import Config
from cnnlab.console import SafeConsole
from cnnlab.errors import UserError
from cnnlab.results import atomic_write_text, check_output_file, read_summary, utc_now, utc_stamp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def d2l_in_process(cfg: Config, device: torch.device, batches: int) -> dict[str, Any]:
    """The report's loop over its DataLoader (end to end), then over batches made beforehand (step)."""
    from cnnlab.d2l_replica import loaders, step, torchvision_layout
    from cnnlab.models.build import build_model

    with torchvision_layout(cfg) as root:
        train_loader, _ = loaders(root, cfg.train.batch_size)
        model = build_model(cfg).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        _peak_reset(device)
        iterator = itertools.cycle(train_loader)
        next(iterator)  # the workers start before the clock does, as a long run would amortise
        metric = [0.0, 0.0, 0.0]
        start = time.perf_counter()
        for x, y in itertools.islice(iterator, batches):
            step(model, optimizer, loss_fn, x.to(device), y.to(device), metric)
        _sync(device)
        end_to_end = metric[2] / (time.perf_counter() - start)
        ready = [(x.to(device), y.to(device)) for x, y in itertools.islice(iterator, min(batches, 50))]
        metric = [0.0, 0.0, 0.0]
        _sync(device)
        start = time.perf_counter()
        for x, y in _repeat(ready, batches):
            step(model, optimizer, loss_fn, x, y, metric)
        _sync(device)
        return {"end_to_end_img_s": end_to_end, "step_img_s": metric[2] / (time.perf_counter() - start),
                "peak_memory_mb": _peak_mb(device)}


def _repeat(items: list, count: int) -> Any:
    return itertools.islice(itertools.cycle(items), count)


def cnnlab_in_process(cfg: Config, batches: int) -> dict[str, Any]:
    """cnnlab's loop (``train_one_epoch``) over on-device batches (end to end), then over batches made
    beforehand (step)."""
    from cnnlab.session import prepare
    from cnnlab.steps import train_one_epoch

    session = prepare(cfg)
    device = session.runtime.device
    data = session.data

    def stream() -> Any:
        while True:
            yield from data.batches("train", cfg.train.batch_size, shuffle=True, generator=session.order)

    def run(batch_source: Any) -> float:
        _sync(device)
        result = train_one_epoch(session.forward, batch_source, session.optimizer, session.scheduler, session.loss_fn,
                                 session.runtime, cfg.train.grad_clip)
        return result["examples"] / max(result["seconds"], 1e-9)

    source = stream()
    run(itertools.islice(source, 2))  # warm-up: first-call costs are start-up, measured separately
    _peak_reset(device)
    end_to_end = run(itertools.islice(source, batches))
    ready = [(x.clone(), y.clone()) for x, y in itertools.islice(source, min(batches, 50))]
    step = run(_repeat(ready, batches))
    result = {"end_to_end_img_s": end_to_end, "step_img_s": step, "peak_memory_mb": _peak_mb(device),
              "device_name": session.runtime.device_name, "threads": session.threads.count,
              "static_step": session.static_step.kind if session.static_step is not None else None}
    if session.static_step is not None:
        result["static_img_s"] = static_in_process(session, batches)
    return result


def static_in_process(session: Any, batches: int) -> float:
    """Images/s of the static step (``train.cuda_graphs``: a CUDA-graph replay per batch on GPUs), end
    to end: batches picked from the on-device data by the step itself. Warmed up and captured first."""
    from cnnlab.capture import WARMUP_STEPS
    from cnnlab.state import EpochProgress

    step, data, device = session.static_step, session.data, session.runtime.device
    n, batch_size = len(data.train), session.cfg.train.batch_size
    full = n // batch_size

    def run(count: int) -> float:
        seconds, done = 0.0, 0
        while done < count:
            progress = EpochProgress(lr=session.optimizer.param_groups[0]["lr"]).to(device)
            permutation = torch.randperm(n, generator=session.order).to(device)
            _sync(device)
            start = time.perf_counter()
            step.run_epoch(progress, permutation, min(full, count - done), None, None)
            _sync(device)
            seconds += time.perf_counter() - start
            done += progress.batches
        return done * batch_size / max(seconds, 1e-9)

    run(WARMUP_STEPS + 2)  # the warm-up steps, the capture and a replay: start-up, not speed
    return run(batches)


def _timed_command(command: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """(wall seconds, peak memory in MB, output) of one command run to its end. The memory is the
    largest proportional set size (PSS) of the command's whole process tree, its data-loading
    workers included, sampled ten times a second (Linux; None elsewhere)."""
    start = time.perf_counter()
    peak = None
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            sample = _tree_pss_mb(process.pid)
            if sample is not None:
                peak = max(peak or 0.0, sample)
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise UserError(f"`{' '.join(command)}` failed (exit {process.returncode}):\n{output[-2000:]}")
    return seconds, peak, output


def _tree_pss_mb(root: int) -> float | None:
    """The summed PSS (MB) of ``root`` and its descendants, from /proc; None where there is no /proc."""
    proc = Path("/proc")
    if not (proc / str(root) / "smaps_rollup").exists():
        return None
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in (proc / str(pid) / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def whole_commands(config_path: Path, overrides: list[str], device: str, epochs: int,
                   data_root: Path | None, pairs: int = 5, hog: bool = False) -> dict[str, Any]:
    """Each pipeline as the command a user runs, from process start to exit, both on the data in
    ``data_root`` (the benchmarked config's ``data.root``; None: where each finds Fashion-MNIST): ``pairs``
    pairs of them, one after the other, and the medians. With ``hog``, as many pairs again with a process
    beside them that keeps one CPU busy (``python -c "while True: pass"``, a busy machine's simplest form),
    and cnnlab's slowdown there against its own quiet time."""
    result = _command_pairs(config_path, overrides, device, epochs, data_root, pairs)
    if hog:
        with cpu_hog():
            result["hog"] = _command_pairs(config_path, overrides, device, epochs, data_root, pairs)
        result["hog_slowdown"] = result["hog"]["cnnlab_seconds"] / result["cnnlab_seconds"]
    return result


@contextlib.contextmanager
def cpu_hog() -> Iterator[None]:
    """A process that keeps one CPU busy for as long as the block runs."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # spinning before the first command starts
        yield
    finally:
        hog.kill()
        hog.wait()


def _command_pairs(config_path: Path, overrides: list[str], device: str, epochs: int, data_root: Path | None,
                   pairs: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    data = ["--data-dir", str(data_root)] if data_root is not None else []
    runs = []
    for _ in range(pairs):
        with tempfile.TemporaryDirectory(prefix="cnnlab-bench-") as tmp:
            ours = [sys.executable, "-m", "cnnlab", "run", str(config_path), "--epochs", str(epochs), "--device", device,
                    "--results", tmp, "--quiet", *(a for o in overrides for a in ("--set", o)), *data]
            d2l = [sys.executable, "-m", "cnnlab.d2l_replica", str(config_path), "--epochs", str(epochs), "--device",
                   device, *data]
            d2l_seconds, d2l_mb, d2l_output = _timed_command(d2l, env)
            our_seconds, our_mb, _ = _timed_command(ours, env)
            [summary_path] = Path(tmp).glob("*/*/summary.json")
            summary = read_summary(summary_path)
        d2l_test = next((line.split("test acc ")[1] for line in d2l_output.splitlines() if "test acc " in line), None)
        runs.append({"d2l_seconds": d2l_seconds, "cnnlab_seconds": our_seconds,
                     "cnnlab_startup_seconds": summary.startup_seconds,
                     "cnnlab_startup": summary.startup.model_dump() if summary.startup else None,
                     "cnnlab_threads": summary.threads, "cnnlab_test_acc": summary.test_acc,
                     "d2l_test_acc": float(d2l_test) if d2l_test else None,
                     "d2l_peak_pss_mb": d2l_mb, "cnnlab_peak_pss_mb": our_mb})
    middle = {key: _median([run[key] for run in runs]) for key in
              ("d2l_seconds", "cnnlab_seconds", "cnnlab_startup_seconds", "d2l_peak_pss_mb", "cnnlab_peak_pss_mb")}
    return {"epochs": epochs, "pairs": pairs, **middle, "ratio": middle["d2l_seconds"] / middle["cnnlab_seconds"],
            "cnnlab_test_acc": runs[-1]["cnnlab_test_acc"], "d2l_test_acc": runs[-1]["d2l_test_acc"], "runs": runs}


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _mb(value: float | None) -> str:
    return "not measured" if value is None else f"{value:,.0f} MB"


def run_bench(config_path: Path | None, overrides: list[str], *, device: str = "cpu", data_dir: Path | None = None,
              batches: int = 150, commands: bool = True, epochs: int = 3, out: Path | None = None,
              quiet: bool = False, pairs: int = 5, hog: bool = False) -> tuple[dict, Path]:
    from cnnlab.config import load_config
    from cnnlab.d2l_replica import require_report_data
    from cnnlab.runtime import resolve_device

    if batches < 1 or epochs < 1 or pairs < 1:
        raise UserError("--batches, --epochs and --pairs must be at least 1")
    if out is not None:
        check_output_file(Path(out), "--out")
    cfg = load_config(config_path, overrides, {"train.device": device, **({"data.root": data_dir} if data_dir else {})})
    require_report_data(cfg)  # before cnnlab's half is timed: the d2l half could not run on it
    resolved = resolve_device(device)
    console = SafeConsole()
    say = (lambda text: None) if quiet else (lambda text: console.print(text, soft_wrap=True))
    say(f"bench {cfg.name}: {cfg.model.name}, batch {cfg.train.batch_size}, {batches} batches each, on {resolved}")
    ours = cnnlab_in_process(cfg, batches)
    say(f"cnnlab  end to end {ours['end_to_end_img_s']:>10,.0f} img/s   step {ours['step_img_s']:>10,.0f} img/s")
    if ours.get("static_img_s"):
        say(f"cnnlab  {ours['static_step']} step, end to end {ours['static_img_s']:>10,.0f} img/s")
    theirs = d2l_in_process(cfg, resolved, batches)
    say(f"d2l     end to end {theirs['end_to_end_img_s']:>10,.0f} img/s   step {theirs['step_img_s']:>10,.0f} img/s")
    result: dict[str, Any] = {
        "config": str(config_path) if config_path else None, "overrides": overrides,
        "data_dir": str(data_dir) if data_dir else None, "name": cfg.name,
        "model": cfg.model.name, "batch_size": cfg.train.batch_size, "batches": batches, "device": str(resolved),
        "device_name": ours.pop("device_name"), "threads": ours.pop("threads"), "torch_version": str(torch.__version__),
        "python": platform.python_version(), "host": socket.gethostname(), "measured": utc_now(),
        "cnnlab": ours, "d2l": theirs,
        "ratio": {"end_to_end": ours["end_to_end_img_s"] / theirs["end_to_end_img_s"],
                  "step": ours["step_img_s"] / theirs["step_img_s"]},
    }
    if ours.get("static_img_s"):
        result["ratio"]["static_end_to_end"] = ours["static_img_s"] / theirs["end_to_end_img_s"]
    say(f"ratio   end to end {result['ratio']['end_to_end']:.2f}x   step {result['ratio']['step']:.2f}x")
    if commands:
        if config_path is None:
            raise UserError("--commands times `cnnlab run CONFIG`: give a config file (e.g. configs/lenet.yaml)")
        say(f"whole commands, {epochs} epochs each, median of {pairs} pair(s){', then beside a CPU hog' if hog else ''} ...")
        result["commands"] = whole_commands(Path(config_path), overrides, device, epochs, cfg.data.root, pairs, hog)
        c = result["commands"]
        say(f"commands  d2l {c['d2l_seconds']:.1f} s, cnnlab {c['cnnlab_seconds']:.1f} s: {c['ratio']:.2f}x; "
            f"cnnlab start-up {c['cnnlab_startup_seconds']} s; peak memory d2l {_mb(c['d2l_peak_pss_mb'])}, "
            f"cnnlab {_mb(c['cnnlab_peak_pss_mb'])}")
        if hog:
            h = c["hog"]
            say(f"with hog  d2l {h['d2l_seconds']:.1f} s, cnnlab {h['cnnlab_seconds']:.1f} s: {h['ratio']:.2f}x; "
                f"cnnlab's own slowdown {c['hog_slowdown']:.2f}x of its quiet time")
    path = Path(out) if out is not None else \
        Path(cfg.output.dir) / "bench" / f"bench-{utc_stamp()}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    say(f"-> {path}")
    return result, path
