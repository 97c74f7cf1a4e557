"""Usage: ``visualize(run_dir, layer="3")``: what a trained network's layers see, as PNG files.

Three pictures of one image (section 6.5 of the lab report and beyond): every channel of a layer's
output as a near-square grid of tiles (``feature maps``), the learned kernels of a conv layer
(``filters``), and a Grad-CAM heat map of the predicted class over the input (``cam``). Layers are
named as the report did, by index into the model's top-level layers (0 = LeNet's first conv,
3 = its second), or by dotted module name (``stage1.0.conv1``).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab.data import Data
from cnnlab.errors import UserError, warn
from cnnlab.modelinfo import profile, short_repr
from cnnlab.results import check_output_file
from cnnlab.runs import open_run
from cnnlab.safetext import one_line, plot_label


@dataclass
class Picture:
    path: Path
    tiles: int  # how many tiles the grid holds (channels or kernels); 0 for a heat map
    layer: str
    image_index: int
    true_label: str
    predicted_label: str
    used: str = ""  # the run, checkpoint and weights drawn, in words (OpenedRun.used_line)


def resolve_layer(model: nn.Module, spec: str) -> tuple[str, nn.Module]:
    """``"3"`` -> the 4th top-level layer; ``"features.0"`` -> that submodule. Errors list the choices."""
    children = list(model.named_children())
    spec = spec.strip()
    if not spec:
        raise UserError("--layer: empty; give a top-level layer index such as 3, or a module name (see --list-layers)")
    if spec.lstrip("-").isdigit():
        index = int(spec)
        if not -len(children) <= index < len(children):
            raise UserError(
                f"--layer {index}: the model has {len(children)} top-level layers (0-{len(children) - 1}); "
                "see them with --list-layers"
            )
        return children[index]
    try:
        return spec, model.get_submodule(spec)
    except (AttributeError, ValueError, TypeError):
        top = ", ".join(name for name, _ in children)
        raise UserError(f"--layer {spec!r}: no such layer; top-level layers: {top} (see --list-layers)") from None


def layer_rows(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(index, name and layer, output shape) of every top-level layer for one image of ``input_shape``, for --list-layers."""
    rows, _ = profile(model, input_shape)
    return [(str(i), f"{row.name}: {row.layer}" if not row.name.isdigit() else row.layer,
             "x".join(map(str, row.output_shape))) for i, row in enumerate(rows)]


def pick_image(data: Data, split: str, image: int | None, class_name: str | None) -> int:
    labels, classes = data.split(split).labels, data.spec.classes
    if class_name is not None:
        def norm(text: str) -> str:
            return unicodedata.normalize("NFC", text).strip().lower().replace("-", " ").replace("_", " ")

        wanted = norm(class_name)
        matches = [i for i, name in enumerate(classes)
                   if wanted in (norm(name), norm(name.split("/")[0]), str(i))]
        if not matches:
            raise UserError(f"--class {class_name!r}: not a {data.spec.title} class; choose one of "
                            f"{', '.join(map(one_line, classes))}")
        positions = (labels == matches[0]).nonzero()
        if not len(positions):
            raise UserError(f"--class {class_name!r}: no such image in the {split} split")
        start = image or 0
        if start >= len(positions):
            raise UserError(f"--image {start}: the {split} split has {len(positions)} images of class "
                            f"{one_line(classes[matches[0]])}")
        return int(positions[start])
    index = image or 0
    if not 0 <= index < len(labels):
        raise UserError(f"--image {index}: the {split} split has {len(labels)} images (0-{len(labels) - 1})")
    return index


def capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, grad: bool = False):
    """(logits, the layer's output) for input ``x``; the output keeps its graph when ``grad``."""
    seen: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
    try:
        with torch.set_grad_enabled(grad):
            logits = model(x)
    finally:
        hook.remove()
    if "out" not in seen:
        raise UserError("that layer is not used in the model's forward pass; pick another (see --list-layers)")
    return logits, seen["out"]


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of a near-square grid for ``n`` tiles (6 -> 2x3, 16 -> 4x4)."""
    rows = max(1, int(math.floor(math.sqrt(n))))
    return rows, math.ceil(n / rows)


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM: the layer's channels weighted by the mean gradient of the target score, ReLU, upsampled."""
    logits, activation = capture(model, layer, x, grad=True)
    if activation.dim() != 4:
        raise UserError("--cam needs a layer whose output is an image (channels x height x width), e.g. a conv layer")
    gradient, = torch.autograd.grad(logits[0, target], activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).detach() if cam.max() > 0 else cam.detach()


def cam_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The default layer for Grad-CAM: the last top-level layer with an image output, pooling layers
    passed over, whose map of ``x``'s predicted class carries signal (varies over the image); the last
    such layer when none does.

    A pooling layer only re-grids what the layer before it holds, coarser. A map is all zero where the
    class-weighted channels sum below zero everywhere: for configs/lenet.yaml trained 20 epochs, on 90
    of the first 200 test images at its second AvgPool, 69 at the Sigmoid before it, 23 at the conv.
    """
    rows, _ = profile(model, tuple(x.shape[1:]))
    pooling = nn.MaxPool2d.__module__  # torch.nn.modules.pooling, home of every torch pooling layer
    candidates = [str(i) for i, (row, (_, module)) in enumerate(zip(rows, model.named_children()))
                  if len(row.output_shape) == 3 and type(module).__module__ != pooling]
    if not candidates:
        raise UserError("the model has no top-level layer with an image output; pass --layer")
    with torch.no_grad():
        target = int(model(x).argmax(1))
    for spec in reversed(candidates):
        heat = grad_cam(model, resolve_layer(model, spec)[1], x, target)
        if heat.max() > heat.min():
            return spec
    return candidates[-1]


def cam_figure(raw, heat: torch.Tensor, caption: str, title: str):
    """The input image beside it with the Grad-CAM map over it, and a colour bar for the map."""
    from cnnlab.plots import plt

    fig = plt.figure(figsize=(8.6, 4.2), dpi=110)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.imshow(raw, cmap="gray")
    left.set_title(caption, fontsize=9)
    right.imshow(raw, cmap="gray")
    shown = right.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    right.set_title(title, fontsize=9)
    for axis in (left, right):
        axis.axis("off")
    fig.colorbar(shown, ax=right, fraction=0.046, pad=0.04, label="Grad-CAM, share of its peak")
    return fig


def visualize(
    run_dir: Path,
    layer: str | None = None,
    *,
    image: int | None = None,
    class_name: str | None = None,
    split: str = "test",
    out: Path | None = None,
    mode: str = "maps",
    trust_code: bool = False,
) -> Picture:
    """Draw ``mode`` (maps, filters or cam) for one image of ``split``; writes a PNG and describes it."""
    from cnnlab.plots import picture, plt, save_figure

    if out is not None:
        check_output_file(Path(out), "--out")
    opened = open_run(run_dir, trust_code=trust_code)
    model = opened.model
    data = opened.load_data()
    if split not in ("test", "val"):
        raise UserError(f"--split {split!r}: choose test or val")
    index = pick_image(data, split, image, class_name)
    chosen = data.split(split)
    x = data.prepare(chosen.window(index, index + 1))
    truth = int(chosen.labels[index])
    if layer is None:
        layer = cam_layer(model, x) if mode == "cam" else "0"
    name, module = resolve_layer(model, layer)
    described = plot_label(f"layer {layer}" + (f" ({name})" if name != layer else "") + f": {short_repr(module)}")
    logits, activation = capture(model, module, x)
    predicted = int(logits.argmax(1))
    raw = picture(chosen.window(index, index + 1)[0].float() / 255)
    classes = opened.spec.classes

    if mode == "filters":
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Conv2d) or weight is None:
            raise UserError(f"--filters needs a conv layer; layer {layer} is {type(module).__name__}")
        kernels = weight.detach()
        # every (out, in) kernel when that is a readable number, else each output's mean over inputs
        tiles = [kernels[o, i] for o in range(kernels.shape[0]) for i in range(kernels.shape[1])] \
            if kernels.shape[0] * kernels.shape[1] <= 256 else list(kernels.mean(1))
        title = f"{described} kernels, {kernels.shape[0]} out x {kernels.shape[1]} in, {kernels.shape[2]}x{kernels.shape[3]}"
    elif mode == "cam":
        heat = grad_cam(model, module, x, predicted)
        tiles = []
        title = f"Grad-CAM of '{plot_label(classes[predicted])}'\nat {described}"
        if not heat.max() > 0:
            title += "\n(all zero: nothing here raises the class's score)"
            warn(f"the Grad-CAM map of '{one_line(classes[predicted])}' at layer {layer} is all zero: no part of that layer's "
                 "output raises the class's score; try an earlier layer (--layer, see --list-layers)")
    else:
        if activation.dim() == 4:
            tiles = list(activation[0])
        elif activation.dim() == 2:
            tiles = [activation[0].reshape(1, -1)]
        else:
            raise UserError(f"layer {layer} outputs shape {tuple(activation.shape)}; pick a conv or pooling layer")
        title = f"{described} output, {len(tiles)} channels of {'x'.join(map(str, activation.shape[2:])) or activation.shape[1]}"

    if out is None:
        out = Path(run_dir) / "visualize" / f"{mode}-layer{layer}-{split}{index}.png"
        check_output_file(out, "visualize output")
    caption = f"{split} image {index}\ntrue: {plot_label(classes[truth])}\npredicted: {plot_label(classes[predicted])}"
    if mode == "cam":
        fig = cam_figure(raw, heat, caption, title)
    else:
        fig = plt.figure(figsize=(10, 5), dpi=110)
        rows, cols = grid_shape(len(tiles))
        outer = fig.add_gridspec(1, 2, width_ratios=[1, 3], wspace=0.08)
        left = fig.add_subplot(outer[0])
        left.imshow(raw, cmap="gray")
        left.set_title(caption, fontsize=9)
        left.axis("off")
        inner = outer[1].subgridspec(rows, cols, wspace=0.05, hspace=0.05)
        for i, tile in enumerate(tiles):
            axis = fig.add_subplot(inner[i // cols, i % cols])
            axis.imshow(tile.detach().float().numpy(), cmap="gray" if mode == "maps" else "RdBu_r",
                        interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        fig.suptitle(title, fontsize=10)
    save_figure(fig, out, tight=False)
    return Picture(out, len(tiles), layer, index, classes[truth], classes[predicted], opened.used_line())
