import csv
import json
import math

import pytest
import torch

from cnnlab.config import ScheduleConfig, dump_config, load_config
from cnnlab.engine import fit
from cnnlab.errors import TrainingError
from cnnlab.optim import lr_factor
from cnnlab.results import Checkpoint, RunDir, atomic_write_text

TIMING_COLUMNS = {"epoch_seconds", "train_examples_per_sec"}


def only_run(results):
    runs = [p for p in results.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def metric_rows(path, drop=TIMING_COLUMNS):
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(handle)]


def test_fit_writes_a_complete_self_describing_run(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "name=tiny run/../x", "model.activation=relu", "optim.lr=0.1",
                             "train.epochs=3"])
    summary = fit(cfg, quiet=True)
    run = only_run(tmp_path / "results")
    assert run.parent.name == "tiny-run-..-x"  # sanitised into one path component
    assert run.parent.parent == tmp_path / "results"
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.csv", "summary.json", "curves.png", "checkpoints",
                                               ".lock"}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt", "best.pt.sha256", "last.pt.sha256"}

    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["status"] == "completed" and on_disk["epochs_completed"] == 3
    assert on_disk["params"] == 61_706 and on_disk["flops_per_image"] == 833_040
    for key in ("test_acc", "test_loss", "wall_seconds", "train_examples_per_sec", "device_name", "torch_version",
                "seed", "best_val_acc", "final"):
        assert key in on_disk
    confusion = on_disk["test_confusion"]  # rows: true class, columns: predicted
    assert sum(map(sum, confusion)) == on_disk["test_size"] and [sum(r) for r in confusion] == [20] * 10
    assert sum(confusion[i][i] for i in range(10)) / on_disk["test_size"] == on_disk["test_acc"]
    rows = metric_rows(run / "metrics.csv", drop=set())
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds",
                             "train_examples_per_sec"]

    best = Checkpoint.load(run / "checkpoints" / "best.pt")
    assert best.epoch == on_disk["best_epoch"] and best.config == cfg.to_dict()
    assert best.optimizer and best.scheduler and best.state["rng"]["generators"].keys() == {"order"}

    assert dump_config(load_config(run / "config.yaml")) == dump_config(cfg)  # the saved config reproduces the run
    from PIL import Image
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG" and image.width > 300


def test_it_learns_the_tiny_data_set(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "model.activation=relu", "optim.lr=0.05", "optim.momentum=0.9",
                             "train.epochs=6"])
    summary = fit(cfg, quiet=True)
    assert summary["best_val_acc"] >= 0.9 and summary["test_acc"] >= 0.9


def test_same_seed_same_metrics(tiny_overrides, tmp_path):
    rows = []
    for out in ("a", "b"):
        cfg = load_config(None, [*tiny_overrides, f"output.dir={tmp_path / out}", "seed=7",
                                 "data.augment.flip=true", "data.augment.crop_padding=2"])
        fit(cfg, quiet=True)
        rows.append(metric_rows(only_run(tmp_path / out) / "metrics.csv"))
    assert rows[0] == rows[1]
    cfg = load_config(None, [*tiny_overrides, f"output.dir={tmp_path / 'c'}", "seed=8"])
    fit(cfg, quiet=True)
    assert metric_rows(only_run(tmp_path / "c") / "metrics.csv") != rows[0]


def test_early_stopping(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "optim.lr=1e-12", "train.epochs=10", "train.patience=2"])
    summary = fit(cfg, quiet=True)
    assert summary["stopped_early"] and summary["epochs_completed"] == 3


def test_divergence_is_recorded_as_failed(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "model.activation=relu", "optim.lr=1e12"])
    with pytest.raises(TrainingError, match="diverged"):
        fit(cfg, quiet=True)
    summary = json.loads((only_run(tmp_path / "results") / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]


def test_schedules():
    const = lr_factor(ScheduleConfig(), 10)
    assert const(0) == const(9.9) == 1.0
    step = lr_factor(ScheduleConfig(name="step", step_size=3, gamma=0.5), 10)
    assert step(2.9) == 1.0 and step(3.0) == 0.5 and step(6.5) == 0.25
    cosine = lr_factor(ScheduleConfig(name="cosine", warmup_epochs=2), 10)
    assert cosine(0) < 0.01 and cosine(1) == pytest.approx(0.5, abs=1e-3) and cosine(2) == pytest.approx(1.0)
    assert cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    onecycle = lr_factor(ScheduleConfig(name="onecycle", pct_start=0.2), 10)
    assert onecycle(1) == pytest.approx(0.5, abs=1e-3) and max(onecycle(t / 10) for t in range(100)) == pytest.approx(1, abs=1e-2)
    assert math.isclose(onecycle(10), 0.0, abs_tol=1e-9)


def test_run_folders_are_never_reused(tmp_path, monkeypatch):
    ids = iter(["same", "same", "other"])
    monkeypatch.setattr("cnnlab.results.new_run_id", lambda: next(ids))
    first = RunDir.create(tmp_path, "exp")
    (first.path / "marker").write_text("keep")
    second = RunDir.create(tmp_path, "exp")
    assert first.path.name == "same" and second.path.name == "other"
    assert (first.path / "marker").read_text() == "keep"


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_bf16_autocast_runs_on_cpu(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.precision=bf16", "train.epochs=1", "train.channels_last=true",
                             "optim.name=adamw", "optim.lr=0.001", "schedule.name=cosine", "train.grad_clip=1.0",
                             "train.label_smoothing=0.1", "init=kaiming"])
    summary = fit(cfg, quiet=True)
    assert summary["status"] == "completed" and summary["precision"] == "bf16"
    assert torch.isfinite(torch.tensor(summary["test_loss"]))


def test_interrupt_is_recorded_and_partial_results_kept(tiny_overrides, tmp_path, monkeypatch):
    import cnnlab.engine as engine

    real = engine.train_one_epoch
    calls = {"n": 0}

    def interrupt_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_second_epoch)
    cfg = load_config(None, [*tiny_overrides, "train.epochs=3"])
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, quiet=True)
    run = only_run(tmp_path / "results")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
    assert len(metric_rows(run / "metrics.csv")) == 1 and (run / "checkpoints" / "last.pt").is_file()
    assert (run / "curves.png").is_file()
    assert not [p for p in run.rglob("*.tmp")]  # no half-written files


def test_checking_a_model_before_training_leaves_no_trace(tiny_overrides):
    """The pre-flight batch must not move BatchNorm statistics or consume dropout's random draws."""
    from cnnlab.data import load_data
    from cnnlab.models.build import build_model
    from cnnlab.session import check_model

    cfg = load_config(None, [*tiny_overrides, "model.batch_norm=true", "model.dropout=0.5"])
    data = load_data(cfg.data, cfg.seed, torch.device("cpu"))
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_model(model, cfg, data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and model.training


def test_device_aware_layout_and_start_up_time_are_recorded(tiny_overrides):
    from cnnlab.runtime import make_runtime

    assert make_runtime("cpu", "fp32").channels_last is True  # auto: NHWC on the CPU
    assert make_runtime("cpu", "fp32", channels_last=False).channels_last is False
    assert make_runtime("cpu", "fp32").tf32 is None  # a CUDA setting only
    summary = fit(load_config(None, [*tiny_overrides, "train.epochs=1"]), quiet=True)
    assert summary["channels_last"] is True and "tf32" not in summary
    assert summary["startup_seconds"] > 0  # from the process start (here, pytest's) to the first batch
    off = fit(load_config(None, [*tiny_overrides, "train.epochs=1", "train.channels_last=false"]), quiet=True)
    assert off["channels_last"] is False
    assert off["test_acc"] == pytest.approx(summary["test_acc"], abs=0.05)  # same model either way


def test_a_checkpoint_snapshot_is_untouched_by_the_training_that_goes_on(tmp_path):
    """The background writer serialises a snapshot while the next epoch trains: parameters updated
    in place and metrics appended afterwards must not reach the file."""
    from cnnlab.results import Checkpoint, CheckpointWriter, RunDir

    model = torch.nn.Linear(3, 1, bias=False).state_dict()
    weight = model["weight"]
    weight.fill_(1.0)
    metrics = [{"epoch": 1, "val_acc": 0.5}]
    live = Checkpoint(model=model, config={"name": "x"}, state={"epoch": 1, "metrics": metrics},
                      optimizer={"tied": [weight, weight]})
    snapshot = live.snapshot()
    run = RunDir.create(tmp_path, "exp")
    writer = CheckpointWriter(run)
    writer.save(live, "last")
    weight.add_(1)  # the next epoch's first step
    metrics.append({"epoch": 2, "val_acc": 0.6})
    assert snapshot.model["weight"].tolist() == [[1.0, 1.0, 1.0]] and len(snapshot.state["metrics"]) == 1
    assert snapshot.optimizer["tied"][0] is snapshot.optimizer["tied"][1]  # held twice, copied once
    assert snapshot.model._metadata == model._metadata  # the module's version numbers, kept
    writer.flush()
    writer.close()
    saved = torch.load(run.checkpoint_dir / "last.pt", weights_only=True)
    assert saved["model"]["weight"].tolist() == [[1.0, 1.0, 1.0]] and saved["state"]["metrics"] == metrics[:1]


def test_random_bytes_are_not_a_pytorch_checkpoint_and_torch_says_nothing(tmp_path):
    """Bytes that open like a pickle (protocol 4) made torch warn and were called 'pickled Python objects'."""
    import os
    import warnings

    from cnnlab.errors import UserError

    path = tmp_path / "random.pt"
    for payload in (b"\x80\x04" + os.urandom(4000), os.urandom(4000), b"PK\x03\x04" + os.urandom(4000)):
        path.write_bytes(payload)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning leaking out fails the test
            with pytest.raises(UserError, match="truncated, corrupt or not a PyTorch checkpoint"):
                Checkpoint.load(path)


def test_stopped_at_says_what_a_resume_will_redo():
    from cnnlab.engine import stopped_at

    assert stopped_at(2, 12, 219, (2, 12)) == "epoch 3, batch 12 of 219"  # checkpointed at that very batch
    assert stopped_at(3, 0, 219, (3, 0)) == "after epoch 3"
    assert stopped_at(2, 219, 219, (2, 0)) == (  # torchrun: the ranks agree only on the epoch's checkpoint
        "epoch 3, batch 219 of 219 (resume redoes epoch 3: the last checkpoint is from the end of epoch 2)")
    assert stopped_at(3, 0, 219, (1, 0)) == (  # epoch 2's checkpoint could not be written
        "after epoch 3 (resume redoes epochs 2-3: the last checkpoint is from the end of epoch 1)")
    assert stopped_at(0, 5, 219, (0, -1)) == "epoch 1, batch 5 of 219 (no checkpoint was written to resume from)"
    assert stopped_at(1, 5, 219, None) == "epoch 2, batch 5 of 219"  # output.checkpoints: false
