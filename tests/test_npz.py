"""data.name: npz: MedMNIST-style NumPy archives, grey and colour, trained for an epoch; bad archives named."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import data_set, describe
from cnnlab.engine import fit
from cnnlab.errors import UserError
from cnnlab.inference import load_image, predict
from cnnlab.runs import open_run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def arrays(n: int, seed: int, colour: bool = False, column_labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images (a class-placed block over noise), N x 28 x 28, or N x 32 x 32 x 3 in colour."""
    labels = np.arange(n) % 10
    images = make_images(torch.from_numpy(labels), seed).numpy()
    if colour:  # padded to 32x32, in three different channels
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        images = np.stack([images, 255 - images, images // 2], axis=3)
    return images, (labels[:, None] if column_labels else labels)


def write_npz(path: Path, colour: bool = False, val: bool = True, **replace) -> Path:
    parts = {}
    for split, n in (("train", 300), ("val", 60), ("test", 100)):
        if split == "val" and not val:
            continue
        parts[f"{split}_images"], parts[f"{split}_labels"] = arrays(n, seed=n, colour=colour, column_labels=not colour)
    parts.update(replace)
    np.savez(path, **{key: value for key, value in parts.items() if value is not None})
    return path


def settings(archive: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["data.name=npz", f"data.root={archive}", "data.val_size=60", "train.epochs=1", "train.batch_size=32",
            "train.device=cpu", "model.activation=relu", "optim.lr=0.1", f"output.dir={tmp_path / 'results'}", *extra]


def test_a_grey_archive_trains_for_an_epoch_with_its_own_validation_images(tmp_path):
    archive = write_npz(tmp_path / "grey.npz")
    cfg = load_config(None, settings(archive, tmp_path))
    spec = describe(cfg.data)
    assert (spec.name, spec.title, spec.input_shape, spec.classes) == ("npz", "grey.npz", (1, 28, 28),
                                                                       tuple("0123456789"))
    summary = fit(cfg, quiet=True)
    recorded = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert recorded["data"]["source"] == str(archive) and recorded["data"]["dark_background"] is False
    assert summary["test_acc"] > 0.3  # learnt something in one epoch (chance: 0.1)


def test_a_colour_archive_trains_with_the_configs_class_names(tmp_path):
    archive = write_npz(tmp_path / "colour.npz", colour=True, val=False)
    names = [f"kind {c}" for c in "abcdefghij"]
    cfg = load_config(None, settings(archive, tmp_path, f"data.classes={json.dumps(names)}"))
    assert describe(cfg.data).input_shape == (3, 32, 32) and describe(cfg.data).classes == tuple(names)
    summary = fit(cfg, quiet=True)
    recorded = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert recorded["data"]["classes"] == names and len(recorded["data"]["mean"]) == 3


class Planted:
    """An object whose unpickling would write a file: what a malicious archive carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    marker = tmp_path / "pwned"
    not_zip = tmp_path / "not.npz"
    not_zip.write_bytes(b"just some bytes")
    images, labels = arrays(100, seed=1)
    return {
        "missing key": (write_npz(tmp_path / "a.npz", test_labels=None), "lacks test_labels"),
        "pickled array": (write_npz(tmp_path / "b.npz", test_labels=np.array([Planted(marker)] * 100, dtype=object)),
                          "test_labels is a pickled (object) array, which cnnlab never loads"),
        "lengths": (write_npz(tmp_path / "c.npz", test_labels=labels[:90]),
                    "test_images holds 100 images but test_labels 90 labels"),
        "float images": (write_npz(tmp_path / "d.npz", train_images=images.astype(np.float32)),
                         "train_images are float32; images must be uint8 (0-255)"),
        "float labels": (write_npz(tmp_path / "e.npz", test_labels=labels.astype(np.float64)),
                         "test_labels are float64; labels must be integers"),
        "multi-label": (write_npz(tmp_path / "f.npz", test_labels=np.zeros((100, 3), dtype=np.int64)),
                        "test_labels has shape (100, 3); labels are N or N x 1"),
        "negative label": (write_npz(tmp_path / "g.npz", test_labels=labels - 1), "test_labels holds -1"),
        "val without labels": (write_npz(tmp_path / "h.npz", val_labels=None), "has val_images without its pair"),
        "sizes differ": (write_npz(tmp_path / "i.npz", test_images=images[:, :20, :20]),
                         "test_images are 1x20x20 but train_images 1x28x28"),
        "not an archive": (not_zip, "not a NumPy .npz archive cnnlab can read"),
        "a folder": (tmp_path, "is a folder; data.root names the .npz file itself"),
        "one class": (write_npz(tmp_path / "j.npz", **{f"{split}_labels": np.zeros((n, 1), np.int64) for split, n in
                                                      (("train", 300), ("val", 60), ("test", 100))}),
                      "only one class (0); a classifier needs two or more classes"),
        "zero-size side": (write_npz(tmp_path / "k.npz", **{f"{split}_images": np.zeros((n, 0, 28), np.uint8) for split, n in
                                                           (("train", 300), ("val", 60), ("test", 100))}),
                           "train_images has shape (300, 0, 28): images of 0x28 pixels; each side must be 1 to 8,192"),
        "huge label": (write_npz(tmp_path / "l.npz", test_labels=np.append(labels[1:, 0], 2**63).astype(np.uint64)),
                       "test_labels holds label 9,223,372,036,854,775,808; at most 100,000 classes"),
        "short member": (npz_of(tmp_path / "m.npz", test_labels=npy_bytes(labels)[:-400]),
                         "test_labels: its header declares 800 bytes of int64 numbers, and the archive holds 400"),
    }


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as numpy.save writes it: a .npy header, then its bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_of(path: Path, compression: int = zipfile.ZIP_STORED, **members: bytes) -> Path:
    """A .npz archive as write_npz makes it, but for ``members``: .npy files given as raw bytes (valid CRCs)."""
    with np.load(write_npz(path)) as made:
        raw = {key: npy_bytes(made[key]) for key in made.files}
    with zipfile.ZipFile(path, "w", compression) as archive:
        for key, data in {**raw, **members}.items():
            archive.writestr(f"{key}.npy", data)
    return path


@pytest.mark.parametrize("case", ["missing key", "pickled array", "lengths", "float images", "float labels", "multi-label",
                                  "negative label", "val without labels", "sizes differ", "not an archive", "a folder",
                                  "one class", "zero-size side", "huge label", "short member"])
def test_a_bad_archive_is_exit_2_naming_the_file_and_the_problem(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    archive, message = bad_cases(tmp_path)[case]
    result = CliRunner().invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--data-dir", str(archive), "--device", "cpu",
                                      "--results", str(tmp_path / "results"), "--set", "data.name=npz"])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())  # the message as one line, however the terminal wrapped it
    assert message in flat and str(archive.name) in flat
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()
    assert not (tmp_path / "pwned").exists()  # the planted pickle never ran


def test_cnnlab_data_names_an_archive_of_images_without_pixels(tmp_path):
    archive = bad_cases(tmp_path)["zero-size side"][0]
    result = CliRunner().invoke(app, ["data", "npz", "--root", str(archive)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{archive}: train_images has shape (300, 0, 28)" in " ".join(result.output.split())


def test_an_archive_member_is_read_no_further_than_its_header_declares(tmp_path, monkeypatch):
    # 40 MB of zeros (40 kB deflated) after train_images' declared bytes: refused without inflating them
    padded = npz_of(tmp_path / "padded.npz", zipfile.ZIP_DEFLATED,
                    train_images=npy_bytes(arrays(300, seed=300)[0]) + bytes(40 << 20))
    assert padded.stat().st_size < 1 << 20
    cfg = load_config(None, settings(padded, tmp_path))
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=rf"^{padded}: train_images: its header declares 235,200 bytes of uint8 numbers, "
                                            "and the archive holds 41,943,040 more"):
            data_set("npz").read_splits(cfg.data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the arrays' own bytes (a few hundred kB) and no more
    # An array larger than the memory available is refused before any of it is read.
    monkeypatch.setattr("cnnlab.data.bounded.host_memory_available", lambda: 200_000)
    cfg = load_config(None, settings(write_npz(tmp_path / "plain.npz"), tmp_path))
    with pytest.raises(UserError, match=r"plain.npz: train_images: its header declares 235,200 bytes, more than the 200,000 "
                                        "bytes of memory"):
        data_set("npz").read_splits(cfg.data)


def test_labels_beyond_the_configs_class_names_are_named(tmp_path):
    archive = write_npz(tmp_path / "grey.npz")
    cfg = load_config(None, settings(archive, tmp_path, "data.classes=[a, b, c]"))
    with pytest.raises(UserError, match="holds label 9, but data.classes names 3 classes"):
        describe(cfg.data)


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory) -> Path:
    """A LeNet trained for three epochs on a 3x32x32 archive: a colour data set's run."""
    root = tmp_path_factory.mktemp("colour")
    archive = write_npz(root / "colour.npz", colour=True)
    summary = fit(load_config(None, settings(archive, root, "train.epochs=3")), quiet=True)
    return Path(summary["run_dir"])


def test_predict_takes_colour_pictures_for_a_colour_run(colour_run, tmp_path):
    opened = open_run(colour_run)
    test = opened.load_data().test
    for index in (0, 5):
        as_data = predict(colour_run, [], index=index)[0]
        picture = tmp_path / f"test{index}.png"
        Image.fromarray(test.images[index].permute(1, 2, 0).numpy(), mode="RGB").save(picture)
        assert torch.equal(load_image(picture, opened.spec), test.images[index])  # the very same pixels, not grey
        as_file = predict(colour_run, [picture])[0]
        assert as_file.top[0] == pytest.approx(as_data.top[0], abs=1e-6)
        # Larger, with a white margin: scaled to cover 32x32 and centre-cropped, never inverted (no dark background).
        framed = Image.new("RGB", (80, 64), (255, 255, 255))
        framed.paste(Image.open(picture).resize((64, 64), Image.Resampling.NEAREST), (8, 0))
        framed.save(tmp_path / "framed.png")
        made = load_image(tmp_path / "framed.png", opened.spec).float()
        assert (made - test.images[index].float()).abs().mean() < 4  # the same picture but for Lanczos's ringing
    result = CliRunner().invoke(app, ["predict", str(colour_run), str(tmp_path / "framed.png"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["top"][0]["class"] == predict(colour_run, [], index=5)[0].top[0][0]


def test_onnx_export_of_a_colour_run_agrees_and_names_its_classes(colour_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    result = CliRunner().invoke(app, ["export", str(colour_run), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["cnnlab.classes"]) == list("0123456789") and json.loads(meta["cnnlab.input_shape"]) == [3, 32, 32]
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]
    opened = open_run(colour_run)
    test = opened.load_data().test
    [logits] = session.run(None, {"pixels": (test.images[:20].float() / 255).numpy()})
    with torch.no_grad():
        expected = opened.model(opened.load_data().prepare(test.images[:20])).numpy()
    assert np.abs(logits - expected).max() < 1e-4
    picture = tmp_path / "p.png"
    Image.fromarray(test.images[3].permute(1, 2, 0).numpy(), mode="RGB").save(picture)
    [one] = session.run(None, {"pixels": (load_image(picture, opened.spec)[None].float() / 255).numpy()})
    assert json.loads(meta["cnnlab.classes"])[int(one.argmax())] == predict(colour_run, [picture])[0].top[0][0]
