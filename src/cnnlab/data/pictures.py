"""Usage: ``problems = each_file(probe, paths)``; ``decode_into(path, out[i], (28, 28), 1)``: picture files as uint8 pixels.

Decoding any picture Pillow reads into 8-bit grey or RGB pixels of one size: EXIF orientation
applied, made 8-bit by the mode rule below, then resized (antialiased bilinear, as torchvision's
``Resize``). A decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) is refused from
its header, before any decoding.

The mode rule (``eight_bit``) is the one way a picture becomes 8-bit pixels, for a data folder,
``cnnlab data`` and ``predict`` alike: the same file gives the same pixels everywhere, or one refusal
(``Refused``) that names the mode, what was found and what to do. By Pillow mode:

- ``L``, ``RGB``, ``1`` (0 or 255), ``P`` (its palette's colours), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``,
  ``RGBX``: as Pillow converts them (to RGB, and RGB to grey by ITU-R 601-2 luma), 8 bits kept as they are.
  (Pillow reads a 16-bit colour PNG or TIFF as 8-bit ``RGB``/``RGBA`` itself, by each value's high byte.)
- Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``), and a transparent colour or palette
  index (PNG's tRNS, GIF's): composited on black, round(colour x alpha / 255): a transparent pixel
  is black whatever colour it hides. (A data set of light things on black is what most grey sets are;
  any fixed colour would do as long as training and prediction use the same one.)
- Unsigned integers wider than 8 bits (``I;16``, ``I;16B``...): scaled by their full range,
  round(value x 255 / (2^bits - 1)): 16 bits is value / 257, so 0 is black, 65,535 white, and a
  16-bit copy of an 8-bit picture (k x 257) gives it back exactly. ``bits`` is 16, or what a TIFF's
  BitsPerSample says where it says fewer (Pillow 13 opens a 12-bit TIFF as ``I;16`` holding 0-4,095).
  A transparent value (tRNS) is black.
- ``I`` (32-bit signed integer): Pillow 13 opens 16-bit grey PNG and TIFF as ``I;16``, but a PGM/PPM of
  more than 8 bits as ``I`` (any maxval scaled by Pillow to 0-65,535), and a PNG was ``I`` in older
  Pillow: from those, the 16-bit rule. From anything else (a TIFF of 32-bit or signed samples) the
  range is unknown (a camera's 32-bit TIFF may hold 0-4,095 or 0-2^32), so the picture is refused:
  save it as 8- or 16-bit, or as float 0-1.
- ``F`` (float): 0 is black and 1 white, round(value x 255); a picture with NaN, infinite values or
  values outside 0-1 is refused, naming the range found (scale it to 0-1, or save it as 8- or 16-bit).

No rule looks at a picture's own values to decide what they mean: a per-picture stretch (its darkest
pixel black, its lightest white) would make one value mean different things in different pictures,
and a faint picture as bright as a contrasted one.

Files are decoded by a pool of threads, one per CPU core: Pillow releases the GIL while it
decodes. On a loaded 2-core machine neither threads nor processes beat one thread on
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
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageOps

T = TypeVar("T")
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
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


def open_checked(path: str | Path | BinaryIO) -> Image.Image:
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


class Refused(Exception):
    """A picture the mode rule gives no 8-bit pixels: the message names its mode, what was found and what to do
    (the caller puts the file's name before it)."""


SAVE_AS = "save it as an 8- or 16-bit picture, or as float with values 0-1"
ALPHA = {"RGBA", "LA", "La", "PA", "RGBa"}
KEYED = {"1", "L", "P", "RGB"}  # modes whose ``info["transparency"]`` (a colour or palette index) Pillow applies


def integer_bits(image: Image.Image) -> int | None:
    """How many bits the samples of an integer picture wider than 8 bits hold (the mode rule): 16, or a TIFF's
    BitsPerSample where it says fewer; None where its range is unknown (mode ``I`` from anything but a PGM/PPM or PNG)."""
    if image.mode == "I":
        return 16 if image.format in ("PPM", "PNG") else None
    bits = 16
    if image.format == "TIFF":
        declared = getattr(image, "tag_v2", {}).get(258)  # BitsPerSample
        declared = declared[0] if isinstance(declared, tuple) and declared else declared
        if isinstance(declared, int) and 8 < declared < 16:
            bits = declared
    return bits


def wide_grey(image: Image.Image) -> np.ndarray:
    """uint8 pixels of a grey picture wider than 8 bits (``I;16*``, ``I``, ``F``), by the mode rule, or ``Refused``."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        lead = "mode F (floating point) with"
        if np.isnan(values).any():
            raise Refused(f"{lead} NaN (not-a-number) pixels, which are no brightness; {SAVE_AS}")
        if not np.isfinite(values).all():
            raise Refused(f"{lead} infinite pixels, which are no brightness; {SAVE_AS}")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 1:
            raise Refused(f"{lead} values from {low:g} to {high:g}: cnnlab reads a float picture's 0 as black and 1 as "
                          "white; scale it to 0-1, or save it as an 8- or 16-bit picture")
        return np.rint(values * 255).astype(np.uint8)
    bits = integer_bits(image)
    if bits is None:
        source = f" from a {image.format} file" if image.format else ""
        raise Refused(f"mode I (32-bit integer){source}: its range is unknown (cnnlab scales 8- to 16-bit unsigned "
                      f"pictures, not wider or signed ones); {SAVE_AS}")
    values = np.asarray(image).astype(np.int64)
    top = (1 << bits) - 1
    pixels = ((values * 510 + top) // (2 * top)).clip(0, 255).astype(np.uint8)  # round(value x 255 / top)
    key = image.info.get("transparency")
    if isinstance(key, int):
        pixels[values == key] = 0
    return pixels


def eight_bit(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as mode L (``channels`` 1) or RGB (3) by the mode rule (this module's docstring), or ``Refused``.
    Call it on the picture as opened (EXIF rotation may be applied in place first): it reads the file's format and
    tags to know what a wide picture's values mean."""
    if image.mode in ("F", "I") or image.mode.startswith("I;16"):
        image = Image.fromarray(wide_grey(image))
    elif image.mode in ALPHA or (image.mode in KEYED and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if target == "L" and image.mode not in GREY_MODES:
        image = image.convert("RGB")  # palette, CMYK, YCbCr...: to colour first, then to luminance
    return image.convert(target)


def decode_into(source: str | Path | BinaryIO, out: np.ndarray, size: tuple[int, int], channels: int) -> None:
    """Decode the picture at ``source`` (a path, or an open binary file) into ``out`` (uint8 [channels, height,
    width]), made 8-bit by the mode rule and resized; ``Refused`` where the rule gives it no pixels."""
    with open_checked(source) as opened:
        opened.load()  # a truncated or corrupt file fails here
        ImageOps.exif_transpose(opened, in_place=True)  # in place: the format and tags the mode rule reads stay
        image = eight_bit(opened, channels)
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    out[...] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def problem(err: Exception) -> str:
    """What is wrong with a picture, in words, from what Pillow (or the mode rule) raised on it."""
    if isinstance(err, Refused):
        return str(err)
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
