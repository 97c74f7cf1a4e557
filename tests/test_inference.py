"""`cnnlab predict` on pictures and data-set images, and `cnnlab export` through the real runtimes."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab import inference
from cnnlab.cli import app
from cnnlab.data import described
from cnnlab.errors import UserError
from cnnlab.inference import export, predict
from cnnlab.runs import open_run

runner = CliRunner()
FASHION = described("fashion-mnist")


def test_a_picture_of_a_data_set_image_gets_the_class_eval_gives_it(trained, tmp_path):
    run_dir, _ = trained
    opened = open_run(run_dir)
    test = opened.load_data().test
    for index in (0, 7):
        as_data = predict(run_dir, [], index=index)[0]
        picture = tmp_path / f"test{index}.png"
        Image.fromarray(test.images[index, 0].numpy()).save(picture)
        as_file = predict(run_dir, [picture])[0]
        assert as_file.top[0][0] == as_data.top[0][0]
        assert as_file.top[0][1] == pytest.approx(as_data.top[0][1], abs=1e-6)  # the very same pixels
        # The same garment as a photo would be: 4x larger, in colour, dark on a light background.
        photo = tmp_path / f"photo{index}.jpg"
        big = Image.fromarray(255 - test.images[index, 0].numpy()).resize((112, 112), Image.Resampling.NEAREST)
        big.convert("RGB").save(photo, quality=95)
        assert predict(run_dir, [photo])[0].top[0][0] == as_data.top[0][0]
        for fmt in ("WEBP", "TIFF", "BMP", "GIF"):  # any format a data folder takes; lossless, so the very same answer
            other = tmp_path / f"test{index}.{fmt.lower()}"
            lossless = {"lossless": True} if fmt == "WEBP" else {}
            Image.fromarray(test.images[index, 0].numpy()).save(other, format=fmt, **lossless)
            assert predict(run_dir, [other])[0].top[0][1] == pytest.approx(as_data.top[0][1], abs=1e-6), fmt
    with torch.no_grad():  # and that class is the model's own answer on the data set (what `eval` reports)
        x = opened.load_data().prepare(test.images[:8])
        assert [FASHION.classes[int(c)] for c in opened.model(x).argmax(1)][7] == predict(run_dir, [], index=7)[0].top[0][0]


def test_predict_prints_the_top_classes_or_json(trained, tmp_path):
    run_dir, _ = trained
    result = runner.invoke(app, ["predict", str(run_dir), "--image", "3", "--json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.output)
    assert entry["image"] == "test image 3" and len(entry["top"]) == 3
    assert entry["top"][0]["probability"] >= entry["top"][1]["probability"] and entry["label"] in FASHION.classes
    text = runner.invoke(app, ["predict", str(run_dir), "--image", "3", "--top", "2"])
    assert text.exit_code == 0 and text.output.count("%") == 2 and "(true: " in text.output


def png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("notes.png", b"these are not pixels", "not an image cnnlab can read"),
    ("empty.png", b"", "the file is empty"),
    ("bomb.png", png_header_claiming(100_000, 100_000), "100,000 x 100,000 pixels is too large a picture"),
    ("drawing.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image cnnlab can read"),  # EPS
    ("missing.png", "skip", "no such image file"),
])
def test_a_bad_picture_is_exit_2_naming_it(trained, tmp_path, name, content, message):
    run_dir, _ = trained
    path = tmp_path / name
    if content is None:
        Image.new("L", (10, 10)).save(path, format="GIF")
    elif content != "skip":
        path.write_bytes(content)
    result = runner.invoke(app, ["predict", str(run_dir), str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and name in result.output and "Traceback" not in result.output


def test_a_folder_or_a_fifo_is_named_for_what_it_is_and_never_opened_for_reading(trained, tmp_path):
    run_dir, _ = trained
    (tmp_path / "photos").mkdir()
    result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "photos")])
    assert result.exit_code == 2 and "photos: is a folder" in result.output, result.output
    os.mkfifo(tmp_path / "pipe.png")  # nothing ever writes to it: a blocking open would wait forever
    result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "pipe.png")])
    assert result.exit_code == 2 and "pipe.png: is a FIFO (named pipe), not a regular file" in result.output, result.output


def test_a_phones_mpo_jpeg_is_read_by_its_first_frame(trained, tmp_path):
    run_dir, _ = trained
    garment = Image.fromarray(255 - open_run(run_dir).load_data().test.images[3, 0].numpy()).resize((84, 84))
    garment.convert("RGB").save(tmp_path / "photo.jpg", quality=95)
    depth_map = Image.new("RGB", (84, 84), (0, 0, 0))
    garment.convert("RGB").save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[depth_map], quality=95)
    with Image.open(tmp_path / "phone.jpg") as check:
        assert check.format == "MPO" and check.n_frames == 2
    assert torch.equal(inference.load_image(tmp_path / "phone.jpg", FASHION),
                       inference.load_image(tmp_path / "photo.jpg", FASHION))
    assert predict(run_dir, [tmp_path / "phone.jpg"])[0].top == predict(run_dir, [tmp_path / "photo.jpg"])[0].top


def test_a_very_long_picture_is_reduced_in_pillow_never_walked_pixel_by_pixel(tmp_path):
    tall = Image.new("L", (1, 5_000_000), 255)  # 5 megapixels in a column: a PNG of a few KB
    tall.paste(0, (0, 2_000_000, 1, 3_000_000))  # a dark band across the middle fifth, on white
    tall.save(tmp_path / "tall.png")
    del tall
    tracemalloc.start()
    try:
        image = inference.load_image(tmp_path / "tall.png", FASHION)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes of Python objects for one picture"  # a list of its border: 80 MB
    column = image[0, :, 13]  # fitted to 1 x 28, centred; inverted, as its background is light
    assert image.sum() == column.sum() and column[:8].max() < 10 and column[11:16].min() > 200


def test_onnx_export_round_trips_through_onnxruntime(trained, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    run_dir, _ = trained
    result = runner.invoke(app, ["export", str(run_dir), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "max abs difference of logits against PyTorch on 200 test images" in result.output
    opened = open_run(run_dir)
    test = opened.load_data().test
    raw = test.images[:50].float() / 255  # raw pixels: the normalisation is inside the file
    [logits] = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"pixels": raw.numpy()})
    with torch.no_grad():
        expected = opened.model(opened.load_data().prepare(test.images[:50])).numpy()
    assert np.abs(logits - expected).max() < 1e-4


def test_torchscript_export_loads_without_cnnlab(trained, tmp_path):
    run_dir, _ = trained
    done = export(run_dir, "torchscript", tmp_path / "m.pt")
    assert done.max_difference < 1e-4
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    opened = open_run(run_dir)
    test = opened.load_data().test
    with torch.no_grad():
        assert torch.allclose(loaded(test.images[:20].float() / 255), opened.model(opened.load_data().prepare(test.images[:20])),
                              atol=1e-5)


def test_an_export_that_disagrees_is_not_written(trained, tmp_path, monkeypatch):
    run_dir, _ = trained
    monkeypatch.setattr(inference, "EXPORT_TOLERANCE", -1.0)  # no export can agree this well
    with pytest.raises(UserError, match="differs from the PyTorch model"):
        export(run_dir, "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
    bad = runner.invoke(app, ["export", str(run_dir), "--format", "keras"])
    assert bad.exit_code == 2 and "choose onnx or torchscript" in bad.output


def test_a_16_bit_picture_is_scaled_not_clipped(trained, tmp_path):
    run_dir, _ = trained
    test = open_run(run_dir).load_data().test
    eight = tmp_path / "eight.png"
    Image.fromarray(test.images[5, 0].numpy()).save(eight)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(test.images[5, 0].numpy().astype(np.uint16) * 257).save(sixteen)  # a 16-bit grey PNG
    with Image.open(sixteen) as check:
        assert check.mode.startswith("I;16") or check.mode == "I"
    # the same picture, every pixel
    assert torch.equal(inference.load_image(sixteen, FASHION), inference.load_image(eight, FASHION))
    assert predict(run_dir, [sixteen])[0].top == predict(run_dir, [eight])[0].top


def test_float_and_wide_pictures_are_the_pixels_of_their_8_bit_png_never_stretched(tmp_path):
    """A float TIFF of k/255 and a PGM of k*257 (Pillow: mode I) are the 8-bit PNG of k, not stretched per picture to
    black-to-white: a faint garment stays faint, as it would in a data folder."""
    faint = (np.arange(28 * 28).reshape(28, 28) % 90 + 30).astype(np.uint8)  # 30 ... 119
    Image.fromarray(faint).save(tmp_path / "eight.png")
    Image.fromarray(faint.astype(np.float32) / 255).save(tmp_path / "float.tif")
    Image.fromarray(faint.astype(np.uint16) * 257).save(tmp_path / "wide.pgm")
    expected = inference.load_image(tmp_path / "eight.png", FASHION)
    for name in ("float.tif", "wide.pgm"):
        assert torch.equal(inference.load_image(tmp_path / name, FASHION), expected), name


def test_a_picture_the_mode_rule_refuses_is_exit_2_naming_it_and_its_mode(trained, tmp_path):
    run_dir, _ = trained
    Image.fromarray(np.full((28, 28), 70_000, dtype=np.int32)).save(tmp_path / "counts.tif")
    Image.fromarray(np.full((28, 28), 2.5, dtype=np.float32)).save(tmp_path / "bright.tif")
    for name, says in (("counts.tif", "mode I (32-bit integer)"), ("bright.tif", "mode F (floating point) with values "
                                                                                "from 2.5 to 2.5")):
        result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / name)])
        assert result.exit_code == 2, result.output
        assert f"{name}: {says}" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1 and "save it as" in result.output, result.output


def test_export_to_a_place_it_cannot_write_is_exit_2_and_files_it_writes_are_readable(trained, tmp_path):
    import os
    import stat

    run_dir, _ = trained
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    result = runner.invoke(app, ["export", str(run_dir), "--format", "torchscript", "-o", str(blocked / "m.pt")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output and str(blocked / "m.pt") in result.output
    done = export(run_dir, "torchscript", tmp_path / "m.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(done.path.stat().st_mode) == 0o666 & ~umask


def test_an_exports_tolerance_follows_the_size_of_the_logits():
    """float32 rounds relative to a number's size: logits in the thousands may differ by more than 1e-4 and be as
    exact; logits near 1 may not; NaN never agrees."""
    big = torch.tensor([[3000.0, -2500.0]])
    assert inference.export_difference(big + 0.01, big) == pytest.approx((0.01, 0.3), rel=0.01)
    small = torch.tensor([[0.5, -0.2]])
    difference, allowed = inference.export_difference(small + 0.001, small)
    assert difference > allowed == 1e-4
    difference, allowed = inference.export_difference(torch.full((1, 2), float("nan")), small)
    assert not difference <= allowed


def test_predict_show_draws_what_the_network_received_beside_its_top_classes(trained, tmp_path):
    from cnnlab.plots import prediction_figure

    run_dir, _ = trained
    Image.new("RGB", (120, 80), "white").save(tmp_path / "shoe.jpg")
    result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "shoe.jpg"), "--show", "--json"])
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.output)
    assert answer["shown"] == str(run_dir / "predict" / "shoe.png")
    with Image.open(answer["shown"]) as drawn:
        assert drawn.format == "PNG"
    [prediction] = predict(run_dir, [tmp_path / "shoe.jpg"], top=2)
    figure = prediction_figure(prediction.image, prediction.top, "shoe.jpg")
    seen, bars = figure.axes
    assert (seen.images[0].get_array() == prediction.image[0].numpy()).all()  # the very pixels, 28x28, not the photo
    assert [p.get_width() for p in bars.patches] == pytest.approx([p for _, p in prediction.top][::-1])
