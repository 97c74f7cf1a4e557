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
