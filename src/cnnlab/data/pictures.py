"""Usage: ``problems = each_file(probe, paths)``; ``decode_into(path, out[i], (28, 28), 1)``: picture files as uint8 pixels.

Decoding any picture Pillow reads into 8-bit grey or RGB pixels of one size: EXIF orientation
applied, 16-bit grey scaled to 8 bits (divided by 257), alpha composited on black (a transparent
pixel is black, whatever colour it hides), palette, CMYK and other modes converted, then resized
(antialiased bilinear, as torchvision's ``Resize``). A decompression bomb (more pixels than
``PIL.Image.MAX_IMAGE_PIXELS``) is refused from its header, before any decoding.

Files are decoded by a pool of threads, one per CPU core: Pillow releases the GIL while it
decodes. On this project's loaded 2-core machine neither threads nor processes beat one thread on
28x28 PNGs (0.49 s, 0.48 s and 0.52 s for 10,000 of them), and threads need neither pickling nor a
fork of a process that holds PyTorch's thread pools; on larger pictures and more cores, threads
decode side by side.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

T = TypeVar("T")
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
SIXTEEN_BIT = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
ORIENTATION = 0x0112
# The formats a picture may be in: raster formats Pillow decodes itself. Not EPS (Pillow runs Ghostscript on it,
# a program with a history of exploits, on whatever a data set holds), nor the stub formats (FITS, GRIB, HDF5,
# BUFR, WMF) that hand the file to other code. Pillow identifies a file by its content, not its name: opening
# with ``formats=`` is what keeps an EPS named cat.png from reaching Ghostscript.
FORMATS = ("PNG", "JPEG", "JPEG2000", "WEBP", "AVIF", "TIFF", "BMP", "DIB", "GIF", "PPM", "TGA", "PCX", "ICO", "QOI")


@functools.cache
def extensions() -> frozenset[str]:
    """The file endings of the ``FORMATS`` this Pillow reads (``.png``, ``.jpg``, ``.tif``, ``.webp``...), lower case."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt in FORMATS)


def open_checked(path: str | Path) -> Image.Image:
    """The picture at ``path``, opened (header read, pixels not yet): a decompression bomb raises here.
    (Pillow only warns below twice its limit: ``each_file`` makes that warning an error too.)"""
    image = Image.open(path, formats=[fmt for fmt in FORMATS if fmt in Image.OPEN])
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise Image.DecompressionBombError(f"{width}x{height} pixels, above Pillow's limit of {Image.MAX_IMAGE_PIXELS:,}")
    return image


def is_grey(image: Image.Image) -> bool:
    """Whether a picture holds grey pixels only: a grey mode, or a palette of greys."""
    if image.mode in GREY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = image.getpalette("RGB") or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))
    return False


def probe(path: str | Path) -> tuple[int, int, bool]:
    """(height, width, grey) of the picture at ``path`` as it will be shown (EXIF rotation applied), from its header."""
    with open_checked(path) as image:
        width, height = image.size
        if image.getexif().get(ORIENTATION) in ROTATED:
            width, height = height, width
        return height, width, is_grey(image)


def eight_bit(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as mode L (``channels`` 1) or RGB (3): 16 bits scaled down, alpha on black, any mode converted."""
    if image.mode in SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray(((wide + 128) // 257).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if target == "L" and image.mode not in GREY_MODES:
        image = image.convert("RGB")  # palette, CMYK, YCbCr...: to colour first, then to luminance
    return image.convert(target)


def decode_into(path: str | Path, out: np.ndarray, size: tuple[int, int], channels: int) -> None:
    """Decode the picture at ``path`` into ``out`` (uint8 [channels, height, width]), converted and resized."""
    with open_checked(path) as opened:
        opened.load()  # a truncated or corrupt file fails here
        image = eight_bit(ImageOps.exif_transpose(opened), channels)
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    out[...] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def problem(err: Exception) -> str:
    """What is wrong with a picture, in words, from what Pillow raised on it."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"a decompression bomb ({err})"
    if isinstance(err, Image.UnidentifiedImageError):
        return f"not a picture in a format cnnlab reads ({', '.join(FORMATS)})"
    text = str(err) or type(err).__name__
    return f"cannot be decoded ({text})"


def each_file(job: Callable[[Path], T], paths: Sequence[Path]) -> list[T | str]:
    """``job(path)`` for every path on a pool of threads, in order: its result, or what was wrong with the file.

    Any failure is the file's: a picture file is untrusted input, and Pillow's many readers fail in
    many ways (OSError, SyntaxError, ValueError, struct.error...).
    """

    def attempt(path: Path) -> T | str:
        try:
            return job(path)
        except Exception as err:  # see the docstring: whatever a bad file makes a reader raise
            return problem(err)

    # Set once here, not per file: the filters are the process's, and changing them from many threads races.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if len(paths) < 64:
            return [attempt(path) for path in paths]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return list(pool.map(attempt, paths))
