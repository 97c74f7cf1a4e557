"""The bad-input corpus: hostile or unlucky text, files and paths, as a user or a stranger's results
folder would bring them. Every case: exit 2 (or a warning and the rest shown), one message naming
what is wrong, no traceback, nothing half-written, and never any code run from a results folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.results import sanitize_name

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def clean_exit_2(result, *expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of a trained run folder (so it can be damaged), under results/<name>/<id>."""
    run, _ = trained
    copy = tmp_path / "results" / run.parent.name / run.name
    shutil.copytree(run, copy)
    return copy


def tiny_run(tiny_data, results, *extra):
    return ["run", CONFIGS / "lenet_relu.yaml", "--data-dir", tiny_data, "--results", results, "--epochs", "1",
            "--set", "data.check_counts=false", "--set", "data.val_size=100", "--set", "train.batch_size=64",
            "--device", "cpu", "--quiet", *extra]


# ---------------------------------------------------------------------------------------------
# User text is printed literally


def test_markup_in_a_run_name_is_printed_literally_and_never_crashes(tiny_data, tmp_path):
    result = invoke(*tiny_run(tiny_data, tmp_path / "res[old]", "--set", "name=[/x]bold[b]café[old]"))
    assert result.exit_code == 0, result.output
    assert "[/x]bold[b]café[old]" in result.output  # the name, exactly as given
    assert str(tmp_path / "res[old]") in result.output  # paths shown are the real paths
    [run] = (tmp_path / "res[old]").glob("*/*")
    assert run.parent.name == "x-bold-b-café-old"  # sanitised, with its accent kept
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"

    compared = invoke("compare", tmp_path / "res[old]")
    assert compared.exit_code == 0 and "[/x]bold[b]café[old]" in compared.output


def test_markup_in_a_missing_path_is_shown_as_typed(tmp_path):
    clean_exit_2(invoke("run", tmp_path / "[/x][old]nope.yaml"), "[/x][old]nope.yaml")


@pytest.mark.parametrize("name, folder", [
    ("café", "café"),
    ("模型 对比", "模型-对比"),
    ("../../etc/passwd", "etc-passwd"),
    ("-rf --all", "rf---all"),
    ("line\nbreak\ttab", "line-break-tab"),
    ("ok.name=1", "ok.name=1"),
])
def test_names_become_one_safe_path_component(name, folder):
    assert sanitize_name(name) == folder


def test_long_unicode_names_fit_a_file_system_name():
    safe = sanitize_name("é" * 300)
    assert len(safe) <= 100 and len(safe.encode()) <= 200
    with pytest.raises(Exception, match="no letters or digits"):
        sanitize_name("/// ...")


# ---------------------------------------------------------------------------------------------
# Files read back: checkpoints


class Foreign:  # a pickled class: weights_only loading must refuse it, not run it
    pass


def _foreign_checkpoint(path: Path) -> None:
    torch.save({"model": Foreign()}, path)


CHECKPOINT_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:1000]), "SHA-256"),
    "empty": (lambda p: p.write_bytes(b""), "SHA-256"),
    "foreign, no checksum": (lambda p: (_foreign_checkpoint(p), Path(f"{p}.sha256").unlink()), "pickled Python objects"),
    "text, no checksum": (lambda p: (p.write_text("hello"), Path(f"{p}.sha256").unlink()), "truncated, corrupt or not"),
    "weights of another model": (lambda p: (torch.save({"model": {"w": torch.zeros(3)}, "config": {}}, p),
                                            Path(f"{p}.sha256").unlink()), "do not fit the model"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_a_bad_checkpoint_is_exit_2_naming_the_file(run_copy, damage):
    best = run_copy / "checkpoints" / "best.pt"
    harm, expected = CHECKPOINT_DAMAGE[damage]
    harm(best)
    for command in (["eval", run_copy], ["visualize", run_copy, "--out", run_copy.parent / "x.png"]):
        result = invoke(*command)
        clean_exit_2(result, str(best), expected)
        assert "weights_only=False" not in result.output  # never advise the unsafe setting


# ---------------------------------------------------------------------------------------------
# Files read back: summaries, metrics, trials, configs


def _break(run: Path, name: str, text: str) -> None:
    (run / name).write_text(text)


def good_and_bad_runs(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(results folder, the bad run's folder): two copies of ``run``, under good/ and bad/, the second
    without its lock file so that it can be damaged freely."""
    results = tmp_path / "results"
    shutil.copytree(run, results / "good" / run.name)
    bad = results / "bad" / run.name
    shutil.copytree(run, bad)
    (bad / ".lock").unlink()
    return results, bad


@pytest.mark.parametrize("name, text", [
    ("summary.json", "{not json"),
    ("summary.json", "[1, 2]"),
    ("summary.json", '{"status": "done", "name": "x"}'),
    ("metrics.csv", "epoch,val_acc\n1,abc\n"),
    ("metrics.csv", "\x00\x01binary"),
])
def test_compare_and_report_skip_a_corrupt_run_and_show_the_others(trained, tmp_path, name, text):
    results, bad = good_and_bad_runs(trained[0], tmp_path)
    _break(bad, name, text)

    # An unreadable run is named, left out, and said in the exit status (2); a bad metrics.csv only
    # costs the run its curve.
    unreadable = name == "summary.json"
    compared = invoke("compare", results)
    assert compared.exit_code == (2 if unreadable else 0), compared.output
    assert "experiment" in compared.output and "1.000" in compared.output  # the good run's row is shown
    if unreadable:
        assert str(bad / name) in compared.output and "skipped" in compared.output

    report = invoke("report", results, "-o", tmp_path / "out" / "report.md")
    assert report.exit_code == (2 if unreadable else 0), report.output
    assert str(bad / name) in report.output  # the warning names the bad file
    assert (tmp_path / "out" / "report.md").is_file()


def test_the_default_run_of_eval_skips_broken_runs(trained, tmp_path, monkeypatch):
    run, _ = trained
    results = tmp_path / "results"
    shutil.copytree(run, results / "good" / run.name)
    (results / "broken" / "x").mkdir(parents=True)
    (results / "broken" / "x" / "summary.json").write_text("\xff garbage")
    result = invoke("eval", "--results", results)
    assert result.exit_code == 0, result.output


def test_a_corrupt_trials_json_falls_back_to_the_run_folders(tiny_data, tmp_path):
    sweep = tmp_path / "results" / "sweeps" / "s"
    stamp = sweep / "20260101T000000Z"
    stamp.mkdir(parents=True)
    (stamp / "trials.json").write_text('[{"name": 1}]')
    result = invoke(*tiny_run(tiny_data, sweep / "runs"))
    assert result.exit_code == 0, result.output
    compared = invoke("compare", sweep)
    assert compared.exit_code == 0, compared.output
    assert "trials.json" in compared.output and "lenet_relu" in compared.output


@pytest.mark.parametrize("damage, expected", [
    (lambda text: text.replace("lr: 0.1", "lr: [1, 2]"), "optim.lr"),
    (lambda text: "\xff\xfe not text", "not a text file"),
    (lambda text: "- just\n- a list", "must be a YAML mapping"),
    (lambda text: "!!python/object/apply:os.system ['echo owned']", "YAML"),
    (lambda text: "", "not the resolved config"),
    (lambda text: f"extends: {CONFIGS / 'lenet.yaml'}\n", "it extends another file"),
    (lambda text: "[" * 50_000, "nested too deeply"),
])
def test_a_bad_config_yaml_in_a_run_folder_is_exit_2_naming_it(run_copy, damage, expected):
    text = damage((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_bytes(text.encode("utf-8", "surrogateescape") if text.isascii() or "\xff" not in text
                                           else text.encode("latin-1"))
    clean_exit_2(invoke("eval", run_copy), str(run_copy / "config.yaml"), expected)
    clean_exit_2(invoke("resume", run_copy), str(run_copy / "config.yaml"))


# ---------------------------------------------------------------------------------------------
# Opening someone's results never runs their code


def test_a_run_naming_python_code_needs_trust_code(trained, tmp_path, monkeypatch):
    run, _ = trained
    (tmp_path / "evil.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(tmp_path / 'OWNED')!r}).write_text("ran")
        from cnnlab.models.lenet import lenet as build
    """))
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "results" / "evil" / run.name
    shutil.copytree(run, copy)
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(config.replace("name: lenet", "name: evil:build", 1))

    for command in (["eval", copy], ["visualize", copy, "--layer", "0"], ["report", copy],
                    ["resume", copy, "--epochs", "9"], ["summary", copy / "config.yaml"],
                    ["run", copy / "config.yaml", "--epochs", "1"]):
        clean_exit_2(invoke(*command), "--trust-code", "evil:build")
        assert not (tmp_path / "OWNED").exists(), command
    assert not (tmp_path / "results" / "report").exists()

    trusted = invoke("eval", copy, "--trust-code")
    assert trusted.exit_code == 0, trusted.output
    assert (tmp_path / "OWNED").read_text() == "ran"


# ---------------------------------------------------------------------------------------------
# User Python models that misbehave: exit 2 before any folder exists

BAD_MODELS = {
    "raises on import": ("raise RuntimeError('boom at import')", "importing module", "boom at import"),
    "syntax error": ("def net(:\n    pass", "SyntaxError", "line 1"),
    "sys.exit(0) on import": ("import sys\nsys.exit(0)", "sys.exit(0)", "importing module"),
    "builder raises": ("def net(num_classes=10, in_channels=1):\n    raise ValueError('no way')", "no way", ""),
    "builder exits": ("import sys\ndef net(num_classes=10, in_channels=1):\n    sys.exit(0)", "sys.exit(0)", "builder"),
    "not a module": ("def net(num_classes=10, in_channels=1):\n    return 42", "returned int", "nn.Module"),
    "wrong output": ("from torch import nn\ndef net(num_classes=10, in_channels=1):\n"
                     "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))", "shape (batch, 10)", "(2, 7)"),
    "forward exits": ("import sys\nfrom torch import nn\nclass Exit(nn.Module):\n    def forward(self, x):\n"
                      "        sys.exit(0)\ndef net(num_classes=10, in_channels=1):\n    return Exit()",
                      "fails on a batch", "SystemExit"),
    "forward fails": ("from torch import nn\ndef net(num_classes=10, in_channels=1):\n"
                      "    return nn.Sequential(nn.Linear(3, 10))", "fails on a batch", "RuntimeError"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_a_broken_user_model_is_exit_2_before_anything_is_written(case, tiny_data, tmp_path, monkeypatch):
    source, *expected = BAD_MODELS[case]
    module = f"usermodel_{abs(hash(case))}"
    (tmp_path / f"{module}.py").write_text(source + "\n")
    monkeypatch.chdir(tmp_path)
    result = invoke(*tiny_run(tiny_data, tmp_path / "results", "--set", f"model.name={module}:net"))
    clean_exit_2(result, *[e for e in expected if e])
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------
# Output paths: exit 2 before anything is written


def test_output_paths_that_cannot_be_written(trained, tmp_path, tiny_data):
    run, _ = trained
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    clean_exit_2(invoke("sweep", CONFIGS / "kernels", "--results", a_file), "--results", "is a file")
    clean_exit_2(invoke("visualize", run, "--out", folder), "--out", "is a folder")
    clean_exit_2(invoke("visualize", run, "--out", a_file / "x.png"), "is a file, not a folder")
    clean_exit_2(invoke("report", run, "-o", folder), "--output", "is a folder")
    clean_exit_2(invoke(*tiny_run(tiny_data, a_file)), str(a_file))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file.txt", "folder"]
    assert list(folder.iterdir()) == []


def test_a_rejected_report_leaves_nothing_behind(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x").mkdir()
    (empty / "x" / "summary.json").write_text('{"status": "failed", "name": "x"}')
    (empty / "x" / "config.yaml").write_text("name: x\n")
    result = invoke("report", empty, "-o", tmp_path / "out" / "r.md")
    clean_exit_2(result, "no completed runs")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_results_folder(tiny_data, tmp_path):
    results = tmp_path / "results"
    (results / "lenet_relu").mkdir(parents=True)
    (results / "lenet_relu").chmod(0o500)
    try:
        clean_exit_2(invoke(*tiny_run(tiny_data, results)), "cannot create a run folder", "--results")
    finally:
        (results / "lenet_relu").chmod(0o700)


# ---------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("schedule.warmup_epochs=.inf", "schedule.warmup_epochs"),
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("seed=18446744073709551617", "seed"),
    ("seed=-1", "seed"),
    ("train.threads=1000", "train.threads: 1000 is more than"),
    ("model.dropout=.inf", "model.dropout"),
    ("train.eval_batch_size=1e99", "train.eval_batch_size"),
    ("optim.lr=1e39", "optim.lr"),
    ("name='a\x1b[31mred'", "control characters"),
    ("name=''", "name"),
    ("name=///", "no letters or digits"),
])
def test_non_finite_huge_and_empty_values_are_rejected(override, expected, tiny_data, tmp_path):
    clean_exit_2(invoke(*tiny_run(tiny_data, tmp_path / "results", "--set", override)), expected)
    assert not (tmp_path / "results").exists()


def test_home_folder_in_output_dir_is_expanded(tiny_data, tmp_path):
    result = invoke(*tiny_run(tiny_data, "~/cnnlab-results"), env={"HOME": str(tmp_path / "home")})
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "home" / "cnnlab-results" / "lenet_relu").iterdir())
    assert not Path("~").exists()


@pytest.mark.parametrize("layer, expected", [("", "--layer: empty"), (" ", "--layer: empty"), ("x.y", "no such layer"),
                                             ("3.5", "no such layer"), ("99", "top-level layers"), ("-", "no such layer")])
def test_visualize_layer_values(trained, tmp_path, layer, expected):
    run, _ = trained
    clean_exit_2(invoke("visualize", run, "--layer", layer, "--out", tmp_path / "x.png"), expected)
    assert not (tmp_path / "x.png").exists()


def test_the_markdown_report_shows_html_in_run_names_as_text(trained, tmp_path):
    run, summary = trained
    copy = tmp_path / "results" / "x" / run.name
    shutil.copytree(run, copy)
    data = json.loads((copy / "summary.json").read_text())
    data["name"] = "<img src=x onerror=alert(1)>|[link](http://e.x)"
    (copy / "summary.json").write_text(json.dumps(data))
    result = invoke("report", copy, "-o", tmp_path / "r" / "r.md", "--html")
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "r" / "r.md").read_text()
    assert "<img src=x" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert "\\[link\\](http://e.x)" in markdown and "\\|" in markdown
    assert "<img src=x" not in (tmp_path / "r" / "r.html").read_text()


def test_sweep_variant_names_never_collide_and_a_threads_grid_is_kept(tmp_path):
    from cnnlab.sweep import expand

    long = "x" * 120
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"base: {CONFIGS / 'lenet.yaml'}\ngrid:\n  name: ['{long}a', '{long}b']\n  train.threads: [1, 2]\n")
    _, trials = expand(spec, [])
    names = [t.name for t in trials]
    assert len(set(names)) == 4 and all(len(n) <= 100 for n in names)
    assert sorted(t.config.train.threads for t in trials) == [1, 1, 2, 2]


# ---------------------------------------------------------------------------------------------
# Found by a hostile review


def test_a_report_never_copies_what_a_link_in_a_run_folder_points_to(run_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-TOKEN-123")
    (run_copy / "curves.png").unlink()
    (run_copy / "curves.png").symlink_to(secret)
    result = invoke("report", run_copy, "-o", tmp_path / "rep" / "r.md", "--html")
    assert result.exit_code == 0, result.output
    assert "not a regular PNG file" in result.output
    written = b"".join(p.read_bytes() for p in (tmp_path / "rep").rglob("*") if p.is_file())
    assert b"SECRET-TOKEN" not in written and b"U0VDUkVUL" not in written  # nor its base64


@pytest.mark.parametrize("damage", [
    lambda d: {**d, "status": "running", "pid": 10**30},
    lambda d: {**d, "status": "running", "pid": -1},
    lambda d: "[" * 100_000,
])
def test_summaries_that_break_parsers_are_skipped_by_compare(trained, tmp_path, damage):
    results, bad = good_and_bad_runs(trained[0], tmp_path)
    damaged = damage(json.loads((bad / "summary.json").read_text()))
    (bad / "summary.json").write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    compared = invoke("compare", results)
    assert compared.exit_code == 2, compared.output  # the table is shown; the status says a run was left out
    assert "experiment" in compared.output and "1.000" in compared.output
    assert str(bad / "summary.json") in compared.output and "skipped" in compared.output
    clean_exit_2(invoke("eval", bad), str(bad / "summary.json"))
    assert invoke("eval", "--results", results).exit_code == 0


def test_a_deeply_nested_trials_json_is_skipped(tiny_data, tmp_path):
    sweep = tmp_path / "results" / "sweeps" / "s"
    (sweep / "20260101T000000Z").mkdir(parents=True)
    (sweep / "20260101T000000Z" / "trials.json").write_text("[" * 100_000)
    assert invoke(*tiny_run(tiny_data, sweep / "runs")).exit_code == 0
    compared = invoke("compare", sweep)
    assert compared.exit_code == 0 and "nested too deeply" in compared.output


def test_a_metrics_csv_without_its_columns_is_left_out_of_plots(run_copy, tmp_path):
    (run_copy / "metrics.csv").write_text("epoch,train_loss,train_acc\n1,1,1\n")
    result = invoke("report", run_copy, "-o", tmp_path / "rep" / "r.md")
    assert result.exit_code == 0, result.output
    assert "lacks the column(s) val_loss, val_acc" in result.output


def _resave(path: Path, change) -> None:
    """Change a checkpoint and give it a matching checksum, as someone who knows the format could."""
    import hashlib

    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)
    Path(f"{path}.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["state"].pop("epoch"), "state.epoch is not a count"),
    (lambda d: d["state"].update(epoch="abc"), "state.epoch is not a count"),
    (lambda d: d["state"].update(epoch=-5), "state.epoch is not a count"),
    (lambda d: d["state"].update(epoch=1), "one row per completed epoch"),
    (lambda d: d["state"]["metrics"][0].update(epoch="x"), "row 1"),
    (lambda d: d["state"].update(current={"batches": -30}), "state.current.batches"),
    (lambda d: d.update(config={"train": "x"}), "not a valid cnnlab config"),
    (lambda d: d.update(optimizer=None), "does not fit"),
    (lambda d: d["state"].update(rng={}), "state.rng"),
])
def test_crafted_checkpoints_with_valid_checksums_are_refused_by_resume(run_copy, change, expected):
    last = run_copy / "checkpoints" / "last.pt"
    _resave(last, change)
    clean_exit_2(invoke("resume", run_copy, "--epochs", "5"), str(last), expected)
    assert json.loads((run_copy / "summary.json").read_text())["epochs_completed"] == 3


def test_a_checksum_file_without_a_checksum_is_an_error(run_copy):
    sidecar = run_copy / "checkpoints" / "best.pt.sha256"
    sidecar.write_text("zzz\n")
    clean_exit_2(invoke("eval", run_copy), str(sidecar), "no SHA-256")


def test_resume_refuses_other_data_than_the_run_was_trained_on(run_copy, tmp_path):
    from conftest import write_dataset

    other = write_dataset(tmp_path / "other", n_train=600, n_test=200)
    clean_exit_2(invoke("resume", run_copy, "--epochs", "5", "--data-dir", other),
                 "is not the data", "train_size", "--data-dir")


def test_long_variant_names_never_cut_the_numbers(trained, tmp_path):
    run, summary = trained
    for i, length in enumerate((8, 100, 150)):
        copy = tmp_path / "long" / f"r{i}"
        shutil.copytree(run, copy)
        data = json.loads((copy / "summary.json").read_text())
        data["name"] = "y" * length
        (copy / "summary.json").write_text(json.dumps(data))
    result = invoke("compare", tmp_path / "long")
    assert result.exit_code == 0
    assert "y" * 150 in result.output and "…" not in result.output
    rows = [line for line in result.output.splitlines() if "yyyyyyyy" in line]
    assert len(rows) == 3 and all(f"{summary['params']:,}" in row and row.rstrip().endswith("ok") for row in rows)


def test_terminal_escapes_in_a_foreign_run_name_are_shown_escaped(run_copy, tmp_path):
    data = json.loads((run_copy / "summary.json").read_text())
    data["name"] = "\x1b[31mred\x07"
    (run_copy / "summary.json").write_text(json.dumps(data))
    compared = invoke("compare", run_copy)
    assert compared.exit_code == 0 and "\x1b" not in compared.output and "\\x1b[31mred\\x07" in compared.output
    assert invoke("report", run_copy, "-o", tmp_path / "r" / "r.md", "--html").exit_code == 0
    for page in ("r.md", "r.html"):
        assert "\x1b" not in (tmp_path / "r" / page).read_text()


def test_markdown_math_and_emphasis_in_names_are_escaped():
    from cnnlab.report import md

    assert md("$a^2$ _x_ *y*") == "\\$a^2\\$ \\_x\\_ \\*y\\*"


def test_a_ctrl_c_at_any_moment_of_start_up_stops_the_command(tiny_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import HANG_SECONDS, wait_for

    def handlers_installed(pid: int) -> bool:
        """cnnlab records signals from its first line (entry.py); before that the interpreter itself
        is starting, and a Ctrl-C there is Python's, not cnnlab's (SigCgt: the signals it catches)."""
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        return all(caught & (1 << (s - 1)) for s in (signal.SIGTERM, signal.SIGHUP))

    for delay in (0.0, 0.05, 0.4, 1.2):  # after cnnlab's first line: during imports, data loading, the first batches
        results = tmp_path / f"r{delay}"
        command = [sys.executable, "-m", "cnnlab", *map(str, tiny_run(tiny_data, results)), "--epochs", "100000"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: handlers_installed(process.pid), "cnnlab to install its signal handlers", process)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=HANG_SECONDS)[0].decode()
        assert process.returncode == 130, (delay, output)
        completed = [p for p in results.glob("*/*/summary.json") if '"completed"' in p.read_text()]
        assert not completed, delay


def test_folder_sweep_files_that_sanitise_alike_get_their_own_trials(tmp_path):
    from cnnlab.sweep import expand

    folder = tmp_path / "family"
    folder.mkdir()
    (folder / "a b.yaml").write_text("optim: {lr: 0.05}\n")
    (folder / "a-b.yaml").write_text("optim: {lr: 0.1}\n")
    _, trials = expand(folder, [])
    names = [t.name for t in trials]
    assert len(set(names)) == 2 and all(n.startswith("a-b-") for n in names)
    assert sorted(t.config.optim.lr for t in trials) == [0.05, 0.1]
    assert len({sanitize_name(t.config.name) for t in trials}) == 2  # two run folders


def test_a_fifo_in_place_of_a_summary_is_skipped_not_waited_on(trained, tmp_path):
    results, bad = good_and_bad_runs(trained[0], tmp_path)
    (bad / "summary.json").unlink()
    os.mkfifo(bad / "summary.json")
    os.mkfifo(bad / ".lock")
    compared = invoke("compare", results)
    assert compared.exit_code == 2 and "not a regular file" in compared.output and "1.000" in compared.output


def test_compare_says_when_a_sweeps_run_folders_are_missing(tmp_path):
    stamp = tmp_path / "sweep" / "20260101T000000Z"
    stamp.mkdir(parents=True)
    (stamp / "trials.json").write_text(json.dumps([{"name": "a", "status": "completed", "seed": 0, "test_acc": 0.9,
                                                     "run_dir": "../runs/a/1"}]))
    result = invoke("compare", tmp_path / "sweep")
    assert result.exit_code == 0 and "1 of its run folders are missing" in result.output and "0.900" in result.output


# ---------------------------------------------------------------------------------------------
# Output paths are missing or regular files: a rename never swaps a device, FIFO or link for a file


def special_files(tmp_path: Path) -> dict[Path, str]:
    """Things an output rename would replace, each with the words its refusal names it by."""
    fifo = tmp_path / "pipe.out"
    os.mkfifo(fifo)
    real = tmp_path / "real.out"
    real.write_text("keep")
    link = tmp_path / "link.out"
    link.symlink_to(real)
    folder = tmp_path / "folder.out"
    folder.mkdir()
    found = {fifo: "is a FIFO (named pipe), not a regular file", link: "is a symbolic link", folder: "is a folder"}
    try:  # a device node like /dev/null, made here (root only): the real one is never put at risk
        os.mknod(tmp_path / "null.out", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        found[tmp_path / "null.out"] = "is a character device, not a regular file"
    except PermissionError:
        pass
    return found


def kinds(paths) -> list[tuple[str, int, str | None]]:
    return [(p.name, stat.S_IFMT(os.lstat(p).st_mode), os.readlink(p) if p.is_symlink() else None) for p in paths]


@pytest.mark.parametrize("command", [
    ["export", "RUN", "--format", "torchscript", "-o"],
    ["visualize", "RUN", "--out"],
    ["report", "RUN", "-o"],
    ["bench", "--no-commands", "--batches", "1", "--out"],
])
def test_an_output_that_is_not_a_regular_file_is_refused_and_left_as_it_was(trained, tmp_path, command):
    run, _ = trained
    special = special_files(tmp_path)
    before = kinds(special)
    for path, message in special.items():
        clean_exit_2(invoke(*[run if a == "RUN" else a for a in command], path), str(path), message)
    assert kinds(special) == before
    assert (tmp_path / "real.out").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in special), "real.out"])


def test_a_reports_html_and_image_folder_follow_the_same_rule(trained, tmp_path):
    run, _ = trained
    os.mkfifo(tmp_path / "r.html")
    clean_exit_2(invoke("report", run, "-o", tmp_path / "r.md", "--html"), "r.html", "FIFO")
    (tmp_path / "r.html").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("keep")
    (tmp_path / "r_files").symlink_to(elsewhere)
    clean_exit_2(invoke("report", run, "-o", tmp_path / "r.md"), "r_files", "symbolic link", "real path")
    assert (tmp_path / "r_files").is_symlink() and [p.name for p in elsewhere.iterdir()] == ["mine.txt"]
    assert not (tmp_path / "r.md").exists()
