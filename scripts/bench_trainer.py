"""Usage: ``python scripts/bench_trainer.py [--batches 150] [--model-set model.activation=relu]`` (or ``make bench``).

Trains LeNet (the report's model, batch 256) for the same number of batches two ways, in this one
process and on the same data, and prints images/second and the ratio:

- baseline: the lab report's d2l pipeline: torchvision's FashionMNIST with ``ToTensor``, a shuffled
  DataLoader with 4 workers, and d2l's per-batch ``Accumulator`` that reads loss and accuracy back
  to the host after every batch;
- cnnlab: ``cnnlab.engine.train_one_epoch`` over on-device uint8 batches (``Data.batches``).

Both time the whole epoch loop including data loading, i.e. end-to-end images/second. A ratio is
meaningful only within one run of this script (same machine, same moment).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cnnlab.config import load_config
from cnnlab.data import FILES, find_data_dir, find_file, load_data, read_bytes
from cnnlab.engine import build_model, make_optimizer, make_runtime, make_scheduler, train_one_epoch


def d2l_baseline(cfg, batches: int) -> float:
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        root = find_data_dir(cfg.data.root)
        for stem in (s for pair in FILES.values() for s in pair):
            (raw / stem).write_bytes(read_bytes(find_file(root, stem)))
        dataset = datasets.FashionMNIST(tmp, train=True, transform=transforms.ToTensor(), download=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=True, num_workers=4)
        model = build_model(cfg)  # same weights; on the CPU in the default NCHW layout, as d2l had it
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        seen, metric = 0, [0.0, 0.0, 0.0]
        iterator = iter(loader)
        next(iterator)  # let the workers start before timing, as a long run would amortise
        start = time.perf_counter()
        for x, y in itertools.islice(iterator, batches):
            optimizer.zero_grad()
            y_hat = model(x)
            loss = loss_fn(y_hat, y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # d2l's Accumulator: three host reads per batch
                metric[0] += float(loss * x.shape[0])
                metric[1] += float((y_hat.argmax(1) == y).sum())
                metric[2] += x.shape[0]
            seen += len(y)
        return seen / (time.perf_counter() - start)


def cnnlab_trainer(cfg, batches: int) -> float:
    runtime = make_runtime("cpu", cfg.train.precision)
    data = load_data(cfg.data, cfg.seed, runtime.device, channels_last=cfg.train.channels_last)
    model = build_model(cfg, runtime)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.train.epochs, data.num_batches("train", 256))
    stream = data.batches("train", cfg.train.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    next(stream)
    result = train_one_epoch(
        model, itertools.islice(stream, batches), optimizer, scheduler, nn.CrossEntropyLoss(), runtime
    )
    return result["examples"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/lenet.yaml")
    parser.add_argument("--batches", type=int, default=150, help="batches timed per pipeline")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override")
    args = parser.parse_args()
    cfg = load_config(args.config, ["train.device=cpu", *args.overrides])
    print(f"{cfg.model.name} {cfg.model.kwargs}, batch {cfg.train.batch_size}, {args.batches} batches each, "
          f"{torch.get_num_threads()} threads")
    baseline = d2l_baseline(cfg, args.batches)
    print(f"d2l pipeline (DataLoader, 4 workers, per-batch host reads): {baseline:8,.0f} images/s")
    ours = cnnlab_trainer(cfg, args.batches)
    print(f"cnnlab trainer (on-device batches, one read per epoch):     {ours:8,.0f} images/s")
    print(f"speed-up: {ours / baseline:.2f}x")


if __name__ == "__main__":
    main()
