"""Test-time augmentation (``eval.tta``): the mean of the logits of each image's views (its mirror image, its shifted
crops), reported beside the plain test figures, never instead of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.errors import UserError
from cnnlab.runtime import make_runtime
from cnnlab.steps import evaluate, shifted, tta_views

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator))
            for _ in range(3)]


def test_flip_tta_changes_nothing_for_a_model_that_cannot_tell_left_from_right():
    """1x1 convolutions and a global average see an image and its mirror image alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    plain, flipped = evaluate(model, batches(), runtime), evaluate(model, batches(), runtime, tta=["flip"])
    assert flipped.acc == plain.acc and flipped.examples == plain.examples == 48
    assert flipped.loss == pytest.approx(plain.loss, rel=1e-6)


def test_flip_tta_averages_each_images_logits_with_its_mirror_images():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # sees left and right apart
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    flipped = evaluate(model, batches(), runtime, tta=["flip"])
    with torch.no_grad():
        logits = [((model(x) + model(x.flip(-1))) / 2, y) for x, y in batches()]
    loss = sum(nn.functional.cross_entropy(z, y, reduction="sum").item() for z, y in logits) / 48
    acc = sum((z.argmax(1) == y).sum().item() for z, y in logits) / 48
    assert flipped.loss == pytest.approx(loss, rel=1e-5) and flipped.acc == acc
    assert flipped.loss != pytest.approx(evaluate(model, batches(), runtime).loss, rel=1e-3)  # it did flip


def test_a_run_reports_tta_beside_the_plain_test_figures(tiny_overrides, tmp_path):
    result = CliRunner().invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--quiet", "--set", "eval.tta=[flip]",
                                      *(a for o in tiny_overrides for a in ("--set", o))])
    assert result.exit_code == 0, result.output
    (summary_file,) = (tmp_path / "results").glob("lenet/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["test_tta"] == ["flip"] and 0 <= summary["test_acc_tta"] <= 1 and summary["test_loss_tta"] > 0
    assert summary["test_acc"] is not None  # the plain figure stays
    assert f"with flip TTA {summary['test_acc_tta']:.4f}" in result.output
    # cnnlab eval repeats the run's test pass, TTA included (the run's eval.tta by default), and refuses others
    run_dir = summary_file.parent
    evaluated = CliRunner().invoke(app, ["eval", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((run_dir / "eval" / "test-best" / "eval.json").read_text())
    assert report["tta"] == ["flip"] and report["accuracy_tta"] == summary["test_acc_tta"]
    assert report["accuracy"] == summary["test_acc"] and f"with flip TTA: accuracy {report['accuracy_tta']:.4f}" in \
        evaluated.output
    refused = CliRunner().invoke(app, ["eval", str(run_dir), "--split", "val", "--tta", "mirror"])
    assert refused.exit_code == 2 and "--tta mirror: the test-time augmentations are flip and crop" in refused.output
    assert not (run_dir / "eval" / "val-best").exists()
    # without it, the summary says nothing of TTA
    plain = CliRunner().invoke(app, ["run", str(CONFIGS / "lenet.yaml"), "--quiet",
                                     *(a for o in tiny_overrides for a in ("--set", o))])
    assert plain.exit_code == 0 and "TTA" not in plain.output


def test_a_shifted_view_moves_the_picture_by_one_pixel_and_fills_with_zeros():
    x = torch.arange(1, 10, dtype=torch.float32).view(1, 1, 3, 3)
    assert shifted(x, 1)[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    assert shifted(x, -1)[0, 0].tolist() == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]
    views = tta_views(x, ["flip", "crop"])
    assert len(views) == 6 and torch.equal(views[3], x.flip(-1)) and torch.equal(views[5], shifted(x, 1).flip(-1))


def test_crop_tta_averages_the_logits_of_the_image_and_its_two_shifted_crops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    cropped = evaluate(model, batches(), runtime, tta=["crop"])
    with torch.no_grad():
        logits = [((model(x) + model(shifted(x, -1)) + model(shifted(x, 1))) / 3, y) for x, y in batches()]
    loss = sum(nn.functional.cross_entropy(z, y, reduction="sum").item() for z, y in logits) / 48
    assert cropped.loss == pytest.approx(loss, rel=1e-5)
    assert cropped.acc == sum((z.argmax(1) == y).sum().item() for z, y in logits) / 48


@pytest.mark.parametrize("value, message", [("[mirror]", "eval.tta"), ("[flip, flip]", "names an augmentation twice")])
def test_an_unknown_or_repeated_augmentation_is_named(value, message):
    with pytest.raises(UserError, match=message):
        load_config(CONFIGS / "lenet.yaml", [f"eval.tta={value}"])
