"""data.name: folder: a folder of pictures (PNG and JPEG, mixed sizes and modes) decoded once, cached, trained on."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import load_data
from cnnlab.data import pictures as pics
from cnnlab.data.folder import describe
from cnnlab.engine import fit

CLASSES = ("cat", "dog", "owl")
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "lenet.yaml"
runner = CliRunner()


@pytest.fixture(autouse=True)
def cache_here(tmp_path, monkeypatch):
    """Every test's cache in its own folder, never the user's ~/.cache."""
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pattern(label: int, index: int, size: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A learnable grey picture (height x width): class c lights a band at a class-specific place."""
    height, width = size
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 50, (height, width)).astype(np.uint8)
    top = label * height // 3
    pixels[top : top + height // 4, :] = 220
    return pixels


def save(path: Path, pixels: np.ndarray, mode: str = "L", fmt: str | None = None) -> None:
    """``pixels`` (grey, height x width) saved at ``path`` in ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = Image.fromarray(pixels, "L")
    if mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)  # uint16: mode I;16
    elif mode == "P":
        image = grey.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = grey.convert(mode)
    image.save(path, format=fmt)


def make_folder(root: Path, per_class: int = 24, splits: tuple[str, ...] = ("train", "test"), mixed: bool = True) -> Path:
    """A data folder: per split and class ``per_class`` pictures, PNG and JPEG; with ``mixed`` also of other sizes
    (most are 16x16) and modes (L, RGB, RGBA, P, I;16, CMYK JPEG)."""
    modes = [("L", "png"), ("RGB", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png"), ("L", "jpg"), ("CMYK", "jpg")]
    for split in splits:
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                mode, ext = modes[i % len(modes)] if mixed else ("L", "png")
                size = (20, 12) if mixed and i % 5 == 4 else (16, 16)
                save(root / split / name / f"{i:03d}.{ext}", pattern(label, 1000 * label + i + (split == "test") * 500, size),
                     mode)
    return root


def overrides(root: Path, tmp_path: Path, *more: str) -> list[str]:
    return [f"data.root={root}", "data.name=folder", "data.val_size=12", "train.epochs=1", "train.batch_size=16",
            "train.device=cpu", f"output.dir={tmp_path / 'results'}", *more]


def test_a_folder_of_mixed_pictures_trains_for_an_epoch(tmp_path, capsys):
    root = make_folder(tmp_path / "pictures")
    summary = fit(load_config(None, overrides(root, tmp_path)), quiet=True)
    assert summary["status"] == "completed"
    data = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["data"]
    # Class names from the folders; RGB because some pictures are colour; the most common size (16x16).
    assert (data["name"], data["classes"], data["channels"], data["image_size"]) == ("folder", list(CLASSES), 3, [16, 16])
    assert summary["train_size"] + summary["val_size"] == 3 * 24 and summary["test_size"] == 3 * 24
    assert "decoded 144 images" in capsys.readouterr().err


def test_every_mode_decodes_to_the_same_pixels(tmp_path):
    """L, RGB, RGBA, P, 16-bit and CMYK (JPEG: lossy) of one grey picture decode to about that picture."""
    pixels = pattern(1, 7)
    for mode, ext in (("L", "png"), ("RGB", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png"), ("L", "jpg"),
                      ("CMYK", "jpg")):
        path = tmp_path / f"{mode.replace(';', '')}.{ext}"
        save(path, pixels, mode)
        for channels in (1, 3):
            out = np.zeros((channels, 16, 16), dtype=np.uint8)
            pics.decode_into(path, out, (16, 16), channels)
            error = np.abs(out.astype(int) - pixels[None].astype(int))
            assert (error.mean() < 8 if ext == "jpg" else error.max() <= 1), (mode, ext, channels, error.mean())


def test_sixteen_bits_scale_to_eight_and_alpha_composites_on_black(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(tmp_path / "wide.png")
    out = np.zeros((1, 1, 3), dtype=np.uint8)
    pics.decode_into(tmp_path / "wide.png", out, (1, 3), 1)
    assert out.ravel().tolist() == [0, 100, 255]
    Image.fromarray(np.array([[[255, 255, 255, 0], [200, 100, 50, 255]]], dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    out = np.zeros((3, 1, 2), dtype=np.uint8)
    pics.decode_into(tmp_path / "a.png", out, (1, 2), 3)
    assert out[:, 0, 0].tolist() == [0, 0, 0] and out[:, 0, 1].tolist() == [200, 100, 50]


def test_an_exif_rotated_jpeg_is_shown_upright(tmp_path):
    """Orientation 6 (rotate 90 clockwise to show): a 32x16 stored picture is 16 wide and 32 high shown."""
    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, :8] = 255  # bright at the stored left: at the top once rotated clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored, "L").save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    assert pics.probe(tmp_path / "r.jpg") == (32, 16, True)
    out = np.zeros((1, 32, 16), dtype=np.uint8)
    pics.decode_into(tmp_path / "r.jpg", out, (32, 16), 1)
    assert out[0, :6].mean() > 200 and out[0, 10:].mean() < 50


def test_the_second_load_reads_the_cache_and_a_changed_file_decodes_again(tmp_path, capsys, cache_here):
    root = make_folder(tmp_path / "pictures", per_class=8)
    cfg = load_config(None, overrides(root, tmp_path)).data
    first = load_data(cfg, 0, torch.device("cpu"))
    assert "decoded 48 images" in capsys.readouterr().err
    [cache_file] = (cache_here / "folder").glob("*.npz")
    second = load_data(cfg, 0, torch.device("cpu"))
    assert f"read 48 images from cache {cache_file}" in capsys.readouterr().err
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)
    assert first.spec == second.spec
    os.utime(root / "train" / "cat" / "000.png", ns=(1, 1))  # touched: the same bytes, the same pixels
    load_data(cfg, 0, torch.device("cpu"))
    assert f"read 48 images from cache {cache_file}" in capsys.readouterr().err
    save(root / "train" / "cat" / "000.png", 255 - pattern(0, 0))  # changed: decoded again
    load_data(cfg, 0, torch.device("cpu"))
    assert "decoded 48 images" in capsys.readouterr().err


def bmp_folder(root: Path, invert: bool = False) -> Path:
    """train/{x,y}/{0..3}.bmp and test/{x,y}/0.bmp: BMP files are one size whatever their pixels, and every file's
    modification time is fixed, as a reproducible archive or a Nix store leaves them."""
    for split, count in (("train", 4), ("test", 1)):
        for label, name in enumerate("xy"):
            for i in range(count):
                pixels = pattern(label, 10 * label + i + 100 * (split == "test"))
                save(root / split / name / f"{i}.bmp", 255 - pixels if invert else pixels, fmt="BMP")
    for path in root.rglob("*.bmp"):
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return root


def png_copy(source: Path, root: Path) -> Path:
    """The pictures of ``source`` as 8-bit PNG files of the same names: the reference decode."""
    for path in source.rglob("*.bmp"):
        target = root / path.relative_to(source).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as picture:
            picture.save(target)
    return root


def folder_data(root: Path, tmp_path: Path):
    return load_data(load_config(None, overrides(root, tmp_path, "data.val_size=0")).data, 0, torch.device("cpu"))


def test_folders_of_the_same_names_sizes_and_times_never_share_a_cache(tmp_path, capsys):
    a, b = bmp_folder(tmp_path / "A"), bmp_folder(tmp_path / "B", invert=True)
    assert [p.stat().st_size for p in sorted(a.rglob("*.bmp"))] == [p.stat().st_size for p in sorted(b.rglob("*.bmp"))]
    means = []
    for root in (a, b):
        result = runner.invoke(app, ["data", "folder", "--data-dir", str(root)])
        assert result.exit_code == 0 and "decoded 10 images" in result.output, result.output
        means.append(result.output.split("pixels in [0, 1]): ")[1].split(" /")[0])
    assert float(means[0]) + float(means[1]) == pytest.approx(1, abs=2e-4)  # B is A inverted
    for root in (a, b):  # and the pixels are those of the folder's own pictures: its PNG copies decode to them
        read, reference = folder_data(root, tmp_path), folder_data(png_copy(root, tmp_path / f"{root.name}-png"), tmp_path)
        assert torch.equal(read.train.images, reference.train.images) and torch.equal(read.test.images, reference.test.images)
        assert torch.equal(read.train.labels, reference.train.labels)
    assert "from cache" in capsys.readouterr().err  # the second load of each read its own cache
    shutil.copytree(a, tmp_path / "A2")  # a copy elsewhere, bytes and times alike: its own cache all the same
    result = runner.invoke(app, ["data", "folder", "--data-dir", str(tmp_path / "A2")])
    assert result.exit_code == 0 and "decoded 10 images" in result.output, result.output


def test_a_file_replaced_in_place_with_its_time_kept_decodes_again(tmp_path, capsys):
    root = bmp_folder(tmp_path / "pictures")
    first = folder_data(root, tmp_path)
    picture = root / "train" / "x" / "0.bmp"
    before = picture.stat()
    save(picture, 255 - pattern(0, 0), fmt="BMP")  # other pixels, the same size; its time put back
    os.utime(picture, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert picture.stat().st_size == before.st_size and picture.stat().st_mtime_ns == before.st_mtime_ns
    capsys.readouterr()
    second = folder_data(root, tmp_path)
    assert "decoded 10 images" in capsys.readouterr().err
    assert torch.equal(second.train.images[0, 0], torch.from_numpy(255 - pattern(0, 0)))
    assert torch.equal(first.train.images[1:], second.train.images[1:])


def test_a_corrupt_cache_file_is_rebuilt_never_trusted(tmp_path, capsys, cache_here):
    root = make_folder(tmp_path / "pictures", per_class=8, mixed=False)
    cfg = load_config(None, overrides(root, tmp_path)).data
    first = load_data(cfg, 0, torch.device("cpu"))
    [cache_file] = (cache_here / "folder").glob("*.npz")
    raw = bytearray(cache_file.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # one flipped bit pattern inside the pixels
    cache_file.write_bytes(bytes(raw))
    capsys.readouterr()
    again = load_data(cfg, 0, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "is corrupt" in err and "decoded 48 images" in err
    assert torch.equal(first.train.images, again.train.images)
    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # truncated
    load_data(cfg, 0, torch.device("cpu"))
    assert "is corrupt" in capsys.readouterr().err


def test_without_test_folder_the_test_split_is_the_same_for_every_seed(tmp_path):
    root = make_folder(tmp_path / "pictures", per_class=20, splits=("train",), mixed=False)
    cfg = load_config(None, overrides(root, tmp_path, "data.test_size=0.25")).data
    runs = [load_data(cfg, seed, torch.device("cpu")) for seed in (0, 1)]
    assert len(runs[0].test) == 15 and torch.bincount(runs[0].test.labels).tolist() == [5, 5, 5]
    assert torch.equal(runs[0].test.images, runs[1].test.images) and torch.equal(runs[0].test.labels, runs[1].test.labels)
    assert not torch.equal(runs[0].val.images, runs[1].val.images)  # the validation split does follow the seed
    counted = load_data(load_config(None, overrides(root, tmp_path, "data.test_size=6")).data, 0, torch.device("cpu"))
    assert len(counted.test) == 6


def test_a_val_folder_is_the_validation_split(tmp_path):
    root = make_folder(tmp_path / "pictures", per_class=6, splits=("train", "val", "test"), mixed=False)
    data = load_data(load_config(None, overrides(root, tmp_path, "data.val_size=5000")).data, 0, torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (18, 18, 18)
    report_mode = load_data(load_config(None, overrides(root, tmp_path, "data.val_size=0")).data, 0, torch.device("cpu"))
    assert report_mode.val is None and len(report_mode.train) == 18


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` grey pixels: a decompression bomb's header, no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(0, 3)).save(buffer, format="PNG")
    return buffer.getvalue()[:60]


def bad_file(root: Path, name: str, content: bytes) -> Path:
    path = root / "train" / "dog" / name
    path.write_bytes(content)
    return path


def break_empty_class(root: Path) -> str:
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("no pictures here")
    return "train/emu: an empty class folder"


def break_test_class(root: Path) -> str:
    save(root / "test" / "yak" / "0.png", pattern(0, 1))
    return "test/yak: class 'yak' is not in train/"


def break_single_class(root: Path) -> str:
    for name in CLASSES[1:]:
        for path in (root / "train" / name).iterdir():
            path.unlink()
        (root / "train" / name).rmdir()
    return "train: only one class (cat)"


def break_no_pictures(root: Path) -> str:
    for name in CLASSES:
        for path in (root / "train" / name).iterdir():
            path.unlink()
        (root / "train" / name).rmdir()
    return "train: no class folders, so no pictures"


def break_folder_loop(root: Path) -> str:
    (root / "train" / "dog" / "again").symlink_to(root / "train")
    return "train/dog/again: a symlink loop"


def break_file_loop(root: Path) -> str:
    (root / "train" / "dog" / "self.png").symlink_to(root / "train" / "dog" / "self.png")
    return "train/dog/self.png: a symlink loop"


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def test_only_raster_formats_that_pillow_decodes_itself_are_pictures(tmp_path):
    """An .eps (which Pillow would hand to Ghostscript) in a class folder is passed over like a text file."""
    root = make_folder(tmp_path / "pictures", per_class=4, mixed=False)
    bad_file(root, "vector.eps", EPS)
    assert ".eps" not in pics.extensions() and {".png", ".jpg", ".webp", ".tif", ".bmp", ".gif"} <= pics.extensions()
    data = load_data(load_config(None, overrides(root, tmp_path, "data.val_size=0")).data, 0, torch.device("cpu"))
    assert len(data.train) == 3 * 4


def breaking(name: str, content: bytes, problem: str):
    """A case that adds the bad picture train/dog/``name``, and the message expected."""
    return lambda root: (bad_file(root, name, content), f"train/dog/{name}: {problem}")[1]


BAD_DATA = {
    "truncated": breaking("cut.png", truncated_png(), "cannot be decoded"),
    "not a picture": breaking("text.jpg", b"hello", "not a picture in a format cnnlab reads"),
    # Pillow knows a file by its content: an EPS named .png must not reach the EPS reader (and Ghostscript).
    "eps named png": breaking("vector.png", EPS, "not a picture in a format cnnlab reads"),
    "bomb": breaking("bomb.png", png_header_only(20000, 20000), "a decompression bomb"),
    "bomb (warning size)": breaking("big.png", png_header_only(10000, 10000), "a decompression bomb"),
    "empty class": break_empty_class,
    "test class not in train": break_test_class,
    "single class": break_single_class,
    "no pictures": break_no_pictures,
    "folder symlink loop": break_folder_loop,
    "file symlink loop": break_file_loop,
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_exit_2_naming_the_file_and_nothing_is_written(tmp_path, case, cache_here):
    root = make_folder(tmp_path / "pictures", per_class=4, mixed=False)
    expected = BAD_DATA[case](root)
    args = [f"--set={value}" for value in overrides(root, tmp_path)]
    result = runner.invoke(app, ["run", str(CONFIG), *args, "--quiet"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "results").exists() and not list(cache_here.rglob("*"))


def test_skip_bad_trains_without_the_bad_pictures_and_records_them(tmp_path):
    root = make_folder(tmp_path / "pictures", per_class=8, mixed=False)
    bad_file(root, "cut.png", truncated_png())
    summary = fit(load_config(None, overrides(root, tmp_path, "data.skip_bad=true")), quiet=True)
    written = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert written["status"] == "completed" and written["skipped_images"] == 1
    assert written["skipped_examples"][0].startswith("train/dog/cut.png: cannot be decoded")
    assert written["train_size"] + written["val_size"] == 24  # the 24 good ones


def test_describe_reads_headers_only_and_agrees_with_the_load(tmp_path):
    root = make_folder(tmp_path / "pictures", per_class=6)
    cfg = load_config(None, overrides(root, tmp_path)).data
    before = describe(cfg)
    assert (before.classes, before.channels, before.image_size) == (CLASSES, 3, (16, 16))
    data = load_data(cfg, 0, torch.device("cpu"))
    assert describe(cfg) == before and data.spec.input_shape == before.input_shape


def test_a_load_lists_the_folder_once_decoded_or_cached(tmp_path, monkeypatch, capsys):
    # Listing and stat-ing every file was most of a cached load of 70,000 pictures; describe and
    # read_splits each did it, so a load did it twice. The real scan still runs: this only counts it.
    from cnnlab.data import folder

    scans = []
    real_scan = folder.scan
    monkeypatch.setattr(folder, "scan", lambda root: scans.append(root) or real_scan(root))
    root = make_folder(tmp_path / "pictures", per_class=6)
    cfg = load_config(None, overrides(root, tmp_path)).data
    first = load_data(cfg, 0, torch.device("cpu"))
    assert len(scans) == 1 and "decoded 36 images" in capsys.readouterr().err
    second = load_data(cfg, 0, torch.device("cpu"))
    assert len(scans) == 2 and "from cache" in capsys.readouterr().err
    assert first.spec == second.spec == describe(cfg).model_copy(update={"mean": first.spec.mean, "std": first.spec.std,
                                                                          "source": first.spec.source})


def test_a_file_changed_between_its_hash_and_its_decoding_leaves_no_cache(tmp_path, capsys, cache_here, monkeypatch):
    """The key names the bytes hashed; pixels decoded from other bytes are never stored under it."""
    from cnnlab.data import folder

    root = bmp_folder(tmp_path / "pictures")
    picture = root / "train" / "x" / "0.bmp"
    real = folder.file_digests

    def then_changed(found):
        digests = real(found)
        save(picture, 255 - pattern(0, 0), fmt="BMP")  # after its hash, before its decoding
        return digests

    monkeypatch.setattr(folder, "file_digests", then_changed)
    data = folder_data(root, tmp_path)
    assert "no cache (1 picture file(s) changed while the folder was read" in capsys.readouterr().err
    assert torch.equal(data.train.images[0, 0], torch.from_numpy(255 - pattern(0, 0)))  # as it is now
    assert not list(cache_here.rglob("*.npz"))
    monkeypatch.setattr(folder, "file_digests", real)
    assert torch.equal(folder_data(root, tmp_path).train.images, data.train.images)
    assert "decoded 10 images" in capsys.readouterr().err and len(list(cache_here.rglob("*.npz"))) == 1


def test_class_folders_whose_names_only_look_alike_are_told_apart_in_words(tmp_path):
    # "Café" spelled in NFC in train/ and in NFD in test/: one class to the eye, two strings to the file system.
    import unicodedata

    from typer.testing import CliRunner

    from cnnlab.cli import app

    nfc, nfd = unicodedata.normalize("NFC", "Café"), unicodedata.normalize("NFD", "Café")
    pixels = np.zeros((4, 4), dtype=np.uint8)
    for split, names in (("train", (nfc, "tea")), ("test", (nfd, "tea"))):
        for name in names:
            (tmp_path / "d" / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(tmp_path / "d" / split / name / "0.png")
    said = CliRunner().invoke(app, ["data", "folder", "--data-dir", str(tmp_path / "d")])
    assert said.exit_code == 2, said.output
    assert "is not train/'s 'Café': they differ only in Unicode normalisation" in said.output

    (tmp_path / "d" / "train" / nfd).mkdir()  # both spellings in train/: two classes that look the same
    Image.fromarray(pixels).save(tmp_path / "d" / "train" / nfd / "0.png")
    said = CliRunner().invoke(app, ["data", "folder", "--data-dir", str(tmp_path / "d")])
    assert said.exit_code == 2, said.output
    assert "look the same but they differ only in Unicode normalisation" in said.output


def test_pictures_of_one_value_everywhere_are_named_not_a_validation_dump(tmp_path):
    # Nothing to learn and nothing to normalise by (a std of 0): one line naming the folder, exit 2.
    from typer.testing import CliRunner

    from cnnlab.cli import app

    for name in ("a", "b"):
        (tmp_path / "d" / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F").save(tmp_path / "d" / "train" / name / f"{i}.tif")
    said = CliRunner().invoke(app, ["data", "folder", "--data-dir", str(tmp_path / "d")])
    assert said.exit_code == 2, said.output
    assert "in every training picture every pixel has the same value (0.502 on a 0-1 scale)" in said.output
    assert "ValidationError" not in said.output and "pydantic" not in said.output
