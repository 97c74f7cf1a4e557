"""The data description (DataSpec): made by the data layer, recorded by a run, read back (validated) by
everything after training; old run folders without one read as Fashion-MNIST; another data set
(3 channels, 5 classes, 16x16) reaches the model, FLOPs, eval, predict and export."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import DATA_SETS, DataSpec, Split, described
from cnnlab.engine import fit
from cnnlab.errors import UserError
from cnnlab.evaluation import evaluate_run
from cnnlab.inference import export, predict
from cnnlab.modelinfo import profile
from cnnlab.models.build import build_model
from cnnlab.results import Checkpoint, digest_path
from cnnlab.runs import open_run, runs_of
from cnnlab.visualize import visualize

runner = CliRunner()
COLOUR = DataSpec(name="tiny-colour", title="Tiny colour", classes=("a", "b", "c", "d", "e"), channels=3,
                  image_size=(16, 16))


def test_a_run_records_its_data_in_summary_json_and_checkpoints(trained):
    run_dir, summary = trained
    recorded = json.loads((run_dir / "summary.json").read_text())["data"]
    assert recorded["name"] == "fashion-mnist" and recorded["classes"] == list(described().classes)
    assert recorded["channels"] == 1 and recorded["image_size"] == [28, 28]
    assert recorded["mean"] == [summary["pixel_mean"]] and recorded["std"] == [summary["pixel_std"]]
    assert recorded["source"] == summary["data_root"]
    for name in ("best", "last"):
        assert Checkpoint.load(run_dir / "checkpoints" / f"{name}.pt").data == recorded


def as_older_cnnlab_wrote_it(run_dir: Path, target: Path) -> Path:
    """A copy of a run folder without the data description (summary, checkpoints) and data.name (config)."""
    shutil.copytree(run_dir, target)
    summary = json.loads((target / "summary.json").read_text())
    del summary["data"]
    (target / "summary.json").write_text(json.dumps(summary))
    config = yaml.safe_load((target / "config.yaml").read_text())
    del config["data"]["name"]
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for path in (target / "checkpoints").glob("*.pt"):
        rewrite_checkpoint(path, lambda payload: payload.pop("data"))
    return target


def rewrite_checkpoint(path: Path, change) -> None:
    """Change a checkpoint's stored dict in place, with a matching SHA-256 beside it."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    digest_path(path).write_text(hashlib.sha256(buffer.getvalue()).hexdigest() + "\n")


def test_an_old_run_folder_without_a_description_is_read_as_fashion_mnist(trained, tmp_path, capsys):
    run_dir, _ = trained
    old = as_older_cnnlab_wrote_it(run_dir, tmp_path / "old")
    assert "data" not in torch.load(old / "checkpoints" / "best.pt", weights_only=True)
    capsys.readouterr()
    assert open_run(old).spec == described("fashion-mnist")
    now, then = evaluate_run(run_dir), evaluate_run(old)
    assert (then.accuracy, then.per_class, then.confusion) == (now.accuracy, now.per_class, now.confusion)
    assert predict(old, [], index=5) == predict(run_dir, [], index=5)
    assert visualize(old, "0", class_name="Trouser", out=tmp_path / "maps.png").true_label == "Trouser"
    assert export(old, "torchscript", tmp_path / "m.pt").max_difference <= 1e-4
    assert capsys.readouterr().err == ""  # said nowhere: no warning, no error


def test_a_run_folder_without_data_name_is_still_found_by_resume_auto(trained, tmp_path):
    run_dir, _ = trained
    old = as_older_cnnlab_wrote_it(run_dir, tmp_path / "results" / run_dir.parent.name / run_dir.name)
    cfg = load_config(old / "config.yaml", [f"output.dir={tmp_path / 'results'}"])
    assert [found for found, _, _ in runs_of(cfg)] == [old]


@pytest.mark.parametrize("change, message", [
    ({"channels": 0}, "data.channels: Input should be greater than or equal to 1"),
    ({"channels": "1"}, "data.channels: Input should be a valid integer"),
    ({"classes": ["a", 2]}, "data.classes.1: Input should be a valid string"),
    ({"mean": [0.1, 0.2]}, "mean has 2 value(s), one per channel expected (1)"),
    ({"image_size": [28, 0]}, "each side must be 1 to"),
    ({"std": [0.0]}, "std must be above 0"),
    # eval's table would have nine rows for ten classes, the last name's counts over the first's
    ({"classes": ["a", "b", "c", "d", "e", "f", "g", "h", "b", "j"]}, "class 'b' is named twice (labels 1 and 8)"),
    ({"classes": ["all"]}, "only one class (all); a classifier needs two or more classes"),
])
def test_a_bad_description_in_summary_json_is_one_error_naming_the_file(trained, tmp_path, change, message):
    run_dir, _ = trained
    copy = shutil.copytree(run_dir, tmp_path / "run")
    summary = json.loads((copy / "summary.json").read_text())
    summary["data"].update(change)
    (copy / "summary.json").write_text(json.dumps(summary))
    result = runner.invoke(app, ["eval", str(copy)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{copy / 'summary.json'}: not a readable cnnlab summary.json" in result.output
    assert message in " ".join(result.output.split()) and "Value error" not in result.output  # the validator's words


def test_a_bad_description_in_a_checkpoint_is_one_error_naming_the_file(trained, tmp_path):
    run_dir, _ = trained
    copy = shutil.copytree(run_dir, tmp_path / "run")
    path = copy / "checkpoints" / "best.pt"
    rewrite_checkpoint(path, lambda payload: payload["data"].update(classes=[]))
    with pytest.raises(UserError, match=rf"^{path}: its data description is not valid \(classes: .*at least 1 item"):
        Checkpoint.load(path)


@pytest.mark.parametrize("name, options", [("lenet", {}), ("vgg", {}), ("resnet18", {}), ("sequential", {
    "layers": [{"conv": 4}, "relu", {"pool": {"size": 2}}, "flatten", {"linear": 5}]})])
def test_another_spec_reaches_the_builder_and_the_flop_count(name, options):
    cfg = load_config(None, [f"model.name={name}", *(f"model.{k}={json.dumps(v)}" for k, v in options.items())])
    model = build_model(cfg, spec=COLOUR)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    rows, flops = profile(model, COLOUR.input_shape)
    assert flops > 0 and rows[-1].output_shape == (5,)


def test_a_config_image_size_wins_over_the_datas():
    cfg = load_config(None, ["model.image_size=32"])
    assert build_model(cfg, spec=COLOUR)(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def tiny_colour_splits(cfg) -> tuple[Path, Split, Split]:
    """A data set module's ``read_splits``: 3-channel 16x16 images, class c bright in channel c % 3."""
    def split(n: int, seed: int) -> Split:
        labels = torch.arange(n) % 5
        images = torch.randint(0, 40, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
        for i, c in enumerate(labels.tolist()):
            images[i, c % 3, 2 * c : 2 * c + 6, 2 * c : 2 * c + 6] += 200
        return Split(images.clamp(0, 255).to(torch.uint8), labels)

    return Path(cfg.root or "/nowhere"), split(300, 1), split(100, 2)


def test_another_data_set_is_one_module_and_a_config_value(tmp_path, monkeypatch):
    monkeypatch.setitem(DATA_SETS, COLOUR.name, SimpleNamespace(NAME=COLOUR.name, SPEC=COLOUR, describe=lambda cfg: COLOUR,
                                                          read_splits=tiny_colour_splits))
    cfg = load_config(None, [f"data.name={COLOUR.name}", "data.val_size=50", "train.epochs=1", "train.batch_size=32",
                             "train.device=cpu", "model.activation=relu", "optim.lr=0.05", f"output.dir={tmp_path}"])
    summary = fit(cfg, quiet=True)
    run_dir = Path(summary["run_dir"])
    recorded = DataSpec.read(summary["data"], "summary")
    assert recorded.model_dump(include={"name", "classes", "channels", "image_size"}) == \
        COLOUR.model_dump(include={"name", "classes", "channels", "image_size"})
    assert len(recorded.mean) == 3 and recorded.mean[0] != recorded.mean[1]
    assert "pixel_mean" not in summary  # one number cannot say three channels' mean
    assert len(summary["test_confusion"]) == 5 and all(len(row) == 5 for row in summary["test_confusion"])
    report = evaluate_run(run_dir)
    assert report.images == 100 and set(report.per_class) <= set(COLOUR.classes) and len(report.confusion) == 5
    [prediction] = predict(run_dir, [], index=3, top=5)
    assert prediction.label == "d" and sorted(name for name, _ in prediction.top) == list(COLOUR.classes)
    assert visualize(run_dir, None, class_name="e", out=tmp_path / "maps.png").true_label == "e"
    assert export(run_dir, "torchscript", tmp_path / "m.pt").max_difference <= 1e-4
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert loaded(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    [picture] = predict(run_dir, [tmp_path / "maps.png"], top=5)  # a colour picture, for a colour model
    assert sorted(name for name, _ in picture.top) == list(COLOUR.classes)


def test_summary_and_models_say_the_default_data_sets_shape():
    result = runner.invoke(app, ["summary", "lenet"])
    assert result.exit_code == 0 and "lenet()  input 1x28x28" in result.output


def test_an_unknown_data_set_is_named_with_the_known_ones():
    with pytest.raises(UserError, match=r"data\.name: .*unknown data set 'cifar'; cnnlab knows .*fashion-mnist"):
        load_config(None, ["data.name=cifar"])
