"""The README's command lines, run as written: a README that lies is a bug.

Every line of a README code block that starts with ``cnnlab`` or ``torchrun`` is run, in the order
the README shows them, from a copy of the project root whose configs train on tiny data (the
shipped configs with one epoch, a small batch and a small validation split added; a tune's space
with 3 trials; the data comes from ``CNNLAB_DATA``). Each must exit 0, as the README promises for a
command that works. Commands that start other processes (torchrun, Ray) run as the user's shell
would run them; the others run in this process through typer's test runner, with the same working
folder and environment (the same code path, without paying PyTorch's import each time). Run ids in
the README (``results/lenet/20261128T010203Z-3f9a1c``) stand for a run the earlier lines made: a
completed one, or for ``cnnlab resume`` an interrupted one. A line that cannot run here says why in
its README comment ("not run by the README test: ..."), and is checked to say so.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import write_dataset
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.results import read_summary

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PLACEHOLDER = "results/lenet/20261128T010203Z-3f9a1c"
NOT_RUN = "not run by the README test"
runner = CliRunner()
TINY = {"train": {"epochs": 1, "batch_size": 64}, "data": {"check_counts": False, "val_size": 100}}


def readme_commands() -> list[tuple[str, str]]:
    """(command, comment) for each command line of the README's code blocks, continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            command, _, comment = line.partition("  #")
            if re.match(r"(cnnlab|torchrun) ", command.strip()):
                commands.append((command.strip(), comment.strip()))
    return commands


def tiny_configs(root: Path) -> None:
    """The shipped configs, copied under ``root``, made to train in seconds (a tune: 3 trials)."""
    shutil.copytree(ROOT / "configs", root / "configs")
    for path in (root / "configs").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        if "space" in data:
            data["trials"] = 3
        elif "grid" not in data:
            for section, values in TINY.items():
                data[section] = {**(data.get(section) or {}), **values}
        path.write_text(yaml.safe_dump(data, sort_keys=False))


def pictures(root: Path) -> None:
    """The pictures the README classifies: a shoe-like photo (JPEG) and a PNG."""
    image = Image.new("RGB", (120, 80), "white")
    image.paste((40, 40, 40), (10, 40, 110, 70))
    for name in ("shoe.jpg", "my-shoe.jpg"):
        image.save(root / name)
    image.convert("L").save(root / "photo.png")
    for label, colour in enumerate(("red", "green", "blue")):  # my-pictures/: the README's folder of your own data
        (root / "my-pictures" / "train" / colour).mkdir(parents=True)
        for i in range(50):
            shade = Image.new("RGB", (16, 16), colour)
            shade.putpixel((i % 16, label), (i, i, i))
            shade.save(root / "my-pictures" / "train" / colour / f"{i}.png")


def newest_run(root: Path, status: str) -> Path:
    runs = sorted(p for p in (root / "results" / "lenet").iterdir() if (p / "summary.json").is_file())
    return next(run for run in reversed(runs) if read_summary(run / "summary.json").status == status)


def interrupted_lenet_run(root: Path, env: dict[str, str]) -> None:
    """A run of configs/lenet.yaml stopped by Ctrl-C after its first epoch's checkpoint, as a user's
    stopped run is. It is started for many epochs, so that it is still training whenever the signal
    comes, then its config.yaml is given the epochs of a short run (as if it had been started with
    ``--epochs``): a resume, which may change the epoch count, then has one epoch left to train."""
    before = set((root / "results" / "lenet").glob("*/checkpoints/last.pt"))
    process = subprocess.Popen([str(BIN / "cnnlab"), "run", "configs/lenet.yaml", "--epochs", "100000", "--quiet"],
                               cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not set((root / "results" / "lenet").glob("*/checkpoints/last.pt")) - before or process.poll() is not None:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130, output
    run = newest_run(root, "interrupted")
    done = read_summary(run / "summary.json").epochs_completed or 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["epochs"] = done + 1
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


SEPARATE_PROCESS = ("torchrun", "cnnlab tune", "--launcher ray")  # they start processes of their own


def run_command(argv: list[str], root: Path, env: dict[str, str], monkeypatch) -> tuple[int, str]:
    """(exit status, output) of one command line, run from ``root`` with ``env``."""
    if any(part in " ".join(argv) for part in SEPARATE_PROCESS):
        result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
        return result.returncode, result.stdout + result.stderr
    with monkeypatch.context() as patch:
        patch.chdir(root)
        for key in set(os.environ) - set(env):
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        result = runner.invoke(app, argv[1:])
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 1, 2) else "")


def test_the_readme_commands_run_as_written(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    tiny_configs(root)
    pictures(root)
    env = {**os.environ, "CNNLAB_DATA": str(write_dataset(tmp_path / "data", n_train=600, n_test=200)),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "CNNLAB_CACHE": str(tmp_path / "cache")}
    real_data = Path("/usr/share/datasets/fashion-mnist")

    commands = readme_commands()
    assert len(commands) > 20 and commands[0][0] == "cnnlab run configs/lenet_relu.yaml"
    ran = []
    for command, comment in commands:
        if NOT_RUN in comment:
            continue
        run_env = dict(env)
        if command.startswith("cnnlab data"):
            if not real_data.is_dir():
                continue  # checksums are Fashion-MNIST's own: only the real files pass them
            del run_env["CNNLAB_DATA"]
        if command.startswith("cnnlab resume"):  # with or without a run folder: one that stopped before its end
            interrupted_lenet_run(root, env)
        if PLACEHOLDER in command:
            run = newest_run(root, "interrupted" if command.startswith("cnnlab resume") else "completed")
            command = command.replace(PLACEHOLDER, str(run.relative_to(root)))
        started = time.monotonic()
        status, output = run_command(shlex.split(command), root, run_env, monkeypatch)
        print(f"{time.monotonic() - started:6.1f} s  {command}")
        assert status == 0, f"{command}\n{output}"
        assert "Traceback" not in output, f"{command}\n{output}"
        ran.append(command)
    assert any(c.startswith("torchrun") for c in ran) and any("--launcher ray" in c for c in ran)
    assert any(c.startswith("cnnlab tune") for c in ran)


def test_every_readme_command_the_test_skips_says_why():
    for command, comment in readme_commands():
        if NOT_RUN in comment:
            assert len(comment.split(NOT_RUN, 1)[1].strip(" :()")) > 5, f"{command}: say why it is not run"
