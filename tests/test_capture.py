"""The static training step (capture.py), run eagerly on the CPU: the same training as the ordinary
loop to float rounding, a resumable mid-epoch stop, and the fallbacks. On CUDA the same step is
captured as a CUDA graph (not measured here: no GPU)."""

import signal
from pathlib import Path

import pytest

from cnnlab.config import load_config
from cnnlab.engine import fit
from cnnlab.progress import Reporter
from cnnlab.results import read_metrics_csv
from cnnlab.runs import resume
from cnnlab.stopping import Interrupted

from conftest import write_dataset

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


def test_the_static_step_trains_as_the_ordinary_loop_does(hard_settings):
    ordinary = fit(load_config(None, [*hard_settings, "train.cuda_graphs=false"]), quiet=True)
    static = fit(load_config(None, [*hard_settings, "train.cuda_graphs=true"]), quiet=True)
    assert ordinary["train_step"] == "ordinary" and static["train_step"] == "static"
    for a, b in zip(rows(ordinary), rows(static), strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a, b)
    assert static["test_acc"] == pytest.approx(ordinary["test_acc"], abs=0.01)


class StopAfter(Reporter):
    """Asks the run to stop (as SIGTERM would) after ``batches`` batches."""

    def __init__(self, batches: int) -> None:
        super().__init__(enabled=False)
        self.left = batches

    def advance(self, loss_sum, correct, seen) -> None:
        self.left -= 1
        if self.left == 0:
            raise Interrupted(signal.SIGTERM)


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
    from cnnlab.engine import prepare

    summary = fit(load_config(None, [*tiny_overrides, "train.epochs=1", "train.cuda_graphs=true", "optim.name=adam"]),
                  quiet=True)
    assert summary["status"] == "completed" and summary["train_step"] == "ordinary"
    assert "only SGD's step is captured so far" in summary["train_step_note"]
    assert capsys.readouterr().err.count("train.cuda_graphs: off") == 1
    session = prepare(load_config(None, [*tiny_overrides, "train.cuda_graphs=true", "train.compile=true"]))
    assert session.static_step is None and "torch.compile and the captured step" in session.step_note


def test_auto_keeps_the_ordinary_step_off_cuda(tiny_overrides):
    summary = fit(load_config(None, [*tiny_overrides, "train.epochs=1", "train.cuda_graphs=auto"]), quiet=True)
    assert summary["train_step"] == "ordinary" and "train_step_note" not in summary
