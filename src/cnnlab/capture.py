"""Usage: ``step = StaticStep(session, graph="cuda")``; ``step.train_epoch(progress, reporter, stop)``;
``StaticEval(session, "val", graph="cuda")(stop)``.

The training step and the evaluation step over static buffers, each written once and run one of
three ways (``train.cuda_graphs``):

- eagerly (``true`` off CUDA): the very code that a graph would hold, as plain PyTorch calls; the
  CPU tests check it against the ordinary loop (``steps.train_one_epoch``, ``steps.evaluate``);
- as a CUDA graph (``true``, or ``auto`` on CUDA): warmed up on a side stream, captured once, each
  batch one replay;
- as an emulated graph (``emulate``, any device): warmed up, recorded once at the level of
  PyTorch's operators, and each batch the recorded operators replayed with the arguments they were
  recorded with. What a CUDA graph freezes (every Python number, every shape, which tensors are
  read and written) is frozen here too, and what it cannot hold (a read-back to the host such as
  ``.item()``, a data-dependent shape) is refused the same way: a model or an option that would
  train wrongly or fail as a CUDA graph does so on the CPU as well, where the tests can see it.

One training step, all on the device and at fixed shapes: the batch's indices are a slice of the
epoch's permutation at a device-side offset, the images are gathered, converted, normalised and
augmented (the data's own device generator), then forward, loss, backward, optional gradient
clipping, SGD's update with the learning rate as a device tensor (refreshed from the schedule before
each step), and the running loss and correct counts. The permutation is drawn exactly as
``Data.batches`` draws it, and a last short batch goes through the ordinary step, so an epoch sees the
same batches in the same order either way. Only SGD is captured so far (PyTorch's own SGD reads a
tensor learning rate back to the host); other optimisers and fp16's gradient scaler fall back to the
ordinary loop with one line saying why; a step that fails to capture (a model that reads a value
back, say) runs eagerly from then on, with one line saying why. A compiled model (``train.compile``)
is captured inside the step when asked for by name (``train.cuda_graphs: true``): its fused kernels
in the whole-step graph; by default it keeps the ordinary step. The per-batch bookkeeping is the
ordinary step's (steps.py); a run's session is known here by what the steps train with
(``steps.Trainables``), so that this module imports nothing above it.

One evaluation step: a slice of the split at a device-side offset, converted and normalised, the
forward pass in eval mode, and the summed loss and correct counts; the per-epoch evaluation replays
it, the last short batch runs eagerly.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from cnnlab.listeners import Listener
from cnnlab.state import EpochProgress
from cnnlab.steps import Evaluation, Trainables, add_eval_batch, add_train_batch, batch_done, totals, train_one_epoch
from cnnlab.stopping import StopSignals

WARMUP_STEPS = 3  # eager steps before capture (CUDA's rule: allocations and cuDNN's choices settle first)

Graph = Literal["cuda", "emulated"] | None  # how a static step runs: a CUDA graph, its emulation, or eagerly


def graph_kind(wanted: bool | str, device: torch.device) -> Graph:
    """What ``train.cuda_graphs`` means on ``device``: the graph to capture, or None (eagerly)."""
    if wanted == "emulate":
        return "emulated"
    return "cuda" if device.type == "cuda" else None


def why_not(session: Trainables) -> str | None:
    """Why this run's step cannot be the static one (None: it can)."""
    cfg = session.cfg
    if cfg.optim.name != "sgd":
        return f"optim.name {cfg.optim.name}: only SGD's step is captured so far"
    if len(session.optimizer.param_groups) > 1:
        return "optim.backbone_lr: the captured SGD step updates with one learning rate so far"
    if session.runtime.scaler is not None:
        return "precision fp16: its gradient scaler decides on the host whether to step"
    if cfg.train.compile and cfg.train.cuda_graphs == "auto":
        return ("train.compile: the compiled model runs in the ordinary step (set train.cuda_graphs: true to "
                "capture the compiled model in the whole-step graph)")
    if isinstance(cfg.train.compile, str) and cfg.train.cuda_graphs is True:
        return (f"train.compile: {cfg.train.compile} makes CUDA graphs of its own, which cannot be captured "
                "inside the step's; use train.compile: true")
    if cfg.train.compile and cfg.train.cuda_graphs == "emulate":
        return "train.compile: compiled kernels bypass the PyTorch operators that the emulation records"
    if session.world.distributed:
        return "torchrun: DistributedDataParallel's gradient hooks are not captured here"
    ordinary_only = [name for name, on in (("train.ema", cfg.train.ema is not None),
                                           ("train.accumulate", cfg.train.accumulate > 1),
                                           ("data.augment.mixup", cfg.data.augment.mixup > 0),
                                           ("data.augment.cutmix", cfg.data.augment.cutmix > 0)) if on]
    if ordinary_only:
        return f"{', '.join(ordinary_only)}: the ordinary step runs {'them' if len(ordinary_only) > 1 else 'it'} so far"
    if session.data.placement != "device":
        return f"data.placement: the data is not whole on the device ({session.data.placement}), and a graph cannot copy it there"
    return None


# ---------------------------------------------------------------------------------------------
# Running a step function: eagerly, or captured once and replayed


class HostRead(RuntimeError):
    """An operation inside a captured step that a graph cannot hold."""


_REFUSED = {
    torch.ops.aten._local_scalar_dense.default: "reads a tensor's value back to the host (.item(), float(t), `if t:`)",
    torch.ops.aten.nonzero.default: "has a data-dependent shape (nonzero, boolean-mask indexing)",
    torch.ops.aten.masked_select.default: "has a data-dependent shape (masked_select)",
}


def _refusal(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why a CUDA graph cannot hold this operator call (None: it can)."""
    refused = _REFUSED.get(func)
    if refused is not None:
        return refused
    if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):  # t.cpu(), t.to("cpu")
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu":
            return "copies a tensor from the device to the host"
    if func is torch.ops.aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
        return "copies a tensor from the device to the host"
    return None


class _Before:
    """A tensor made before the capture, as a recorded call holds it: weakly, as a CUDA graph holds
    only its address. Reading it after it was freed is an error here, and freed memory there."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.what = f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"

    def get(self) -> torch.Tensor:
        tensor = self.ref()
        if tensor is None:
            raise RuntimeError(f"a tensor the captured step reads ({self.what}) was freed after the capture "
                               "(a CUDA graph would read freed memory): keep the step's tensors alive")
        return tensor


class _Recorder(TorchDispatchMode):
    """Runs every operator call below autograd (the forward, the backward, the update), refusing what a
    CUDA graph cannot hold; with ``record``, also records them: tensors made inside the step strongly
    (a graph's own memory), tensors made before it weakly."""

    def __init__(self, record: bool = True) -> None:
        super().__init__()
        self.record = record
        self.calls: list[tuple[Any, tuple, dict, list]] = []
        self.made: set[int] = set()  # ids of the tensors the recorded calls made (kept alive by self.calls)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        refused = _refusal(func, args, kwargs)
        if refused is not None:
            raise HostRead(f"the step {refused}, which a CUDA graph cannot hold")
        out = func(*args, **kwargs)
        if self.record:
            inputs = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
            outputs = []
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and id(value) in inputs and id(value) not in self.made:
                    value = None  # written in place into a tensor from before: nothing new to stand in for
                elif isinstance(value, torch.Tensor):
                    self.made.add(id(value))
                outputs.append(value)
            self.calls.append((func, tree_map(self._held, args), tree_map(self._held, kwargs), outputs))
        return out

    def _held(self, value: Any) -> Any:
        return _Before(value) if isinstance(value, torch.Tensor) and id(value) not in self.made else value


class EmulatedGraph:
    """A CUDA graph's semantics on any device: ``capture`` runs ``body`` once, recording each operator
    call with its arguments; ``replay`` calls them again with the very same arguments (the same
    tensors, numbers, shapes and generators), each result standing in for the recorded one in the
    calls after it. Tensors made before the capture (parameters, gradients, optimiser state, the
    static buffers) are read and written in place, as a CUDA graph's kernels would, and held only
    weakly: a step that lets one be freed (a gradient set to None) fails here as it would corrupt
    memory there."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple, dict, list]] = []

    def capture(self, body: Callable[[], None]) -> None:
        recorder = _Recorder()
        with recorder:
            body()
        self.calls = recorder.calls  # the tensors made inside stay referenced: their ids stay theirs

    @torch.no_grad()  # the recorded calls include the backward's: autograd must not record them again
    def replay(self) -> None:
        fresh: dict[int, torch.Tensor] = {}

        def current(value: Any) -> Any:
            if isinstance(value, _Before):
                return value.get()
            return fresh.get(id(value), value) if isinstance(value, torch.Tensor) else value

        for func, args, kwargs, outputs in self.calls:
            result = func(*tree_map(current, args), **tree_map(current, kwargs))
            for recorded, now in zip(outputs, tree_flatten(result)[0], strict=True):
                if isinstance(recorded, torch.Tensor):
                    fresh[id(recorded)] = now


class Captured:
    """``body`` (a step over static buffers) as the run asks: eagerly (``graph`` None); or run
    ``WARMUP_STEPS`` times eagerly, then captured once and replayed on every call after (``cuda``,
    ``emulated``). The last warm-up step runs under the emulation's checks: an operator a graph
    cannot hold (a read-back to the host) is found there, said in one line (``fallback``), and the
    body runs eagerly from then on. A CUDA capture that fails even so: under ``train.cuda_graphs: auto``
    (``strict`` False) the body runs eagerly from then on too, said the same way, and only if that fails
    as well (a failed capture can leave CUDA's state unusable) does the run end; asked for by name
    (``strict``), the run ends with advice. ``generators``: the explicit random generators the body draws
    from (a CUDA graph must be told)."""

    def __init__(self, body: Callable[[], None], graph: Graph, device: torch.device, what: str,
                 generators: tuple[torch.Generator, ...] = (), strict: bool = True) -> None:
        self.body, self.kind, self.device, self.what, self.generators = body, graph, device, what, generators
        self.strict = strict
        self.graph: Any = None
        self.calls = 0
        self.fallback: str | None = None
        self.stream: Any = None  # CUDA: the side stream of the warm-up and the capture

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.kind is None:
            self.body()
        elif self.calls < WARMUP_STEPS - 1:
            self._warm_up(self.body)
        elif self.calls == WARMUP_STEPS - 1:
            self._warm_up(self._checked)
        else:
            self._capture()
        self.calls += 1

    def _checked(self) -> None:
        try:
            with _Recorder(record=False):
                self.body()
        except HostRead as err:
            self._eagerly_from_now(f"the {self.what} cannot be captured ({err}); it runs eagerly")
            self.body()  # (the operators before the refused one ran already: they run again)

    def _eagerly_from_now(self, reason: str) -> None:
        from cnnlab.errors import warn

        self.kind, self.graph, self.fallback = None, None, reason
        warn(f"train.cuda_graphs: {reason}")

    def _warm_up(self, body: Callable[[], None]) -> None:
        if self.kind != "cuda":
            body()
            return
        with torch.cuda.device(self.device):
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # graphs want the warm-up on a side stream
            with torch.cuda.stream(self.stream):
                body()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _capture(self) -> None:
        if self.kind == "emulated":
            graph = EmulatedGraph()
            graph.capture(self.body)  # recorded while it runs: this call's batch is done
            self.graph = graph
            return
        try:
            with torch.cuda.device(self.device):
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                for generator in self.generators:
                    graph.register_generator_state(generator)
                with torch.cuda.graph(graph, stream=self.stream):
                    self.body()  # recorded, not run: the replay below runs this call's batch
                graph.replay()
        except Exception as err:
            from cnnlab.errors import TrainingError

            failure = f"{type(err).__name__}: {err}"
            if self.strict:
                raise TrainingError(f"train.cuda_graphs: the {self.what} could not be captured as a CUDA graph "
                                    f"({failure}); run it with train.cuda_graphs: false or auto") from err
            # Nothing of this call's batch ran (a capture records, it does not run): it runs now, eagerly.
            self._eagerly_from_now(f"the {self.what} could not be captured as a CUDA graph ({failure}); it runs eagerly")
            try:
                self.body()
            except Exception as again:
                raise TrainingError(f"train.cuda_graphs: the {self.what} could not be captured as a CUDA graph "
                                    f"({failure}), and failed eagerly after it ({type(again).__name__}: {again}); "
                                    "run it with train.cuda_graphs: false") from again
            return
        self.graph = graph


def _autocast(session: Trainables, graph: Graph) -> contextlib.AbstractContextManager:
    runtime = session.runtime
    if runtime.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float16
    # No cast cache inside a graph: the cache is emptied when autocast exits, and a replay would read freed memory.
    return torch.autocast(runtime.device.type, dtype=dtype, cache_enabled=graph is None)


# ---------------------------------------------------------------------------------------------
# The training step


class StaticStep:
    """The training step of ``session`` over static buffers, run as ``graph`` says."""

    def __init__(self, session: Trainables, graph: Graph) -> None:
        self.session = session
        self.device = device = session.runtime.device
        cfg, data = session.cfg, session.data
        self.batch_size = cfg.train.batch_size
        split = data.split("train")
        self.images, self.labels = split.images, split.labels
        self.order = torch.zeros(len(split), dtype=torch.long, device=device)  # the epoch's permutation
        self.start = torch.zeros((), dtype=torch.long, device=device)  # the next batch's first position
        self.offsets = torch.arange(self.batch_size, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        group = session.optimizer.param_groups[0]
        self.lr = torch.tensor(float(group["lr"]), device=device)
        self.params = [p for p in session.model.parameters() if p.requires_grad]
        # The scheduler is stepped after this step's own SGD update, as after optimizer.step() in the
        # ordinary loop; PyTorch only sees that its optimiser's step() was never called, and would say so.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
                                category=UserWarning)
        generators = (data.augment_generator,) if data.augment_generator is not None else ()
        self.graph_kind = graph
        self.pinned: list[tuple[torch.Tensor, Any, Any]] | None = None
        self.step = Captured(self._body, graph, device, "training step", generators,
                             strict=session.cfg.train.cuda_graphs is True)

    @property
    def kind(self) -> str:
        """What summary.json's train_step says: cuda-graph, emulated-graph or static (eagerly)."""
        return {"cuda": "cuda-graph", "emulated": "emulated-graph"}.get(self.step.kind or "", "static")

    # -- the step itself, written once ------------------------------------------------------

    def _body(self) -> None:
        session, data = self.session, self.session.data
        idx = self.order.index_select(0, self.start + self.offsets)
        x, y = data.training_input(self.images.index_select(0, idx)), self.labels.index_select(0, idx)
        with _autocast(session, self.graph_kind):
            logits = session.forward(x)
            loss = session.loss_fn(logits, y)
        for p in self.params:  # zeroed in place: the graph's gradients are static buffers too
            if p.grad is not None:
                p.grad.zero_()
        loss.backward()
        if session.cfg.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, session.cfg.train.grad_clip)
        self._sgd()
        add_train_batch(self.loss_sum, self.correct, loss, logits, y, self.batch_size)
        self.start += self.batch_size

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

    def _pin(self) -> None:
        """The gradients and momentum buffers a captured graph reads and writes, in place again. The
        ordinary step of an epoch's short last batch sets gradients to None (they would be freed
        under the graph) and PyTorch's SGD keeps its buffers where they are, but a graph must not
        depend on that: the tensors of the capture are held here and put back."""
        if self.step.graph is None:
            return
        state = self.session.optimizer.state
        if self.pinned is None:  # just after the capture, these are the graph's tensors
            self.pinned = [(p, p.grad, state[p].get("momentum_buffer")) for p in self.params]
        for p, grad, buffer in self.pinned:
            if p.grad is not grad:
                p.grad = grad  # its values do not matter: the step zeroes it first
            current = state[p].get("momentum_buffer")
            if buffer is not None and current is not buffer:
                buffer.copy_(current)
                state[p]["momentum_buffer"] = buffer

    def train_epoch(self, progress: EpochProgress, reporter: Listener, stop: StopSignals) -> dict[str, float]:
        """One epoch through this step: the same permutation ``Data.batches`` draws, its full batches
        replayed (or run eagerly), a last short batch through the ordinary step."""
        session = self.session
        cfg, data = session.cfg, session.data
        batch_size, n = cfg.train.batch_size, len(data.train)
        used = data.num_batches("train", batch_size, shuffle=True) * batch_size  # as Data.batches, a short last one counted
        full = min(n, used) // batch_size
        permutation = torch.randperm(n, generator=session.order).to(data.train.images.device)
        session.forward.train()
        start = time.perf_counter()
        try:
            self.run_epoch(progress, permutation, full, reporter, stop)
        finally:
            progress.seconds += time.perf_counter() - start
        session.order.set_state(progress.order_state)  # the same permutation again, for the short last batch
        rest = data.batches("train", batch_size, shuffle=True, generator=session.order, skip=full) if progress.batches < \
            session.steps_per_epoch else iter(())
        return train_one_epoch(session.forward, rest, session.optimizer, session.scheduler, session.loss_fn, session.runtime,
                               cfg.train.grad_clip, reporter, progress=progress, stop=stop)

    def run_epoch(self, progress: EpochProgress, permutation: torch.Tensor, full_batches: int,
                  reporter: Listener | None, stop: StopSignals | None) -> None:
        """Train the epoch's full batches from ``progress.batches`` on, adding into ``progress``
        after every batch (a last short batch is the caller's, through the ordinary step)."""
        self._pin()
        self.order.copy_(permutation)
        self.start.fill_(progress.batches * self.batch_size)
        self.loss_sum.copy_(progress.loss_sum)
        self.correct.copy_(progress.correct)
        progress.loss_sum, progress.correct = self.loss_sum, self.correct  # the same tensors from here on
        group = self.session.optimizer.param_groups[0]
        try:
            for _ in range(progress.batches, full_batches):
                self.lr.fill_(float(group["lr"]))
                self.step()
                self.session.scheduler.step()
                batch_done(progress, self.batch_size, reporter, stop)
        finally:  # the sums leave the static buffers, which the next epoch overwrites
            progress.loss_sum, progress.correct = self.loss_sum.clone(), self.correct.clone()
            self._pin()  # before the short last batch's ordinary step: the capture's tensors, held


# ---------------------------------------------------------------------------------------------
# The evaluation step


class StaticEval:
    """The per-epoch evaluation of split ``name`` over static buffers, run as ``graph`` says: the same
    figures as ``steps.evaluate`` (full batches of ``train.eval_batch_size`` replayed, the last
    short one eagerly)."""

    def __init__(self, session: Trainables, name: str, graph: Graph) -> None:
        self.session = session
        device = session.runtime.device
        split = session.data.split(name)
        self.images, self.labels, self.n = split.images, split.labels, len(split)
        self.batch_size = min(session.cfg.train.eval_batch_size, self.n)
        self.full = self.n // self.batch_size
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(self.batch_size, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.graph_kind = graph
        self.step = Captured(self._full_batch, graph, device, "evaluation step",
                             strict=session.cfg.train.cuda_graphs is True)

    def _batch(self, idx: torch.Tensor) -> None:
        session = self.session
        x, y = session.data.prepare(self.images.index_select(0, idx)), self.labels.index_select(0, idx)
        with _autocast(session, self.graph_kind):
            logits = session.forward(x)
        add_eval_batch(self.loss_sum, self.correct, logits, y)

    def _full_batch(self) -> None:
        self._batch(self.start + self.offsets)
        self.start += self.batch_size

    def __call__(self, stop: StopSignals | None = None) -> Evaluation:
        """Mean cross-entropy and accuracy over the split, as ``steps.evaluate`` gives them."""
        self.session.forward.eval()
        self.start.zero_()
        self.loss_sum.zero_()
        self.correct.zero_()
        with torch.no_grad():
            for _ in range(self.full):
                self.step()
                if stop is not None:
                    stop.check()
            if self.full * self.batch_size < self.n:
                self._batch(torch.arange(self.full * self.batch_size, self.n, device=self.start.device))
        loss_sum, correct, seen = totals(self.loss_sum, self.correct, self.n, None)
        return Evaluation(loss_sum / seen, correct / seen, seen)
