"""The optimisers: PyTorch's numbers to the bit, state dicts that load both ways, and a run that never imports
PyTorch's compiler (``torch._dynamo``, 0.7-1.5 s of a start on a 2-core machine)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import command_imports
from torch import nn

from cnnlab.config import OptimConfig, ScheduleConfig
from cnnlab.optim import make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [
    {"name": "sgd", "lr": 0.9},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
    {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "backbone_lr": 0.1},
]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def pytorchs(net: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser as PyTorch's own class builds it, from cnnlab's parameter groups."""
    groups = [{**group} for group in make_optimizer(net, cfg).param_groups]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    kind = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    scheduler = make_scheduler(optimizer, ScheduleConfig(name="cosine", warmup_epochs=1), 2, 4)
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        scheduler.step()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_the_optimisers_are_pytorchs_to_the_bit_and_their_state_loads_both_ways(setting):
    cfg = OptimConfig(**setting)
    ours_net, theirs_net = model(), model()
    ours, theirs = make_optimizer(ours_net, cfg), pytorchs(theirs_net, cfg)
    assert isinstance(ours, type(theirs)) and type(ours) is not type(theirs)
    train(ours_net, ours, 5)
    train(theirs_net, theirs, 5)
    assert same(ours_net, theirs_net)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state["param_groups"] == theirs_state["param_groups"]
    assert ours_state["state"].keys() == theirs_state["state"].keys()
    assert bool(ours_state["state"]) == (cfg.name != "sgd" or cfg.momentum > 0)  # momentum buffers, moments
    # a checkpoint of either continues in the other, exactly
    swapped_ours, swapped_theirs = make_optimizer(ours_net, cfg), pytorchs(theirs_net, cfg)
    swapped_ours.load_state_dict(theirs_state)
    swapped_theirs.load_state_dict(ours_state)
    train(ours_net, swapped_ours, 3, start=5)
    train(theirs_net, swapped_theirs, 3, start=5)
    assert same(ours_net, theirs_net)
    # and the optimiser itself pickles (torch.save of a whole optimiser, a deep copy), as PyTorch's does
    copied = pickle.loads(pickle.dumps(swapped_ours))
    assert type(copied) is type(swapped_ours)
    assert copied.state_dict()["param_groups"] == swapped_ours.state_dict()["param_groups"]


@pytest.mark.parametrize("config", ["lenet.yaml", "resnet9.yaml"])
def test_a_run_of_cnnlabs_own_models_never_imports_pytorchs_compiler(config, tiny_overrides):
    """Neither the optimiser (momentum and weight decay in resnet9's), the shape trace (residual adds), the FLOP
    count nor the rest of a run: PyTorch's compiler takes 0.7-1.5 s to import, half of a 2-core machine's start."""
    args = ["run", str(ROOT / "configs" / config), "--quiet", *(f"--set={o}" for o in tiny_overrides),
            "--set=train.epochs=1", "--set=model.width=4" if config == "resnet9.yaml" else "--set=seed=1"]
    stderr = command_imports("torch._dynamo", args, cwd=ROOT)
    assert "exit 0 torch._dynamo not imported" in stderr, stderr
