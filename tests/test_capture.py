"""The static training and evaluation steps (capture.py) on the CPU, eagerly and as emulated graphs
(captured once, replayed with a CUDA graph's rules): the same training as the ordinary loop to float
rounding, a resumable mid-epoch stop, and the fallbacks. On CUDA the same steps are captured as CUDA
graphs (scripts/gpu_check.sh checks that on a GPU)."""

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import StopAfter, write_dataset

from cnnlab.config import load_config
from cnnlab.engine import fit, resume
from cnnlab.results import read_metrics_csv
from cnnlab.stopping import Interrupted

COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


@pytest.fixture
def hard_settings(tmp_path):
    """Everything the step must get right: BatchNorm, dropout, Nesterov momentum, weight decay,
    clipping, a cosine schedule, augmentation from the data's generator, and a short last batch
    (900 training images in batches of 64: 14 full ones and 4 images)."""
    data = write_dataset(tmp_path / "data", n_train=1000, n_test=200)
    return [f"data.root={data}", "data.check_counts=false", "data.val_size=100", "train.epochs=3",
            "train.batch_size=64", "train.device=cpu", "model.activation=relu", "model.batch_norm=true",
            "model.dropout=0.2", "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=true",
            "optim.weight_decay=0.0005", "train.grad_clip=1.0", "schedule.name=cosine",
            "data.augment.crop_padding=2", "data.augment.flip=true", f"output.dir={tmp_path / 'results'}"]


def rows(summary):
    return read_metrics_csv(Path(summary["run_dir"]) / "metrics.csv")


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")


@pytest.mark.parametrize("device, mode, step, tolerance", [
    ("cpu", "true", "static", 1e-4),
    ("cpu", "emulate", "emulated-graph", 1e-4),
    pytest.param("cuda", "true", "cuda-graph", 2e-3, marks=on_cuda),  # cuDNN may pick other kernels per path
])
def test_the_static_steps_train_and_evaluate_as_the_ordinary_loop_does(hard_settings, device, mode, step, tolerance):
    """Eagerly and as replayed graphs. Validation batches of 32 (3 full, 4 images left): the
    evaluation graph is captured in epoch 2 and replayed from then on, the training step's in epoch 1."""
    settings = [*hard_settings, "train.eval_batch_size=32", f"train.device={device}", "train.tf32=false",
                "train.swa.epochs=2"]  # averaged at epoch ends, beside the step: it works with either
    ordinary = fit(load_config(None, [*settings, "train.cuda_graphs=false"]), quiet=True)
    static = fit(load_config(None, [*settings, f"train.cuda_graphs={mode}"]), quiet=True)
    assert ordinary["train_step"] == "ordinary" and static["train_step"] == step
    assert "train_step_note" not in static  # nothing fell back
    for a, b in zip(rows(ordinary), rows(static), strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=tolerance), (key, a, b)
    assert static["test_acc"] == pytest.approx(ordinary["test_acc"], abs=0.01)
    assert static["test_acc_swa"] == pytest.approx(ordinary["test_acc_swa"], abs=0.01)


def test_an_emulated_graph_freezes_what_a_cuda_graph_freezes():
    """Replays run the recorded operators with the recorded arguments: tensors are read afresh,
    Python numbers are not (a learning rate read as a float would stay at its first value)."""
    from cnnlab.capture import EmulatedGraph

    weight, lr_tensor = torch.ones(3), torch.tensor(0.5)
    settings = {"lr": 0.5}

    def body():
        weight.sub_(lr_tensor)  # a device tensor: what the static step does
        weight.sub_(settings["lr"])  # a Python number: baked in at capture
        weight.add_(torch.rand(3))  # the generator advances on every replay

    graph = EmulatedGraph()
    graph.capture(body)  # runs once while recording
    assert weight.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1.0)
    before = weight.clone()
    lr_tensor.fill_(2.0)
    settings["lr"] = 100.0
    torch.manual_seed(0)
    graph.replay()
    torch.manual_seed(0)
    assert torch.allclose(weight, before - 2.0 - 0.5 + torch.rand(3))


def test_an_emulated_graph_refuses_to_read_a_tensor_freed_after_the_capture():
    """A CUDA graph holds addresses, not tensors: a gradient set to None after the capture would be
    read from freed memory. The emulation holds the step's older tensors weakly and says so instead."""
    from cnnlab.capture import EmulatedGraph

    holder = {"grad": torch.zeros(3)}
    total = torch.zeros(3)

    def body():
        total.add_(holder["grad"] + 1)

    graph = EmulatedGraph()
    graph.capture(body)
    graph.replay()
    assert total.tolist() == [2.0, 2.0, 2.0]
    holder["grad"] = None  # as optimizer.zero_grad(set_to_none=True) does
    with pytest.raises(RuntimeError, match=r"a tensor the captured step reads \(\(3,\) float32\) was freed"):
        graph.replay()


def test_a_step_a_graph_cannot_hold_runs_eagerly_said_once(tiny_overrides, tmp_path, monkeypatch, capsys):
    """A user's model that reads a value back to the host in its forward pass: refused at capture,
    said once for the training step and once for the evaluation step, and the run goes on eagerly
    to the same figures."""
    (tmp_path / "host_read.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

            def forward(self, x):
                if float(x.abs().max()) > 1e6:  # a host read, as a check in a model might do
                    raise ValueError("absurd input")
                return self.body(x)

        def net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
            return Net()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = [*tiny_overrides, "model.name=host_read:net", "train.eval_batch_size=20"]
    eager = fit(load_config(None, [*settings, "train.cuda_graphs=true"]), quiet=True)
    capsys.readouterr()
    emulated = fit(load_config(None, [*settings, "train.cuda_graphs=emulate"]), quiet=True)
    err = capsys.readouterr().err
    assert emulated["status"] == "completed" and emulated["train_step"] == "static"
    assert "reads a tensor's value back to the host" in emulated["train_step_note"]
    assert err.count("the training step cannot be captured") == 1, err
    assert err.count("the evaluation step cannot be captured") == 1, err
    for a, b in zip(rows(eager), rows(emulated), strict=True):
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=1e-4)


def test_a_static_run_stopped_mid_epoch_resumes_to_the_same_metrics(hard_settings):
    settings = [*hard_settings, "train.cuda_graphs=true"]
    clean = fit(load_config(None, settings), quiet=True)
    with pytest.raises(Interrupted):
        fit(load_config(None, settings), reporter=StopAfter(20))  # in epoch 2, batch 5
    [stopped] = [p for p in Path(clean["run_dir"]).parent.iterdir() if p.name != Path(clean["run_dir"]).name]
    done = resume(stopped, quiet=True)
    assert done["status"] == "completed" and done["resumes"][0]["from_batch"] == 5
    for a, b in zip(rows(clean), rows(done), strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a, b)


def test_what_cannot_take_the_static_step_falls_back_with_one_line(tiny_overrides, capsys):
    from cnnlab.capture import why_not
    from cnnlab.session import prepare

    summary = fit(load_config(None, [*tiny_overrides, "train.epochs=1", "train.cuda_graphs=true", "optim.name=adam"]),
                  quiet=True)
    assert summary["status"] == "completed" and summary["train_step"] == "ordinary"
    assert "only SGD's step is captured so far" in summary["train_step_note"]
    assert capsys.readouterr().err.count("train.cuda_graphs: off") == 1
    session = prepare(load_config(None, [*tiny_overrides, "train.cuda_graphs=emulate", "train.compile=true"]))
    assert session.static_step is None and "compiled kernels bypass" in session.step_note
    session = prepare(load_config(None, [*tiny_overrides, "train.cuda_graphs=true", "train.compile=reduce-overhead"]))
    assert session.static_step is None and "makes CUDA graphs of its own" in session.step_note
    session = prepare(load_config(None, [*tiny_overrides, "train.compile=true"]))  # auto: what it says on CUDA
    assert session.static_step is None and "the compiled model runs in the ordinary step" in why_not(session)


def test_the_default_auto_keeps_the_ordinary_step_off_cuda(tiny_overrides):
    assert load_config(None, []).train.cuda_graphs == "auto"
    summary = fit(load_config(None, [*tiny_overrides, "train.epochs=1"]), quiet=True)
    assert summary["train_step"] == "ordinary" and "train_step_note" not in summary


def test_compiled_models_train_as_the_plain_model_does(tiny_overrides):
    """train.compile by mode name (reduce-overhead: CUDA graphs of the compiled model on GPUs), and a
    compiled model inside the static step (on GPUs: its fused kernels inside the whole-step graph)."""
    settings = [*tiny_overrides, "train.epochs=1", "train.eval_batch_size=20"]
    plain = fit(load_config(None, settings), quiet=True)
    by_mode = fit(load_config(None, [*settings, "train.compile=reduce-overhead"]), quiet=True)
    in_step = fit(load_config(None, [*settings, "train.compile=true", "train.cuda_graphs=true"]), quiet=True)
    assert by_mode["train_step"] == "ordinary" and in_step["train_step"] == "static"
    for compiled in (by_mode, in_step):
        assert compiled["status"] == "completed"
        for a, b in zip(rows(plain), rows(compiled), strict=True):
            for key in COMPARED:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a, b)


def test_a_failed_cuda_capture_under_auto_runs_the_step_eagerly_and_says_why():
    """train.cuda_graphs: auto may only help: a capture that fails (here for real: the device is no GPU) runs this
    batch and every later one eagerly, with the reason; asked for by name (true), it ends the run with advice."""
    from cnnlab.capture import WARMUP_STEPS, Captured
    from cnnlab.errors import TrainingError

    ran = []
    step = Captured(lambda: ran.append(len(ran)), "cuda", torch.device("cpu"), "training step", strict=False)
    step.calls = WARMUP_STEPS  # warmed up: the next call captures
    step()
    assert ran == [0] and step.kind is None and step.graph is None
    assert step.fallback.startswith("the training step could not be captured as a CUDA graph (")
    assert step.fallback.endswith("it runs eagerly")
    step()
    assert ran == [0, 1]

    strict = Captured(lambda: ran.append(len(ran)), "cuda", torch.device("cpu"), "training step", strict=True)
    strict.calls = WARMUP_STEPS
    with pytest.raises(TrainingError, match="could not be captured as a CUDA graph .*train.cuda_graphs: false or auto"):
        strict()
    assert ran == [0, 1]
