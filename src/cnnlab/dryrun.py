"""Usage: ``estimate = measure(load_config("configs/resnet9.yaml"))``; ``estimate.line()``.

A run checked and timed before it starts (``cnnlab run --dry-run``, ``sweep --dry-run``, ``tune
--dry-run``): its session is prepared as for training (data read and placed, model built and tried,
optimiser made: every error a run would meet before its first batch), then a few training steps and
evaluation batches are timed on this machine, as it is loaded now, and scaled to an epoch and to the
whole run. Nothing is written: no run folder, no checkpoint, no decoding cache of a folder data set
(``prepared``: it is decoded, and said to be kept nowhere); the timed steps change only the prepared
model, which is thrown away with the session.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cnnlab.config import Config
from cnnlab.data import cache
from cnnlab.numtext import duration_text
from cnnlab.session import Session, prepare
from cnnlab.steps import evaluate, train_one_epoch, tta_views

TIMED_STEPS = 7  # training batches timed (the median of them) after one untimed warm-up batch
TIMED_EVAL_BATCHES = 2


@dataclass(frozen=True)
class Estimate:
    """What a few timed batches say of a run on this machine now."""

    step_seconds: float  # one training batch
    batch_size: int
    steps_per_epoch: int
    eval_seconds: float  # one epoch's evaluation (validation, or the test set in the report's mode)
    test_seconds: float  # the final test pass
    epochs: int
    train_step: str  # the step timed: the ordinary one (the static CUDA-graph step is not timed here)

    @property
    def epoch_seconds(self) -> float:
        return self.step_seconds * self.steps_per_epoch + self.eval_seconds

    @property
    def total_seconds(self) -> float:
        return self.epoch_seconds * self.epochs + self.test_seconds

    @property
    def images_per_second(self) -> float:
        return self.batch_size / max(self.step_seconds, 1e-9)

    def line(self) -> str:
        return (f"timed: {self.step_seconds * 1000:,.0f} ms a training batch of {self.batch_size} "
                f"({self.images_per_second:,.0f} img/s, {self.train_step} step); about "
                f"{duration_text(self.epoch_seconds)} an epoch of {self.steps_per_epoch:,} batches with its evaluation, "
                f"{duration_text(self.total_seconds)} for {self.epochs} epoch{'s' * (self.epochs != 1)} and the test "
                "(on this machine as loaded now)")


@contextlib.contextmanager
def nothing_written() -> Iterator[None]:
    """Inside it, what reading data would keep on disk is not written (the decoding cache; ``cache.WRITES``)."""
    token = cache.WRITES.set(False)
    try:
        yield
    finally:
        cache.WRITES.reset(token)


def prepared(cfg: Config) -> Session:
    """``cfg``'s session prepared as for training (bad input raises ``UserError`` as ``cnnlab run`` would), writing
    nothing."""
    with nothing_written():
        return prepare(cfg)


def measure(cfg: Config, session: Session | None = None) -> Estimate:
    """Prepare ``cfg``'s session (``prepared``) and time it."""
    session = session or prepared(cfg)
    data, batch_size = session.data, cfg.train.batch_size
    batches = data.batches("train", batch_size, shuffle=True, generator=session.order)
    timed = min(TIMED_STEPS, max(session.steps_per_epoch - 1, 1))

    def train(count: int) -> None:  # the loop a run trains with, its batches drawn as it draws them
        train_one_epoch(session.forward, itertools.islice(batches, count), session.optimizer, session.scheduler,
                        session.loss_fn, session.runtime, cfg.train.grad_clip, mix=data.mix,
                        accumulate=cfg.train.accumulate, average=session.average)

    train(1)  # warm-up: first-call costs are start-up, not a step's
    times = []
    for _ in range(timed):  # each step timed alone: the median stands still when another job takes the CPU a moment
        start = _now(session)
        train(1)
        times.append(_now(session) - start)
    step_seconds = statistics.median(times)
    eval_split = data.eval_split_name
    eval_batches = data.num_batches(eval_split, cfg.train.eval_batch_size)
    test_batches = data.num_batches("test", cfg.train.eval_batch_size)
    sample = list(itertools.islice(data.batches(eval_split, cfg.train.eval_batch_size), TIMED_EVAL_BATCHES))
    start = _now(session)
    evaluate(session.forward, sample, session.runtime)
    per_eval_batch = (_now(session) - start) / max(len(sample), 1)
    # train.ema evaluates the averaged weights too; the test pass adds each of eval.tta's views; train.swa, at the
    # end, a pass over the training images (BatchNorm's statistics), the validation split and the test passes
    weights = 2 if session.average is not None else 1
    tested = weights + (session.swa is not None)
    test_passes = tested * (1 + (len(tta_views(sample[0][0][:1], cfg.eval.tta)) if cfg.eval.tta and sample else 0))
    if session.swa is not None:
        test_passes += eval_batches / max(test_batches, 1) + data.num_batches("train", cfg.train.eval_batch_size) / \
            max(test_batches, 1)
    return Estimate(step_seconds, batch_size, session.steps_per_epoch, per_eval_batch * eval_batches * weights,
                    per_eval_batch * test_batches * test_passes, cfg.train.epochs, "ordinary")


def _now(session: Session) -> float:
    if session.runtime.device.type == "cuda":
        torch.cuda.synchronize(session.runtime.device)
    return time.perf_counter()


def total_text(estimates: list[Estimate], jobs: int) -> str:
    """A sweep's estimate: its trials' times added, divided among ``jobs`` at once (as they share the machine,
    a rough figure: trials at once each run slower)."""
    total = sum(e.total_seconds for e in estimates)
    if jobs <= 1:
        return f"about {duration_text(total)} in all, one trial at a time"
    return (f"about {duration_text(total)} of training in all; with {jobs} at a time at least "
            f"{duration_text(total / jobs)} (trials at once share the machine, each slower)")
