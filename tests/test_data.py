import gzip
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import idx_bytes, write_dataset
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import DataConfig
from cnnlab.data import Augment, fashion_mnist, load_data, stratified_split
from cnnlab.data.fashion_mnist import find_data_dir, read_idx, read_split
from cnnlab.errors import UserError

CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("compress", [True, False])
def test_reads_gz_and_plain_idx(tmp_path, compress):
    folder = write_dataset(tmp_path, n_train=50, n_test=30, compress=compress)
    train = read_split(folder, "train", check_counts=False)
    assert train.images.shape == (50, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_torchvision_layout_is_found(tmp_path):
    write_dataset(tmp_path / "FashionMNIST" / "raw", n_train=20, n_test=20)
    assert find_data_dir(tmp_path) == tmp_path


def test_missing_data_lists_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setattr("cnnlab.data.idx.CACHE_ROOT", tmp_path / "cache")
    monkeypatch.setattr(fashion_mnist.SET, "system_dir", tmp_path / "system")
    (tmp_path / "cache" / "fashion-mnist").mkdir(parents=True)
    with pytest.raises(UserError) as info:
        find_data_dir(None)
    message = str(info.value)
    for place in ("env", "cache/fashion-mnist", "system"):
        assert str(tmp_path / place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


def test_explicit_folder_without_files(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}: lacks train-images-idx3-ubyte"):
        find_data_dir(tmp_path)


def test_truncated_gz_names_the_file(tmp_path):
    folder = write_dataset(tmp_path, n_train=50, n_test=30)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: truncated or corrupted gzip"):
        read_split(folder, "train", check_counts=False)


def test_truncated_plain_file_is_never_silently_short(tmp_path):
    folder = write_dataset(tmp_path, n_train=50, n_test=30, compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-784])
    with pytest.raises(UserError, match="header says 50 images .* truncated"):
        read_split(folder, "train", check_counts=False)


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">II", 0x803, 2) + b"\x00\x01")
    with pytest.raises(UserError, match="wrong magic number 0x00000803, expected 0x00000801"):
        read_idx(path, "labels")


def test_labels_out_of_range(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(torch.tensor([0, 12]), "labels"))
    with pytest.raises(UserError, match="label 12"):
        read_idx(path, "labels")


def test_wrong_image_size(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 1, 32, 32) + bytes(32 * 32)))
    with pytest.raises(UserError, match="32x32, expected 28x28"):
        read_idx(path, "images")


def test_counts_must_match_between_images_and_labels(tmp_path):
    folder = write_dataset(tmp_path, n_train=50, n_test=30)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(torch.zeros(49), "labels")))
    with pytest.raises(UserError, match="holds 50 images but .* holds 49 labels"):
        read_split(folder, "train", check_counts=False)


def test_fashion_mnist_counts_are_enforced_by_default(tmp_path):
    folder = write_dataset(tmp_path, n_train=50, n_test=30)
    with pytest.raises(UserError, match="50 images, Fashion-MNIST's train set has 60,000"):
        read_split(folder, "train")


def test_stratified_split_is_exact_balanced_and_seeded():
    labels = torch.arange(1000) % 10
    train, val = stratified_split(labels, 100, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert torch.bincount(labels[val]).tolist() == [10] * 10
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.equal(val, stratified_split(labels, 100, seed=3)[1])
    assert not torch.equal(val, stratified_split(labels, 100, seed=4)[1])


def test_val_size_must_leave_training_images(tiny_data):
    cfg = DataConfig(root=tiny_data, check_counts=False, val_size=400)
    with pytest.raises(UserError, match="data.val_size: 400 leaves no training images"):
        load_data(cfg, 0, CPU)


def test_report_mode_evaluates_on_test(tiny_data):
    data = load_data(DataConfig(root=tiny_data, check_counts=False, val_size=0), 0, CPU)
    assert data.val is None and data.eval_split_name == "test" and len(data.train) == 400


def test_shuffled_batches_visit_every_image_once(tiny_data):
    data = load_data(DataConfig(root=tiny_data, check_counts=False, val_size=100, normalize=False), 0, CPU)
    seen = []
    for x, y in data.batches("train", 64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert 0.0 <= x.min() and x.max() <= 1.0
        seen.append(y)
    labels = torch.cat(seen)
    assert len(labels) == 300
    assert torch.equal(labels.sort().values, data.train.labels.sort().values)


def test_normalised_batches_have_zero_mean_unit_std(tiny_data):
    data = load_data(DataConfig(root=tiny_data, check_counts=False, val_size=0), 0, CPU)
    x = torch.cat([x for x, _ in data.batches("train", 1000)])
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_augmentation_keeps_shape_and_is_seeded():
    x = torch.rand(16, 1, 28, 28)
    augment = Augment(crop_padding=4, flip=True, erasing=1.0)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert (a == 0).any()  # erasing with probability 1 blanks a rectangle in every image


def test_crop_padding_shifts_content():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 14, 14] = 1.0
    moved = Augment(crop_padding=3)(x.repeat(64, 1, 1, 1), torch.Generator().manual_seed(1))
    positions = {tuple(m[0].nonzero()[0].tolist()) for m in moved if m.sum() > 0}
    assert len(positions) > 5  # the bright pixel lands in many places


def test_val_size_may_be_a_fraction_of_the_training_images(tiny_data):
    data = load_data(DataConfig(root=tiny_data, check_counts=False, val_size=0.25), 0, CPU)
    assert (len(data.train), len(data.val)) == (300, 100)
    assert torch.bincount(data.val.labels).tolist() == [10] * 10  # stratified as a count is


@pytest.mark.parametrize(("value", "said"), [
    ("1.5", "data.val_size: a fraction is below 1 (0.1 = a tenth of the images); a count is a whole number"),
    ("0.001", "data.val_size: 0.001 of the training set's 400 images is 0; give a larger fraction, a count"),
])
def test_a_val_size_fraction_that_makes_no_split_is_exit_2_saying_why(value, said, tiny_data, tmp_path):
    result = CliRunner().invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--data-dir", str(tiny_data), "--results",
                                      str(tmp_path / "results"), "--set", "data.check_counts=false",
                                      "--set", f"data.val_size={value}", "--device", "cpu", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "results").exists()


def test_the_shipped_folder_example_trains_on_a_folder_of_a_few_dozen_pictures(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    for label, colour in enumerate(("red", "green", "blue")):
        for i in range(20):
            picture = Image.new("RGB", (16, 16), colour)
            picture.putpixel((i % 16, label), (i, i, i))
            (tmp_path / "pics" / "train" / colour).mkdir(parents=True, exist_ok=True)
            picture.save(tmp_path / "pics" / "train" / colour / f"{i}.png")
    result = CliRunner().invoke(app, ["run", str(CONFIGS / "datasets" / "folder_example.yaml"), "--data-dir",
                                      str(tmp_path / "pics"), "--results", str(tmp_path / "results"), "--epochs", "1",
                                      "--device", "cpu", "--quiet", "--set", "train.batch_size=8"])
    assert result.exit_code == 0, result.output
    [summary] = (tmp_path / "results").glob("*/*/summary.json")
    recorded = json.loads(summary.read_text())
    assert recorded["test_size"] == 6 and recorded["val_size"] > 0
    assert recorded["train_size"] + recorded["val_size"] == 54
