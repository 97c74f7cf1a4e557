"""Usage: ``make_activation("relu")``: building blocks shared by the model builders."""

from __future__ import annotations

import itertools
from typing import Literal, get_args

import torch
from torch import nn

ActivationName = Literal["sigmoid", "relu", "tanh", "gelu", "silu", "elu", "leaky_relu", "mish", "identity"]
PoolName = Literal["avg", "max"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "mish": nn.Mish,
    "identity": nn.Identity,
}
assert set(_ACTIVATIONS) == set(get_args(ActivationName))


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def make_pool(kind: str, kernel_size: int = 2, stride: int = 2) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(kernel_size, stride)
    if kind == "max":
        return nn.MaxPool2d(kernel_size, stride)
    raise ValueError(f"unknown pooling {kind!r}; choose avg or max")


class Residual(nn.Module):
    """The report's (and d2l's) basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the input, then ReLU.

    The shortcut goes through a 1x1 conv with the same stride when ``use_1x1conv`` (shapes change).
    """

    def __init__(self, in_channels: int, out_channels: int, use_1x1conv: bool = False, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None

    def forward(self, x):
        y = nn.functional.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = self.conv3(x) if self.conv3 is not None else x
        return nn.functional.relu(y + shortcut)


class Inception(nn.Module):
    """GoogLeNet's Inception block as the report built it: four branches concatenated on channels.

    1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1. A ReLU only between a branch's two convs
    (the report applied none to the branch outputs).
    """

    def __init__(self, in_channels: int, ch1: int, ch2: tuple[int, int], ch3: tuple[int, int], ch4: int) -> None:
        super().__init__()
        self.p1_1 = nn.Conv2d(in_channels, ch1, 1)
        self.p2_1 = nn.Conv2d(in_channels, ch2[0], 1)
        self.p2_2 = nn.Conv2d(ch2[0], ch2[1], 3, padding=1)
        self.p3_1 = nn.Conv2d(in_channels, ch3[0], 1)
        self.p3_2 = nn.Conv2d(ch3[0], ch3[1], 5, padding=2)
        self.p4_1 = nn.MaxPool2d(3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, ch4, 1)
        self.out_channels = ch1 + ch2[1] + ch3[1] + ch4

    def forward(self, x):
        relu = nn.functional.relu
        p1 = self.p1_1(x)
        p2 = self.p2_2(relu(self.p2_1(x)))
        p3 = self.p3_2(relu(self.p3_1(x)))
        p4 = self.p4_2(self.p4_1(x))
        return torch.cat((p1, p2, p3, p4), dim=1)


Side = int | tuple[int, int]  # an image size: one side of a square, or (height, width)


def sides(size: Side) -> tuple[int, int]:
    """(height, width) of an image size given as one side or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class MapVanishes(ValueError):
    """A model's feature map shrinks to nothing at one of its layers for the images it is given."""

    def __init__(self, shape: tuple[int, int, int], layer: str, kind: str, before: tuple[int, int], after: tuple[int, int],
                 smallest: int | None) -> None:
        self.shape, self.layer, self.kind, self.before, self.after, self.smallest = shape, layer, kind, before, after, smallest
        hint = f"; use data.image_size >= {smallest}" if smallest else ""
        size = "x".join(str(max(0, side)) for side in after)
        super().__init__(f"the feature map vanishes at {layer} ({kind}): {before[0]}x{before[1]} -> {size}{hint}")

    def for_model(self, name: str) -> str:
        """The one line a user reads: ``model vgg11 does not fit 1x8x8 images: the feature map vanishes at ...``."""
        return f"model {name} does not fit {'x'.join(map(str, self.shape))} images: {self}"


class _Vanished(Exception):
    def __init__(self, found: Vanishing) -> None:
        self.found = found


def _window_output(module: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (height, width) a conv or pooling layer makes of a map of ``size``; None for other layers."""
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) or getattr(module, "padding", 0) == "same":
        return None
    pair = nn.modules.utils._pair
    padding = pair(0 if module.padding == "valid" else module.padding)
    kernel, stride = pair(module.kernel_size), pair(module.stride or module.kernel_size)
    dilation = pair(getattr(module, "dilation", 1))
    return tuple((side + 2 * p - d * (k - 1) - 1) // s + 1
                 for side, k, s, p, d in zip(size, kernel, stride, padding, dilation))


Vanishing = tuple[str, str, tuple[int, int], tuple[int, int]]  # layer name, layer type, map size in, map size out


def vanishing_point(model: nn.Module, input_shape: tuple[int, int, int]) -> Vanishing | None:
    """(layer name, layer type, map size in, map size out) of the first layer of ``model`` that shrinks a
    (channels, height, width) input's feature map to nothing; None when none does.

    A shape trace (``shape_trace``: no arithmetic, no memory, no random numbers drawn): forward
    pre-hooks compute each conv's and pool's output size before it runs, forward hooks catch any other
    layer that returns an empty map. A model that fails for any other reason is not this check's to
    report (``session.check_model`` runs it on real images).
    """
    names = {module: name or type(model).__name__ for name, module in model.named_modules()}

    def before(module: nn.Module, args: tuple) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.dim() == 4:
            size = (int(x.shape[2]), int(x.shape[3]))
            out = _window_output(module, size)
            if out is not None and min(out) < 1:
                raise _Vanished((names[module], type(module).__name__, size, out))

    def after(module: nn.Module, args: tuple, out: object) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.dim() == 4 and isinstance(out, torch.Tensor) and out.dim() == 4 and 0 in out.shape[2:]:
            raise _Vanished((names[module], type(module).__name__, tuple(x.shape[2:]), tuple(out.shape[2:])))

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        shape_trace(model, input_shape)
    except _Vanished as vanished:
        return vanished.found
    except KeyboardInterrupt:
        raise
    except BaseException:  # any other failure (user code may even call sys.exit) is not a vanishing map: check_model
        return None  # reports it, on real images
    finally:
        for handle in handles:
            handle.remove()
    return None


def shape_trace(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.Size:
    """The shape of ``model``'s output for one image of ``input_shape``, without computing it: the model runs
    an empty batch (PyTorch's layers take batches of 0 images, at no cost) on its own device; where that fails
    (a forward that does ``x.view(x.size(0), -1)`` or asserts a batch), and for a model with lazy modules
    (which would make their weights), one image on the meta device. The empty batch comes first because on
    the meta device most operations import ``torch._dynamo`` (0.7-1.5 s of a run's start).
    The model runs in eval mode (BatchNorm takes one image) and is left in the modes it was in; hooks see
    the empty batch first, and then maybe the meta one."""
    was_training = {m: m.training for m in model.modules()}
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    lazy = any(isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params() for m in model.modules())
    try:
        with torch.no_grad():
            if not lazy:  # a lazy module would make its weights here, drawing random numbers
                try:
                    return model.eval()(torch.zeros(0, *input_shape, device=device, dtype=dtype)).shape[1:]
                except _Vanished:
                    raise
                except Exception:  # any forward that refuses an empty batch: the meta device's turn
                    pass
            meta = {name: torch.empty_like(t, device="meta")
                    for name, t in (*model.named_parameters(), *model.named_buffers())}
            out = torch.func.functional_call(model.eval(), meta, (torch.zeros(1, *input_shape, device="meta"),))
            return out.shape[1:]
    finally:
        for module, mode in was_training.items():
            module.training = mode


def smallest_fitting_side(model: nn.Module, channels: int, start: int) -> int | None:
    """The smallest square side above ``start`` whose map does not vanish in ``model`` (None beyond 8192)."""
    low, high = start, start
    while vanishing_point(model, (channels, high, high)) is not None:
        low, high = high, high * 2
        if high > 8192:
            return None
    while high - low > 1:  # low vanishes, high fits
        mid = (low + high) // 2
        low, high = (mid, high) if vanishing_point(model, (channels, mid, mid)) is not None else (low, mid)
    return high


def check_fits(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Raise ``MapVanishes`` naming the layer where an image of ``input_shape`` shrinks to nothing."""
    found = vanishing_point(model, input_shape)
    if found is not None:
        raise MapVanishes(input_shape, *found, smallest_fitting_side(model, input_shape[0], max(1, min(input_shape[1:]))))


def flat_features(layers: list[nn.Module], in_channels: int, image_size: Side) -> int:
    """Features per image after ``layers`` (a model's convolutional part), found by a shape trace; a map
    that vanishes on the way is a ``MapVanishes`` naming the layer."""
    body = nn.Sequential(*layers)
    shape = (in_channels, *sides(image_size))
    check_fits(body, shape)
    return shape_trace(body, shape).numel()
