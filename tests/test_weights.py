"""Pretrained weights and fine-tuning: ``model.weights`` (a file, or a library's named weights from its local
cache), the first convolution adapted and the head made new when the data differs, ``train.freeze``,
``optim.backbone_lr`` and ``data.normalize: weights``. Nothing here downloads: the libraries' caches are
folders of the test's own."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import write_dataset
from test_folder import make_folder
from test_library_models import timm_installed
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.engine import fit, resume
from cnnlab.errors import UserError
from cnnlab.session import prepare

runner = CliRunner()
MOBILENET = "torchvision.mobilenet_v3_small"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def small(tmp_path: Path) -> list[str]:
    """One epoch of 100 tiny grey 28x28 images of 10 classes, in batches of 16."""
    root = write_dataset(tmp_path / "small", n_train=120, n_test=40)
    return [f"data.root={root}", "data.check_counts=false", "data.val_size=20", "train.epochs=1", "train.batch_size=16",
            "train.device=cpu", "optim.lr=0.01", f"output.dir={tmp_path / 'results'}", f"model.name={MOBILENET}"]


@pytest.fixture
def imagenet_file(tmp_path: Path) -> Path:
    """A state dict shaped as torchvision's ImageNet weights of MobileNetV3-small: 3 channels, 1,000 classes."""
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(1)
    path = tmp_path / "imagenet.pth"
    torch.save(mobilenet_v3_small().state_dict(), path)
    return path


def run(overrides: list[str]):
    """``cnnlab run`` of a config that names nothing but the experiment, with ``overrides``."""
    config = Path(overrides[0].partition("=")[2]).parent / "experiment.yaml"
    config.write_text("name: experiment\n")
    return runner.invoke(app, ["run", str(config), "--quiet", *[a for o in overrides for a in ("--set", o)]])


def model_of(overrides: list[str]) -> torch.nn.Module:
    return prepare(load_config(None, overrides)).model


def test_weights_of_another_class_and_channel_count_load_adapted_and_the_head_new(small, imagenet_file):
    given = torch.load(imagenet_file, weights_only=True)
    session = prepare(load_config(None, [*small, f"model.weights={imagenet_file}"]))
    own = session.model.state_dict()
    conv = "features.0.0.weight"
    assert torch.equal(own[conv], given[conv].sum(dim=1, keepdim=True))  # RGB kernels summed for one channel
    assert torch.equal(own["features.1.block.0.0.weight"], given["features.1.block.0.0.weight"])
    assert own["classifier.3.weight"].shape == (10, 1024)  # the head is built for the data's 10 classes, left as initialised
    report = session.weights
    assert report.adapted == [f"{conv} (3 -> 1 channels)"] and report.new == ["classifier.3.weight", "classifier.3.bias"]
    assert report.loaded == len(own) - 3 and report.unused == []
    assert "2 new (classifier.3.weight, classifier.3.bias)" in report.line()


def test_a_runs_checkpoint_starts_another_run_and_the_summary_says_what_was_loaded(small, tmp_path):
    first = fit(load_config(None, small), quiet=True)
    checkpoint = Path(first["run_dir"]) / "checkpoints" / "best.pt"
    result = run([*small, f"model.weights={checkpoint}"])
    assert result.exit_code == 0, result.output
    assert f"model.weights: {checkpoint}: 244 tensors loaded, 0 adapted, 0 new" in " ".join(result.output.split())
    [second] = [p for p in (tmp_path / "results").glob("*/*") if str(p) != first["run_dir"]]
    summary = json.loads((second / "summary.json").read_text())
    assert summary["weights"] == {"source": str(checkpoint), "loaded": 244, "adapted": [], "new": [], "unused": []}
    # The same numbers as the checkpoint's at the start: a plain state dict and a .safetensors file load alike.
    trained = torch.load(checkpoint, weights_only=True)["model"]
    plain, safe = tmp_path / "plain.pt", tmp_path / "weights.safetensors"
    torch.save(trained, plain)
    from safetensors.torch import save_file

    save_file(trained, str(safe))
    for path in (plain, safe):
        own = model_of([*small, f"model.weights={path}"]).state_dict()
        assert all(torch.equal(own[k], trained[k]) for k in own), path


def test_grey_weights_start_a_colour_run_of_three_classes(small, tmp_path):
    """1 -> 3 channels (repeated, scaled by 1/3) and 10 -> 3 classes, from a cnnlab run to a picture folder."""
    first = fit(load_config(None, small), quiet=True)
    checkpoint = Path(first["run_dir"]) / "checkpoints" / "last.pt"
    pictures = make_folder(tmp_path / "pictures", per_class=8, mixed=False)
    colour = [f"data.root={pictures}", "data.name=folder", "data.channels=3", "data.val_size=6", "train.device=cpu",
              f"model.name={MOBILENET}", f"model.weights={checkpoint}"]
    session = prepare(load_config(None, colour))
    grey = torch.load(checkpoint, weights_only=True)["model"]["features.0.0.weight"]
    assert torch.allclose(session.model.state_dict()["features.0.0.weight"], grey.repeat(1, 3, 1, 1) / 3)
    assert session.weights.adapted == ["features.0.0.weight (1 -> 3 channels)"]
    assert session.weights.new == ["classifier.3.weight", "classifier.3.bias"]


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    from torchvision.models import resnet18

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    files = {
        "missing": (tmp_path / "nowhere.pt", "not found"),
        "text": (tmp_path / "notes.pt", "not a readable state dict: it is truncated, corrupt or not a PyTorch file"),
        "code": (tmp_path / "code.pt", "holds pickled Python objects"),
        "numbers": (tmp_path / "numbers.pt", "not a state dict (a mapping of parameter names to tensors"),
        "other model": (tmp_path / "resnet.pt", "none of its 122 tensors fits the model"),
        "other shapes": (tmp_path / "wide.pt", "tensors of other shapes than the model's: features.1.block.0.0.weight"),
        "nan": (tmp_path / "nan.pt", "tensors holding inf or nan: features.0.0.weight"),
        "safetensors": (tmp_path / "broken.safetensors", "not a readable .safetensors file"),
        # complex numbers hide a nan from a check of floating-point tensors; integers and bools are no weights at all
        "complex nan": (tmp_path / "complex.pt", "tensors of another kind of number than the model's: features.0.0.weight "
                                                "(complex64, the model's float32)"),
        "integers": (tmp_path / "integers.pt", "features.0.1.weight (int64, the model's float32)"),
        "bools": (tmp_path / "bools.pt", "features.0.1.bias (bool, the model's float32)"),
    }
    files["text"][0].write_text("these are not weights\n")
    files["code"][0].write_bytes(pickle.dumps({"w": Payload()}))
    torch.save({"epoch": 3, "lr": 0.1}, files["numbers"][0])
    torch.save(resnet18().state_dict(), files["other model"][0])
    from torchvision.models import mobilenet_v3_small

    wide = mobilenet_v3_small().state_dict()
    wide["features.1.block.0.0.weight"] = torch.zeros(32, 1, 3, 3)
    torch.save(wide, files["other shapes"][0])
    poisoned = mobilenet_v3_small().state_dict()
    poisoned["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(poisoned, files["nan"][0])
    files["safetensors"][0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    complex_nan = mobilenet_v3_small().state_dict()
    complex_nan["features.0.0.weight"] = complex_nan["features.0.0.weight"].to(torch.complex64)
    complex_nan["features.0.0.weight"][0, 0, 0, 0] = complex(float("nan"), 0)
    torch.save(complex_nan, files["complex nan"][0])
    integers = mobilenet_v3_small().state_dict()
    integers["features.0.1.weight"] = integers["features.0.1.weight"].long()
    torch.save(integers, files["integers"][0])
    bools = mobilenet_v3_small().state_dict()
    bools["features.0.1.bias"] = bools["features.0.1.bias"] > 0
    torch.save(bools, files["bools"][0])
    return files


def test_bad_weights_files_are_exit_2_naming_the_file_and_write_nothing(small, tmp_path, capfd):
    results = tmp_path / "results"
    for what, (path, problem) in bad_files(tmp_path).items():
        result = run([*small, f"model.weights={path}"])
        said = " ".join(result.output.split())
        assert result.exit_code == 2, (what, result.output)
        assert f"model.weights: {path}" in said and problem in said, (what, said)
        assert "Traceback" not in said and not results.exists(), what
    assert "pickled code ran" not in capfd.readouterr().out


def test_named_weights_come_from_the_local_cache_only(small, tmp_path, monkeypatch, imagenet_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    with pytest.raises(UserError, match=r"IMAGENET1K_V1 are not in the local cache .*add --download"):
        prepare(load_config(None, [*small, "model.weights=DEFAULT"]))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(imagenet_file.read_bytes())
    session = prepare(load_config(None, [*small, "model.weights=DEFAULT", "data.normalize=weights"]))
    assert session.weights.source == f"torchvision IMAGENET1K_V1 ({cached})" and len(session.weights.new) == 2
    # data.normalize: weights: ImageNet's statistics, averaged for grey data, recorded in the data's description
    assert session.data.spec.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    assert session.data.spec.std == pytest.approx((sum(IMAGENET_STD) / 3,))


@pytest.mark.skipif(not timm_installed(), reason="pip install 'cnnlab[timm]'")
def test_timm_pretrained_tags_come_from_the_hugging_face_cache(small, tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    timm_run = [*small, "model.name=timm.resnet10t", "model.weights=DEFAULT"]
    with pytest.raises(UserError, match=r"resnet10t.c3_in1k weights are not in the Hugging Face cache"):
        prepare(load_config(None, timm_run))
    repo = tmp_path / "hf" / "models--timm--resnet10t.c3_in1k"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    given = timm.create_model("resnet10t").state_dict()
    save_file(given, str(repo / "snapshots" / "0123abc" / "model.safetensors"))
    session = prepare(load_config(None, timm_run))
    assert session.weights.adapted == ["conv1.0.weight (3 -> 1 channels)"] and session.weights.new == ["fc.weight", "fc.bias"]
    assert torch.equal(session.model.state_dict()["layer1.0.conv1.weight"], given["layer1.0.conv1.weight"])


@pytest.mark.parametrize(("sets", "problem"), [
    (["model.name=lenet", "model.weights=DEFAULT"], "'DEFAULT' names a library's weights, and 'lenet' is cnnlab's own model"),
    (["model.weights=IMAGENET1K_V9"], "has no weights 'IMAGENET1K_V9'; its weights are IMAGENET1K_V1, DEFAULT"),
    (["data.normalize=weights"], "data.normalize: weights takes the mean and std a library records"),
    (["model.weights=mine.pt", "data.normalize=weights"], "has model.weights: mine.pt, a file, which records none"),
    (["train.freeze=[layer9]"], "train.freeze: 'layer9' names no part of the model with parameters; its top-level parts are "
                                "features, classifier"),
    (["train.freeze=[features, classifier]"], "covers every parameter of the model, which leaves nothing to train"),
])
def test_weights_and_fine_tuning_settings_that_cannot_work_are_exit_2(small, sets, problem):
    result = run([*small, *sets])
    assert result.exit_code == 2, result.output
    assert problem in " ".join(result.output.split())


def test_a_frozen_backbone_stays_as_it_was_and_the_head_learns_at_its_own_rate(small, imagenet_file):
    tuned = [*small, f"model.weights={imagenet_file}", "train.freeze=[backbone]", "optim.backbone_lr=0.1",
             "optim.name=sgd", "optim.momentum=0.9"]
    session = prepare(load_config(None, tuned))
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    assert [g["lr"] for g in session.optimizer.param_groups] == pytest.approx([0.01, 0.001])
    assert session.frozen_params == sum(p.numel() for n, p in session.model.named_parameters()
                                        if not n.startswith("classifier.3."))
    summary = fit(load_config(None, tuned), quiet=True)
    assert summary["frozen_params"] == session.frozen_params
    checkpoint = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["model"]
    params = dict(session.model.named_parameters())
    assert all(torch.equal(checkpoint[n], before[n]) for n in params if not n.startswith("classifier.3."))
    assert not torch.equal(checkpoint["classifier.3.weight"], before["classifier.3.weight"])


def test_a_run_with_a_backbone_rate_resumes_with_both_rates_without_its_weights_file(small, imagenet_file):
    tuned = [*small, f"model.weights={imagenet_file}", "optim.backbone_lr=0.25", "schedule.name=cosine", "train.epochs=1"]
    summary = fit(load_config(None, tuned), quiet=True)
    imagenet_file.unlink()  # a resumed run's weights come from its checkpoint: the file it started from may be gone
    resumed = resume(Path(summary["run_dir"]), epochs=2, quiet=True)
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 2
    state = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([0.01, 0.0025])


def test_the_captured_step_says_why_it_cannot_take_a_backbone_rate(small, capsys):
    """The static (CUDA-graph) step runs SGD with one learning rate: two are refused in one line, not ignored."""
    session = prepare(load_config(None, [*small, "optim.backbone_lr=0.5", "train.cuda_graphs=emulate"]))
    assert session.static_step is None
    assert session.step_note == "train.cuda_graphs: off: optim.backbone_lr: the captured SGD step updates with one " \
                                "learning rate so far"
    assert session.step_note in " ".join(capsys.readouterr().err.split())


def test_the_shipped_fine_tuning_config_asks_for_its_weights_instead_of_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    root = write_dataset(tmp_path / "small", n_train=120, n_test=40)
    result = runner.invoke(app, ["run", "configs/finetune_resnet18.yaml", "--data-dir", str(root), "--results",
                                 str(tmp_path / "results"), "--set", "data.check_counts=false", "--set", "data.val_size=20"])
    assert result.exit_code == 2, result.output
    assert ("model.weights: torchvision's resnet18 weights IMAGENET1K_V1 are not in the local cache "
            f"({tmp_path}/torch/hub/checkpoints/resnet18-f37072fd.pth)") in " ".join(result.output.split())
    assert not (tmp_path / "results").exists()
