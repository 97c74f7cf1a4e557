"""One picture decoder: every Pillow mode made 8-bit by one rule, the same pixels in a data folder, `cnnlab data`
and `predict`, or one refusal naming the file and the mode."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab import inference
from cnnlab.cli import app
from cnnlab.data import pictures as pics
from cnnlab.data.spec import DataSpec
from cnnlab.errors import UserError

runner = CliRunner()
HEIGHT, WIDTH = 6, 8
# A grey picture away from both ends of the range: a per-picture stretch would change it, the rule must not.
GREY = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) * 4 + 10).astype(np.uint8)  # 10 ... 198


@pytest.fixture(autouse=True)
def cache_here(tmp_path, monkeypatch):
    """Every test's cache in its own folder, never the user's ~/.cache."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))


def spec(channels: int) -> DataSpec:
    """A data set of pictures of exactly this size: ``predict`` neither resizes, crops nor inverts them."""
    return DataSpec(name="folder", title="t", classes=("a", "b"), channels=channels, image_size=(HEIGHT, WIDTH),
                    dark_background=False)


def through_folder(path, channels: int) -> np.ndarray:
    out = np.zeros((channels, HEIGHT, WIDTH), dtype=np.uint8)
    pics.decode_into(path, out, (HEIGHT, WIDTH), channels)
    return out


def through_predict(path, channels: int) -> np.ndarray:
    return inference.load_image(path, spec(channels)).numpy()


def reference(tmp_path, pixels: np.ndarray, channels: int) -> np.ndarray:
    """``pixels`` (uint8, grey or RGB) saved as an 8-bit PNG and decoded: what every other copy must give exactly."""
    path = tmp_path / f"reference-{pixels.ndim}.png"
    Image.fromarray(pixels).save(path)
    decoded = through_folder(path, channels)
    assert np.array_equal(through_predict(path, channels), decoded)
    if pixels.ndim == 2:
        assert np.array_equal(decoded, pixels[None].repeat(channels, 0))
    elif channels == 3:
        assert np.array_equal(decoded, pixels.transpose(2, 0, 1))
    return decoded


def tiff_12_bit(path, values: np.ndarray) -> None:
    """An uncompressed 12-bit grey TIFF (what scientific cameras write): two samples in three bytes, big-endian bits."""
    height, width = values.shape
    rows = []
    for row in values.astype(int):
        packed = bytearray()
        padded = list(row) + [0] * (len(row) % 2)
        for a, b in zip(padded[::2], padded[1::2]):
            packed += bytes([a >> 4, ((a & 15) << 4) | (b >> 8), b & 255])
        rows.append(bytes(packed[: (12 * width + 7) // 8]))
    data = b"".join(rows)
    tags = [(256, 3, width), (257, 3, height), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 3, height), (279, 4, len(data))]
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<I", data_at if tag == 273 else value) if kind == 4
                                              else struct.pack("<HH", value, 0))
        for tag, kind, value in tags) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + data)


def float_tiff(path, grey):
    Image.fromarray(grey.astype(np.float32) / 255).save(path)


def sixteen_png(path, grey):
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)


def sixteen_tiff(path, grey):
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)


def sixteen_tiff_big_endian(path, grey):
    wide = (grey.astype(np.uint16) * 257).astype(">u2")
    Image.frombytes("I;16B", (grey.shape[1], grey.shape[0]), wide.tobytes()).save(path)


def sixteen_pgm(path, grey):
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # P5 with maxval 65535


def twelve_tiff(path, grey):
    tiff_12_bit(path, np.rint(grey.astype(np.float64) * 4095 / 255))


WIDE = {  # each writes GREY (k) in a wider form: the same pictures as the 8-bit PNG of k
    "float TIFF of k/255": ("f.tif", float_tiff, "F"),
    "16-bit PNG of k*257": ("s.png", sixteen_png, "I;16"),
    "16-bit TIFF of k*257": ("s.tif", sixteen_tiff, "I;16"),
    "16-bit big-endian TIFF": ("b.tif", sixteen_tiff_big_endian, "I;16B"),
    "16-bit PGM (Pillow: mode I)": ("s.pgm", sixteen_pgm, "I"),
    "12-bit TIFF of k*4095/255": ("t.tif", twelve_tiff, "I;16"),
}


@pytest.mark.parametrize("case", list(WIDE))
def test_a_wide_picture_decodes_to_the_pixels_of_its_8_bit_png(tmp_path, case):
    name, write, mode = WIDE[case]
    path = tmp_path / name
    write(path, GREY)
    with Image.open(path) as check:
        assert check.mode == mode  # what Pillow 13 opens it as: the mode the rule is for
    for channels in (1, 3):
        expected = reference(tmp_path, GREY, channels)
        assert np.array_equal(through_folder(path, channels), expected), (case, channels)
        assert np.array_equal(through_predict(path, channels), expected), (case, channels)


def colour_with_alpha() -> np.ndarray:
    """RGBA, every alpha from opaque to transparent, colours that differ per channel."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (HEIGHT, WIDTH, 4)).astype(np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 255, 0
    return rgba


def on_black(rgba: np.ndarray) -> np.ndarray:
    """The colour of each pixel composited on black: round(colour x alpha / 255)."""
    colour, alpha = rgba[..., :3].astype(int), rgba[..., 3:].astype(int)
    return ((colour * alpha + 127) // 255).astype(np.uint8)


def test_alpha_is_composited_on_black_in_a_folder_and_in_predict_alike(tmp_path):
    rgba = colour_with_alpha()
    grey_alpha = np.stack([GREY, rgba[..., 3]], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
    for channels in (1, 3):
        expected = reference(tmp_path, on_black(rgba), channels)
        assert np.array_equal(through_folder(tmp_path / "rgba.png", channels), expected), channels
        assert np.array_equal(through_predict(tmp_path / "rgba.png", channels), expected), channels
        expected = reference(tmp_path, on_black(np.stack([GREY] * 3 + [rgba[..., 3]], -1))[..., 0], channels)
        assert np.array_equal(through_folder(tmp_path / "la.png", channels), expected), channels
        assert np.array_equal(through_predict(tmp_path / "la.png", channels), expected), channels


def test_a_transparent_colour_key_is_black_in_a_folder_and_in_predict_alike(tmp_path):
    """PNG's tRNS (one grey or colour that is transparent), of 8-bit and 16-bit grey, and a GIF's transparent index."""
    keyed = GREY.copy()
    keyed[2] = 50  # the transparent value
    expected_grey = np.where(keyed == 50, 0, keyed).astype(np.uint8)
    Image.fromarray(keyed).save(tmp_path / "l.png", transparency=50)
    Image.fromarray(keyed.astype(np.uint16) * 257).save(tmp_path / "s.png", transparency=50 * 257)
    Image.fromarray(np.stack([keyed] * 3, -1)).save(tmp_path / "rgb.png", transparency=(50, 50, 50))
    Image.fromarray(keyed).convert("P").save(tmp_path / "p.gif", transparency=50)
    for name in ("l.png", "s.png", "rgb.png", "p.gif"):
        with Image.open(tmp_path / name) as check:
            assert "transparency" in check.info, name
        for channels in (1, 3):
            expected = reference(tmp_path, expected_grey, channels)
            assert np.array_equal(through_folder(tmp_path / name, channels), expected), (name, channels)
            assert np.array_equal(through_predict(tmp_path / name, channels), expected), (name, channels)


def test_eight_bit_modes_decode_as_pillow_converts_them_the_same_everywhere(tmp_path):
    rgb = colour_with_alpha()[..., :3]
    colour = Image.fromarray(rgb, "RGB")
    for mode in ("L", "1", "P", "CMYK", "YCbCr", "RGB"):
        picture = colour.convert(mode)
        path = tmp_path / f"{mode}.{'jpg' if mode in ('CMYK', 'YCbCr') else 'tif'}"
        picture.save(path, **({"quality": 100} if path.suffix == ".jpg" else {}))
        with Image.open(path) as opened:
            opened.load()
            as_read = opened.copy()
        for channels in (1, 3):
            eight = as_read.convert("RGB")
            expected = np.asarray(eight.convert("L"))[None] if channels == 1 else np.asarray(eight).transpose(2, 0, 1)
            if as_read.mode in ("L", "1"):
                expected = np.asarray(as_read.convert("L"))[None].repeat(channels, 0)
            assert np.array_equal(through_folder(path, channels), expected), (mode, channels)
            assert np.array_equal(through_predict(path, channels), expected), (mode, channels)


def refusing(tmp_path) -> dict:
    """Pictures whose pixels have no 8-bit meaning under the rule: (file, what the refusal must say)."""
    cases = {}
    Image.fromarray(np.full((HEIGHT, WIDTH), 70_000, dtype=np.int32)).save(tmp_path / "wide.tif")
    cases["32-bit integer"] = ("wide.tif", "mode I (32-bit integer)")
    Image.fromarray((GREY.astype(np.int16) - 100)).save(tmp_path / "signed.tif")  # mode I from signed 16-bit
    cases["signed 16-bit"] = ("signed.tif", "mode I (32-bit integer)")
    Image.fromarray(GREY.astype(np.float32)).save(tmp_path / "f255.tif")  # float, but 0-255
    cases["float 0-255"] = ("f255.tif", "mode F (floating point) with values from 10 to 198")
    nan = GREY.astype(np.float32) / 255
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    cases["float NaN"] = ("nan.tif", "mode F (floating point) with NaN")
    infinite = GREY.astype(np.float32) / 255
    infinite[0, 0] = -np.inf
    Image.fromarray(infinite).save(tmp_path / "inf.tif")
    cases["float infinite"] = ("inf.tif", "mode F (floating point) with infinite")
    return cases


def test_pictures_without_an_8_bit_meaning_are_refused_naming_the_mode_and_the_range(tmp_path):
    for case, (name, says) in refusing(tmp_path).items():
        for channels in (1, 3):
            with pytest.raises(pics.Refused, match=r"^" + __import__("re").escape(says)):
                through_folder(tmp_path / name, channels)
            with pytest.raises(UserError) as refused:
                through_predict(tmp_path / name, channels)
            message = str(refused.value)
            assert message.startswith(f"{tmp_path / name}: {says}") and "\n" not in message, (case, message)
            assert "save it as" in message, message


@pytest.mark.parametrize("case", ["32-bit integer", "float 0-255", "float NaN"])
def test_cnnlab_data_on_a_folder_with_such_a_picture_is_exit_2_naming_it(tmp_path, case):
    root = tmp_path / "pictures"
    for label in ("x", "y"):
        (root / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(GREY).save(root / "train" / label / f"{i}.png")
    name, says = refusing(tmp_path)[case]
    (tmp_path / name).rename(root / "train" / "y" / name)
    result = runner.invoke(app, ["data", "folder", "--data-dir", str(root)])
    assert result.exit_code == 2, result.output
    assert f"train/y/{name}: {says}" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cnnlab_data_on_float_pictures_gives_their_mean_not_black(tmp_path):
    """The bug: float TIFFs of 0-1 read as near-black, `cnnlab data` saying mean 0.0000."""
    root = tmp_path / "pictures"
    for label in ("x", "y"):
        (root / "train" / label).mkdir(parents=True)
        for i in range(4):
            float_tiff(root / "train" / label / f"{i}.tif", GREY)
    result = runner.invoke(app, ["data", "folder", "--data-dir", str(root), "--set", "data.test_size=2"])
    assert result.exit_code == 0, result.output
    mean, std = GREY.mean() / 255, GREY.std() / 255
    assert f"{mean:.4f} / {std:.4f}" in result.output, result.output
