"""Usage: ``step = StaticStep.build(session, graphs=True)``; ``step.run_epoch(progress, ...)``.

The training step over static buffers, written once: on CUDA it is captured as a CUDA graph and
each batch is one replay (``train.cuda_graphs``); anywhere else the very same code runs eagerly,
which is how the CPU tests check it against the ordinary loop (``engine.train_one_epoch``).

One step, all on the device and at fixed shapes: the batch's indices are a slice of the epoch's
permutation at a device-side offset, the images are gathered, converted, normalised and augmented
(the data's own device generator), then forward, loss, backward, optional gradient clipping, SGD's
update with the learning rate as a device tensor (refreshed from the schedule before each step),
and the running loss and correct counts. The permutation is drawn exactly as ``Data.batches`` draws
it, and a last short batch goes through the ordinary step, so an epoch sees the same batches in the
same order either way. Only SGD is captured so far (PyTorch's own SGD reads a tensor learning rate
back to the host); other optimisers, fp16's gradient scaler and torch.compile fall back to the
ordinary loop with one line saying why.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from cnnlab.engine import Session
    from cnnlab.state import EpochProgress

WARMUP_STEPS = 3  # eager steps on a side stream before capture (CUDA's rule: allocations settle first)


def why_not(session: Session) -> str | None:
    """Why this run's step cannot be the static one (None: it can)."""
    cfg = session.cfg
    if cfg.optim.name != "sgd":
        return f"optim.name {cfg.optim.name}: only SGD's step is captured so far"
    if session.runtime.scaler is not None:
        return "precision fp16: its gradient scaler decides on the host whether to step"
    if cfg.train.compile:
        return "train.compile: torch.compile and the captured step are two ways to the same end; pick one"
    if session.world.distributed:
        return "torchrun: DistributedDataParallel's gradient hooks are not captured here"
    if session.data.num_batches("train", cfg.train.batch_size, shuffle=True) < WARMUP_STEPS + 1 and \
            session.runtime.device.type == "cuda":
        return "fewer batches in an epoch than the warm-up needs"
    return None


class StaticStep:
    """The step of ``session`` over static buffers; ``graphs``: capture and replay it (CUDA only)."""

    def __init__(self, session: Session, graphs: bool) -> None:
        self.session = session
        self.device = session.runtime.device
        self.graphs = graphs and self.device.type == "cuda"
        cfg, data = session.cfg, session.data
        self.batch_size = cfg.train.batch_size
        split = data.split("train")
        self.images, self.labels = split.images, split.labels
        self.order = torch.zeros(len(split), dtype=torch.long, device=self.device)  # the epoch's permutation
        self.start = torch.zeros((), dtype=torch.long, device=self.device)  # the next batch's first position
        self.offsets = torch.arange(self.batch_size, device=self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        group = session.optimizer.param_groups[0]
        self.lr = torch.tensor(float(group["lr"]), device=self.device)
        self.params = [p for p in session.model.parameters() if p.requires_grad]
        # The scheduler is stepped after this step's own SGD update, as after optimizer.step() in the
        # ordinary loop; PyTorch only sees that its optimiser's step() was never called, and would say so.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                                category=UserWarning)
        self.graph: Any = None
        self.steps_run = 0
        self.fallback: str | None = None  # why a capture that was tried did not happen

    # -- the step itself, written once ------------------------------------------------------

    def _body(self) -> None:
        session, data = self.session, self.session.data
        idx = self.order.index_select(0, self.start + self.offsets)
        x, y = data.prepare(self.images.index_select(0, idx)), self.labels.index_select(0, idx)
        if data.augment is not None and data.augment.active:
            x = data.augment(x, data.augment_generator)
        with self._autocast():
            logits = session.forward(x)
            loss = session.loss_fn(logits, y)
        for p in self.params:  # zeroed in place: the graph's gradients are static buffers too
            if p.grad is not None:
                p.grad.zero_()
        loss.backward()
        if session.cfg.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, session.cfg.train.grad_clip)
        self._sgd()
        self.loss_sum += loss.detach().float() * self.batch_size
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.start += self.batch_size

    def _autocast(self) -> contextlib.AbstractContextManager:
        runtime = self.session.runtime
        if runtime.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=not self.graphs)  # no cast cache in graphs

    @torch.no_grad()
    def _sgd(self) -> None:
        """torch.optim.SGD's update (momentum, dampening 0, Nesterov, weight decay) with the learning
        rate as a device tensor; its momentum buffers live in the optimiser's state, so checkpoints
        and the ordinary step share them."""
        group = self.session.optimizer.param_groups[0]
        momentum, decay, nesterov = group["momentum"], group["weight_decay"], group["nesterov"]
        state = self.session.optimizer.state
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        if decay:
            grads = torch._foreach_add(grads, params, alpha=decay)
        if momentum:
            buffers = []
            for p, g in zip(params, grads):
                buffer = state[p].get("momentum_buffer")
                if buffer is None:  # the first step: the buffer starts as the gradient
                    buffer = state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buffer.mul_(momentum).add_(g)
                buffers.append(buffer)
            grads = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
        torch._foreach_add_(params, torch._foreach_mul(grads, -self.lr))

    # -- running it --------------------------------------------------------------------------

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        generator = self.session.data.augment_generator
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            self._body()
        self.graph = graph

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.graphs and self.steps_run >= WARMUP_STEPS:
            torch.cuda.synchronize(self.device)
            saved = self.start.clone()
            try:
                self._capture()  # records without running; the replay below runs this batch
            except Exception as err:  # an operation that cannot be captured: go on eagerly, said once
                from cnnlab.errors import warn

                self.graph, self.graphs = None, False
                self.fallback = f"the step could not be captured ({type(err).__name__}: {err}); it runs eagerly"
                warn(f"train.cuda_graphs: {self.fallback}")
                self.start.copy_(saved)
                self._body()
                return
            self.start.copy_(saved)
            self.graph.replay()
            return
        if self.graphs:  # warm-up on a side stream, as CUDA graphs require
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
        else:
            self._body()
        self.steps_run += 1

    def run_epoch(self, progress: EpochProgress, permutation: torch.Tensor, full_batches: int,
                  rest: Callable[[], None], reporter: Any, stop: Any) -> None:
        """Train the epoch's full batches from ``progress.batches`` on, then ``rest`` (the ordinary
        step for a last short batch), adding into ``progress`` after every batch."""
        self.order.copy_(permutation)
        self.start.fill_(progress.batches * self.batch_size)
        self.loss_sum.copy_(progress.loss_sum)
        self.correct.copy_(progress.correct)
        progress.loss_sum, progress.correct = self.loss_sum, self.correct  # the same tensors from here on
        group = self.session.optimizer.param_groups[0]
        for _ in range(progress.batches, full_batches):
            self.lr.fill_(float(group["lr"]))
            self.step()
            self.session.scheduler.step()
            progress.seen += self.batch_size
            progress.batches += 1
            if reporter is not None:
                reporter.advance(progress.loss_sum, progress.correct, progress.seen)
            if stop is not None:
                stop.check()
        progress.loss_sum, progress.correct = self.loss_sum.clone(), self.correct.clone()
        rest()
