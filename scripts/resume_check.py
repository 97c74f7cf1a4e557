"""Usage: ``python scripts/resume_check.py configs/lenet_relu.yaml --epochs 3 --device cuda --out /tmp/rc``.

Checks, on any device, that a run stopped mid-epoch and resumed ends as an uninterrupted run does:
trains the config twice without interruption (how much two clean runs differ is the noise floor on
this device: zero on the CPU, possibly not with cuDNN's nondeterministic kernels), once stopped with
SIGTERM inside an epoch and resumed, once killed with SIGKILL and resumed. Prints one JSON object:
per run the metrics columns that differ from the first clean run (timing columns aside), the largest
difference, test accuracies, exit codes, and the seconds one full-state checkpoint takes to save.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMING = {"epoch_seconds", "train_examples_per_sec"}


def cnnlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "cnnlab", *args]


def run_dir(results: Path) -> Path:
    [run] = [p for p in results.glob("*/*") if p.is_dir()]
    return run


def metrics(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as handle:
        return [{k: float(v) for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def differences(a: list[dict], b: list[dict]) -> tuple[list[str], float]:
    if len(a) != len(b):
        return [f"{len(a)} rows against {len(b)}"], float("inf")
    keys = sorted({k for ra, rb in zip(a, b) for k in ra if ra[k] != rb.get(k)})
    return keys, max((abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in ra), default=0.0)


def interrupted(base: list[str], results: Path, signum: int, after_epochs: int) -> dict:
    process = subprocess.Popen(cnnlab(*base, "--results", str(results)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    while not any(len(m.read_text().splitlines()) > after_epochs for m in results.glob("*/*/metrics.csv")):
        if process.poll() is not None:
            return {"error": "finished before the signal", "output": process.stdout.read()[-2000:]}
        time.sleep(0.005)
    time.sleep(0.05)
    process.send_signal(signum)
    process.communicate()
    run = run_dir(results)
    stopped = json.loads((run / "summary.json").read_text())
    resumed = subprocess.run(cnnlab("resume", str(run), "--quiet"), capture_output=True, text=True)
    return {"signal_exit": process.returncode, "stopped_status": stopped["status"],
            "stopped_at": stopped.get("stopped_at"), "resume_exit": resumed.returncode,
            "resume_error": resumed.stderr[-1000:] if resumed.returncode else "", "run": run}


def checkpoint_seconds(config: str, device: str) -> dict[str, float]:
    from cnnlab.config import load_config
    from cnnlab.results import Checkpoint
    from cnnlab.session import prepare
    from cnnlab.state import TrainState

    session = prepare(load_config(config, values={"train.device": device}))
    state = TrainState()
    out = Path("/tmp/cnnlab-resume-check.pt")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.checkpoint(state).save(out)
        times.append(time.perf_counter() - start)
    size = out.stat().st_size
    start = time.perf_counter()
    Checkpoint.load(out)
    return {"save_seconds_median": sorted(times)[2], "load_seconds": time.perf_counter() - start, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("config")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    base = ["run", args.config, "--quiet", "--epochs", str(args.epochs), "--device", args.device,
            *[a for s in args.set for a in ("--set", s)]]
    report: dict = {"config": args.config, "epochs": args.epochs, "device": args.device}
    clean = []
    for name in ("clean1", "clean2"):
        done = subprocess.run(cnnlab(*base, "--results", str(args.out / name)), capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        clean.append(run_dir(args.out / name))
    reference = metrics(clean[0])
    report["clean2"] = dict(zip(("differs_in", "max_abs_diff"), differences(metrics(clean[1]), reference)))
    for name, signum in (("sigterm", signal.SIGTERM), ("sigkill", signal.SIGKILL)):
        outcome = interrupted(base, args.out / name, signum, after_epochs=1)
        run = outcome.pop("run", None)
        if run is not None and outcome["resume_exit"] == 0:
            outcome.update(zip(("differs_in", "max_abs_diff"), differences(metrics(run), reference)))
            outcome["test_acc"] = json.loads((run / "summary.json").read_text())["test_acc"]
        report[name] = outcome
    report["clean_test_acc"] = [json.loads((c / "summary.json").read_text())["test_acc"] for c in clean]
    report["checkpoint"] = checkpoint_seconds(args.config, args.device)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
