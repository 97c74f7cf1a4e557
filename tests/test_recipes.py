"""The parts of modern training recipes: a moving average of the weights (``train.ema``), the average of the
last epochs' weights (``train.swa``), Mixup and CutMix
(``data.augment.mixup``, ``cutmix``), gradient accumulation (``train.accumulate``); each checked against a
hand computation, and all of them together against a seeded run repeated and resumed mid-epoch."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import StopAfter
from torch import nn

from cnnlab.averaging import WeightAverage, recompute_batchnorm
from cnnlab.config import EmaConfig, load_config
from cnnlab.data.mixing import Mix, beta
from cnnlab.engine import fit, resume
from cnnlab.errors import UserError
from cnnlab.listeners import Listener
from cnnlab.results import Checkpoint, read_metrics_csv
from cnnlab.runtime import make_runtime
from cnnlab.steps import batch_parts, train_step
from cnnlab.stopping import Interrupted

RECIPE = ["train.ema.half_life=0.5", "data.augment.mixup=0.2", "data.augment.cutmix=1.0", "train.accumulate=2",
          "eval.tta=[flip, crop]", "data.augment.flip=true", "data.augment.crop_padding=2", "data.augment.erasing=0.25",
          "data.augment.trivial=true",
          "train.label_smoothing=0.1", "model.activation=relu", "optim.lr=0.1", "optim.momentum=0.9",
          "schedule.name=onecycle", "train.epochs=3", "train.swa.epochs=2",
          "model.batch_norm=true", "model.dropout=0.2"]


# ---------------------------------------------------------------------------------------------
# The moving average of the weights


def test_the_average_moves_towards_the_weights_by_one_minus_its_decay_after_a_warm_up():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    average.update()  # the first update: decay min(0.9, 2/11)
    first = 1 - 2 / 11
    for name, value in average.module.state_dict().items():
        now = model.state_dict()[name]
        expected = now if name.endswith("num_batches_tracked") else start[name] + (now - start[name]) * first
        assert torch.allclose(value, expected), name
    for _ in range(200):
        average.update()
    assert average.current_decay() == 0.9  # the warm-up is over
    assert not any(p.requires_grad for p in average.module.parameters())


def test_a_half_life_in_epochs_halves_a_steps_weight_after_that_many_epochs():
    decay = EmaConfig(half_life=2).decay_per_step(steps_per_epoch=10)
    assert decay ** 20 == pytest.approx(0.5)
    assert EmaConfig(decay=0.999).decay_per_step(10) == 0.999
    with pytest.raises(ValueError, match="give one of decay"):
        EmaConfig(decay=0.9, half_life=1)
    with pytest.raises(UserError, match="train.ema: .*give one of decay"):
        load_config(None, ["train.ema={}"])


def test_a_half_life_that_averages_nothing_is_bad_input_before_the_folder(tiny_overrides, tmp_path):
    with pytest.raises(UserError, match="train.ema.half_life: 1e-09 epochs .* averages nothing"):
        fit(load_config(None, [*tiny_overrides, "train.ema.half_life=1e-9"]), quiet=True)
    assert not (tmp_path / "results").exists()


def test_a_run_with_ema_tests_both_weights_saves_the_average_as_ema_and_names_the_better(tiny_overrides):
    summary = fit(load_config(None, [*tiny_overrides, "train.ema.half_life=0.25", "model.activation=relu",
                                     "optim.lr=0.1"]), quiet=True)
    run = Path(summary["run_dir"])
    assert summary["status"] == "completed"
    assert 0 <= summary["test_acc_ema"] <= 1 and summary["test_loss_ema"] > 0 and summary["test_acc"] is not None
    rows = read_metrics_csv(run / "metrics.csv")
    assert all(0 <= row["val_acc_ema"] <= 1 for row in rows)
    best = rows[summary["best_epoch"] - 1]
    assert summary["better_weights"] == ("ema" if best["val_acc_ema"] > best["val_acc"] else "raw")
    assert summary["best_val_acc"] == max(best["val_acc"], best["val_acc_ema"])
    assert "val_acc_ema" in summary["final"]
    for name in ("best", "last"):
        checkpoint = Checkpoint.load(run / "checkpoints" / f"{name}.pt")
        assert checkpoint.ema is not None and checkpoint.ema.keys() == checkpoint.model.keys()
        assert any(not torch.equal(checkpoint.ema[k], checkpoint.model[k]) for k in checkpoint.model)
    assert Checkpoint.load(run / "checkpoints" / "last.pt").state["ema_updates"] > 0


def test_a_run_without_ema_writes_nothing_of_it(tiny_overrides):
    summary = fit(load_config(None, [*tiny_overrides, "train.epochs=1"]), quiet=True)
    run = Path(summary["run_dir"])
    assert "test_acc_ema" not in summary and "better_weights" not in summary
    assert "val_acc_ema" not in (run / "metrics.csv").read_text()
    assert Checkpoint.load(run / "checkpoints" / "last.pt").ema is None


def test_a_checkpoint_whose_ema_is_not_weights_is_refused_by_name(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "format": 1, "ema": {"w": "not a tensor"}}, path)
    with pytest.raises(UserError, match="bad.pt: not a cnnlab checkpoint .its ema entry is not a state dict"):
        Checkpoint.load(path)


# ---------------------------------------------------------------------------------------------
# The average of the last epochs' weights (SWA)


def test_without_a_decay_the_average_weighs_every_update_the_same():
    model = nn.Linear(3, 2)
    average = WeightAverage(model)
    seen = []
    for value in (1.0, 4.0, -2.0, 7.0):
        with torch.no_grad():
            model.weight.fill_(value)
        seen.append(model.weight.clone())
        average.update()
    assert torch.allclose(average.module.weight, torch.stack(seen).mean(0))
    assert average.updates == 4 and average.current_decay() == pytest.approx(4 / 5)


def test_batchnorm_statistics_are_measured_again_over_the_images_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten())
    model[0].running_mean.fill_(9.0)
    images = [torch.randn(8, 3, 4, 4) * 2 + 1 for _ in range(4)]  # batches of one size: a plain mean of the means
    assert recompute_batchnorm(model, images, model)
    everything = torch.cat(images)
    assert torch.allclose(model[0].running_mean, everything.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in images]).mean(0)
    assert torch.allclose(model[0].running_var, per_batch_var, atol=1e-5)
    assert not model.training and model[0].momentum == 0.1
    assert not recompute_batchnorm(nn.Linear(2, 2), images, model)


def test_a_run_with_swa_averages_its_last_epochs_tests_the_average_and_saves_it_in_the_last_checkpoint(tiny_overrides):
    """One epoch averaged is that epoch's weights; BatchNorm's statistics are then those of the training images, so
    the average differs from the weights in those alone, and evaluating it again gives the summary's figure."""
    from typer.testing import CliRunner

    from cnnlab.cli import app

    summary = fit(load_config(None, [*tiny_overrides, "train.swa.epochs=1", "model.activation=relu",
                                     "model.batch_norm=true", "optim.lr=0.1"]), quiet=True)
    run = Path(summary["run_dir"])
    assert summary["swa_epochs"] == 1 and 0 <= summary["test_acc_swa"] <= 1 and 0 <= summary["val_acc_swa"] <= 1
    assert summary["better_weights"] in ("raw", "swa") and "test_acc_swa_tta" not in summary
    last = Checkpoint.load(run / "checkpoints" / "last.pt")
    assert last.state["swa_updates"] == 1 and last.swa.keys() == last.model.keys()
    different = {k for k in last.model if not torch.equal(last.model[k], last.swa[k])}
    assert different and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in different)
    result = CliRunner().invoke(app, ["eval", str(run), "--weights", "swa", "--checkpoint", "last", "--split", "val"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval" / "val-last-swa" / "eval.json").read_text())
    assert report["accuracy"] == summary["val_acc_swa"] and "the average of its last epochs' weights" in result.output
    refused = CliRunner().invoke(app, ["eval", str(run), "--weights", "swa", "--checkpoint", "best"])
    assert refused.exit_code == 2 and "add --checkpoint last" in refused.output


class TermAtTheEnd(Listener):
    """Sends this process SIGTERM once the last epoch is checkpointed: the run stops at its next check, after
    the epoch loop (in train.swa's BatchNorm pass, or in the test pass once the best epoch's weights are loaded)."""

    def end_epoch(self, row, is_best) -> None:
        if row["epoch"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("swa", [["train.swa.epochs=2"], []])
def test_a_run_stopped_after_its_last_epoch_resumes_to_the_same_averages_and_weights(tiny_overrides, swa):
    """Its last checkpoint stays the last epoch's (not the best epoch's weights the test had loaded), and the
    resume measures BatchNorm's statistics afresh: the same figures and files as a run never stopped."""
    settings = [*tiny_overrides, *swa, "train.epochs=3", "train.ema.decay=0.9", "model.activation=relu",
                "model.batch_norm=true", "model.dropout=0.3", "optim.lr=0.1"]
    clean = fit(load_config(None, settings), quiet=True)
    assert clean["best_epoch"] < 3  # the test loads other weights than the last epoch's
    with pytest.raises(Interrupted):
        fit(load_config(None, settings), reporter=TermAtTheEnd())
    [stopped] = [p for p in Path(clean["run_dir"]).parent.iterdir() if str(p) != clean["run_dir"]]
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    resumed = resume(stopped, quiet=True)
    assert resumed["status"] == "completed" and resumed.get("swa_epochs") == (2 if swa else None)
    assert figures(resumed) == figures(clean) and resumed.get("val_acc_swa") == clean.get("val_acc_swa")
    for name in ("last.pt", "best.pt"):
        reference = Checkpoint.load(Path(clean["run_dir"]) / "checkpoints" / name)
        got = Checkpoint.load(stopped / "checkpoints" / name)
        for entry in ("model", "ema", "swa"):
            assert (getattr(got, entry) is None) == (getattr(reference, entry) is None)
            if getattr(reference, entry) is not None:
                assert all(torch.equal(getattr(got, entry)[k], v) for k, v in getattr(reference, entry).items())


def test_an_early_stop_before_the_last_epochs_leaves_no_average_and_eval_says_so(tiny_overrides):
    from typer.testing import CliRunner

    from cnnlab.cli import app

    summary = fit(load_config(None, [*tiny_overrides, "train.epochs=4", "train.swa.epochs=2", "train.patience=1",
                                     "optim.lr=1e-12"]), quiet=True)  # never better after epoch 1: stops after 2
    assert summary["epochs_completed"] == 2 and summary["swa_epochs"] == 0 and "test_acc_swa" not in summary
    refused = CliRunner().invoke(app, ["eval", summary["run_dir"], "--weights", "swa", "--checkpoint", "last"])
    assert refused.exit_code == 2 and "there is no average to evaluate" in refused.output


def test_swa_of_more_epochs_than_the_run_has_is_bad_input(tiny_overrides):
    with pytest.raises(UserError, match="swa.epochs: 5 last epochs to average, but epochs is 2; choose swa.epochs <= epochs"):
        load_config(None, [*tiny_overrides, "train.swa.epochs=5"])


def test_a_run_without_swa_has_no_average_to_evaluate(tiny_overrides):
    from typer.testing import CliRunner

    from cnnlab.cli import app

    plain = fit(load_config(None, [*tiny_overrides, "train.epochs=1"]), quiet=True)
    assert "swa_epochs" not in plain and Checkpoint.load(Path(plain["run_dir"]) / "checkpoints" / "last.pt").swa is None
    refused = CliRunner().invoke(app, ["eval", plain["run_dir"], "--weights", "swa", "--checkpoint", "last"])
    assert refused.exit_code == 2 and "the run trained without train.swa" in refused.output


# ---------------------------------------------------------------------------------------------
# Mixup and CutMix


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=generator) + 1, torch.tensor([0, 1, 2, 0, 1, 2])


def test_mixup_blends_images_and_labels_by_one_weight_and_the_targets_sum_to_one():
    x, y = batch()
    mix = Mix(mixup=0.4, cutmix=0.0, num_classes=3, generator=torch.Generator().manual_seed(1))
    weight = beta(0.4, torch.Generator().manual_seed(1))  # the same draw, by hand
    mixed, targets = mix(x, y)
    assert torch.allclose(mixed, weight * x + (1 - weight) * x.flip(0))
    assert torch.allclose(targets.sum(1), torch.ones(6))
    expected = weight * nn.functional.one_hot(y, 3) + (1 - weight) * nn.functional.one_hot(y.flip(0), 3)
    assert torch.allclose(targets, expected.float())


def test_cutmix_pastes_one_rectangle_and_weighs_the_labels_by_its_area():
    x, y = batch()
    for seed in range(20):
        mix = Mix(mixup=0.0, cutmix=1.0, num_classes=3, generator=torch.Generator().manual_seed(seed))
        mixed, targets = mix(x, y)
        pasted = (mixed != x).all(0).all(0)  # pixels from the reversed batch (every pixel differs there: x > 1)
        assert torch.equal(mixed[:, :, pasted], x.flip(0)[:, :, pasted])
        assert torch.equal(mixed[:, :, ~pasted], x[:, :, ~pasted])
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        if len(rows):  # one rectangle
            assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        kept = 1 - pasted.float().mean().item()
        assert torch.allclose(targets[0], torch.tensor([kept, 0, 1 - kept]) if y[0] != y[-1] else targets[0])
        assert torch.allclose(targets.sum(1), torch.ones(6))


def test_with_both_each_batch_is_one_or_the_other():
    x, y = batch()
    mix = Mix(mixup=0.4, cutmix=1.0, num_classes=3, generator=torch.Generator().manual_seed(0))
    kinds = set()
    for _ in range(20):
        mixed, _ = mix(x, y)
        kinds.add("cutmix" if ((mixed == x) | (mixed == x.flip(0))).all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


@pytest.mark.parametrize("alpha", [0.2, 1.0, 3.0])
def test_the_mixing_weight_is_beta_distributed(alpha):
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([beta(alpha, generator) for _ in range(4000)])
    assert ((draws >= 0) & (draws <= 1)).all()
    assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
    assert draws.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)  # Beta(a, a)'s variance


def test_the_training_loss_is_the_cross_entropy_of_the_mixed_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = batch()
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    mixing = torch.Generator().manual_seed(3)
    hand_mix = Mix(mixup=0.4, cutmix=1.0, num_classes=3, generator=torch.Generator().manual_seed(3))
    mixed, targets = hand_mix(x, y)
    with torch.no_grad():
        expected = -(targets * model(mixed).log_softmax(1)).sum(1).mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, logits = train_step(model, x, y, optimizer, nn.CrossEntropyLoss(), runtime,
                              mix=Mix(0.4, 1.0, 3, mixing))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation


@pytest.mark.parametrize("n, k, parts", [(8, 4, [2, 2, 2, 2]), (10, 4, [3, 3, 4]), (3, 2, [3]), (7, 1, [7]),
                                         (2, 2, [2]), (1, 2, [1]), (9, 4, [3, 3, 3])])
def test_a_batch_is_split_into_at_most_k_parts_none_of_one_image_where_avoidable(n, k, parts):
    assert batch_parts(n, k) == parts


def test_k_parts_of_n_accumulated_equal_one_batch_of_k_times_n():
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    x, y = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    results = []
    for accumulate in (1, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = [train_step(model, x, y, optimizer, nn.CrossEntropyLoss(label_smoothing=0.1), runtime, grad_clip=1.0,
                             accumulate=accumulate)[0].item() for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (plain_losses, plain), (parts_losses, parts) = results
    assert parts_losses == pytest.approx(plain_losses, rel=1e-5)
    for a, b in zip(plain, parts, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_accumulate_must_leave_every_part_an_image():
    with pytest.raises(UserError, match="accumulate: 17 parts of a batch of 32 leaves parts of fewer than two"):
        load_config(None, ["train.batch_size=32", "train.accumulate=17"])


# ---------------------------------------------------------------------------------------------
# Everything together: seeded, repeated, resumed


def weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.load(run / "checkpoints" / "last.pt")
    return {**checkpoint.model, **{f"ema.{k}": v for k, v in checkpoint.ema.items()},
            **{f"swa.{k}": v for k, v in checkpoint.swa.items()}}


def figures(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k.startswith(("test_", "best_", "final", "better"))}


def test_a_seeded_run_with_every_option_on_is_bit_identical_twice_and_after_a_mid_epoch_resume(tiny_overrides):
    settings = [*tiny_overrides, *RECIPE]
    first = fit(load_config(None, settings), quiet=True)
    second = fit(load_config(None, settings), quiet=True)
    with pytest.raises(Interrupted):
        fit(load_config(None, settings), reporter=StopAfter(20))  # in epoch 2
    runs = sorted(Path(first["run_dir"]).parent.iterdir())
    [stopped] = [p for p in runs if str(p) not in (first["run_dir"], second["run_dir"])]
    saved = json.loads((stopped / "summary.json").read_text())
    assert saved["status"] == "interrupted" and saved["stopped_at"].startswith("epoch 2, batch")
    resumed = resume(stopped, quiet=True)
    assert resumed["status"] == "completed" and resumed["train_step"] == "ordinary"
    reference = weights(Path(first["run_dir"]))
    for other in (second, resumed):
        assert figures(other) == figures(first)
        got = weights(Path(other["run_dir"]))
        assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert first["test_acc_ema_tta"] is not None and first["test_tta"] == ["flip", "crop"]
    assert first["test_acc_swa_tta"] is not None and first["swa_epochs"] == 2
    assert math.isfinite(first["final"]["train_loss"])


def test_cnnlab_eval_evaluates_the_moving_average_when_asked_and_refuses_a_run_without_one(tiny_overrides):
    from typer.testing import CliRunner

    from cnnlab.cli import app

    averaged = fit(load_config(None, [*tiny_overrides, "train.ema.decay=0.9", "train.epochs=1"]), quiet=True)
    result = CliRunner().invoke(app, ["eval", averaged["run_dir"], "--weights", "ema"])
    assert result.exit_code == 0, result.output
    report = json.loads((Path(averaged["run_dir"]) / "eval" / "test-best-ema" / "eval.json").read_text())
    assert report["weights"] == "ema" and report["accuracy"] == averaged["test_acc_ema"]
    assert "its moving average of the weights" in result.output
    plain = fit(load_config(None, [*tiny_overrides, "train.epochs=1"]), quiet=True)
    refused = CliRunner().invoke(app, ["eval", plain["run_dir"], "--weights", "ema"])
    assert refused.exit_code == 2 and "holds no moving average of the weights" in refused.output
    assert not (Path(plain["run_dir"]) / "eval").exists()


def test_predict_and_export_use_the_moving_average_when_asked_and_name_it(tiny_overrides):
    # A user whose summary.json names ema the better weights classifies and ships those, not the raw ones.
    from typer.testing import CliRunner

    from cnnlab.cli import app
    from cnnlab.runs import open_run

    onnxruntime = pytest.importorskip("onnxruntime")
    run = Path(fit(load_config(None, [*tiny_overrides, "train.ema.decay=0.9", "train.epochs=1"]), quiet=True)["run_dir"])
    answers = {}
    for weights in ("raw", "ema"):
        said = CliRunner().invoke(app, ["predict", str(run), "--image", "3", "--top", "10", "--json", "--weights", weights])
        assert said.exit_code == 0, said.output
        answers[weights] = {row["class"]: row["probability"] for row in json.loads(said.output)[0]["top"]}
    opened = open_run(run, weights="ema")
    pixels = opened.load_data().test.images[3:4]
    with torch.no_grad():
        expected = opened.model(opened.load_data().prepare(pixels)).softmax(1)[0]
    assert [answers["ema"][name] for name in opened.spec.classes] == pytest.approx(expected.tolist(), abs=1e-6)
    assert answers["ema"] != pytest.approx(answers["raw"], abs=1e-6)

    shipped = CliRunner().invoke(app, ["export", str(run), "--weights", "ema"])
    assert shipped.exit_code == 0, shipped.output
    assert "the moving average of the weights of epoch 1 of 1 (best checkpoint)" in shipped.output
    session = onnxruntime.InferenceSession(str(run / "model-ema.onnx"))
    assert session.get_modelmeta().custom_metadata_map["cnnlab.weights"] == "ema"
    [logits] = session.run(None, {"pixels": (pixels.float() / 255).numpy()})
    assert torch.from_numpy(logits).softmax(1)[0].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    refused = CliRunner().invoke(app, ["export", str(run), "--weights", "swa", "--checkpoint", "last"])
    assert refused.exit_code == 2 and "holds no average of the last epochs' weights" in refused.output
    assert sorted(p.name for p in run.glob("model*")) == ["model-ema.onnx"]


def test_a_run_of_a_cnnlab_without_these_options_is_still_the_same_experiment(tiny_overrides):
    """Its config.yaml lacks the new keys, nested ones too (data.augment.mixup): they take today's defaults,
    so that `run --resume auto` and a sweep's "done before" still find it."""
    import yaml

    from cnnlab.runs import runs_of

    cfg = load_config(None, [*tiny_overrides, "train.epochs=1"])
    summary = fit(cfg, quiet=True)
    path = Path(summary["run_dir"]) / "config.yaml"
    older = yaml.safe_load(path.read_text())
    for key in ("mixup", "cutmix", "trivial"):
        del older["data"]["augment"][key]
    del older["train"]["ema"], older["train"]["accumulate"], older["train"]["swa"]
    path.write_text(yaml.safe_dump(older))
    assert [run for run, _, _ in runs_of(cfg)] == [path.parent]
