"""The comparison table tells the truth: runs are averaged only with runs of the same experiment,
every number a file can hold (NaN, infinity, 1e308) is shown as what it is, a run that cannot be read
is named and left out while the rest is shown, and text from files never reaches the terminal raw."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cnnlab import cli
from cnnlab.cli import app
from cnnlab.compare import (
    aggregate,
    collect_rows,
    markdown_table,
    mean_std,
    read_trials,
    table_cells,
    table_headers,
    write_trials,
)
from cnnlab.console import SafeConsole
from cnnlab.errors import UserError, warn
from cnnlab.identity import experiment_key, variant_labels

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()
ESCAPES = "\x1b]0;TITLE\x07\x1b[2J"  # retitles, then clears, a terminal that receives it raw


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_run(tiny_data, results, *extra):
    return ["run", CONFIGS / "lenet.yaml", "--data-dir", tiny_data, "--results", results, "--epochs", "1",
            "--set", "data.check_counts=false", "--set", "data.val_size=100", "--set", "train.batch_size=64",
            "--device", "cpu", "--quiet", *extra]


def copy_run(run: Path, to: Path, config: dict | None = None, **summary) -> Path:
    """A copy of a trained run folder with its config.yaml keys and summary.json values changed, as
    cnnlab would have written them for that run."""
    shutil.copytree(run, to)
    (to / ".lock").unlink(missing_ok=True)
    if config:
        data = yaml.safe_load((to / "config.yaml").read_text())
        for dotted, value in config.items():
            *path, last = dotted.split(".")
            node = data
            for part in path:
                node = node[part]
            node[last] = value
        (to / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if summary:
        data = json.loads((to / "summary.json").read_text())
        (to / "summary.json").write_text(json.dumps({**data, **summary}))
    return to


def rows_of(output: str) -> dict[str, str]:
    """The table's lines by their first cell."""
    return {line.split()[0]: line for line in output.splitlines() if line.strip()}


# ---------------------------------------------------------------------------------------------
# One experiment per row


def test_overrides_make_a_variant_of_their_own_never_averaged_with_the_plain_run(tiny_data, tmp_path):
    results = tmp_path / "results"
    assert invoke(*tiny_run(tiny_data, results)).exit_code == 0
    assert invoke(*tiny_run(tiny_data, results, "--seed", "1")).exit_code == 0
    changed = invoke(*tiny_run(tiny_data, results, "--set", "model.pool=max", "--set", "optim.lr=0.5"))
    assert changed.exit_code == 0, changed.output

    compared = invoke("compare", results)
    assert compared.exit_code == 0, compared.output
    rows = rows_of(compared.output)
    assert rows["lenet"].split()[1:4] == ["n=2", "(seeds", "0,1)"]  # the two seeds of the plain config, averaged together
    # the variant alone, named by what differs
    assert rows["lenet[model.pool=max,optim.lr=0.5]"].split()[1:4] == ["n=1", "(seed", "0)"]

    written = invoke("report", results, "-o", tmp_path / "report" / "r.md")
    assert written.exit_code == 0, written.output
    report = (tmp_path / "report" / "r.md").read_text()
    assert "lenet\\[model.pool=max,optim.lr=0.5\\]" in report  # the variant's label, Markdown-escaped


def test_placement_and_seed_do_not_split_an_experiment_but_any_other_key_does(trained, tmp_path):
    run, _ = trained
    results = tmp_path / "results"
    copy_run(run, results / "a" / "1", {"seed": 0})
    copy_run(run, results / "a" / "2", {"seed": 1, "train.device": "cuda", "output.dir": "/elsewhere",
                                        "train.threads": 1, "train.eval_batch_size": 64}, seed=1)
    copy_run(run, results / "a" / "3", {"seed": 2, "train.epochs": 7}, seed=2)
    table = aggregate(collect_rows([results]).rows)
    assert sorted((e["name"], tuple(e["seeds"])) for e in table) == [
        ("experiment", (0, 1)), ("experiment[train.epochs=7]", (2,))]


def test_a_key_left_at_its_default_is_the_same_experiment_as_one_set_to_it():
    bare = {"name": "lenet", "model": {"name": "lenet"}}
    explicit = {"name": "lenet", "model": {"name": "lenet", "pool": "avg"}, "train": {"epochs": 20}}
    assert experiment_key(bare) == experiment_key(explicit)
    assert experiment_key(bare) != experiment_key({**bare, "model": {"name": "lenet", "pool": "max"}})


def test_variant_labels_are_distinct_and_name_only_the_keys_that_differ():
    base = experiment_key({"model": {"name": "lenet"}})
    lower = experiment_key({"model": {"name": "lenet"}, "optim": {"lr": 0.1}})
    other = experiment_key({"model": {"name": "lenet"}, "optim": {"lr": 0.1}, "train": {"epochs": 3}})
    labels = variant_labels("lenet", [base, lower, other])
    assert labels == ["lenet", "lenet[optim.lr=0.1]", "lenet[optim.lr=0.1,train.epochs=3]"]


# ---------------------------------------------------------------------------------------------
# Numbers as they are


@pytest.mark.parametrize("value, shown", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")])
def test_nan_and_infinity_in_a_summary_are_shown_not_crashed_on_or_dropped(trained, tmp_path, value, shown):
    run, _ = trained
    results = tmp_path / "results"
    copy_run(run, results / "a" / "1")
    copy_run(run, results / "a" / "2", {"seed": 1}, seed=1)
    text = (results / "a" / "2" / "summary.json").read_text()
    data = json.loads(text)
    data["test_acc"] = "@@"
    (results / "a" / "2" / "summary.json").write_text(json.dumps(data).replace('"@@"', value))

    compared = invoke("compare", results)
    assert compared.exit_code == 0 and "Traceback" not in compared.output, compared.output
    assert rows_of(compared.output)["experiment"].split()[5] == shown  # the mean over both seeds, not the finite one
    written = invoke("report", results, "-o", tmp_path / "report" / "r.md", "--html")
    assert written.exit_code == 0 and "Traceback" not in written.output, written.output


def test_huge_numbers_are_written_compactly(trained, tmp_path):
    run, _ = trained
    copy_run(run, tmp_path / "results" / "a" / "1", train_examples_per_sec=1e308, wall_seconds=1e300)
    compared = invoke("compare", tmp_path / "results")
    assert compared.exit_code == 0, compared.output
    assert "1e+308" in compared.output and "1e+300" in compared.output
    assert max(map(len, compared.output.split())) < 30  # not 309 digits


def test_a_mean_over_a_nan_is_nan_and_over_nothing_is_missing():
    nan, inf = float("nan"), float("inf")
    assert str(mean_std([0.9, nan])) == "(nan, nan)"
    assert mean_std([0.9, inf]) == (inf, pytest.approx(float("nan"), nan_ok=True))
    assert mean_std([None, None]) == (None, None)
    cells = table_cells({"name": "x", "seeds": [0], "runs": 1, "failed": 0, "params": None,
                         **{m: v for m, v in zip(("train_loss", "train_acc", "val_acc", "test_acc", "examples_per_sec",
                                                  "wall_seconds"), [(None, None), (nan, nan), (inf, nan), (0.5, 0.1),
                                                                    (1e308, 0.0), (2.0, 0.0)])}})
    assert cells[1:4] == ["n=1 (seed 0)", "–", "–"]  # no epochs or headline recorded
    assert cells[4:10] == ["–", "nan", "inf", "0.500 ± 0.100", "1e+308", "2.0"]


# ---------------------------------------------------------------------------------------------
# What cannot be read is named, and the rest is shown


def test_one_missing_target_among_several_is_named_and_the_others_shown(trained, tmp_path):
    run, _ = trained
    copy_run(run, tmp_path / "results" / "a" / "1")
    compared = invoke("compare", tmp_path / "results", tmp_path / "nowhere")
    assert compared.exit_code == 2, compared.output
    assert f"{tmp_path / 'nowhere'}: no such run or sweep folder" in compared.output
    assert "experiment" in rows_of(compared.output)


# ---------------------------------------------------------------------------------------------
# Text from files is made safe for the terminal


def test_warnings_show_escape_sequences_instead_of_sending_them(capsys):
    warn(f"run {ESCAPES} failed")
    shown = capsys.readouterr().err
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;TITLE\\x07\\x1b[2J" in shown


def test_an_error_and_a_folder_name_from_files_never_reach_the_terminal_raw(trained, tmp_path):
    run, _ = trained
    hostile = copy_run(run, tmp_path / "results" / "a" / f"1{ESCAPES}", status="failed", error=f"boom{ESCAPES}")
    broken = copy_run(run, tmp_path / "results" / "b" / f"2{ESCAPES}")
    (broken / "summary.json").write_text("{")
    for result in (invoke("eval", hostile), invoke("compare", tmp_path / "results"),
                   invoke("predict", hostile, "--image", "0"),
                   invoke("report", tmp_path / "results", "-o", tmp_path / "rep" / "r.md")):
        assert "\x1b" not in result.output and "\x07" not in result.output, result.output
        assert "\\x1b" in result.output  # shown, as an escape


# ---------------------------------------------------------------------------------------------
# The data set, shown where the runs differ in it


def test_a_data_set_column_appears_only_where_the_runs_differ_in_it(trained, tmp_path):
    run, summary = trained
    mnist = {**summary["data"], "name": "mnist", "title": "MNIST", "classes": list("0123456789")}
    copy_run(run, tmp_path / "same" / "a")
    copy_run(run, tmp_path / "same" / "b", {"seed": 1}, seed=1)
    same = invoke("compare", tmp_path / "same")
    assert same.exit_code == 0, same.output
    assert same.output.splitlines()[0].split()[:2] == ["variant", "seeds"]

    copy_run(run, tmp_path / "mixed" / "fashion")
    copy_run(run, tmp_path / "mixed" / "mnist", {"data.name": "mnist"}, data=mnist)
    older = copy_run(run, tmp_path / "mixed" / "older", {"seed": 2}, seed=2)  # as cnnlab wrote runs before data sets
    recorded = json.loads((older / "summary.json").read_text())
    del recorded["data"]
    (older / "summary.json").write_text(json.dumps(recorded))
    mixed = invoke("compare", tmp_path / "mixed")
    assert mixed.exit_code == 0, mixed.output
    assert mixed.output.splitlines()[0].split()[:3] == ["variant", "data", "seeds"]
    rows = rows_of(mixed.output)
    assert rows["experiment"].split()[1:5] == ["fashion-mnist", "n=2", "(seeds", "0,2)"]  # the older run: Fashion-MNIST's
    assert rows["experiment[data.name=mnist]"].split()[1:5] == ["mnist", "n=1", "(seed", "0)"]
    written = markdown_table(aggregate(collect_rows([tmp_path / "mixed"]).rows))
    assert written.startswith("| variant | data | seeds |")
    assert "| experiment[data.name=mnist] | mnist | n=1 (seed 0) |" in written


def test_summary_csv_always_names_each_rows_data_set(trained, tmp_path):
    # A CSV is read by programs: the column is there whether or not the runs differ, last so that the
    # columns of CSVs written before it keep their places.
    run, summary = trained
    mnist = {**summary["data"], "name": "mnist", "title": "MNIST", "classes": list("0123456789")}
    copy_run(run, tmp_path / "runs" / "fashion")
    copy_run(run, tmp_path / "runs" / "mnist", {"data.name": "mnist"}, data=mnist)
    older = copy_run(run, tmp_path / "runs" / "older", {"seed": 2}, seed=2)  # as cnnlab wrote runs before data sets
    recorded = json.loads((older / "summary.json").read_text())
    del recorded["data"]
    (older / "summary.json").write_text(json.dumps(recorded))
    for folders in (["fashion"], ["fashion", "mnist", "older"]):
        rows = collect_rows([tmp_path / "runs" / name for name in folders]).rows
        write_trials(tmp_path, rows, ["optim.lr"])
        with open(tmp_path / "summary.csv", newline="") as handle:
            reader = csv.DictReader(handle)
            written = {Path(row["run_dir"]).name: row["data"] for row in reader}
        assert reader.fieldnames == ["name", "optim.lr", "seed", "train_loss", "train_acc", "val_acc", "test_acc",
                                     "examples_per_sec", "wall_seconds", "params", "status", "error", "run_dir", "data",
                                     "test_acc_tta", "test_acc_ema", "test_acc_ema_tta", "test_acc_swa", "test_acc_swa_tta",
                                     "epochs", "headline", "headline_acc"]
        assert written == {name: {"mnist": "mnist"}.get(name, "fashion-mnist") for name in folders}


def test_a_trials_json_from_before_data_sets_reads_as_fashion_mnist(tmp_path):
    trial = {"name": "lenet", "status": "completed", "seed": 0, "test_acc": 0.9, "run_dir": ""}
    (tmp_path / "trials.json").write_text(json.dumps([trial, {**trial, "name": "digits", "data": "mnist"}]))
    table = aggregate(collect_rows([tmp_path]).rows)
    assert [(entry["name"], entry["data"]) for entry in table] == [("lenet", "fashion-mnist"), ("digits", "mnist")]
    assert markdown_table(table).startswith("| variant | data | seeds |")


def test_test_accuracies_beside_the_plain_one_get_a_column_only_where_a_run_has_them(trained, tmp_path, monkeypatch):
    # eval.tta, train.ema and train.swa report test accuracies beside the plain one: the tables show each
    # after "test acc" (mean ± std over seeds like the rest), and summary.csv keeps them in its last columns.
    run, _ = trained
    copy_run(run, tmp_path / "plain" / "a")
    plain = markdown_table(aggregate(collect_rows([tmp_path / "plain"]).rows))
    # the headline (here the plain test accuracy, shared by every run) leads, and is not shown twice
    assert plain.startswith("| variant | seeds | epochs | headline: test acc | train loss | train acc | val acc | examples/s |")

    recipe = {"train.ema": {"half_life": 1}, "eval.tta": ["flip"]}
    copy_run(run, tmp_path / "runs" / "plain")
    copy_run(run, tmp_path / "runs" / "ema0", recipe, test_acc_tta=0.91, test_acc_ema=0.92, test_acc_ema_tta=0.93)
    copy_run(run, tmp_path / "runs" / "ema1", {**recipe, "seed": 1}, seed=1, test_acc_tta=0.93, test_acc_ema=0.94,
             test_acc_ema_tta=0.95)
    rows = collect_rows([tmp_path / "runs"]).rows
    table = markdown_table(aggregate(rows)).splitlines()
    assert table[0].startswith("| variant | seeds | epochs | headline: test acc | train loss | train acc | val acc "
                               "| test acc TTA | ema test acc | ema TTA | examples/s |") and "swa" not in table[0]
    cells = {line.split(" | ")[1]: line.split(" | ") for line in table[2:]}  # by their seeds
    assert cells["n=2 (seeds 0,1)"][7:10] == ["0.920 ± 0.014", "0.930 ± 0.014", "0.940 ± 0.014"]
    assert cells["n=1 (seed 0)"][7:10] == ["–", "–", "–"]  # the plain run measured none of them
    shown = invoke("compare", tmp_path / "runs")
    assert shown.exit_code == 0 and "ema test acc" in shown.output.splitlines()[0], shown.output
    # In a terminal narrower than the table nothing is cut short or left out: the terminal wraps its lines.
    terminal = io.StringIO()
    monkeypatch.setattr(cli, "out", SafeConsole(soft_wrap=True, width=60, file=terminal))
    cli.print_table(aggregate(rows))
    printed = terminal.getvalue()
    assert all(header in printed for header in table_headers(aggregate(rows)))
    assert all(cell.strip() in printed for line in table[2:] for cell in line.strip("| ").split(" | ")[1:])  # a long
    # variant name alone folds onto more lines

    write_trials(tmp_path / "sweep", rows, [])
    with open(tmp_path / "sweep" / "summary.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        written = {Path(row["run_dir"]).name: row for row in reader}
    assert reader.fieldnames[-9:] == ["data", "test_acc_tta", "test_acc_ema", "test_acc_ema_tta", "test_acc_swa",
                                      "test_acc_swa_tta", "epochs", "headline", "headline_acc"]
    assert written["ema1"]["test_acc_ema_tta"] == "0.95" and written["plain"]["test_acc_ema_tta"] == ""
    assert markdown_table(aggregate(collect_rows([tmp_path / "sweep"]).rows)).splitlines() == table  # read back

    trials = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    trials[1]["test_acc_ema"] = "0.99"
    (tmp_path / "sweep" / "trials.json").write_text(json.dumps(trials))
    with pytest.raises(UserError, match=r"trials\.json: trial 1 \(.*\): test_acc_ema is not a number"):
        read_trials(tmp_path / "sweep" / "trials.json")


def test_the_tables_lead_with_each_runs_headline_and_name_it_where_runs_differ(trained, tmp_path, monkeypatch):
    # A run's answer is the figure its config declared (eval.headline): the first figure of every table, named in
    # the header where all runs shown share it, and beside each value where they do not.
    run, summary = trained
    recipe = {"train.ema": {"half_life": 1}, "eval.tta": ["flip"]}
    copy_run(run, tmp_path / "results" / "plain")
    copy_run(run, tmp_path / "results" / "ema", recipe, test_acc_tta=0.91, test_acc_ema=0.92, test_acc_ema_tta=0.93,
             headline="test_acc_ema_tta", epochs_completed=20)
    lines = markdown_table(aggregate(collect_rows([tmp_path / "results"]).rows)).splitlines()
    assert lines[0].startswith("| variant | seeds | epochs | headline | train loss | train acc | val acc | test acc | "
                               "test acc TTA | ema test acc | ema TTA |")
    ema, plain = sorted((line.split(" | ") for line in lines[2:]), key=lambda cells: "0.920" not in cells)
    assert ema[2:4] == ["20", "0.930 (ema TTA)"] and plain[2:4] == ["3", f"{summary['test_acc']:.3f} (test acc)"]

    only_ema = markdown_table(aggregate(collect_rows([tmp_path / "results" / "ema"]).rows)).splitlines()
    assert only_ema[0].startswith("| variant | seeds | epochs | headline: ema TTA | train loss | train acc | val acc | "
                                  "test acc | test acc TTA | ema test acc | examples/s |")  # ema TTA not twice
    assert only_ema[2].split(" | ")[3] == "0.930"

    monkeypatch.chdir(tmp_path)  # no folder named: the runs under ./results, as eval and predict find them
    shown = invoke("compare")
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[0].split()[:4] == ["variant", "seeds", "epochs", "headline"]
    assert "0.930 (ema TTA)" in shown.output


def test_a_variant_of_another_model_is_labelled_by_the_keys_the_user_changed():
    # Another model has other options: their defaults (and the first model's options it lacks) are not differences
    # anyone made, so they stay out of the label (it listed a dozen `=null` keys).
    from cnnlab.config import load_config
    from cnnlab.identity import experiment_key, variant_labels

    def key(*settings):
        return experiment_key(load_config(str(CONFIGS / "lenet.yaml"), list(settings)).to_dict())

    assert variant_labels("lenet", [key(), key("model.name=resnet9"), key("model.name=resnet9", "model.width=16"),
                                    key("optim.lr=0.5"), key("model.kernel_size=3")]) == [
        "lenet", "lenet[model.name=resnet9]", "lenet[model.name=resnet9,model.width=16]", "lenet[optim.lr=0.5]",
        "lenet[model.kernel_size=3]"]
