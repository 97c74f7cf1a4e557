"""Where the pixels stay while a run trains (data.placement): whole on the device, in host memory with batches
gathered ahead, or memory-mapped from a folder's cache file. Every path trains on the same numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_folder import make_folder, overrides
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import load_data, placement
from cnnlab.engine import fit

runner = CliRunner()
LEARNED = ("train_loss", "train_acc", "val_loss", "val_acc")


@pytest.fixture(autouse=True)
def cache_here(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def learned(summary: dict) -> tuple[list[tuple[str, ...]], float]:
    """The numbers a run learned (per epoch, and its test accuracy), without its timings."""
    with open(Path(summary["run_dir"]) / "metrics.csv", newline="") as f:
        rows = [tuple(row[key] for key in LEARNED) for row in csv.DictReader(f)]
    return rows, summary["test_acc"]


def test_every_placement_trains_to_the_same_numbers_and_says_which_it_took(tmp_path, capsys):
    root = make_folder(tmp_path / "pictures", per_class=16, splits=("train",), mixed=False)
    results = {}
    for where in ("device", "host", "mapped"):
        cfg = load_config(None, overrides(root, tmp_path, f"data.placement={where}", "train.epochs=2",
                                          "data.augment.flip=true", f"name=p-{where}"))
        results[where] = learned(fit(cfg, quiet=True))
        err = capsys.readouterr().err
        said = {"device": "whole on cpu (data.placement: device)",
                "host": "in host memory; batches gathered and copied ahead to cpu (data.placement: host)",
                "mapped": "memory-mapped from"}[where]
        assert said in err, err
    assert results["host"] == results["device"] and results["mapped"] == results["device"]


def test_a_mapped_set_is_not_copied_to_make_its_splits(tmp_path):
    root = make_folder(tmp_path / "pictures", per_class=16, splits=("train",), mixed=False)
    cfg = load_config(None, overrides(root, tmp_path, "data.placement=mapped")).data
    load_data(cfg, 0, torch.device("cpu"))  # decodes and caches
    mapped = load_data(cfg, 0, torch.device("cpu"))
    in_memory = load_data(load_config(None, overrides(root, tmp_path)).data, 0, torch.device("cpu"))
    assert mapped.placement == "mapped" and in_memory.placement == "device"
    # The held-out test split, the validation split and the training split are rows of the one mapped array.
    whole = 3 * 16
    for name in ("train", "val", "test"):
        split = mapped.split(name)
        assert split.images.shape[0] == whole and split.rows is not None
        assert split.images.untyped_storage().data_ptr() == mapped.train.images.untyped_storage().data_ptr()
        assert torch.equal(split.window(0, len(split)), in_memory.split(name).images)
        assert torch.equal(split.labels, in_memory.split(name).labels)
    assert mapped.spec == in_memory.spec


def test_auto_maps_a_set_larger_than_half_the_memory_available(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "pictures", per_class=8, mixed=False)
    cfg = load_config(None, overrides(root, tmp_path)).data
    assert load_data(cfg, 0, torch.device("cpu")).placement == "device"
    monkeypatch.setattr(placement, "host_memory_available", lambda: 1000)  # a machine with 1 kB to spare
    data = load_data(cfg, 0, torch.device("cpu"))
    assert data.placement == "mapped" and data.train.mapped
    assert "memory-mapped from" in data.placement_line


def test_mapped_names_the_data_sets_that_have_no_cache_file(tmp_path, tiny_data):
    result = runner.invoke(app, ["run", "configs/lenet.yaml", "--data-dir", str(tiny_data), "--results", str(tmp_path),
                                 "--set", "data.placement=mapped", "--set", "data.check_counts=false"])
    assert result.exit_code == 2
    assert "data.placement: mapped maps a data set's cache file" in result.output
    assert not (tmp_path / "lenet").exists()


def test_a_cache_file_whose_mapped_pixels_were_changed_is_decoded_again(tmp_path, capsys, cache_here):
    root = make_folder(tmp_path / "pictures", per_class=8, mixed=False)
    cfg = load_config(None, overrides(root, tmp_path, "data.placement=mapped")).data
    first = load_data(cfg, 0, torch.device("cpu"))
    [cache_file] = (cache_here / "folder").glob("*.npz")
    with np.load(cache_file) as stored:
        pixels = stored["images"].tobytes()
    raw = bytearray(cache_file.read_bytes())
    at = raw.index(pixels[:64]) + len(pixels) // 2  # a byte in the middle of the pixels
    raw[at] ^= 0xFF
    cache_file.write_bytes(bytes(raw))
    capsys.readouterr()
    again = load_data(cfg, 0, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "is corrupt" in err and "do not match their CRC-32" in err and "decoded 48 images" in err
    assert torch.equal(first.train.window(0, len(first.train)), again.train.window(0, len(again.train)))


def test_the_run_records_what_it_trained_on_whatever_the_placement(tmp_path):
    root = make_folder(tmp_path / "pictures", per_class=8, mixed=False)
    summary = fit(load_config(None, overrides(root, tmp_path, "data.placement=host")), quiet=True)
    recorded = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert recorded["status"] == "completed" and recorded["data"]["name"] == "folder"
