"""Usage: ``python scripts/torchrun_drift.py configs/lenet.yaml --images 1200 --epochs 2 --seeds 0,1,2``.

How far a run trained by 2 torchrun processes (gloo, CPU) lands from the same run in 1 process, on a
subset of the real Fashion-MNIST, over several seeds: the same config, the same seed, the same data.
Prints one JSON object: per seed, each epoch's validation accuracy and loss in both, and the largest
differences; then the spread between seeds of the 1-process runs, to set the drift against.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cnnlab.data.fashion_mnist import FILES, find_data_dir, find_file


def subset(source: Path, target: Path, images: int, test_images: int) -> Path:
    """The first ``images`` training and ``test_images`` test images of the IDX files, as IDX files."""
    target.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", images), ("test", test_images)):
        for stem in FILES[split]:
            path = find_file(source, stem)
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            is_images = int.from_bytes(raw[2:4], "big") == 0x0803
            header, item = (16, 28 * 28) if is_images else (8, 1)
            head = bytearray(raw[:header])
            head[4:8] = count.to_bytes(4, "big")
            (target / stem).write_bytes(bytes(head) + raw[header:header + count * item])
    return target


def epochs_of(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as handle:
        return [{"val_acc": float(r["val_acc"]), "val_loss": float(r["val_loss"])} for r in csv.DictReader(handle)]


def train(config: str, data: Path, results: Path, seed: int, epochs: int, processes: int, val_size: int) -> list[dict]:
    sets = ["--set", f"data.root={data}", "--set", "data.check_counts=false", "--set", f"data.val_size={val_size}"]
    args = ["-m", "cnnlab", "run", config, "--seed", str(seed), "--epochs", str(epochs), "--device", "cpu",
            "--results", str(results), "--quiet", *sets]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        command = [torchrun, "--standalone", "--nproc-per-node", str(processes), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    [run] = [p for p in results.glob("*/*") if (p / "metrics.csv").is_file()]
    return epochs_of(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        data = subset(find_data_dir(), Path(scratch, "data"), args.images, args.test_images)
        per_seed = {}
        for seed in seeds:
            one = train(args.config, data, Path(scratch, f"one-{seed}"), seed, args.epochs, 1, args.val_size)
            two = train(args.config, data, Path(scratch, f"two-{seed}"), seed, args.epochs, 2, args.val_size)
            per_seed[seed] = {
                "one_process": one, "two_processes": two,
                "max_val_acc_difference": max(abs(a["val_acc"] - b["val_acc"]) for a, b in zip(one, two)),
                "max_val_loss_difference": max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(one, two)),
            }
    last = [per_seed[s]["one_process"][-1]["val_acc"] for s in seeds]
    print(json.dumps({
        "config": args.config, "images": args.images, "val_size": args.val_size, "epochs": args.epochs,
        "seeds": per_seed,
        "largest_val_acc_difference": max(v["max_val_acc_difference"] for v in per_seed.values()),
        "val_acc_std_over_seeds_one_process": statistics.stdev(last) if len(last) > 1 else 0.0,
    }, indent=2))


if __name__ == "__main__":
    main()
