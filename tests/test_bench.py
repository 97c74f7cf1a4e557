"""`cnnlab bench` on tiny data: the plumbing (both pipelines, both whole commands, the JSON), not the speed."""

import json
from pathlib import Path

from conftest import HANG_SECONDS
from typer.testing import CliRunner

from cnnlab.cli import app

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()


def test_bench_times_both_pipelines_and_both_commands_into_one_json(tmp_path, tiny_data):
    config = tmp_path / "lenet.yaml"
    config.write_text(f"extends: {CONFIGS / 'lenet.yaml'}\ndata: {{root: {tiny_data}, check_counts: false, val_size: 100}}\n"
                      "train: {batch_size: 32}\n")
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(config), "--batches", "4", "--epochs", "1", "--pairs", "2", "--hog",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for pipeline in ("cnnlab", "d2l"):
        assert report[pipeline]["end_to_end_img_s"] > 0 and report[pipeline]["step_img_s"] > 0
    assert report["ratio"]["end_to_end"] == report["cnnlab"]["end_to_end_img_s"] / report["d2l"]["end_to_end_img_s"]
    commands = report["commands"]
    assert commands["epochs"] == 1 and commands["d2l_seconds"] > 0 and commands["cnnlab_seconds"] > 0
    assert commands["ratio"] == commands["d2l_seconds"] / commands["cnnlab_seconds"]
    assert commands["pairs"] == 2 and len(commands["runs"]) == 2  # the figures above are their medians
    assert commands["cnnlab_seconds"] == sum(run["cnnlab_seconds"] for run in commands["runs"]) / 2
    assert set(commands["runs"][0]["cnnlab_startup"]) >= {"imports", "data", "model", "setup", "first_step"}
    hog = commands["hog"]  # the same again beside a process that keeps a CPU busy
    assert len(hog["runs"]) == 2 and hog["ratio"] == hog["d2l_seconds"] / hog["cnnlab_seconds"]
    assert commands["hog_slowdown"] == hog["cnnlab_seconds"] / commands["cnnlab_seconds"]
    assert "with hog" in result.output and "cnnlab's own slowdown" in result.output
    assert 0 < commands["cnnlab_startup_seconds"] < commands["cnnlab_seconds"]
    assert 0 <= commands["cnnlab_test_acc"] <= 1 and 0 <= commands["d2l_test_acc"] <= 1
    assert commands["cnnlab_peak_pss_mb"] > 10 and commands["d2l_peak_pss_mb"] > 10  # torch alone is more
    assert report["device"] == "cpu" and report["batch_size"] == 32 and report["batches"] == 4
    assert "ratio   end to end" in result.output


def test_bench_refuses_bad_options(tmp_path):
    result = runner.invoke(app, ["bench", str(CONFIGS / "lenet.yaml"), "--batches", "0"])
    assert result.exit_code == 2 and "--batches, --epochs and --pairs must be at least 1" in result.output
    result = runner.invoke(app, ["bench", str(CONFIGS / "lenet.yaml"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


def test_bench_and_the_d2l_replica_refuse_data_other_than_the_reports(tmp_path, tiny_data):
    # The replica reads Fashion-MNIST as the report did: bench timed cnnlab on the configured set against it on
    # whatever files bore Fashion-MNIST's names (MNIST's do), and a resized set built a model the replica cannot feed.
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    base = ["bench", str(CONFIGS / "lenet.yaml"), "--data-dir", str(tiny_data), "--batches", "2", "--no-commands",
            "--out", str(out), "--set", "data.check_counts=false", "--set", "data.val_size=100"]
    for asked, says in (("data.name=mnist", "data.name is mnist, but the d2l replica"),
                        ("data.image_size=32", "data.image_size/data.channels ask for 1x32x32, but the d2l replica"),
                        ("data.channels=3", "ask for 3x28x28")):
        result = runner.invoke(app, [*base, "--set", asked])
        assert result.exit_code == 2 and says in result.output, result.output
        assert "Fashion-MNIST as torchvision serves it, 1x28x28" in result.output and not out.exists()
    config = tmp_path / "mnist.yaml"
    config.write_text(f"extends: {CONFIGS / 'lenet.yaml'}\ndata: {{name: mnist, check_counts: false}}\n")
    replica = subprocess.run([sys.executable, "-m", "cnnlab.d2l_replica", str(config), "--data-dir", str(tiny_data),
                              "--epochs", "1"], capture_output=True, text=True, timeout=HANG_SECONDS)
    assert replica.returncode == 2 and replica.stdout == "", replica.stdout + replica.stderr
    assert replica.stderr.startswith("error: data.name is mnist, but the d2l replica") and len(replica.stderr.splitlines()) == 1


def test_the_gpu_check_script_collects_every_figure_into_one_json(tmp_path, tiny_data):
    """scripts/gpu_check.sh, run on the CPU with tiny data: its steps run and its JSON gathers them."""
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path / "check"), "DEVICE": "cpu", "STEPS": "bench baseline eager fill", "EPOCHS": "1",
           "FILL_JOBS": "2", "FILL_SEEDS": "0",
           "BATCHES": "2", "PAIRS": "1", "PYTHON": sys.executable, "CNNLAB_DATA": str(tiny_data)}
    env["SETS"] = "data.check_counts=false data.val_size=100"  # the tiny data set is not Fashion-MNIST's size
    # Eight commands, torch.compile among them: the deadline only catches a hang, however loaded the machine.
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=3 * HANG_SECONDS)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert set(steps) == {"bench_lenet", "bench_resnet", "bench_googlenet", "baseline", "eager", "compiled",
                          "compiled_graphs", "fill_2"}
    assert all(s["exit_code"] == 0 for s in steps.values()), [(tmp_path / "check" / f"{n}.log").read_text() for n in steps]
    assert report["bench_lenet"]["commands"]["ratio"] > 0 and report["bench_lenet"]["commands"]["pairs"] == 1
    assert report["bench_resnet"]["model"] == "resnet"
    assert report["bench_googlenet"]["model"] == "googlenet"
    assert report["baseline"]["status"] == "completed" and report["baseline"]["epochs_completed"] == 1
    assert report["eager"]["train_step"] == "ordinary" and report["compiled"]["status"] == "completed"
    assert report["baseline_vs_eager"]["speed_ratio"] > 0 and "test_acc_difference" in report["baseline_vs_compiled"]
    assert report["compiled_graphs"]["train_step"] == "static"  # on the CPU: the static step, eagerly
    assert report["fill"] == {"trials": 3, "seconds_by_jobs": {"2": steps["fill_2"]["seconds"]}}


def test_bench_times_the_static_step_where_the_run_takes_it(tmp_path, tiny_data):
    """On a GPU the default takes the CUDA-graph step; here the emulated graph stands in for it."""
    config = tmp_path / "lenet.yaml"
    config.write_text(f"extends: {CONFIGS / 'lenet.yaml'}\ndata: {{root: {tiny_data}, check_counts: false, val_size: 100}}\n"
                      "train: {batch_size: 32, cuda_graphs: emulate}\n")
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(config), "--batches", "6", "--no-commands", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["cnnlab"]["static_step"] == "emulated-graph" and report["cnnlab"]["static_img_s"] > 0
    assert report["ratio"]["static_end_to_end"] == report["cnnlab"]["static_img_s"] / report["d2l"]["end_to_end_img_s"]
    assert "emulated-graph step, end to end" in result.output
