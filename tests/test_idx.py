"""The IDX family: Fashion-MNIST, MNIST and KMNIST through one reader. Tiny sets in their files' names
and layouts train for an epoch by data.name, eval names their own classes, each set searches its own
places, and `cnnlab data NAME --verify` checks the published checksums it has."""

from __future__ import annotations

import gzip
import hashlib
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import idx_bytes, write_dataset
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import DATA_SETS, described
from cnnlab.data.idx import STEMS, Checksum
from cnnlab.engine import fit
from cnnlab.errors import UserError

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


@pytest.mark.parametrize(("name", "layout", "classes"), [
    ("mnist", "MNIST/raw", [str(d) for d in range(10)]),
    ("kmnist", "KMNIST/raw", KMNIST_CLASSES),
])
def test_the_shipped_mnist_and_kmnist_configs_train_an_epoch_and_eval_names_their_classes(tmp_path, name, layout, classes):
    write_dataset(tmp_path / "data" / layout, n_train=300, n_test=100)  # torchvision's layout, as --download leaves it
    cfg = load_config(CONFIGS / "datasets" / f"{name}_lenet.yaml", [f"data.root={tmp_path / 'data'}", "data.check_counts=false",
                             "data.val_size=50", "train.epochs=1", "train.batch_size=32", "train.device=cpu",
                             f"output.dir={tmp_path / 'results'}"])
    summary = fit(cfg, quiet=True)
    assert summary["data"]["name"] == name and summary["data"]["classes"] == classes
    result = runner.invoke(app, ["eval", summary["run_dir"]])
    assert result.exit_code == 0, result.output
    shown = {line.split()[0] for line in result.output.splitlines()[3:13]}  # after the run, the figures, the header
    assert shown == set(classes) and "Trouser" not in result.output


def test_each_idx_set_has_its_own_classes_and_the_same_reader():
    assert described("mnist").classes == tuple("0123456789")
    assert list(described("kmnist").classes) == KMNIST_CLASSES
    assert described("fashion-mnist").classes[1] == "Trouser"
    assert {DATA_SETS[n].SET.read_split.__func__ for n in ("fashion-mnist", "mnist", "kmnist")} == \
        {DATA_SETS["mnist"].SET.read_split.__func__}


def test_mnist_counts_are_enforced_by_default(tmp_path):
    write_dataset(tmp_path, n_train=50, n_test=30)
    with pytest.raises(UserError, match="50 images, MNIST's train set has 60,000"):
        fit(load_config(None, ["data.name=mnist", f"data.root={tmp_path}", "train.device=cpu"]), quiet=True)


def test_cnnlab_data_is_fashion_mnists_folder_only(tmp_path, monkeypatch):
    # $CNNLAB_DATA has always named Fashion-MNIST's files, which have MNIST's names and counts: an MNIST
    # run must never read them. It searches its own cache, where --download puts it.
    monkeypatch.setenv("CNNLAB_DATA", str(write_dataset(tmp_path / "fashion", n_train=20, n_test=20)))
    monkeypatch.setattr("cnnlab.data.idx.CACHE_ROOT", tmp_path / "cache")
    with pytest.raises(UserError) as info:
        DATA_SETS["kmnist"].SET.find_data_dir(None)
    message = str(info.value)
    assert message.startswith("KMNIST not found") and str(tmp_path / "cache" / "kmnist") in message
    assert str(tmp_path / "fashion") not in message and "apt-get" not in message and "--download" in message
    write_dataset(tmp_path / "cache" / "kmnist", n_train=20, n_test=20)
    assert DATA_SETS["kmnist"].SET.find_data_dir(None) == tmp_path / "cache" / "kmnist"
    assert DATA_SETS["fashion-mnist"].SET.find_data_dir(None) == tmp_path / "fashion"


def published(folder: Path, monkeypatch) -> None:
    """Make the tiny files in ``folder`` MNIST's "published" ones: their MD5s become the known digests."""
    checksums = {stem: Checksum("md5", hashlib.md5((folder / f"{stem}.gz").read_bytes()).hexdigest(), archive=True)
                 for stem in STEMS}
    monkeypatch.setattr(DATA_SETS["mnist"].SET, "checksums", checksums)
    monkeypatch.setattr(DATA_SETS["mnist"].SET, "counts", {"train": 40, "test": 20})


def test_verify_checks_the_archives_md5_and_names_a_changed_one(tmp_path, monkeypatch):
    folder = write_dataset(tmp_path, n_train=40, n_test=20)
    published(folder, monkeypatch)
    assert sum("md5 ok" in line for line in DATA_SETS["mnist"].check(folder, verify=True)) == 4
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes()), mtime=1))  # same labels, another archive
    lines = []
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz: checksum differs from MNIST's"):
        lines.extend(DATA_SETS["mnist"].check(folder, verify=True))
    assert lines[-1] == "  t10k-labels-idx1-ubyte.gz: md5 MISMATCH"


def test_verify_says_when_only_decompressed_files_are_there(tmp_path, monkeypatch):
    published(write_dataset(tmp_path / "gz", n_train=40, n_test=20), monkeypatch)
    folder = write_dataset(tmp_path / "plain", n_train=40, n_test=20, compress=False)
    lines = list(DATA_SETS["mnist"].check(folder, verify=True))
    assert sum("not checked (MNIST's published md5 is of " in line for line in lines) == 4


def test_cnnlab_data_name_describes_the_set(tmp_path, monkeypatch):
    monkeypatch.setattr("cnnlab.data.idx.CACHE_ROOT", tmp_path / "cache")
    folder = write_dataset(tmp_path / "data" / "KMNIST" / "raw", n_train=300, n_test=100)
    result = runner.invoke(app, ["data", "kmnist", "--root", str(tmp_path / "data"), "--set", "data.check_counts=false"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "KMNIST (kmnist): 10 classes, 1x28x28 (channels x height x width)"
    assert lines[1] == f"files: {tmp_path / 'data'}"
    assert lines[2] == f"cache: {tmp_path / 'cache' / 'kmnist'} (not made yet; --download fills it)"
    mean, std = (float(v) for v in lines[3].rsplit(":", 1)[1].split("/"))
    pixels = DATA_SETS["kmnist"].SET.read_split(folder, "train", check_counts=False).images.double() / 255
    assert mean == pytest.approx(pixels.mean().item(), abs=1e-4) and std == pytest.approx(pixels.std().item(), abs=1e-3)
    rows = [line.split() for line in lines[5:16]]
    assert [row[1] for row in rows[:10]] == KMNIST_CLASSES and all(row[2:] == ["30", "10"] for row in rows[:10])
    assert rows[10] == ["all", "300", "100"]


def test_cnnlab_data_without_a_name_still_checks_fashion_mnist(tmp_path):
    result = runner.invoke(app, ["data", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "Fashion-MNIST not found" in result.output and "Traceback" not in result.output


def test_cnnlab_data_name_verify_names_a_changed_file(tmp_path, monkeypatch):
    folder = write_dataset(tmp_path, n_train=40, n_test=20)
    published(folder, monkeypatch)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(gzip.decompress((folder / "train-images-idx3-ubyte.gz")
                                                                                      .read_bytes()), mtime=1))
    result = runner.invoke(app, ["data", "mnist", "--root", str(folder), "--verify"])
    assert result.exit_code == 2 and "MNIST (mnist): 10 classes" in result.output
    assert "train-images-idx3-ubyte.gz: md5 MISMATCH" in result.output and "checksum differs from MNIST's" in result.output


def test_a_sweep_over_idx_data_sets_shows_each_rows_data_set(tmp_path, tiny_data):
    sweep_file = tmp_path / "sets.yaml"
    sweep_file.write_text(f"base: {CONFIGS / 'lenet.yaml'}\ngrid: {{data.name: [fashion-mnist, mnist]}}\n")
    sets = [f"data.root={tiny_data}", "data.check_counts=false", "data.val_size=100", "train.epochs=1",
            "train.batch_size=64", "train.device=cpu"]
    result = runner.invoke(app, ["sweep", str(sweep_file), "--results", str(tmp_path / "r"),
                                 *(arg for s in sets for arg in ("--set", s))])
    assert result.exit_code == 0, result.output
    [sweep_dir] = (tmp_path / "r" / "sweeps" / "sets").glob("2*")
    table = (sweep_dir / "summary.md").read_text()
    assert "| variant | data | seeds |" in table
    assert "| name=fashion-mnist | fashion-mnist | n=1 (seed 0) |" in table
    assert "| name=mnist | mnist | n=1 (seed 0) |" in table


def test_cnnlab_data_name_verify_honours_check_counts(tmp_path, monkeypatch):
    # The description honoured data.check_counts, then the check of the files demanded MNIST's counts anyway.
    folder = write_dataset(tmp_path, n_train=40, n_test=20)
    published(folder, monkeypatch)
    monkeypatch.setattr(DATA_SETS["mnist"].SET, "counts", {"train": 60_000, "test": 10_000})
    result = runner.invoke(app, ["data", "mnist", "--root", str(folder), "--verify", "--set", "data.check_counts=false"])
    assert result.exit_code == 0, result.output
    assert "  train: 40 images, 28x28" in result.output and sum("md5 ok" in line for line in result.output.splitlines()) == 4
    result = runner.invoke(app, ["data", "mnist", "--root", str(folder), "--verify"])
    assert result.exit_code == 2 and "40 images, MNIST's train set has 60,000" in result.output


def test_cnnlab_data_takes_the_folder_and_download_from_set_as_from_its_options(tmp_path, monkeypatch):
    # The files' check used the --root option only: --set data.root=DIR described DIR and then checked elsewhere.
    folder = write_dataset(tmp_path / "mnist", n_train=40, n_test=20)
    published(folder, monkeypatch)
    for where in (["--root", str(folder)], ["--set", f"data.root={folder}"]):
        result = runner.invoke(app, ["data", "mnist", "--verify", *where])
        assert result.exit_code == 0, result.output
        assert f"MNIST found in {folder}" in result.output and sum("md5 ok" in line for line in result.output.splitlines()) == 4
    fashion = write_dataset(tmp_path / "fashion", n_train=40, n_test=20)
    for where in (["--data-dir", str(fashion)], ["--set", f"data.root={fashion}"]):
        result = runner.invoke(app, ["data", *where, "--set", "data.check_counts=false"])
        assert result.exit_code == 0, result.output
        assert f"Fashion-MNIST found in {fashion}" in result.output


def test_cnnlab_data_downloads_when_the_config_says_so(tmp_path, monkeypatch):
    # Nothing can download here: the download itself is replaced by writing the files where it would put them.
    fetched = []

    def download(folder: Path) -> Path:
        fetched.append(folder)
        return write_dataset(folder, n_train=40, n_test=20)

    monkeypatch.setattr(DATA_SETS["fashion-mnist"].SET, "download", download)
    empty = tmp_path / "empty"
    result = runner.invoke(app, ["data", "--data-dir", str(empty), "--set", "data.check_counts=false"])
    assert result.exit_code == 2 and "Fashion-MNIST not found" in result.output and fetched == []
    for into, asked in (("option", ["--download"]), ("config", ["--set", "data.download=true"])):
        result = runner.invoke(app, ["data", "--data-dir", str(tmp_path / into), *asked, "--set", "data.check_counts=false"])
        assert result.exit_code == 0, result.output
        assert fetched[-1] == tmp_path / into and f"Fashion-MNIST found in {tmp_path / into}" in result.output


def test_idx_files_of_no_images_are_named(tmp_path):
    # data.check_counts: false took them, and the reader failed on an offset with exit 1, naming no file
    folder = write_dataset(tmp_path / "data", n_train=100, n_test=50)
    for stem, kind in (("t10k-images-idx3-ubyte", "images"), ("t10k-labels-idx1-ubyte", "labels")):
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(torch.zeros((0, 28, 28) if kind == "images" else 0),
                                                                     kind)))
    result = runner.invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--data-dir", str(folder), "--set",
                                 "data.check_counts=false", "--set", "data.val_size=10", "--results", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"{folder / 't10k-images-idx3-ubyte.gz'}: its header says 0 images" in said and "Traceback" not in said
    assert not (tmp_path / "r").exists()


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    """A header of 10 images and 40 MB of zeros after them (40 kB gzipped): refused having read 10 images' bytes and
    one more, not after inflating (and copying) the whole of it."""
    folder = write_dataset(tmp_path, n_train=10, n_test=10)
    bomb = folder / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(gzip.decompress(bomb.read_bytes()) + bytes(40 << 20), compresslevel=1))
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=rf"^{bomb}: header says 10 images \(7,856 bytes\) but the file holds more"):
            DATA_SETS["fashion-mnist"].SET.read_split(folder, "train", check_counts=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    # A header declaring more than any memory holds (2^32 - 1 images, 3.4 TB) is refused before reading any.
    bomb.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 2**32 - 1, 28, 28) + bytes(1 << 20)))
    with pytest.raises(UserError, match=rf"^{bomb}: its header declares 4,294,967,295 images, 3,136.0 GiB, more than the"):
        DATA_SETS["fashion-mnist"].SET.read_split(folder, "train", check_counts=False)
