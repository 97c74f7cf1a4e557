"""Names from files, shown safely everywhere: a data folder whose class names hold a terminal escape, a bell, a
newline and letters the plots' font lacks. Tables keep one row per class, lines show each control character as an
escape (never sending it, never dropping it), figures draw the same escapes (no glyph-less boxes), and library
warnings reach the terminal as one cnnlab line each, or not at all where they are noise."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.safetext import how_names_differ, look_alike, one_line, plot_label, printable

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
runner = CliRunner()

# Sorted as the folder reader orders its classes; the last has letters the plots' font (DejaVu Sans) has no glyph for.
NAMES = ("café", "dog\x1b[31m\x07", "new\nline", "模型")
SHOWN = ("café", "dog\\x1b[31m\\x07", "new\\nline", "模型")
RAW = ("\x1b", "\x07")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(run folder, data folder, environment): a LeNet trained for an epoch on pictures in class folders named NAMES."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(NAMES):
            for i in range(6):
                pixels = rng.integers(0, 50, (16, 16)).astype(np.uint8)
                pixels[4 * label : 4 * label + 4, :] = 220
                (root / "data" / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "L").save(root / "data" / split / name / f"{i}.png")
    env = {"CNNLAB_CACHE": str(root / "cache")}
    result = runner.invoke(app, [str(a) for a in (
        "run", CONFIGS / "lenet_relu.yaml", "--set", "data.name=folder", "--data-dir", root / "data", "--epochs", "1",
        "--set", "data.val_size=0", "--set", "train.batch_size=8", "--results", root / "results", "--device", "cpu",
        "--quiet")], env=env)
    assert result.exit_code == 0, result.output
    [run] = (root / "results").glob("*/*")
    return run, root / "data", env


def table_after(output: str, header: str, rows: int) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == header.split())
    return lines[start + 1 : start + 1 + rows]


def assert_no_raw_controls(text: str) -> None:
    assert not any(char in text for char in RAW), text


# ---------------------------------------------------------------------------------------------
# Tables and lines: one row per class, every control shown as an escape


def test_the_data_table_shows_each_class_on_one_row(hostile):
    _, data, env = hostile
    result = runner.invoke(app, ["data", "folder", "--data-dir", str(data)], env=env)
    assert result.exit_code == 0, result.output
    assert_no_raw_controls(result.output)
    rows = table_after(result.output, "label class train test", len(NAMES) + 1)
    for label, (row, shown) in enumerate(zip(rows, SHOWN)):
        assert row.split() == [str(label), shown, "6", "6"], rows
    assert rows[-1].split() == ["all", "24", "24"], rows


def test_eval_shows_each_class_on_one_row_and_one_line_of_confusions(hostile):
    run, _, env = hostile
    result = runner.invoke(app, ["eval", str(run)], env=env)
    assert result.exit_code == 0, result.output
    assert_no_raw_controls(result.output)
    rows = table_after(result.output, "class accuracy", len(NAMES))
    assert [row.split()[0] for row in rows] == list(SHOWN), rows
    assert all(re.fullmatch(r"\S+\s+\d\.\d{3}", row.strip()) for row in rows), rows
    confused = next(line for line in result.output.splitlines() if line.startswith("most confused"))
    assert result.output.splitlines()[result.output.splitlines().index(confused) + 1].startswith("confusion.csv")


def test_predict_shows_a_bell_in_a_name_as_an_escape_never_dropping_it(hostile):
    run, data, env = hostile
    picture = data / "test" / NAMES[1] / "0.png"
    for args in ([str(picture)], ["--image", "6"]):  # a file of the class's folder, and a test image of that class
        result = runner.invoke(app, ["predict", str(run), *args, "--top", str(len(NAMES))], env=env)
        assert result.exit_code == 0, result.output
        assert_no_raw_controls(result.output)
        lines = result.output.splitlines()
        first = next(i for i, line in enumerate(lines) if "%  " in line)
        source, tops = lines[first - 1], lines[first:]
        assert SHOWN[1] in source, source  # the picture's folder, or its true class
        assert len(tops) == len(NAMES) and all(re.fullmatch(r"\s+\d+\.\d\d%  \S+", line) for line in tops), lines
        assert sorted(line.split("%  ")[1] for line in tops) == sorted(SHOWN)


# ---------------------------------------------------------------------------------------------
# Figures: the same escapes, drawn (a control character has no glyph: matplotlib drew a box and warned)


def drawn_texts(fig) -> list[str]:
    import matplotlib.text

    fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


@pytest.mark.parametrize("mode", ["maps", "cam"])
def test_visualize_draws_class_names_as_escapes(hostile, mode, monkeypatch, tmp_path):
    from cnnlab import plots
    from cnnlab.visualize import visualize

    run, _, env = hostile
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    drawn: list[str] = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, **kw: (drawn.extend(drawn_texts(fig)), save(fig, out, **kw))[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        visualize(run, image=6, mode=mode, out=tmp_path / "v.png")  # test image 6: of class 1, the escape's
    assert not [w for w in caught if re.match(r"Glyph (7|9|10|27) ", str(w.message))], [str(w.message) for w in caught]
    assert any(f"true: {SHOWN[1]}" in text for text in drawn), drawn
    for text in drawn:
        assert_no_raw_controls(text)


def test_eval_figures_draw_class_names_as_escapes(hostile, monkeypatch):
    from cnnlab import plots
    from cnnlab.evaluation import evaluate_run

    run, _, env = hostile
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    drawn: list[list[str]] = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, **kw: (drawn.append(drawn_texts(fig)), save(fig, out, **kw))[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_run(run)
    assert not [w for w in caught if re.match(r"Glyph (7|9|10|27) ", str(w.message))], [str(w.message) for w in caught]
    confusion, errors = drawn
    assert [name for name in SHOWN if name in confusion] == list(SHOWN), confusion  # the matrix's tick labels
    for text in confusion + errors:
        assert_no_raw_controls(text)
        assert "new\nline" not in text  # a tile's caption has its own lines: true class, then predicted
    for text in errors:
        if text.startswith("#"):
            assert len(text.split("\n")) == 3, text


# ---------------------------------------------------------------------------------------------
# The forms of untrusted text


def test_one_line_and_plot_labels_show_every_line_break_and_control_as_an_escape():
    text = "a\nb\tc\rd\x07e\x1b[2J\u2028f\x85"
    assert one_line(text) == plot_label(text) == "a\\nb\\tc\\rd\\x07e\\x1b[2J\\u2028f\\x85"
    assert printable(text) == "a\nb\tc\\rd\\x07e\\x1b[2J\u2028f\\x85"  # a message keeps its lines
    assert one_line("模型 café") == "模型 café"


def test_names_that_look_the_same_are_told_apart_in_words():
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    said = how_names_differ(nfc, nfd)
    assert "Unicode normalisation" in said and "NFC" in said and "NFD" in said, said
    assert "U+00E9" in said and "U+0065 U+0301" in said, said
    assert "invisible" in how_names_differ("dog", "do\u200bg") and "U+200B" in how_names_differ("dog", "do\u200bg")
    assert "CYRILLIC SMALL LETTER O" in how_names_differ("d\u043eg", "dog")
    assert "compatibility" in how_names_differ("\ufb01sh", "fish")
    assert how_names_differ("dog", "dog") == ""
    assert look_alike(["dog", nfc, "cat", nfd]) == (1, 3) and look_alike(["dog", "do\u200bg"]) == (0, 1)
    assert look_alike(["dog", "Dog", "cat", "dog"]) is None  # case shows; the same string twice is a plain duplicate


# ---------------------------------------------------------------------------------------------
# Library warnings: one cnnlab line each, without source lines, or nothing where they are noise


def test_library_warnings_are_one_cnnlab_line_or_silent_where_they_are_noise(capsys):
    from cnnlab.entry import route_warnings
    from cnnlab.plots import plt

    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        route_warnings()
        warnings.warn("Unnamed CHECK constraint; please name it", UserWarning)  # alembic's, migrating MLflow's database
        fig, ax = plt.subplots(figsize=(0.3, 0.3), layout="constrained")  # too small for its axis labels
        ax.set_xlabel("a label far too long for a figure this small")
        fig.canvas.draw()
        plt.close(fig)
        assert capsys.readouterr().err == ""
        warnings.warn("Glyph 27 (\x1b) missing from font(s) DejaVu Sans.\nsecond line", UserWarning)
    err = capsys.readouterr().err
    assert err == "warning: Glyph 27 (\\x1b) missing from font(s) DejaVu Sans. second line\n", err


def test_a_command_says_a_font_without_a_names_letters_in_one_line(hostile, tmp_path):
    run, _, env = hostile
    done = subprocess.run([sys.executable, "-m", "cnnlab", "visualize", str(run), "--class", NAMES[3], "--out",
                           str(tmp_path / "v.png")], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, **env})
    assert done.returncode == 0, done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr, done.stderr
    said = [line for line in done.stderr.splitlines() if "lyph" in line]
    assert said and all(line.startswith("warning: ") for line in said), done.stderr
