"""Usage: ``choice = choose_threads(cfg.train.threads)`` before the data is read; once the model is built,
``choice = probe_if_busy(choice, step)``; summary.json's ``cpus`` is ``choice.as_dict()``.

How many CPU threads torch trains with, and why. Seeded CPU results depend on the thread count (the
reductions are ordered differently: configs/lenet_relu.yaml's first epoch ends at test accuracy 0.7826
with 1 thread and 0.7871 with 2), so the default never depends on how busy the machine is (what does
change on a busy machine, OpenMP's wait policy, changes no result: ``cpus.calm_openmp_if_busy``):

- ``auto`` (the default): torch's own count (or ``OMP_NUM_THREADS``), capped at the CPUs this process
  may really use (cpus.py: affinity mask, cgroup quota, physical cores). When other processes keep the
  machine busy at start, a short timed probe of both counts (under a second) runs and one line says how
  busy the machine is and which ``--threads`` value was faster; the run itself keeps its count.
- ``fastest``: the same, but the run takes the count the probe found faster (speed over bit-identical
  reruns).
- a number: exactly that many, refused when it is more than the machine's CPUs.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from cnnlab import cpus as machine
from cnnlab.cpus import BUSY_CPUS, Cpus, Load, usable_cpus
from cnnlab.errors import UserError

PROBE_SECONDS = 0.2  # timed per thread count and round, after a warm-up step
PROBE_ROUNDS = 2
PROBE_BATCH = 64  # images a step of the probe
# The probe takes about a second; a run of less work than this (some ten seconds on a 2-core CPU) is not worth it.
PROBE_MIN_WORK = 2e11


@dataclass(frozen=True)
class ThreadChoice:
    count: int  # the threads torch trains with
    setting: str  # train.threads as written: auto, fastest or a number
    reason: str  # why this count, in words
    cpus: Cpus
    load: Load | None = None  # how busy the rest of the machine was while the run started
    probe: dict[int, float] = field(default_factory=dict)  # images a second of a training step at each count tried
    line: str | None = None  # what the run says about it, when there is something to say

    @property
    def probing(self) -> bool:
        return self.setting in ("auto", "fastest") and self.load is not None

    def as_dict(self) -> dict[str, object]:
        return {
            "setting": self.setting, "reason": self.reason, **self.cpus.as_dict(),  # reason: the count's; usable_reason
            "busy_cpus": None if self.load is None else round(self.load.others, 2),
            "openmp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "probe": {str(count): round(rate, 1) for count, rate in self.probe.items()},
        }


def choose_threads(setting: int | str | None, cpus: Cpus | None = None, load: Load | None = None) -> ThreadChoice:
    """Apply ``train.threads`` and say why. ``load`` starts measuring how busy the machine is (auto and fastest)."""
    cpus = cpus or usable_cpus()
    if isinstance(setting, int):
        if setting > cpus.logical:
            raise UserError(f"train.threads: {setting} is more than this machine's {cpus.logical} CPU(s), which only "
                            f"slows training down; use at most {cpus.logical}, or auto")
        torch.set_num_threads(setting)
        return ThreadChoice(setting, str(setting), "train.threads", cpus)
    setting = setting or "auto"
    count, reason = torch.get_num_threads(), "torch's default"
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        reason = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS'].strip()}"
        load = None  # set from outside (a sweep gives each trial its share): its siblings are not "other load"
    else:
        load = load or machine.START or Load.start()  # from the command's start, where there was one
    if count > cpus.count:
        count, reason = cpus.count, cpus.reason
        torch.set_num_threads(count)
    return ThreadChoice(count, setting, reason, cpus, load)


def probe_if_busy(choice: ThreadChoice, make_step: Callable[[], Callable[[], int]], worth: bool = True) -> ThreadChoice:
    """When the machine was busy while the run started, time a step made by ``make_step`` (one training step on
    scratch copies, returning its image count) at the run's count and at the count that leaves the busy CPUs alone; say which
    was faster, and take it under ``fastest``. A run too short to be ``worth`` the probe's second only has the
    load recorded; a count given by number or from outside returns ``choice`` unchanged."""
    if not choice.probing:
        return choice
    others = choice.load.others_now()
    load = replace(choice.load, others=others)
    other = max(1, min(choice.count, round(choice.cpus.count - others)))
    if others < BUSY_CPUS or other == choice.count or not worth:
        return replace(choice, load=load)
    probe = time_counts(make_step(), [choice.count, other])
    torch.set_num_threads(choice.count)
    faster = max(probe, key=lambda count: probe[count])
    choice = replace(choice, load=load, probe=probe)
    busy = f"this machine is busy (other processes use {others:.1f} of its {choice.cpus.logical} CPUs)"
    speeds = ", ".join(f"{threads_text(count)} {rate:,.0f} img/s" for count, rate in
                       sorted(probe.items(), key=lambda item: -item[1]))
    if faster == choice.count:
        return replace(choice, line=f"{busy}; measured {speeds}: training with {threads_text(choice.count)}")
    if choice.setting == "fastest":
        torch.set_num_threads(faster)
        line = f"{busy}; measured {speeds}: training with {threads_text(faster)} (train.threads: fastest)"
        return replace(choice, count=faster, reason="fastest in the start-up probe", line=line)
    line = (f"{busy}; measured {speeds}: --threads {faster} would be faster, or train.threads: fastest "
            f"(auto keeps {choice.count}: the thread count changes seeded results)")
    return replace(choice, line=line)


def threads_text(count: int) -> str:
    return f"{count} thread{'s' if count != 1 else ''}"


def time_counts(step: Callable[[], int], counts: list[int]) -> dict[int, float]:
    """Images a second of ``step`` at each thread count: a warm-up step each, then rounds of
    ``PROBE_SECONDS`` per count in turn, so that a change in load hits both alike."""
    images = dict.fromkeys(counts, 0)
    seconds = dict.fromkeys(counts, 0.0)
    for count in counts:
        torch.set_num_threads(count)
        step()
    for _ in range(PROBE_ROUNDS):
        for count in counts:
            torch.set_num_threads(count)
            start = time.perf_counter()
            while True:
                images[count] += step()
                elapsed = time.perf_counter() - start
                if elapsed >= PROBE_SECONDS:
                    break
            seconds[count] += elapsed
    return {count: images[count] / seconds[count] for count in counts}


def scratch_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 loss_fn: Callable[..., torch.Tensor]) -> Callable[[], int]:
    """One forward and backward pass of a copy of ``model`` on ``batch``: the run's model, optimiser, random
    streams and BatchNorm statistics are left exactly as they were."""
    scratch = copy.deepcopy(model).train()
    x, y = batch

    def step() -> int:
        with torch.random.fork_rng(devices=[]):
            scratch.zero_grad(set_to_none=True)
            loss_fn(scratch(x), y).backward()
        return len(x)

    return step



def take_share(count: int) -> None:
    """Train this process's runs with ``count`` threads, a scheduler's share of the machine (a Ray trial's CPUs), as
    ``OMP_NUM_THREADS`` gives a sweep's trial its share: the other trials' load is then not a reason to probe."""
    count = max(1, count)
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)
