"""The command line as a user meets it: exit codes, messages, and nothing written on bad input."""

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import command_imports, write_dataset
from typer.testing import CliRunner

from cnnlab.cli import app

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_args(tiny_data, results, *extra):
    return ["run", CONFIGS / "lenet_relu.yaml", "--data-dir", tiny_data, "--results", results, "--epochs", "1",
            "--set", "data.check_counts=false", "--set", "data.val_size=100", "--set", "train.batch_size=64",
            "--device", "cpu", *extra]


def test_run_trains_and_reports(tiny_data, tmp_path):
    result = invoke(*tiny_args(tiny_data, tmp_path / "results"))
    assert result.exit_code == 0, result.output
    assert "epoch   1/1" in result.output and "test acc" in result.output
    runs = list((tmp_path / "results" / "lenet_relu").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()


def bad_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def corrupt_gz(folder):
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def wrong_magic(folder):
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 2051, 400) + bytes(400)))


CASES = {
    "missing config": (lambda t: ["run", t / "nope.yaml"], "config file not found"),
    "yaml syntax": (lambda t: ["run", bad_file(t, "train:\n  epochs: [1\n")], "YAML syntax error at line"),
    "unknown nested key": (lambda t: ["run", bad_file(t, "data:\n  augment:\n    flipp: true\n")],
                           "unknown key 'data.augment.flipp' (did you mean 'data.augment.flip'?)"),
    "wrong type": (lambda t: ["run", bad_file(t, "optim:\n  lr: fast\n")], "optim.lr: Input should be a valid number"),
    "lr <= 0": (lambda t: ["run", bad_file(t, "optim:\n  lr: -0.1\n")], "optim.lr: Input should be greater than 0"),
    "epochs < 1": (lambda t: ["run", CONFIGS / "lenet.yaml", "--epochs", "0"], "train.epochs: Input should be greater"),
    "batch_size < 1": (lambda t: ["run", CONFIGS / "lenet.yaml", "--set", "train.batch_size=0"], "train.batch_size"),
    "unknown model": (lambda t: ["run", bad_file(t, "model:\n  name: resnett\n")], "unknown model 'resnett'"),
    "bad model argument": (lambda t: ["run", CONFIGS / "lenet.yaml", "--set", "model.depth=3"],
                           "model 'lenet' takes no argument 'depth'"),
    "set without =": (lambda t: ["run", CONFIGS / "lenet.yaml", "--set", "train.epochs"], "expected KEY=VALUE"),
    "set unknown key": (lambda t: ["run", CONFIGS / "lenet.yaml", "--set", "train.epoch=3"],
                        "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    "data folder without files": (lambda t: ["run", CONFIGS / "lenet.yaml", "--data-dir", t], "lacks train-images"),
    "no cuda": (lambda t: ["run", CONFIGS / "lenet.yaml", "--device", "cuda:7"], "train.device: cuda:7"),
    "sweep file": (lambda t: ["run", bad_file(t, "base: x.yaml\ngrid: {optim.lr: [0.1]}\n")], "is a sweep file"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_message_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a results/ folder, if anything wrongly wrote one, would appear here
    make_args, expected = CASES[case]
    result = invoke(*make_args(tmp_path), "--results", tmp_path / "results")
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("damage, expected", [
    (corrupt_gz, "t10k-images-idx3-ubyte.gz: truncated or corrupted gzip"),
    (wrong_magic, "wrong magic number 0x00000803, expected 0x00000801"),
    (None, "data.val_size: 400 leaves no training images"),
])
def test_bad_data_is_exit_2_and_writes_nothing(damage, expected, tmp_path):
    folder = write_dataset(tmp_path / "data")
    extra = ["--set", "data.val_size=400"] if damage is None else []
    if damage is not None:
        damage(folder)
    args = tiny_args(folder, tmp_path / "results")
    result = invoke(*args[: args.index("--set") + 4], *args[args.index("--set") + 4:], *extra)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not (tmp_path / "results").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("run", tmp_path / "nope.yaml", "--debug")
    assert result.exit_code != 0 and result.exc_info is not None
    assert type(result.exception).__name__ == "UserError"


def test_training_failure_exits_1_and_keeps_the_record(tiny_data, tmp_path):
    result = invoke(*tiny_args(tiny_data, tmp_path / "results", "--set", "optim.lr=1e12"))
    assert result.exit_code == 1, result.output
    assert "diverged" in result.output
    [run] = (tmp_path / "results" / "lenet_relu").iterdir()
    assert '"status": "failed"' in (run / "summary.json").read_text()


def test_summary_prints_the_reports_shapes():
    result = invoke("summary", "lenet")
    assert result.exit_code == 0, result.output
    for shape in ("6x28x28", "6x14x14", "16x10x10", "16x5x5", "400", "120", "84"):
        assert shape in result.output
    assert "61,706 parameters" in result.output


def test_summary_of_a_config_applies_its_options():
    result = invoke("summary", CONFIGS / "kernels" / "lenet_k7.yaml")
    assert result.exit_code == 0 and "Conv2d(1, 6, k=7, p=3)" in result.output and "16x4x4" in result.output
    assert invoke("summary", "nonet").exit_code == 2


def test_models_lists_the_registry():
    result = invoke("models")
    assert result.exit_code == 0 and "lenet" in result.output and "61,706" in result.output


def test_data_command(tiny_data, tmp_path):
    assert invoke("data", "--data-dir", tmp_path / "empty").exit_code == 2
    result = invoke("data", "--data-dir", tiny_data)
    assert result.exit_code == 2 and "Fashion-MNIST's train set has 60,000" in result.output


def data_rows(output: str) -> dict[str, str]:
    """``cnnlab data``'s listing: its line for each data set, by the set's name."""
    from cnnlab.data.registry import DATA_SETS

    return {line.split()[0]: line for line in output.splitlines() if line.split()[:1] and line.split()[0] in DATA_SETS}


def test_data_without_a_name_lists_every_known_data_set_found_or_missing_and_where_it_looked(tiny_data, tmp_path,
                                                                                            monkeypatch):
    from cnnlab.data.registry import DATA_SETS

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no cache of any set
    monkeypatch.setattr("cnnlab.data.idx.CACHE_ROOT", tmp_path / "home" / ".cache" / "cnnlab")
    monkeypatch.setenv("CNNLAB_DATA", str(tiny_data))
    result = invoke("data", "--set", "data.check_counts=false")
    assert result.exit_code == 0, result.output
    rows = data_rows(result.output)
    assert set(rows) == set(DATA_SETS), result.output
    assert f"found in {tiny_data}" in rows["fashion-mnist"]
    for name in ("mnist", "cifar10", "cifar100"):
        assert "missing" in rows[name] and str(tmp_path / "home" / ".cache" / "cnnlab" / name) in rows[name], rows[name]
        assert f"cnnlab data {name}" in rows[name]  # which says how to get it
    for name in ("folder", "npz"):  # nothing to search for: they are the user's files
        assert f"cnnlab data {name} --data-dir" in rows[name], rows[name]
    assert "Fashion-MNIST found in" in result.output and "train: 400 images" in result.output  # checked as before


def test_data_without_a_name_looks_for_every_set_in_the_folder_given(tiny_data):
    result = invoke("data", "--data-dir", tiny_data, "--set", "data.check_counts=false")
    assert result.exit_code == 0, result.output
    rows = data_rows(result.output)
    assert all(f"found in {tiny_data}" in rows[name] for name in ("fashion-mnist", "mnist", "kmnist"))
    assert "missing" in rows["cifar10"] and str(tiny_data) in rows["cifar10"]


def test_data_name_shows_the_splits_and_statistics_a_run_uses(tiny_data):
    import torch

    from cnnlab.config import DataConfig
    from cnnlab.data import load_data

    result = invoke("data", "fashion-mnist", "--data-dir", tiny_data, "--set", "data.check_counts=false",
                    "--set", "data.val_size=100")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert next(line for line in lines if line.split()[:1] == ["label"]).split() == ["label", "class", "train", "val", "test"]
    assert next(line for line in lines if line.split()[:1] == ["all"]).split() == ["all", "300", "100", "200"]
    run = load_data(DataConfig(root=tiny_data, check_counts=False, val_size=100), 0, torch.device("cpu"))
    said = next(line for line in lines if line.startswith("mean / std"))
    assert said.endswith(f": {run.mean:.4f} / {run.std:.4f}") and "the training split a run normalises with" in said
    assert "data.val_size 100" in result.output and "seed 0" in result.output


def test_data_name_says_when_a_run_could_not_hold_out_the_validation_split(tiny_data):
    result = invoke("data", "fashion-mnist", "--data-dir", tiny_data, "--set", "data.check_counts=false")
    assert result.exit_code == 0, result.output
    assert next(line for line in result.output.splitlines() if line.split()[:1] == ["all"]).split() == ["all", "400", "200"]
    assert "data.val_size: 5,000 leaves no training images" in result.output


TRAINING_COMMANDS = ["run", "sweep", "tune", "resume"]


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_command_that_trains_takes_the_shared_run_options(command):
    said = " ".join(invoke(command, "--help").output.split())
    for option in ("--epochs", "--threads N|auto|fastest", "--device", "--data-dir"):
        assert option in said, (command, option)


def yaml_documents(output: str) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(output) if doc]


def test_sweep_takes_the_run_options_for_every_trial(tiny_data, tmp_path):
    result = invoke("sweep", CONFIGS / "lenet_relu.yaml", "--set", "optim.lr=0.1,0.2", "--epochs", "3", "--threads", "1",
                    "--device", "cpu", "--data-dir", tiny_data, "--results", tmp_path / "r", "--print-config")
    assert result.exit_code == 0, result.output
    trials = yaml_documents(result.output)
    assert len(trials) == 2 and [t["optim"]["lr"] for t in trials] == [0.1, 0.2]
    for trial in trials:
        assert (trial["train"]["epochs"], trial["train"]["threads"], trial["train"]["device"]) == (3, 1, "cpu")
        assert trial["data"]["root"] == str(tiny_data)


def test_a_sweep_option_and_a_grid_axis_of_the_same_key_is_exit_2(tmp_path):
    result = invoke("sweep", CONFIGS / "lenet_relu.yaml", "--set", "train.epochs=1,2", "--epochs", "3", "--print-config")
    assert result.exit_code == 2 and "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert "train.epochs" in said and "--epochs" in said and "leave out one" in said


def test_tune_takes_the_run_options_for_every_trial(tiny_data):
    result = invoke("tune", CONFIGS / "tune" / "lenet_relu.yaml", "--epochs", "2", "--threads", "1", "--device", "cpu",
                    "--data-dir", tiny_data, "--print-config")
    assert result.exit_code == 0, result.output
    [base] = yaml_documents(result.output)
    assert (base["train"]["epochs"], base["train"]["threads"], base["train"]["device"]) == (2, 1, "cpu")
    assert base["data"]["root"] == str(tiny_data)


def test_resume_takes_threads_and_records_the_change(tiny_overrides):
    import json

    from cnnlab.config import load_config
    from cnnlab.engine import fit

    run = Path(fit(load_config(None, [*tiny_overrides, "train.epochs=1"]), quiet=True)["run_dir"])
    result = invoke("resume", run, "--epochs", "2", "--threads", "1", "--quiet")
    assert result.exit_code == 0, result.output
    assert "train.threads auto -> 1" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["threads"] == 1
    assert {"key": "train.threads", "old": "auto", "new": 1, "epoch": 2} in summary["resumes"][-1]["changes"]
    assert "threads: 1" in (run / "config.yaml").read_text()
    again = invoke("resume", run, "--epochs", "3", "--set", "train.threads=auto", "--quiet")  # --set may change it too
    assert again.exit_code == 0, again.output


def test_option_values_are_taken_as_typed_not_reread_as_yaml(tmp_path, monkeypatch):
    """--data-dir null and --results yes are folders named so: option values are never formatted into
    `key=value` text and read back as YAML (which made them None and True)."""
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "null")
    args = tiny_args(Path("null"), Path("yes"))
    result = invoke(*args[:args.index("--set")], "--seed", "3", *args[args.index("--set"):])
    assert result.exit_code == 0, result.output
    [run] = (tmp_path / "yes" / "lenet_relu").iterdir()
    assert '"seed": 3' in (run / "summary.json").read_text()


def test_summary_of_a_model_name_keeps_the_options_set_for_it():
    narrow = invoke("summary", "resnet9", "--set", "model.width=8")
    assert narrow.exit_code == 0 and "resnet9(width=8)" in narrow.output, narrow.output
    assert "103,800 parameters" in narrow.output


COMMANDS = ["run", "resume", "sweep", "tune", "bench", "predict", "export", "compare", "visualize", "eval", "report", "models",
            "summary", "data"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_help_is_literal_shows_flags_as_typed_and_ends_with_an_example(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1].strip().startswith(f"Example: cnnlab {command} "), lines[-3:]
    assert "-h, --help" in result.output and "<bool>" not in result.output
    if command == "sweep":  # rich markup once ate "[ray]"
        assert "pip install 'cnnlab[ray]'" in " ".join(result.output.split())
        assert "-q, --quiet" in result.output and "-s, --set KEY=VALUE" in result.output


def test_shell_completion_completes_commands_and_options():
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_CNNLAB_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        done = subprocess.run([sys.executable, "-m", "cnnlab"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("cnnlab sw") == ["sweep"]
    assert complete("cnnlab run --ep") == ["--epochs"]
    # typer finds the shell among the command's parent processes (a user's bash); a test's parents are no shell, so it
    # names one, as typer's own tests do
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    shown = subprocess.run([sys.executable, "-m", "cnnlab", "--show-completion", "bash"], capture_output=True, text=True,
                           timeout=120, env=env)
    assert shown.returncode == 0 and "_CNNLAB_COMPLETE=complete_bash" in shown.stdout


@pytest.mark.parametrize("args, config, code", [
    (["--help"], None, 0),
    (["run", "--help"], None, 0),
    (["run", "CONFIG"], "model: {name: lenet\n", 2),  # YAML that does not parse
    (["run", "CONFIG", "--seed", "3"], "train: {epochs: many}\n", 2),  # a value of the wrong type
    (["run", "CONFIG"], "trian: {epochs: 3}\n", 2),  # an unknown key
    (["run", "CONFIG", "--threads", "lots"], "name: x\n", 2),
    (["run", "CONFIG", "--set", "train.epochs=2,3"], "name: x\n", 2),  # a grid where one value goes
])
def test_help_and_config_errors_never_import_torch(tmp_path, args, config, code):
    """PyTorch takes a second or more to import: help and a mistake in a config are answered without it."""
    if config is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(config)
        args = [str(path) if arg == "CONFIG" else arg for arg in args]
    stderr = command_imports("torch", args)
    assert f"exit {code} torch not imported" in stderr, stderr
    if code == 2:
        assert "invalid config" in stderr or "YAML" in stderr
