"""Usage: ``cnnlab predict RUN shoe.jpg``; ``cnnlab export RUN --format onnx``: using a trained model.

``predict`` classifies the user's own pictures: PNG, JPEG, WEBP, TIFF and the other formats a data folder
takes (``picture_formats``), of any size or colour, each made into an image of the run's data set (its
``DataSpec``: channels, size), grey or RGB. For a data set of light things on black (``dark_background``;
a grey set whose description does not say) it is made as such a set is (the longer side fitted to the
image size and centred on black, inverted first when its background is light); for others it is scaled to
cover the image size and centre-cropped, as torchvision's evaluation transforms do. It is then normalised
as the run was trained (per channel).
``export`` writes the model with that normalisation folded in as its first layer, so the file takes
raw [0, 1] pixels (N x channels x height x width), and refuses to write a file whose outputs differ
from PyTorch's; an ONNX file carries the class names and input shape in its metadata
(``cnnlab.classes``, a JSON list; ``cnnlab.input_shape``). Class names come from the run's data description.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from cnnlab.data import DataSpec, pictures
from cnnlab.data.pictures import FORMATS
from cnnlab.errors import UserError
from cnnlab.results import check_output_file, file_kind

MAX_IMAGE_BYTES = 50 << 20  # a photo is a few MB; a larger file is not one to classify
MAX_IMAGE_PIXELS = 40_000_000  # 40 megapixels: checked from the header, before anything is decoded
# Decoding and reducing stop at 3x the pixels the result needs: from there Pillow's two-step resize is
# "indistinguishable from fair resampling in most cases" (Image.resize, reducing_gap).
REDUCING_GAP = 3
# The largest difference of logits an export may show against PyTorch: 1e-4, times the largest logit's size
# where that is above 1 (float32 rounds relative to a number's size, so a model with logits in the thousands
# differs by more in absolute terms and is no less exact)
EXPORT_TOLERANCE = 1e-4
CHECK_IMAGES = 256


class Normalized(nn.Module):
    """The trained model behind its input normalisation (a mean and std per channel): takes raw [0, 1] pixels."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def normalization(opened: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel the run normalised with: from its data description, else from its summary's
    pixel_mean and pixel_std (runs that recorded no description), else from its data (older runs still)."""
    channels = opened.spec.channels
    if not opened.cfg.data.normalize:
        return (0.0,) * channels, (1.0,) * channels
    if opened.spec.mean is not None:  # validated as it was read: one finite value per channel, std above 0
        return opened.spec.mean, opened.spec.std
    mean, std = opened.summary.pixel_mean, opened.summary.pixel_std
    if mean is None or std is None:
        data = opened.load_data()
        mean, std = data.mean, data.std
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise UserError(f"{opened.path / 'summary.json'}: pixel_mean {mean} / pixel_std {std} cannot normalise images")
    return (float(mean),), (float(std),)


def dark_background(spec: DataSpec) -> bool:
    """Whether the data set's images are light things on black: as its description says; a description that
    does not say (recorded before it could) is a grey set's of that time, Fashion-MNIST's, which were."""
    return spec.dark_background if spec.dark_background is not None else spec.channels == 1


def load_image(path: Path, spec: DataSpec) -> torch.Tensor:
    """A picture as an image of the data set ``spec`` describes: uint8 [channels, height, width]. Its pixels are made
    8-bit by the one mode rule (``pictures.eight_bit``, what a data folder's pictures get); a picture the rule refuses
    (a 32-bit integer one, floats outside 0-1) is a ``UserError`` naming the file and its mode.

    The work is bounded by the pixels the result needs: a JPEG is decoded at 1/2 to 1/8 scale where
    that leaves enough of them, and the decoded picture is reduced by whole factors (in Pillow, one
    pass) to at most about 2 x REDUCING_GAP x the image size a side before anything else looks at it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if spec.channels not in (1, 3):
        raise UserError(f"predicting pictures is for grey and RGB data sets; {spec.title} has {spec.channels} channels")
    box = (spec.image_size[1], spec.image_size[0])  # (width, height), as Pillow gives sizes
    on_black = dark_background(spec)
    path = Path(path)
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the size is checked below, with its own message
    try:
        # The formats a data folder may hold (pictures.FORMATS: never EPS, whose reader runs Ghostscript), and MPO:
        # a phone's JPEG is often one, the photo then more frames (another lens, a depth map); the first is read,
        # as of an animated GIF or a multi-page TIFF.
        with _open_picture(path) as handle, Image.open(handle, formats=picture_formats()) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UserError(f"{path}: {width:,} x {height:,} pixels is too large a picture to classify (at most "
                                f"{MAX_IMAGE_PIXELS:,} pixels); give a smaller one")
            opened.draft(None, tuple(REDUCING_GAP * side for side in _fitted_size(opened.size, box, cover=not on_black)))
            ImageOps.exif_transpose(opened, in_place=True)
            # The one mode rule (pictures.eight_bit): the same pixels a data folder and `cnnlab data` get of this file.
            image = _reduced(pictures.eight_bit(opened, spec.channels), box, cover=not on_black)
    except pictures.Refused as err:
        raise UserError(f"{path}: {err}") from None
    except UnidentifiedImageError as err:
        raise UserError(f"{path}: not an image cnnlab can read ({type(err).__name__}); give a picture in one of "
                        f"{', '.join(picture_formats())}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: a damaged image ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if not on_black:
        canvas = image if image.size == box else ImageOps.fit(image, box, Image.Resampling.LANCZOS)
    else:
        if _background(image) > 127:
            image = ImageOps.invert(image)
        fitted = image if image.size == box else image.resize(_fitted_size(image.size, box), Image.Resampling.LANCZOS)
        canvas = Image.new(image.mode, box, 0)
        canvas.paste(fitted, ((box[0] - fitted.width) // 2, (box[1] - fitted.height) // 2))
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    return pixels.reshape(*spec.image_size, spec.channels).permute(2, 0, 1).contiguous()


def picture_formats() -> list[str]:
    """The picture formats ``predict`` reads: those of a data folder, and MPO (a JPEG with more frames)."""
    from PIL import Image

    Image.init()
    return [fmt for fmt in (*FORMATS, "MPO") if fmt in Image.OPEN]


def _open_picture(path: Path) -> BinaryIO:
    """``path`` opened for reading once it is known to be a regular file of a picture's size.

    It is opened without blocking (a FIFO would wait for a writer forever) and checked through the
    open file, so what is checked is what is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{path}: is a folder; give the image files in it")
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: is {file_kind(info.st_mode)}, not a regular file; give a picture file")
        if info.st_size == 0:
            raise UserError(f"{path}: the file is empty")
        if info.st_size > MAX_IMAGE_BYTES:
            raise UserError(f"{path}: {info.st_size:,} bytes is too large for a picture to classify "
                            f"(at most {MAX_IMAGE_BYTES:,})")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _reduced(image: Any, box: tuple[int, int], cover: bool = False) -> Any:
    """A copy of ``image`` box-averaged by whole factors to no less than REDUCING_GAP times its size fitted
    into (or, with ``cover``, over) ``box``: small however large or long the picture (one within that size
    is copied as it is)."""
    return image.reduce(tuple(max(1, side // (REDUCING_GAP * fitted))
                              for side, fitted in zip(image.size, _fitted_size(image.size, box, cover))))


def _fitted_size(size: tuple[int, int], box: tuple[int, int], cover: bool = False) -> tuple[int, int]:
    """The picture's (width, height) scaled to fit ``box`` (width, height), or with ``cover`` to cover it
    (to be centre-cropped), at least 1 x 1."""
    width, height = size
    scale = (max if cover else min)(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _background(image: Any) -> float:
    """The mean grey of the (reduced) picture's border: its background."""
    from PIL import ImageStat

    image = image if image.mode == "L" else image.convert("L")
    width, height = image.size
    strips = [ImageStat.Stat(image.crop(box)) for box in
              ((0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height), (width - 1, 0, width, height))]
    return sum(strip.sum[0] for strip in strips) / sum(strip.count[0] for strip in strips)


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class, probability), most likely first
    label: str | None = None  # the true class, for a data-set image
    # what the network received: uint8 [channels, height, width], before normalising (not part of what a prediction says)
    image: torch.Tensor | None = field(default=None, compare=False, repr=False)
    used: dict[str, Any] = field(default_factory=dict, compare=False)  # the run, checkpoint and weights that answered


def predict(run_dir: Path, images: list[Path], *, split: str | None = None, index: int | None = None, top: int = 3,
            trust_code: bool = False, checkpoint: str = "auto", weights: str = "auto") -> list[Prediction]:
    """The ``top`` classes of each picture file (or of image ``index`` of a split) by the run's model: its ``checkpoint``
    (best, last or auto) with its ``weights`` (raw, ema, swa or auto: ``runs.open_run``)."""
    from cnnlab.runs import open_run

    if not images and index is None:
        raise UserError("give image files, or --image N (with --split test or val) for a data-set image")
    if images and index is not None:
        raise UserError("give image files or --image N, not both")
    opened = open_run(run_dir, trust_code=trust_code, checkpoint=checkpoint, weights=weights)
    classes = opened.spec.classes
    if not 1 <= top <= len(classes):
        raise UserError(f"--top {top}: choose 1 to {len(classes)}")
    model = Normalized(opened.model, *normalization(opened)).eval()
    sources, labels, batch = [], [], []
    if index is not None:
        data = opened.load_data()
        chosen = data.split(split or "test")
        if not 0 <= index < len(chosen):
            raise UserError(f"--image {index}: the {split or 'test'} split has images 0 to {len(chosen) - 1}")
        batch.append(chosen.window(index, index + 1)[0])
        sources.append(f"{split or 'test'} image {index}")
        labels.append(classes[int(chosen.labels[index])])
    else:
        for path in images:
            batch.append(load_image(path, opened.spec))
            sources.append(str(path))
            labels.append(None)
    with torch.no_grad():
        probabilities = model(torch.stack(batch).float() / 255).softmax(1)
    results = []
    for source, label, row, image in zip(sources, labels, probabilities, batch):
        values, indices = row.topk(top)
        results.append(Prediction(source, [(classes[int(c)], float(v)) for v, c in zip(values, indices)], label, image,
                                  used=opened.used()))
    return results


def show_predictions(run_dir: Path, predictions: list[Prediction]) -> list[Path]:
    """``predict --show``: for each prediction, ``<run>/predict/<picture>.png``, the picture as the network received
    it beside its top classes. Two pictures of one name (``a/shoe.jpg``, ``b/shoe.jpg``) get files of their own."""
    from cnnlab.plots import prediction_figure, save_figure
    from cnnlab.results import sanitize_name

    written: list[Path] = []
    for prediction in predictions:
        stem = sanitize_name(Path(prediction.source).stem if prediction.label is None else prediction.source)
        out = Path(run_dir) / "predict" / f"{stem}.png"
        n = 2
        while out in written:
            out, n = out.with_name(f"{stem}-{n}.png"), n + 1
        check_output_file(out, "predict --show")
        title = prediction.source + (f" (true: {prediction.label})" if prediction.label else "")
        written.append(save_figure(prediction_figure(prediction.image, prediction.top, title), out))
    return written


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class Export:
    path: Path
    max_difference: float
    images: int
    used: str = ""  # the run, checkpoint and weights exported, in words (OpenedRun.used_line)


def export(run_dir: Path, fmt: str, out: Path | None = None, *, trust_code: bool = False, checkpoint: str = "auto",
           weights: str = "auto") -> Export:
    """The run's model (its ``checkpoint``, best, last or auto, with its ``weights``, raw, ema, swa or auto: ``open_run``;
    normalisation folded in) as ONNX or TorchScript, checked on 256 test images against PyTorch; nothing is written
    unless it agrees to 1e-4 (relative to logits above 1). The default file is ``<run>/model.onnx`` (``.pt``), named
    after the checkpoint and weights where they are not the best and raw ones: ``model-last-swa.onnx``."""
    from cnnlab.runs import open_run

    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"--format {fmt!r}: choose onnx or torchscript")
    if out is not None:
        check_output_file(out, "-o")
    opened = open_run(run_dir, trust_code=trust_code, checkpoint=checkpoint, weights=weights)
    checkpoint, weights = opened.checkpoint, opened.weights
    if out is None:
        which = "".join(f"-{name}" for name, plain in ((checkpoint, "best"), (weights, "raw")) if name != plain)
        out = opened.path / f"model{which}.{'onnx' if fmt == 'onnx' else 'pt'}"
        check_output_file(out, "export output")
    out = Path(out)
    try:  # where the file goes is checked before the model runs
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
    except OSError as err:
        raise UserError(f"-o {out}: cannot write there ({err.strerror or err}); choose another file") from None
    try:
        model = Normalized(opened.model, *normalization(opened)).eval()
        data = opened.load_data()
        pixels = data.test.window(0, CHECK_IMAGES).float() / 255
        with torch.no_grad():
            expected = model(pixels)
        metadata = {**onnx_metadata(opened.spec), "cnnlab.checkpoint": checkpoint, "cnnlab.weights": weights}
        got = _export_onnx(model, pixels, temporary, metadata) if fmt == "onnx" \
            else _export_torchscript(model, pixels, temporary)
        difference, allowed = export_difference(got, expected)
        if not difference <= allowed:
            raise UserError(f"the {fmt} export differs from the PyTorch model by {difference:.3g} on {len(pixels)} test "
                            f"images (more than {allowed:.3g}); not writing {out}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as any file the user writes, not mkstemp's owner-only mode
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return Export(out, difference, len(pixels), opened.used_line())


def export_difference(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(the largest difference of an export's logits from PyTorch's, the largest allowed: ``EXPORT_TOLERANCE``
    scaled by the largest logit's size where that is above 1). NaN anywhere differs by NaN, never allowed."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((got - expected).abs().max()), EXPORT_TOLERANCE * max(1.0, scale)


def onnx_metadata(spec: DataSpec) -> dict[str, str]:
    """What an ONNX file says of the data its model takes (metadata_props: strings), for whoever loads it."""
    return {"cnnlab.classes": json.dumps(list(spec.classes)), "cnnlab.input_shape": json.dumps(list(spec.input_shape)),
            "cnnlab.data": spec.name}


def _export_torchscript(model: nn.Module, pixels: torch.Tensor, path: str) -> torch.Tensor:
    with warnings.catch_warnings():  # TorchScript is deprecated upstream, and still what many runtimes load
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, pixels[:2])
        traced.save(path)
        loaded = torch.jit.load(path)  # the file as written, not the object in memory
    with torch.no_grad():
        return loaded(pixels)


def _export_onnx(model: nn.Module, pixels: torch.Tensor, path: str, metadata: dict[str, str]) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--format onnx needs onnx, onnxscript and onnxruntime; install them with: "
                        "pip install 'cnnlab[onnx]'") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (pixels[:2],), dynamo=True, input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes={"pixels": {0: batch}}, verbose=False)
    program.model.metadata_props.update(metadata)
    program.save(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    [result] = session.run(None, {"pixels": pixels.numpy()})
    return torch.from_numpy(result)
