"""CIFAR-10 and CIFAR-100 on tiny sets the tests write in the published layouts (binary, and pickled Python
as Python 2 wrote it): read exactly, trained for an epoch, evaluated, drawn in colour and reported;
a colour picture predicted alike by PyTorch and the ONNX export; a malicious pickle refused without
running, a file of the wrong length named; a sweep over two sets; scripts/fashion_to_cifar.py's layout."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import data_set, describe
from cnnlab.data.cifar10 import CLASSES
from cnnlab.data.cifar100 import COARSE, FINE
from cnnlab.engine import fit
from cnnlab.errors import UserError
from cnnlab.evaluation import evaluate_run
from cnnlab.inference import load_image, predict
from cnnlab.report import write_report
from cnnlab.runs import open_run
from cnnlab.visualize import visualize

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def cifar_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Learnable colour images [N, 3, 32, 32]: class c lights an 8x8 block at its own place, in its own colour."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (len(labels), 3, 32, 32))
    for i, c in enumerate(labels % 12):
        row, col = 8 * (c // 4), 8 * (c % 4)
        images[i, c % 3, row : row + 8, col : col + 8] += 190
    return images.astype(np.uint8)


class Python2Pickler(pickle._Pickler):
    """Writes text and bytes as Python 2 wrote its ``str`` (BINSTRING), as in the published pickles (numpy's
    dtype arguments among them)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str2(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw if len(raw) < 256 else
                   pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_str2


def python2_pickle(value) -> bytes:
    """``value`` pickled (protocol 2) as the CIFAR files are: numpy arrays named by numpy 1's module path."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(value)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar(root: Path, name: str, layout: str, n_train: int = 200, n_test: int = 100) -> dict[str, tuple]:
    """A tiny ``name`` set in ``root`` in the ``layout`` distribution; returns split -> (images, fine, coarse)."""
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 10
        splits[split] = (cifar_images(fine, seed=n), fine, fine // 5)
    if name == "cifar10":
        folder = root / ("cifar-10-batches-bin" if layout == "binary" else "cifar-10-batches-py")
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        folder = root / ("cifar-100-binary" if layout == "binary" else "cifar-100-python")
        files = {"train": ["train"], "test": ["test"]}
    folder.mkdir(parents=True)
    for split, (images, fine, coarse) in splits.items():
        for part, stem in zip(range(len(files[split])), files[split]):
            rows = slice(part * len(images) // len(files[split]), (part + 1) * len(images) // len(files[split]))
            flat = images[rows].reshape(-1, 3072)
            if layout == "binary":
                labels = [fine[rows]] if name == "cifar10" else [coarse[rows], fine[rows]]
                records = np.concatenate([np.stack(labels, 1).astype(np.uint8), flat], 1)
                (folder / f"{stem}.bin").write_bytes(records.tobytes())
            else:
                keys = {b"labels": fine[rows].tolist()} if name == "cifar10" else \
                    {b"fine_labels": fine[rows].tolist(), b"coarse_labels": coarse[rows].tolist()}
                batch = {b"batch_label": f"{split} batch".encode(), **keys, b"data": flat,
                         b"filenames": [f"img_{i}.png".encode() for i in range(len(flat))]}
                (folder / stem).write_bytes(python2_pickle(batch))
    if layout == "python":
        meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072} \
            if name == "cifar10" else {b"fine_label_names": [c.encode() for c in FINE],
                                       b"coarse_label_names": [c.encode() for c in COARSE]}
        (folder / ("batches.meta" if name == "cifar10" else "meta")).write_bytes(python2_pickle(meta))
    elif name == "cifar10":
        (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")  # as published: a blank line at the end
    else:
        (folder / "fine_label_names.txt").write_text("\n".join(FINE) + "\n")
        (folder / "coarse_label_names.txt").write_text("\n".join(COARSE) + "\n")
    return splits


def said(result) -> str:
    """A command's output as one line (the console wraps long ones at spaces)."""
    return " ".join(result.output.split())


def overrides(root: Path, name: str, tmp_path: Path, *more: str) -> list[str]:
    return [f"data.name={name}", f"data.root={root}", "data.check_counts=false", "data.val_size=50", "train.epochs=1",
            "train.batch_size=32", "train.device=cpu", "model.activation=relu", "optim.lr=0.05",
            f"output.dir={tmp_path / 'results'}", *more]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["binary", "python"])
def test_each_cifar_distribution_is_read_exactly_and_trains_for_an_epoch(tmp_path, name, layout):
    written = write_cifar(tmp_path / "data", name, layout)
    cfg = load_config(None, overrides(tmp_path / "data", name, tmp_path))
    folder, train, test = data_set(name).read_splits(cfg.data)
    assert folder.parent == tmp_path / "data"
    for split, read in (("train", train), ("test", test)):
        images, fine, _ = written[split]
        assert read.images.dtype == torch.uint8 and torch.equal(read.images, torch.from_numpy(images))
        assert torch.equal(read.labels, torch.from_numpy(fine).long())

    summary = fit(cfg, quiet=True)
    assert summary["status"] == "completed" and summary["test_acc"] is not None
    recorded = summary["data"]
    assert (recorded["name"], recorded["channels"], recorded["image_size"]) == (name, 3, [32, 32])
    assert recorded["classes"] == list(CLASSES if name == "cifar10" else FINE) and len(recorded["mean"]) == 3


def test_cifar100_coarse_labels_and_class_names_from_the_files(tmp_path):
    written = write_cifar(tmp_path / "data", "cifar100", "binary")
    cfg = load_config(None, overrides(tmp_path / "data", "cifar100", tmp_path, "data.labels=coarse"))
    assert describe(cfg.data).classes == COARSE and describe(cfg.data).title == "CIFAR-100 (coarse)"
    _, train, _ = data_set("cifar100").read_splits(cfg.data)
    assert torch.equal(train.labels, torch.from_numpy(written["train"][2]).long())

    names = tmp_path / "data" / "cifar-100-binary" / "coarse_label_names.txt"
    names.write_text("".join(f"group {i}\n" for i in range(20)))
    assert describe(cfg.data).classes == tuple(f"group {i}" for i in range(20))
    names.unlink()
    assert describe(cfg.data).classes == COARSE  # without the file: the published names
    names.write_text("just\ntwo\n")
    with pytest.raises(UserError, match=rf"{names}: 2 class names .* expected 20"):
        describe(cfg.data)
    with pytest.raises(UserError, match="data.labels: coarse: CIFAR-10 has only fine labels"):
        describe(load_config(None, ["data.name=cifar10", "data.labels=coarse"]).data)


def test_a_config_without_files_is_described_by_the_published_names(tmp_path):
    assert describe(SimpleNamespace(name="cifar10", root=tmp_path)).classes == CLASSES
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--set", "data.name=cifar10", "--set",
                                 f"data.root={tmp_path / 'nothing'}", "--set", f"output.dir={tmp_path / 'r'}"])
    assert result.exit_code == 2 and "CIFAR-10 not found" in said(result) and "cifar-10-binary.tar.gz" in said(result)
    assert not (tmp_path / "r").exists()


class Payload:
    """What an attacker's CIFAR file would hold: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["data_batch_3", "batches.meta"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, where):
    write_cifar(tmp_path / "data", "cifar10", "python")
    marker = tmp_path / "pwned"
    evil = tmp_path / "data" / "cifar-10-batches-py" / where
    evil.write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": []}, protocol=3))
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof")))  # the payload is live: plain pickle runs it
    assert (tmp_path / "proof").exists()

    result = runner.invoke(app, ["run", str(CONFIGS / "lenet.yaml"),
                                 *(arg for s in overrides(tmp_path / "data", "cifar10", tmp_path) for arg in ("--set", s))])
    assert result.exit_code == 2, result.output
    assert str(evil) in result.output.replace("\n", "") and "system, which no CIFAR file holds" in said(result)
    assert not marker.exists() and not (tmp_path / "results").exists()


def test_numpy_admitted_only_as_its_pickles_use_it(tmp_path):
    """``numpy.ndarray`` is a type a pickle names, never a function it may call with a shape of its choosing."""
    write_cifar(tmp_path / "data", "cifar10", "python")
    bomb = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    bomb.write_bytes(b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x7f\x85\x85R.")  # numpy.ndarray((2**31 - 2**24,))
    with pytest.raises(UserError, match=rf"{bomb}: refused, not a CIFAR Python batch \(numpy.ndarray called"):
        data_set("cifar10").read_splits(load_config(None, overrides(tmp_path / "data", "cifar10", tmp_path)).data)


def test_a_binary_file_of_the_wrong_length_is_named_with_the_length_expected(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", "binary")
    short = tmp_path / "data" / "cifar-10-batches-bin" / "data_batch_2.bin"
    short.write_bytes(short.read_bytes()[:-100])
    args = [arg for s in overrides(tmp_path / "data", "cifar10", tmp_path) for arg in ("--set", s)]
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet.yaml"), *args])
    assert result.exit_code == 2 and str(short) in result.output.replace("\n", "")
    assert "122,820 bytes, expected a whole number of records of 3,073 bytes" in said(result)
    assert not (tmp_path / "results").exists()

    cfg = load_config(None, overrides(tmp_path / "data", "cifar10", tmp_path, "data.check_counts=true"))
    first = tmp_path / "data" / "cifar-10-batches-bin" / "data_batch_1.bin"
    with pytest.raises(UserError, match=rf"{first}: 122,920 bytes, expected 30,730,000 bytes \(10,000 records"):
        data_set("cifar10").read_splits(cfg.data)


def test_labels_out_of_range_are_named(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", "binary")
    path = tmp_path / "data" / "cifar-10-batches-bin" / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[3073 * 7] = 10
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"{path}: fine label 10 found; CIFAR-10's fine labels are 0-9"):
        data_set("cifar10").read_splits(load_config(None, overrides(tmp_path / "data", "cifar10", tmp_path)).data)


def test_class_names_naming_a_class_twice_are_refused_naming_the_file(tmp_path):
    # Accepted, eval's table and eval.json's per_class had nine entries for ten classes, one class's counts lost.
    write_cifar(tmp_path / "data", "cifar10", "binary")
    names = tmp_path / "data" / "cifar-10-batches-bin" / "batches.meta.txt"
    names.write_text("\n".join(name if name != "dog" else "cat" for name in CLASSES) + "\n")
    args = [arg for s in overrides(tmp_path / "data", "cifar10", tmp_path) for arg in ("--set", s)]
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet.yaml"), *args])
    assert result.exit_code == 2, result.output
    assert f"{names}: class 'cat' is named twice (labels 3 and 5); give each class a name of its own" in said(result)
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()

    write_cifar(tmp_path / "py", "cifar10", "python")
    meta = tmp_path / "py" / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(python2_pickle({b"label_names": [b"ship" if c == "truck" else c.encode() for c in CLASSES]}))
    with pytest.raises(UserError, match=rf"^{meta}: class 'ship' is named twice \(labels 8 and 9\)"):
        describe(load_config(None, overrides(tmp_path / "py", "cifar10", tmp_path)).data)
    # Two names that differ only in what no screen shows are as bad: eval's table would show two 'dog' rows.
    names.write_text("\n".join(name if name != "horse" else "do\u200bg" for name in CLASSES) + "\n")
    with pytest.raises(UserError, match=rf"^{names}: classes 'dog' \(label 5\) and 'do\\u200bg' \(label 7\) look the "
                                        "same: they differ only in invisible characters"):
        describe(load_config(None, overrides(tmp_path / "data", "cifar10", tmp_path)).data)


def test_a_colour_run_is_evaluated_drawn_in_colour_and_reported(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", "binary")
    cfg = load_config(CONFIGS / "datasets" / "cifar10_lenet.yaml", overrides(tmp_path / "data", "cifar10", tmp_path))
    run_dir = Path(fit(cfg, quiet=True)["run_dir"])
    report = evaluate_run(run_dir)
    assert report.images == 100 and set(report.per_class) <= set(CLASSES)
    picture = visualize(run_dir, "0", out=tmp_path / "maps.png")
    assert picture.tiles == cfg.model.kwargs.get("channels", (6, 16))[0]
    with Image.open(picture.path) as drawn:
        pixels = np.asarray(drawn.convert("RGB")).reshape(-1, 3).astype(int)
    assert (np.abs(pixels[:, 0] - pixels[:, 1]) > 60).sum() > 50  # the input is shown in colour, not grey
    write_report([run_dir], tmp_path / "report" / "report.md")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Convolutional networks on CIFAR-10" in text and "3x32x32" in text


def test_a_sweep_over_two_data_sets(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", "binary")
    write_cifar(tmp_path / "data", "cifar100", "python")
    sweep = tmp_path / "sets.yaml"
    sweep.write_text(f"base: {CONFIGS / 'lenet.yaml'}\ngrid: {{data.name: [cifar10, cifar100]}}\n")
    sets = [s for s in overrides(tmp_path / "data", "cifar10", tmp_path) if not s.startswith(("data.name", "output"))]
    result = runner.invoke(app, ["sweep", str(sweep), "--results", str(tmp_path / "r"),
                                 *(arg for s in sets for arg in ("--set", s))])
    assert result.exit_code == 0, result.output
    [sweep_dir] = (tmp_path / "r" / "sweeps" / "sets").glob("2*")
    with open(sweep_dir / "summary.csv") as handle:
        rows = {row["data.name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"cifar10", "cifar100"} and {row["status"] for row in rows.values()} == {"completed"}


def test_the_shipped_cifar10_recipe_trains_and_tests_all_its_parts_on_cifar10_files(tmp_path):
    """configs/best/cifar10_094.yaml as a user runs it on the data, narrowed and shortened to seconds."""
    write_cifar(tmp_path / "data", "cifar10", "binary")
    result = runner.invoke(app, ["run", str(CONFIGS / "best" / "cifar10_094.yaml"), "--data-dir", str(tmp_path / "data"),
                                 "--epochs", "1", "--set", "model.width=8", "--set", "train.batch_size=32",
                                 "--set", "data.check_counts=false", "--set", "data.val_size=50",
                                 "--results", str(tmp_path / "results"), "--quiet"])
    assert result.exit_code == 0, result.output
    [run] = (tmp_path / "results" / "cifar10_094").glob("2*")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["precision"] == "bf16"
    assert summary["data"]["channels"] == 3 and summary["test_tta"] == ["flip", "crop"]
    assert all(0 <= summary[k] <= 1 for k in ("test_acc", "test_acc_tta", "test_acc_ema", "test_acc_ema_tta"))


def test_a_colour_picture_is_predicted_alike_by_the_run_and_its_onnx_export(tmp_path):
    """LeNet trained on a CIFAR binary set: a test image as an RGB PNG, at its size and at 64x48, gets the
    same class and probabilities from ``predict`` as from the exported ONNX file run by onnxruntime."""
    onnxruntime = pytest.importorskip("onnxruntime")
    write_cifar(tmp_path / "data", "cifar10", "binary")
    cfg = load_config(CONFIGS / "datasets" / "cifar10_lenet.yaml", overrides(tmp_path / "data", "cifar10", tmp_path))
    run_dir = Path(fit(cfg, quiet=True)["run_dir"])
    opened = open_run(run_dir)
    image = opened.load_data().test.images[3]
    as_is, resized = tmp_path / "test3.png", tmp_path / "test3-64x48.png"
    Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB").save(as_is)
    Image.open(as_is).resize((64, 48), Image.Resampling.BILINEAR).save(resized)
    assert torch.equal(load_image(as_is, opened.spec), image)  # the very colour pixels the run was tested on

    result = runner.invoke(app, ["export", str(run_dir), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for picture, predicted in zip((as_is, resized), predict(run_dir, [as_is, resized], top=len(CLASSES))):
        [logits] = session.run(None, {"pixels": (load_image(picture, opened.spec)[None].float() / 255).numpy()})
        from_onnx = torch.from_numpy(logits[0]).softmax(0)
        assert predicted.top[0][0] == CLASSES[int(from_onnx.argmax())]
        assert max(abs(p - float(from_onnx[CLASSES.index(c)])) for c, p in predicted.top) < 1e-5


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fashion_to_cifar_writes_tinted_images_in_the_binary_layout(tmp_path):
    """Grey 28x28 images come back from cnnlab's CIFAR-10 reader padded to 32x32, tinted per image (the brightest
    channel the grey itself, the others scaled down), with their labels and Fashion-MNIST's class names; the tints
    come from the seed alone, not the labels."""
    script = load_script("fashion_to_cifar")
    rng = np.random.default_rng(1)
    splits = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
              for split, n in (("train", 50), ("test", 10))}
    script.write_cifar(tmp_path / "a", splits)
    cfg = load_config(None, overrides(tmp_path / "a", "cifar10", tmp_path))
    _, train, test = data_set("cifar10").read_splits(cfg.data)
    assert describe(cfg.data).classes == script.CLASSES
    for (grey, labels), read in zip(splits.values(), (train, test)):
        assert torch.equal(read.labels, torch.from_numpy(labels).long()) and read.images.shape[1:] == (3, 32, 32)
        inner = read.images[:, :, 2:30, 2:30]
        assert read.images.sum() == inner.sum()  # the 2-pixel border is black
        assert torch.equal(inner.max(1).values, torch.from_numpy(grey))  # the brightest channel is the grey image
        assert (inner.float() >= script.DARKEST * torch.from_numpy(grey)[:, None].float() - 0.5).all()
        assert all(not torch.equal(image[0], image[1]) or not torch.equal(image[1], image[2]) for image in read.images)

    shuffled = {split: (grey, np.random.default_rng(2).permutation(labels)) for split, (grey, labels) in splits.items()}
    script.write_cifar(tmp_path / "b", shuffled)
    for name in ("data_batch_1.bin", "test_batch.bin"):
        a, b = ((tmp_path / root / "cifar-10-batches-bin" / name).read_bytes() for root in ("a", "b"))
        records = [np.frombuffer(raw, np.uint8).reshape(-1, 3073) for raw in (a, b)]
        assert np.array_equal(records[0][:, 1:], records[1][:, 1:])  # other labels, the same colours
