"""`cnnlab report`: Markdown with relative images, self-contained HTML, rendered in headless Chromium."""

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import HANG_SECONDS
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app

runner = CliRunner()
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "screenshot_report.sh"


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    run, summary = trained
    out = tmp_path_factory.mktemp("report") / "lab.md"
    result = runner.invoke(app, ["report", str(run), "-o", str(out), "--html"])
    assert result.exit_code == 0, result.output
    return out, summary


def test_markdown_carries_the_runs_numbers_and_relative_images(report):
    out, summary = report
    text = out.read_text()
    for heading in ("## 1. Setup", "## 2. Results", "## 3. Models", "## 4. What the convolutions see"):
        assert heading in text
    start = f"| {summary['name']} | {summary['final']['train_loss']:.3f}"
    row = next(line for line in text.splitlines() if line.startswith(start))
    assert f"| {summary['test_acc']:.3f} |" in row and f"{summary['params']:,}" in row
    assert f"{summary['flops_per_image']:,}" in row
    assert "| 3 | Conv2d(6, 16, k=5) | 16x10x10 | 2,416 |" in text  # the structure table, as `cnnlab summary` prints
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 5 and all(not Path(link).is_absolute() for link in links)
    for link in links:
        with Image.open(out.parent / link) as image:
            assert image.format == "PNG"


def test_html_is_self_contained(report):
    out, _ = report
    page = out.with_suffix(".html").read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) >= 5 and "src='http" not in page and 'src="' not in page
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG" and image.width > 100


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_html_renders_in_headless_chromium_with_no_broken_image(report, tmp_path):
    out, _ = report
    shot = tmp_path / "shot.png"
    result = subprocess.run(["bash", str(SCRIPT), str(out.with_suffix(".html")), str(shot)], capture_output=True,
                            text=True, timeout=HANG_SECONDS)
    assert result.returncode == 0, result.stderr
    counts = dict(re.findall(r"(images|broken): (\d+)", result.stdout))
    assert int(counts["images"]) >= 5 and counts["broken"] == "0"
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        assert rgb.size == (1280, 3000)
        colours = rgb.getcolors(maxcolors=1_000_000) or []
        assert len(colours) > 500  # plots and tables, not a blank page


def test_report_of_nothing_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 2 and "holds no cnnlab runs" in result.output


def variant(run: Path, results: Path, name: str, change) -> Path:
    """A copy of ``run`` under ``results/<name>``, its config.yaml and summary.json changed by ``change(config, summary)``
    (the copy without the original's lock file, as a finished run's folder)."""
    import json

    import yaml

    copy = results / run.parent.name / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    config, summary = yaml.safe_load((copy / "config.yaml").read_text()), json.loads((copy / "summary.json").read_text())
    change(config, summary)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def drawn_figures(monkeypatch) -> dict[str, object]:
    """The figures the report saves, by file name, each as it was before it was written and closed."""
    from cnnlab import plots

    figures: dict[str, object] = {}
    save = plots.save_figure

    def keep(fig, out, **kwargs):
        fig.canvas.draw()
        figures[Path(out).name] = {"legend": [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
                                   if fig.axes and fig.axes[0].get_legend() else [],
                                   "xticks": [t.get_text() for t in fig.axes[0].get_xticklabels()] if fig.axes else []}
        return save(fig, out, **kwargs)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def results_table(text: str) -> list[str]:
    """The variant column of the report's "2. Results" table."""
    part = text.split("## 2. Results")[1].split("\n\n")[1]
    return [re.sub(r"\\(.)", r"\1", line.split(" | ")[0].removeprefix("| ")) for line in part.splitlines()[2:]]


def test_variants_of_one_name_are_apart_in_the_curves_and_bars_as_in_the_table(trained, tmp_path, monkeypatch):
    run, _ = trained
    results = tmp_path / "results"
    variant(run, results, "a", lambda config, summary: None)
    variant(run, results, "b", lambda config, summary: config["optim"].update(lr=0.05))
    variant(run, results, "c", lambda config, summary: config["data"].update(root=str(tmp_path / "other")))  # other data
    figures = drawn_figures(monkeypatch)
    out = tmp_path / "report" / "lab.md"
    result = runner.invoke(app, ["report", str(results), "-o", str(out)])
    assert result.exit_code == 0, result.output
    shown = results_table(out.read_text())
    assert len(set(shown)) == 3, shown  # the table: three variants of one name
    assert sorted(figures["compare-curves.png"]["legend"]) == sorted(shown), figures
    assert sorted(t.replace("\n", "") for t in figures["compare-bars.png"]["xticks"]) == sorted(shown), figures


def test_report_files_are_as_readable_as_the_report_and_tables_say_each_thing_once(trained, tmp_path):
    import os

    run, _ = trained
    results = tmp_path / "results"
    variant(run, results, "a", lambda config, summary: None)
    variant(run, results, "b", lambda config, summary: config["optim"].update(lr=0.05))
    out = tmp_path / "report" / "lab.md"
    old = os.umask(0o022)
    try:
        result = runner.invoke(app, ["report", str(results), "-o", str(out), "--html"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (out.parent / "lab_files").stat().st_mode & 0o777 == out.parent.stat().st_mode & 0o777 == 0o755
    text = out.read_text()
    assert "train and validation loss and accuracy" in text  # a run's curves.png: both losses and both accuracies
    assert "Across runs" not in text  # one seed each: the results table says it all

    def second_seed(config, summary):
        config["seed"] = summary["seed"] = 1 + summary["seed"]

    variant(run, results, "a-seed2", second_seed)
    result = runner.invoke(app, ["report", str(results), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Across runs" in out.read_text()  # a variant over two seeds: its mean and spread
