"""Usage: ``python -m cnnlab.d2l_replica configs/lenet.yaml --epochs 3``: the lab report's pipeline, as a baseline.

A faithful replica of how the report trained (d2l's ``load_data_fashion_mnist`` and ``train_ch6``),
without d2l itself: torchvision's ``FashionMNIST`` with ``ToTensor``, a shuffled ``DataLoader`` with
4 worker processes, the model on the device in its default layout, plain SGD, and d2l's
``Accumulator``, which reads the loss and accuracy back to the host after every batch; after each
epoch the test accuracy is evaluated the same way. ``cnnlab bench`` times it against cnnlab.
The data is read from the local IDX files (copied into a temporary torchvision layout): nothing
is downloaded. It is the report's data only: a config naming another data set, or another shape of
Fashion-MNIST (``data.image_size``, ``data.channels``), is refused (exit 2) rather than trained on
data other than it names; ``cnnlab run`` takes any.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from cnnlab.config import Config, load_config
from cnnlab.data import DEFAULT, describe, described
from cnnlab.data.fashion_mnist import FILES, find_data_dir, find_file, read_bytes
from cnnlab.errors import UserError
from cnnlab.safetext import printable

WORKERS = 4  # d2l's get_dataloader_workers()


def require_report_data(cfg: Config) -> None:
    """Refuse a config whose data is not the report's: the replica reads Fashion-MNIST through torchvision's
    ``FashionMNIST`` as d2l did, so another set (whose IDX files may even bear the same names) or another shape
    would train on data, or build a model for inputs, other than the config names."""
    report = described(DEFAULT)
    if cfg.data.name != DEFAULT:
        asked = f"data.name is {cfg.data.name}"
    elif (shape := describe(cfg.data).shape_text) != report.shape_text:
        asked = f"data.image_size/data.channels ask for {shape}"
    else:
        return
    raise UserError(f"{asked}, but the d2l replica (what cnnlab bench times against) is the lab report's pipeline: "
                    f"{report.title} as torchvision serves it, {report.shape_text}. Use cnnlab run for other data")


@contextlib.contextmanager
def torchvision_layout(cfg: Config) -> Iterator[str]:
    """A temporary folder laid out as torchvision's FashionMNIST expects, holding the local files."""
    require_report_data(cfg)
    with tempfile.TemporaryDirectory(prefix="cnnlab-d2l-") as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        root = find_data_dir(cfg.data.root)
        for stem in (s for pair in FILES.values() for s in pair):
            (raw / stem).write_bytes(read_bytes(find_file(root, stem)))
        yield tmp


def loaders(root: str, batch_size: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    from torchvision import datasets, transforms

    # d2l's 4 workers, as the report ran them, even where PyTorch would suggest fewer
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    train = datasets.FashionMNIST(root, train=True, transform=transforms.ToTensor(), download=False)
    test = datasets.FashionMNIST(root, train=False, transform=transforms.ToTensor(), download=False)
    return (torch.utils.data.DataLoader(train, batch_size, shuffle=True, num_workers=WORKERS),
            torch.utils.data.DataLoader(test, batch_size, shuffle=False, num_workers=WORKERS))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
         metric: list[float]) -> None:
    """One of train_ch6's steps, with its Accumulator's three host reads."""
    optimizer.zero_grad()
    y_hat = model(x)
    loss = loss_fn(y_hat, y)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        metric[0] += float(loss * x.shape[0])
        metric[1] += float((y_hat.argmax(1) == y).sum())
        metric[2] += x.shape[0]


def evaluate_accuracy(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += float((model(x).argmax(1) == y).sum())
            total += y.numel()
    return correct / max(total, 1)


def train_ch6(cfg: Config, epochs: int, device: torch.device) -> dict[str, float]:
    """The report's whole training: returns the final train loss/accuracy and test accuracy, and its
    training img/s (data loading included, as train_ch6's timer measured)."""
    from cnnlab.models.build import build_model

    with torchvision_layout(cfg) as root:
        train_loader, test_loader = loaders(root, cfg.train.batch_size)
        model = build_model(cfg).to(device)  # the same initial weights as cnnlab's run of this config
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        loss_fn = nn.CrossEntropyLoss()
        seconds, seen = 0.0, 0
        for _ in range(epochs):
            model.train()
            metric = [0.0, 0.0, 0.0]
            start = time.perf_counter()
            for x, y in train_loader:
                x, y = x.to(device), y.to(device)
                step(model, optimizer, loss_fn, x, y, metric)
            seconds += time.perf_counter() - start
            seen += int(metric[2])
            test_acc = evaluate_accuracy(model, test_loader, device)
        return {"train_loss": metric[0] / metric[2], "train_acc": metric[1] / metric[2], "test_acc": test_acc,
                "examples_per_sec": seen / max(seconds, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description="The lab report's d2l training pipeline, replicated without d2l.")
    parser.add_argument("config")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, values={"data.root": args.data_dir} if args.data_dir else None)
        result = train_ch6(cfg, args.epochs or cfg.train.epochs, torch.device(args.device))
    except UserError as err:  # bad input: one line and exit 2, as cnnlab's commands say it
        sys.stderr.write(f"error: {printable(str(err))}\n")
        sys.exit(err.exit_code)
    print(f"loss {result['train_loss']:.3f}, train acc {result['train_acc']:.3f}, test acc {result['test_acc']:.3f}")
    print(f"{result['examples_per_sec']:.1f} examples/sec on {args.device}")


if __name__ == "__main__":
    main()
