"""The textbook's (d2l's) AlexNet and DenseNet: the chapters' layers, any channels, classes and size they allow, their configs."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.engine import fit
from cnnlab.errors import UserError
from cnnlab.modelinfo import count_params, profile
from cnnlab.models import get_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def conv(cin, cout, k):
    return cin * cout * k * k + cout


def linear(n_in, n_out):
    return n_in * n_out + n_out


def densenet_count(cin, classes, blocks=(4, 4, 4, 4), growth=32):
    """DenseNet's parameters by hand: stem conv + BN, each dense conv's BN + conv, each transition's BN + 1x1 conv."""
    total, channels = conv(cin, 64, 7) + 2 * 64, 64
    for i, num_convs in enumerate(blocks):
        for _ in range(num_convs):
            total += 2 * channels + conv(channels, growth, 3)
            channels += growth
        if i < len(blocks) - 1:
            total += 2 * channels + conv(channels, channels // 2, 1)
            channels //= 2
    return total + 2 * channels + linear(channels, classes)


def test_alexnet_is_the_chapters_layer_for_layer_on_224x224():
    model = get_model("alexnet")
    rows, _ = profile(model, (1, 224, 224))
    shapes = [r.output_shape for r in rows if r.layer.split("(")[0] in ("Conv2d", "MaxPool2d", "Flatten", "Linear")]
    assert shapes == [(96, 54, 54), (96, 26, 26), (256, 26, 26), (256, 12, 12), (384, 12, 12), (384, 12, 12),
                      (256, 12, 12), (256, 5, 5), (6400,), (4096,), (4096,), (10,)]
    assert isinstance(model[0], torch.nn.Conv2d) and isinstance(model[3], torch.nn.Conv2d)  # the chapter's indices
    assert count_params(model) == (conv(1, 96, 11) + conv(96, 256, 5) + conv(256, 384, 3) + conv(384, 384, 3)
                                   + conv(384, 256, 3) + linear(6400, 4096) + linear(4096, 4096) + linear(4096, 10))


def test_densenet_is_the_chapters_four_blocks_of_four_convs_growing_by_32():
    model = get_model("densenet")
    assert [getattr(model, f"block{i}").out_channels for i in range(1, 5)] == [192, 224, 240, 248]
    assert [getattr(model, f"transition{i}")[2].out_channels for i in range(1, 4)] == [96, 112, 120]
    assert count_params(model) == densenet_count(1, 10) == 758_226
    rows, _ = profile(model, (1, 96, 96))
    # stem, then each dense block and transition: 96x96 -> 24x24 after the stem, halved by each transition
    assert [r.output_shape for r in rows[:8]] == [(64, 24, 24), (192, 24, 24), (96, 12, 12), (224, 12, 12), (112, 6, 6),
                                                  (240, 6, 6), (120, 3, 3), (248, 3, 3)]


@pytest.mark.parametrize("name, options, shape", [
    ("alexnet", {"stem": "small"}, (1, 28, 28)),
    ("alexnet", {"stem": "small"}, (3, 32, 32)),
    ("densenet", {"stem": "small"}, (1, 28, 28)),
    ("densenet", {}, (3, 32, 32)),  # the chapter's 7x7 stem still leaves 1x1 after the last transition
])
def test_they_build_for_the_datas_channels_classes_and_size(name, options, shape):
    size = {"image_size": shape[1]} if name == "alexnet" else {}
    model = get_model(name, num_classes=7, in_channels=shape[0], **options, **size)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if name == "densenet" and not options:
        assert count_params(model) == densenet_count(3, 7)


def test_alexnets_flatten_size_follows_the_image_size():
    assert get_model("alexnet", stem="small")[14].in_features == 256 * 2 * 2  # unset: the small stem's 28x28
    assert get_model("alexnet")[14].in_features == 256 * 5 * 5  # the chapter's 224x224
    assert get_model("alexnet", stem="small", image_size=32)[14].in_features == 256 * 3 * 3
    assert get_model("alexnet", image_size=96)[14].in_features == 256 * 1 * 1


def test_the_chapters_alexnet_on_28x28_names_the_layer_and_the_size_that_fits():
    with pytest.raises(UserError, match=r"^model alexnet does not fit 1x28x28 images: the feature map vanishes at 5 "
                                        r"\(MaxPool2d\): 2x2 -> 0x0; use data.image_size >= 65$"):
        get_model("alexnet", image_size=28)


def test_the_chapters_densenet_on_28x28_is_exit_2_naming_the_layer(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(CONFIGS / "densenet.yaml"), "--data-dir", str(tiny_data),
                                      "--results", str(tmp_path / "results"), "--device", "cpu",
                                      *(arg for setting in ("data.check_counts=false", "data.val_size=100",
                                                            "data.image_size=null") for arg in ("--set", setting))])
    assert result.exit_code == 2, result.output
    assert "model densenet does not fit 1x28x28 images: the feature map vanishes at transition3.3 (AvgPool2d): 1x1 -> 0x0; " \
           "use data.image_size >= 29" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()


# The chapters' settings with the tests' tiny data; sizes kept small where the chapter's would take minutes.
@pytest.mark.parametrize("config, extra", [("alexnet.yaml", ["data.image_size=65"]), ("alexnet_28.yaml", []),
                                           ("densenet.yaml", ["data.image_size=32"])])
def test_one_tiny_epoch_through_each_config(config, extra, tiny_overrides):
    cfg = load_config(CONFIGS / config, [*tiny_overrides, "train.epochs=1", *extra])
    summary = fit(cfg, quiet=True)
    assert summary["status"] == "completed"
    assert 0 <= summary["test_acc"] <= 1 and torch.isfinite(torch.tensor(summary["final"]["train_loss"]))
    assert (Path(summary["run_dir"]) / "metrics.csv").read_text().count("\n") == 2  # header and epoch 1


def test_models_lists_them_and_says_the_chapters_alexnet_does_not_fit_the_default_images():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "(not for 1x28x28)" in lines["alexnet"] and f"{densenet_count(1, 10):,}" in lines["densenet"]
