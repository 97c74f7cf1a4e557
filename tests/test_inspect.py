"""`cnnlab visualize` and `cnnlab eval` on a small model trained on tiny generated data."""

import csv
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data import described
from cnnlab.errors import UserError
from cnnlab.evaluation import evaluate_run
from cnnlab.plots import plt
from cnnlab.runs import open_run
from cnnlab.visualize import cam_figure, grad_cam, grid_shape, resolve_layer, visualize

runner = CliRunner()


def png(path):
    with Image.open(path) as image:
        image.load()
        return image.format, image.mode, image.size


@pytest.mark.parametrize("layer, channels", [("0", 6), ("3", 16), ("2", 6), ("5", 16)])
def test_feature_maps_have_one_tile_per_channel(trained, tmp_path, layer, channels):
    run, _ = trained
    picture = visualize(run, layer, out=tmp_path / "maps.png")
    assert picture.tiles == channels
    fmt, mode, (width, height) = png(picture.path)
    assert fmt == "PNG" and mode in ("RGB", "RGBA") and width > 400 and height > 200


def test_filters_and_cam(trained, tmp_path):
    run, _ = trained
    filters = visualize(run, "3", out=tmp_path / "filters.png", mode="filters")
    assert filters.tiles == 16 * 6 and png(filters.path)[0] == "PNG"
    cam = visualize(run, None, class_name="Trouser", out=tmp_path / "cam.png", mode="cam")
    assert cam.true_label == "Trouser" and png(cam.path)[0] == "PNG"
    with pytest.raises(UserError, match="--filters needs a conv layer"):
        visualize(run, "1", mode="filters")


def test_grad_cam_defaults_to_the_last_conv_block_whose_map_carries_signal(trained, tmp_path):
    run, _ = trained
    opened = open_run(run)
    model = opened.model
    for index in range(5):
        cam = visualize(run, None, image=index, out=tmp_path / f"cam{index}.png", mode="cam")
        module = resolve_layer(model, cam.layer)[1]
        assert isinstance(module, (nn.Conv2d, nn.ReLU)), (cam.layer, module)  # LeNet's last AvgPool is passed over
        x = opened.load_data().prepare(opened.load_data().test.images[index : index + 1])
        heat = grad_cam(model, module, x, described().classes.index(cam.predicted_label))
        assert heat.max() == 1 and heat.min() < 1  # a map, not a blank


def test_a_grad_cam_picture_has_its_colour_bar():
    fig = cam_figure(np.zeros((28, 28)), torch.zeros(28, 28), "test image 0", "Grad-CAM")
    try:
        image, overlay, bar = fig.axes
        assert bar.get_ylabel() == "Grad-CAM, share of its peak" and bar.get_ylim() == (0, 1)
    finally:
        plt.close(fig)


def test_an_all_zero_grad_cam_map_says_so(trained, tmp_path, monkeypatch):
    run, _ = trained
    (tmp_path / "silenced.py").write_text(textwrap.dedent("""
        import functools
        from cnnlab.models.lenet import lenet

        @functools.wraps(lenet)
        def build(*args, **options):  # LeNet, with the picture cut off from the classes after layer 5
            model = lenet(*args, **options)
            model[5].register_forward_hook(lambda module, inputs, output: output * 0)
            return model
    """))
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "silenced" / run.name
    shutil.copytree(run, copy)
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(config.replace("name: lenet", "name: silenced:build", 1))
    result = runner.invoke(app, ["visualize", str(copy), "--cam", "--trust-code", "--out", str(tmp_path / "cam.png")])
    assert result.exit_code == 0, result.output
    assert "warning: the Grad-CAM map of" in result.output and "at layer 4 is all zero" in result.output
    assert png(tmp_path / "cam.png")[0] == "PNG"


@pytest.mark.parametrize("spelling", ["T-shirt", "t-shirt/top", "T_SHIRT", "0"])
def test_class_names_are_forgiving(trained, tmp_path, spelling):
    run, _ = trained
    assert visualize(run, "0", class_name=spelling, out=tmp_path / "x.png").true_label == "T-shirt/top"


def test_grid_is_near_square():
    assert [grid_shape(n) for n in (1, 6, 16, 96)] == [(1, 1), (2, 3), (4, 4), (9, 11)]


def test_visualize_defaults_to_the_latest_run_and_lists_layers(trained):
    run, _ = trained
    results = run.parent.parent
    result = runner.invoke(app, ["visualize", "--layer", "3", "--results", str(results)])
    assert result.exit_code == 0, result.output
    assert "16 tiles" in result.output and Path(result.output.strip().splitlines()[-1]).is_file()
    listed = runner.invoke(app, ["visualize", str(run), "--list-layers"])
    assert listed.exit_code == 0 and "16x10x10" in listed.output and "Conv2d(6, 16, k=5)" in listed.output


@pytest.mark.parametrize("args, expected", [
    (["--layer", "40"], "--layer 40: the model has 12 top-level layers"),
    (["--layer", "features.9"], "no such layer"),
    (["--class", "Sock"], "not a Fashion-MNIST class"),
    (["--image", "100000"], "--image 100000"),
])
def test_visualize_bad_input(trained, args, expected):
    run, _ = trained
    result = runner.invoke(app, ["visualize", str(run), *args])
    assert result.exit_code == 2 and expected in result.output


def test_no_run_yet_says_how_to_make_one(tmp_path):
    result = runner.invoke(app, ["visualize", "--results", str(tmp_path)])
    assert result.exit_code == 2 and "cnnlab run configs/lenet.yaml" in result.output


def test_eval_confusion_matrix_agrees_with_the_run(trained):
    run, summary = trained
    report = evaluate_run(run, "test", "best")
    assert report.images == summary["test_size"] == 200
    total = sum(map(sum, report.confusion))
    diagonal = sum(report.confusion[i][i] for i in range(10))
    assert total == 200 and diagonal / total == pytest.approx(report.accuracy) == pytest.approx(summary["test_acc"])
    folder = Path(report.folder)
    with open(folder / "confusion.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                           "Bag", "Ankle boot"]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 200
    for name in ("confusion.png", "errors.png"):
        assert png(folder / name)[0] == "PNG"
    assert json.loads((folder / "eval.json").read_text())["accuracy"] == pytest.approx(report.accuracy)
    val = runner.invoke(app, ["eval", str(run), "--split", "val", "--checkpoint", "last"])
    assert val.exit_code == 0 and "val (100 images, last checkpoint)" in val.output


def test_commands_take_the_newest_run_of_a_folder_of_runs_or_of_results(trained, tmp_path, monkeypatch):
    """eval, visualize, predict and export: a folder of runs (an experiment's) means its newest finished run, and no
    run at all the newest under --results; resume: the newest unfinished one."""
    run, _ = trained
    results = tmp_path / "results"
    runs = {}
    for name, finished in (("older", "2026-01-01T00:00:00Z"), ("newer", "2026-01-02T00:00:00Z"), ("stopped", None)):
        runs[name] = results / ("other" if name == "stopped" else "lenet") / f"20260101T00000{len(runs)}Z-{name}"
        shutil.copytree(run, runs[name])
        summary = json.loads((runs[name] / "summary.json").read_text())
        if finished is None:  # stopped after its last checkpoint, the latest run to start
            summary = {**summary, "status": "interrupted", "started": "2026-01-03T00:00:00Z"}
            del summary["finished"]
        else:
            summary["finished"] = finished
        (runs[name] / "summary.json").write_text(json.dumps(summary))
    monkeypatch.chdir(tmp_path)  # --results defaults to ./results

    evaluated = runner.invoke(app, ["eval", str(results / "lenet")])
    assert evaluated.exit_code == 0 and str(runs["newer"] / "eval") in " ".join(evaluated.output.split()), evaluated.output
    Image.new("L", (28, 28), 0).save(tmp_path / "dark.png")
    for args in (["predict", "dark.png", "--json"], ["predict", "results/lenet", "dark.png", "--json"]):
        predicted = runner.invoke(app, args)
        assert predicted.exit_code == 0 and json.loads(predicted.output)[0]["image"] == "dark.png", predicted.output
    exported = runner.invoke(app, ["export", "--format", "torchscript"])
    assert exported.exit_code == 0 and (runs["newer"] / "model.pt").is_file(), exported.output

    resumed = runner.invoke(app, ["resume", "--epochs", "4", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((runs["stopped"] / "summary.json").read_text())["status"] == "completed"
    nothing = runner.invoke(app, ["resume"])
    assert nothing.exit_code == 2 and "no unfinished run (interrupted, failed or killed) in results/" in nothing.output
    typo = runner.invoke(app, ["predict", "results/lenet/2026-typo", "dark.png"])
    assert typo.exit_code == 2 and "results/lenet/2026-typo: no such run folder" in typo.output
