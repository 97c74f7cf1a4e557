"""TrivialAugment on whole batches (``data.augment.trivial``): each operation against torchvision's own on the
same picture, one operation per picture, drawn from the data's generator, and capturable in the static step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_dataset
from torchvision.transforms.v2 import functional as tvf

from cnnlab.config import load_config
from cnnlab.data.trivial import MAX_ENHANCE, OPERATIONS, TrivialAugment, apply
from cnnlab.engine import fit


def pictures(channels: int, n: int = 4, side: int = 12) -> torch.Tensor:
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(channels))


def under(x: torch.Tensor, name: str, level: float, sign: float = 1.0) -> torch.Tensor:
    n = len(x)
    op = torch.full((n,), OPERATIONS.index(name))
    return apply(x, op, torch.full((n,), level), torch.full((n,), level * sign))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name, reference", [
    ("brightness", lambda x, f, level: tvf.adjust_brightness(x, f)),
    ("contrast", lambda x, f, level: tvf.adjust_contrast(x, f)),
    ("sharpness", lambda x, f, level: tvf.adjust_sharpness(x, f)),
    ("color", lambda x, f, level: tvf.adjust_saturation(x, f) if x.shape[1] == 3 else x),
    ("solarize", lambda x, f, level: tvf.solarize(x, 1 - level)),
    ("autocontrast", lambda x, f, level: tvf.autocontrast(x)),
    ("posterize", lambda x, f, level: tvf.posterize((x * 255).round().to(torch.uint8), int(8 - round(level * 6))) / 255),
    ("identity", lambda x, f, level: x),
])
@pytest.mark.parametrize("level, sign", [(0.4, 1.0), (0.8, -1.0)])
def test_each_colour_operation_is_torchvisions(channels, name, reference, level, sign):
    x = pictures(channels)
    if name == "posterize":
        x = (x * 255).round() / 255  # posterize works on 8-bit values
    factor = 1 + MAX_ENHANCE * level * sign
    assert torch.allclose(under(x, name, level, sign), reference(x, factor, level).clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("name, axis", [("translate_x", -1), ("translate_y", -2)])
def test_a_translation_moves_the_picture_a_third_of_its_side_and_fills_with_black(name, axis):
    x = pictures(1, side=30) / 2 + 0.25  # no black pixel of its own
    moved = under(x, name, 1.0)
    shift = 10 if torch.equal(moved.narrow(axis, 10, 20), x.narrow(axis, 0, 20)) else -10
    kept = moved.narrow(axis, max(shift, 0), 20)
    assert torch.equal(kept, x.narrow(axis, max(-shift, 0), 20))
    assert (moved.narrow(axis, 0 if shift > 0 else 20, 10) == 0).all()


def test_a_rotation_by_a_quarter_turn_turns_a_square_picture_exactly():
    x = pictures(1, side=8)
    # level 1 is 135 degrees; a quarter turn is level 90/135
    turned = under(x, "rotate", 90 / 135)
    assert torch.equal(turned, x.rot90(1, (2, 3))) or torch.equal(turned, x.rot90(-1, (2, 3)))


def test_a_shear_keeps_the_middle_row_and_moves_the_others():
    x = pictures(1, side=9)
    sheared = under(x, "shear_x", 0.5)
    assert not torch.equal(sheared, x)
    assert torch.equal(sheared[..., 4, :], x[..., 4, :])  # the centre row stays where it is


@pytest.mark.parametrize("channels", [1, 3])
def test_each_picture_gets_one_operation_and_the_draws_repeat_with_the_seed(channels):
    x = pictures(channels, n=64)
    first = TrivialAugment()(x, torch.Generator().manual_seed(5))
    again = TrivialAugment()(x, torch.Generator().manual_seed(5))
    other = TrivialAugment()(x, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1
    changed = (first != x).flatten(1).any(1)
    assert 0 < changed.sum() < 64  # most pictures changed; some drew identity, or strength 0


def test_a_run_with_trivial_augment_is_captured_in_the_static_step_to_the_eager_figures(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=300, n_test=100)
    settings = [f"data.root={data}", "data.check_counts=false", "data.val_size=100", "train.epochs=1",
                "train.batch_size=50", "train.device=cpu", "data.augment.trivial=true", "model.activation=relu",
                "optim.lr=0.05", f"output.dir={tmp_path / 'results'}"]
    eager = fit(load_config(None, settings), quiet=True)
    emulated = fit(load_config(None, [*settings, "train.cuda_graphs=emulate"]), quiet=True)
    assert emulated["train_step"] == "emulated-graph" and "train_step_note" not in emulated, emulated.get("train_step_note")
    assert emulated["final"]["train_loss"] == pytest.approx(eager["final"]["train_loss"], abs=1e-4)
    assert Path(eager["run_dir"]).is_dir()
