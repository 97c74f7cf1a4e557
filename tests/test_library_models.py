"""Library models by name: ``model.name: torchvision.NAME`` and ``timm.NAME`` train, describe, export and
reopen like the built-in ones, with their options checked before anything is built and no --trust-code."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_dataset
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import DataSpec
from cnnlab.errors import UserError
from cnnlab.models.build import build_model
from cnnlab.models.library import rebuild_first_conv
from cnnlab.models.registry import get_entry
from cnnlab.sweep import expand

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHAPES = {"1x28x28": [], "3x32x32": ["data.channels=3", "data.image_size=32"]}


def timm_installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


MODELS = ["torchvision.resnet18", "torchvision.mobilenet_v3_small",
          pytest.param("timm.resnet10t", marks=pytest.mark.skipif(not timm_installed(), reason="pip install 'cnnlab[timm]'"))]


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def small(tmp_path: Path) -> Callable[..., list[str]]:
    """Overrides for one epoch on 100 tiny images in batches of 16: enough to run every path of a big network on CPU."""
    root = write_dataset(tmp_path / "small", n_train=120, n_test=40)

    def overrides(*more: str) -> list[str]:
        return [f"data.root={root}", "data.check_counts=false", "data.val_size=20", "train.epochs=1", "train.batch_size=16",
                "train.device=cpu", "optim.lr=0.01", f"output.dir={tmp_path / 'results'}", *more]

    return overrides


def sets(overrides) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def config(tmp_path: Path, name: str = "torchvision.resnet18") -> str:
    """A config of the model alone (configs/*.yaml set the report's networks' options)."""
    path = tmp_path / "library.yaml"
    path.write_text(f"name: library\nmodel: {{name: {name}}}\n")
    return str(path)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", MODELS)
def test_a_library_model_trains_is_summarised_and_exported_for_the_datas_channels(name, shape, small, tmp_path):
    overrides = small(*SHAPES[shape])
    result = runner.invoke(app, ["run", config(tmp_path, name), "--quiet", *sets(overrides)])
    assert result.exit_code == 0, result.output
    rebuilt = "first convolution conv1 rebuilt for 1 input channel (torchvision builds 3)"
    assert (rebuilt in said(result)) == (name == "torchvision.resnet18" and shape == "1x28x28")
    [run_dir] = (tmp_path / "results").glob("*/*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_acc"] is not None

    shown = runner.invoke(app, ["summary", str(run_dir / "config.yaml")])  # a run folder's config: no --trust-code
    assert shown.exit_code == 0, shown.output
    assert f"{name}()  input {shape}" in shown.output and "total: " in shown.output
    exported = runner.invoke(app, ["export", str(run_dir), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "m.onnx").stat().st_size > 100_000


def test_a_torchvision_run_is_evaluated_predicted_visualised_resumed_and_swept(small, tmp_path):
    assert runner.invoke(app, ["run", config(tmp_path), "--quiet", *sets(small())]).exit_code == 0
    [run_dir] = (tmp_path / "results").glob("*/*")
    for command in (["eval", str(run_dir)], ["predict", str(run_dir), "--image", "0"],
                    ["visualize", str(run_dir), "--layer", "layer1.0.conv1", "--out", str(tmp_path / "maps.png")],
                    ["visualize", str(run_dir), "--cam", "--out", str(tmp_path / "cam.png")],
                    ["resume", str(run_dir), "--epochs", "2", "--quiet"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 2
    assert (tmp_path / "maps.png").is_file() and (tmp_path / "cam.png").is_file()

    sweep = tmp_path / "models.yaml"
    sweep.write_text(f"base: {config(tmp_path)}\ngrid: {{model.name: [torchvision.mobilenet_v3_small, lenet]}}\n")
    result = runner.invoke(app, ["sweep", str(sweep), "--results", str(tmp_path / "r"),
                                 *sets(o for o in small() if not o.startswith("output"))])
    assert result.exit_code == 0, result.output
    [summary_csv] = (tmp_path / "r" / "sweeps" / "models").glob("*/summary.csv")
    with open(summary_csv) as handle:
        statuses = {row["model.name"]: row["status"] for row in csv.DictReader(handle)}
    assert statuses == {"torchvision.mobilenet_v3_small": "completed", "lenet": "completed"}


@pytest.mark.parametrize("override, message", [
    ("model.name=torchvision.resnt18", "model.name: torchvision has no classification model 'resnt18' (did you mean "
                                       "'torchvision.resnet18'"),
    # ResNet's block and layers are the builder's own (no option): the list starts at the class's first default
    ("model.dropout=0.5", "model.dropout: model 'torchvision.resnet18' takes no argument 'dropout'; it takes: "
                          "zero_init_residual, groups, width_per_group"),
    ("model.layers=[1,1,1,1]", "model.layers: model 'torchvision.resnet18' takes no argument 'layers' (did you mean "
                               "'model.norm_layer'?); it takes: zero_init_residual"),
    ("model.zero_init_residual=maybe", "model.zero_init_residual: Input should be a valid boolean"),
    ("model.name=resnet50", "model.name: unknown model 'resnet50' (torchvision's is model.name: torchvision.resnet50)"),
    ("model.name=torchvision.fasterrcnn_resnet50_fpn", "torchvision has no classification model 'fasterrcnn_resnet50_fpn'"),
])
def test_a_wrong_name_or_option_is_exit_2_before_anything_is_built(override, message, tmp_path):
    result = runner.invoke(app, ["run", config(tmp_path), "--set", override, "--set", f"output.dir={tmp_path / 'r'}"])
    assert result.exit_code == 2 and message in said(result), result.output
    assert not (tmp_path / "r").exists()  # nothing written


def test_an_unknown_timm_name_gets_did_you_mean():
    if not timm_installed():
        pytest.skip("pip install 'cnnlab[timm]'")
    with pytest.raises(UserError, match=r"timm has no classification model 'resnet10tt' \(did you mean 'timm.resnet10t'"):
        load_config(None, ["model.name=timm.resnet10tt"])


def test_an_option_the_builder_sets_itself_is_exit_2_naming_the_collision():
    cfg = load_config(None, ["model.name=torchvision.efficientnet_b0", "model.last_channel=640"])
    spec = DataSpec(name="made", title="Made", classes=tuple("abc"), channels=1, image_size=(32, 32))
    with pytest.raises(UserError, match=r"torchvision.efficientnet_b0.*multiple values for .*'last_channel'"):
        build_model(cfg, spec=spec)


@pytest.mark.parametrize("name, option", [("torchvision.vit_b_32", "image_size"), ("torchvision.efficientnet_b0", "dropout")])
def test_a_class_parameter_the_builder_reads_from_its_keywords_stays_an_option(name, option):
    """Required by the model class, yet torchvision's builder takes it from its keywords with a default."""
    assert option in get_entry(name).options.model_fields


def test_a_timm_model_with_img_size_is_built_for_the_datas_images():
    if not timm_installed():
        pytest.skip("pip install 'cnnlab[timm]'")
    spec = DataSpec(name="made", title="Made", classes=tuple("abcde"), channels=1, image_size=(32, 32))
    model = build_model(load_config(None, ["model.name=timm.vit_tiny_patch16_224", "init=default"]), spec=spec)
    assert model.patch_embed.img_size == (32, 32)  # not the 224 of its name
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    model = build_model(load_config(None, ["model.name=timm.vit_tiny_patch16_224", "model.img_size=48"]), spec=spec)
    assert model.patch_embed.img_size == (48, 48)  # the config's own, when it sets one


def test_the_options_given_reach_the_library_builder():
    spec = DataSpec(name="made", title="Made", classes=tuple("abcde"), channels=3, image_size=(32, 32))
    model = build_model(load_config(None, ["model.name=torchvision.resnet18", "model.zero_init_residual=true"]), spec=spec)
    assert model.layer1[0].bn2.weight.abs().sum() == 0 and model.fc.out_features == 5
    assert model.conv1.in_channels == 3  # 3 channels: torchvision's own first convolution
    model = build_model(load_config(None, ["model.name=torchvision.mobilenet_v3_small", "model.dropout=0.5"]), spec=spec)
    assert model.classifier[2].p == 0.5
    with pytest.raises(UserError, match=r"^model 'torchvision.resnet18' cannot be built with \{'width_per_group': 32\}: "
                                        r"BasicBlock only supports groups=1 and base_width=64$"):
        build_model(load_config(None, ["model.name=torchvision.resnet18", "model.width_per_group=32"]), spec=spec)


def test_the_rebuilt_first_convolution_keeps_its_geometry():
    from torchvision.models import mobilenet_v3_small

    model = mobilenet_v3_small(num_classes=4)
    before = model.features[0][0]
    assert rebuild_first_conv(model, 1) == "features.0.0"
    after = model.features[0][0]
    assert (after.in_channels, after.out_channels, after.kernel_size, after.stride, after.padding, after.bias) == \
        (1, before.out_channels, before.kernel_size, before.stride, before.padding, None)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


def test_googlenet_trains_on_its_main_output():
    spec = DataSpec(name="made", title="Made", classes=tuple("abc"), channels=1, image_size=(64, 64))
    model = build_model(load_config(None, ["model.name=torchvision.googlenet"]), spec=spec).train()
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 3)  # no auxiliary outputs


def test_models_lists_a_librarys_models_with_their_parameters_here():
    result = runner.invoke(app, ["models", "--source", "torchvision", "resnet1*"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines()[1:]}
    # ResNet-18 with a 1-channel first convolution (3x fewer of its 9,408 weights) and a 10-class head
    assert rows == {"torchvision.resnet101": "42,514,378", "torchvision.resnet152": "58,158,026",
                    "torchvision.resnet18": "11,175,370"}
    assert runner.invoke(app, ["models", "--source", "keras"]).exit_code == 2
    assert runner.invoke(app, ["models", "resnet"]).exit_code == 2


def test_the_shipped_ecosystem_sweep_gives_each_model_the_same_recipe_and_budget():
    """configs/sweeps/ecosystem.yaml, which measured the README's table: its trials load (nothing trains)."""
    name, trials = expand(CONFIGS / "sweeps" / "ecosystem.yaml", [])
    assert name == "ecosystem"
    assert [t.swept["model.name"] for t in trials] == ["torchvision.resnet18", "torchvision.mobilenet_v3_small",
                                                       "timm.resnet10t", "resnet"]
    for trial in trials:
        if trial.swept["model.name"].startswith("timm.") and not timm_installed():
            assert "pip install 'cnnlab[timm]'" in trial.error
            continue
        cfg = trial.config
        assert trial.error == "" and cfg.model.name == trial.swept["model.name"] and not cfg.model.kwargs
        assert (cfg.init, cfg.data.name, cfg.train.epochs, cfg.train.batch_size) == ("default", "fashion-mnist", 2, 128)
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.schedule.name) == ("sgd", 0.05, 0.9, "cosine")
