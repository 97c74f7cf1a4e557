import pytest
import torch
from torch import nn

from cnnlab.data import described
from cnnlab.errors import UserError
from cnnlab.modelinfo import count_params, profile
from cnnlab.models import get_model, list_models, register_model


def test_default_lenet_is_the_reports_layer_for_layer():
    model = get_model("lenet")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "Sigmoid", "AvgPool2d", "Conv2d", "Sigmoid", "AvgPool2d", "Flatten",
                     "Linear", "Sigmoid", "Linear", "Sigmoid", "Linear"]
    rows, flops = profile(model, described().input_shape)
    shapes = [r.output_shape for r in rows if r.layer.split("(")[0] in ("Conv2d", "AvgPool2d", "Flatten", "Linear")]
    assert shapes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (400,), (120,), (84,), (10,)]
    # conv1 156 + conv2 2,416 + fc 48,120 + 10,164 + 850
    assert count_params(model) == 61_706


@pytest.mark.parametrize("k, flat", [(3, 16 * 6 * 6), (5, 16 * 5 * 5), (7, 16 * 4 * 4)])
def test_kernel_sizes_compute_the_flatten_size(k, flat):
    model = get_model("lenet", kernel_size=k)
    assert model[7].in_features == flat
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_variants():
    relu_max = get_model("lenet", activation="relu", pool="max", channels=(16, 32), hidden=(64,))
    assert isinstance(relu_max[1], nn.ReLU) and isinstance(relu_max[2], nn.MaxPool2d)
    assert relu_max[3].out_channels == 32 and relu_max[-1].in_features == 64
    bn = get_model("lenet", batch_norm=True)
    kinds = [type(m).__name__ for m in bn]
    # BatchNorm right after each conv and hidden Linear, before the activation
    assert kinds[:3] == ["Conv2d", "BatchNorm2d", "Sigmoid"]
    assert kinds[9:12] == ["Linear", "BatchNorm1d", "Sigmoid"]
    assert kinds.count("BatchNorm1d") == 2 and kinds[-1] == "Linear"


def test_impossible_kernel_is_a_clear_error():
    with pytest.raises(UserError, match=r"model lenet does not fit 1x28x28 images: the feature map vanishes at 3 \(Conv2d\): "
                                        r"8x8 -> 0x0; use data.image_size >= 40"):
        get_model("lenet", kernel_size=13, padding=0)


def test_registry_rejects_duplicates_and_suggests_names():
    assert "lenet" in list_models() and list_models() == sorted(list_models())
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet")(lambda num_classes=10, in_channels=1: nn.Identity())
    with pytest.raises(UserError, match="did you mean 'lenet'"):
        get_model("lenet5x")
    with pytest.raises(UserError, match="takes no argument 'depth'"):
        get_model("lenet", depth=3)


# Options a model needs to take 1x28x28 images (the textbook's AlexNet and DenseNet default to its 224 and 96 pixels)
REQUIRED_OPTIONS = {"sequential": {"layers": ["flatten", {"linear": 10}]}, "alexnet": {"stem": "small"},
                    "densenet": {"stem": "small"}}


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_one_step(name):
    model = get_model(name, **REQUIRED_OPTIONS.get(name, {}))
    model.train()
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_flops_counted_layer_by_layer_agree_with_pytorchs_counter(name):
    """Every model of cnnlab's own is counted without PyTorch's FLOP counter (whose import pulls in torch._dynamo
    at a run's start); the count must be the counter's, top-level layer by layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from cnnlab.modelinfo import countable

    model = get_model(name, in_channels=3, **REQUIRED_OPTIONS.get(name, {}))
    assert countable(model)
    rows, total = profile(model, (3, 28, 28))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 28, 28))
    assert total == counter.get_total_flops() > 0
    per_layer = {k.removeprefix(f"{type(model).__name__}."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    assert {row.name: row.flops for row in rows} == {row.name: per_layer.get(row.name, 0) for row in rows}


def test_a_model_with_layers_of_other_kinds_is_counted_by_pytorchs_counter():
    from cnnlab.modelinfo import countable

    class Attention(nn.Module):  # a user's layer: its forward multiplies matrices no child layer shows
        def forward(self, x):
            flat = x.flatten(2)
            return (flat @ flat.transpose(1, 2)).sum(-1)[..., None, None] + x

    model = nn.Sequential(nn.Conv2d(1, 4, 3), Attention(), nn.Flatten(), nn.LazyLinear(5))
    model(torch.zeros(1, 1, 8, 8))
    assert not countable(model)
    _, total = profile(model, (1, 8, 8))
    conv, linear, matmul = 2 * 4 * 6 * 6 * 9, 2 * 5 * 4 * 6 * 6, 2 * 4 * 36 * 4
    assert total == conv + linear + matmul
