"""Usage: ``python scripts/time_models.py [--seconds 20] [--models lenet vgg nin googlenet resnet]``.

Estimates seconds per epoch of each network on this machine by timing training batches of the
real Fashion-MNIST (batch 256, the trainer's own ``train_one_epoch``) for about ``--seconds`` each,
then prints the estimated time of ``cnnlab sweep configs/seed/`` (the whole lab report) from the
epochs its configs ask for. Evaluation passes are not included (they add about a third of an
epoch's forward time per epoch).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch import nn

from cnnlab.config import load_config
from cnnlab.data import load_data
from cnnlab.models.build import build_model
from cnnlab.optim import make_optimizer, make_scheduler
from cnnlab.runtime import make_runtime
from cnnlab.steps import train_one_epoch
from cnnlab.sweep import expand

TRAIN_IMAGES = 60_000  # the report's mode trains on the whole training set


def images_per_second(model_name: str, device: str, seconds: float, data) -> tuple[float, int]:
    cfg = load_config(None, values={"model.name": model_name, "train.device": device, "optim.lr": 0.01})
    runtime = make_runtime(device, "fp32")
    model = build_model(cfg, runtime.device, channels_last=runtime.channels_last)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.schedule, 1, 1000)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)

    def forever():
        while True:
            yield from data.batches("train", 256, shuffle=True, generator=generator)

    stream = forever()
    train_one_epoch(model, itertools.islice(stream, 2), optimizer, scheduler, loss_fn, runtime)  # warm-up
    done, elapsed, batches = 0, 0.0, 0
    while elapsed < seconds:
        step = min(batches or 2, 20)  # short chunks: slow models still stop near --seconds
        result = train_one_epoch(model, itertools.islice(stream, step), optimizer, scheduler, loss_fn, runtime)
        done += result["examples"]
        elapsed += result["seconds"]
        batches += step
    return done / elapsed, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "vgg", "nin", "googlenet", "resnet", "resnet9"])
    parser.add_argument("--seconds", type=float, default=20.0, help="training time measured per model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = load_config(None, values={"data.val_size": 0, "train.device": args.device})
    runtime = make_runtime(args.device, "fp32")
    data = load_data(cfg.data, 0, runtime.device, channels_last=True)
    per_epoch = {}
    print(f"{'model':10} {'images/s':>10} {'batches':>8} {'s/epoch':>9}  ({torch.get_num_threads()} threads, {runtime.device})")
    for name in args.models:
        rate, batches = images_per_second(name, args.device, args.seconds, data)
        per_epoch[name] = TRAIN_IMAGES / rate
        print(f"{name:10} {rate:10,.0f} {batches:8} {per_epoch[name]:9.1f}", flush=True)
    _, trials = expand(Path(__file__).resolve().parent.parent / "configs" / "seed", [])
    total = 0.0
    for trial in trials:
        model = trial.config.model.name
        if model in per_epoch:
            total += per_epoch[model] * trial.config.train.epochs
        else:
            print(f"(no timing for {model}; measure it with --models {model})")
    print(f"estimated training time of `cnnlab sweep configs/seed/` (--jobs 1): {total / 3600:.1f} h")


if __name__ == "__main__":
    main()
