"""Usage: ``write_report([Path("results/sweeps/kernels")], Path("report/report.md"), html=True)``.

A lab report written from results, following the seed report's structure: setup, each model's
structure table, its curves, a results table, comparison plots, and (for LeNet runs) what the
first and second convolutions see. The report is built as a list of blocks, rendered to Markdown
(images linked relative to the report, so the folder can be zipped) and optionally to one
self-contained HTML file (images embedded).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cnnlab.compare import aggregate, collect_rows, metric_text
from cnnlab.console import printable
from cnnlab.errors import UserError, hushed, warn
from cnnlab.numtext import number_text
from cnnlab.results import atomic_write_text, check_output_file


@dataclass
class Block:
    kind: str  # h1, h2, h3, p, table, image
    text: str = ""
    headers: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    path: Path | None = None  # image file inside the report folder


def final(summary, key: str) -> float | None:
    return (summary.final or {}).get(key)


def _unique_runs(rows: list[dict[str, Any]]) -> list[Path]:
    runs = []
    for row in rows:
        if row.get("run_dir") and row.get("status") in ("completed", "skipped"):
            path = Path(row["run_dir"])
            if path not in runs and (path / "summary.json").is_file():
                runs.append(path)
    return runs


def _open_runs(runs: list[Path], trust_code: bool) -> dict[Path, Any]:
    """Each run opened (config and summary validated); a bad one is left out with a warning."""
    from cnnlab.runs import open_run

    opened = {}
    for run in runs:
        try:
            opened[run] = open_run(run, checkpoint=None, trust_code=trust_code)
        except UserError as err:
            warn(f"{err}; left out of the report")
    return opened


NORMALIZED = {True: "normalised by the training mean and std", False: "scaled to [0, 1]",
              "weights": "normalised by the mean and std of the pretrained weights' data"}  # data.normalize
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 50 * 2**20


def copy_png(source: Path, target: Path) -> bool:
    """Copy a run's picture into the report only if it is what it claims: a regular file (not a link,
    which could pull any readable file into a report meant for others) holding a PNG."""
    if not source.exists() and not source.is_symlink():
        return False
    if source.is_symlink() or not source.is_file() or source.stat().st_size > MAX_PNG_BYTES:
        warn(f"{source}: not a regular PNG file of cnnlab's; left out of the report")
        return False
    data = source.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        warn(f"{source}: not a PNG file; left out of the report")
        return False
    target.write_bytes(data)
    return True


def build_blocks(targets: list[Path], assets: Path, trust_code: bool = False) -> tuple[list[Block], list[str]]:
    """The report's blocks, and a line for each run or folder that could not be read (left out)."""
    from cnnlab.modelinfo import profile
    from cnnlab.models.build import build_model
    from cnnlab.plots import plot_accuracy_bars, plot_sweep_curves

    found = collect_rows(targets)
    rows = found.rows
    unfinished = [r for r in rows if r.get("status") not in ("completed", "skipped")]
    if unfinished:
        warn(f"{len(unfinished)} run(s) did not complete and are left out of the results: "
             + ", ".join(f"{r['name']} ({r['status']})" for r in unfinished))
    opened = _open_runs(_unique_runs(rows), trust_code)
    runs = [run for run in opened if opened[run].state == "completed"]
    if not runs:
        raise UserError("no completed runs among " + ", ".join(map(str, targets)) + "; nothing to report")
    summaries = {run: opened[run].summary for run in runs}
    configs = {run: opened[run].cfg for run in runs}
    table = aggregate(rows)
    # Each run under its experiment's label: two variants of one name never look like one experiment.
    label = {Path(run_dir): entry["name"] for entry in table for run_dir in entry["run_dirs"]}
    label = {run: label.get(run, summaries[run].name) for run in runs}
    spec = opened[runs[0]].spec  # the data as the first run recorded it (Fashion-MNIST for runs that did not)
    blocks = [
        Block("h1", f"Convolutional networks on {spec.title}"),
        Block("p", f"Written by cnnlab from {len(runs)} run(s) on "
                   f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: " + ", ".join(map(str, targets)) + "."),
        Block("h2", "1. Setup"),
    ]
    first = configs[runs[0]]
    s0 = summaries[runs[0]]
    split = ("the test set evaluated after every epoch (the lab report's mode)" if s0.eval_split == "test"
             else f"{(s0.val_size or 0):,} training images held out for validation (stratified); the test set "
                  "evaluated once, with the best checkpoint")
    blocks.append(Block("p", (
        f"Data: {spec.title}, {(s0.train_size or 0):,} training / {(s0.test_size or 0):,} test images of {spec.shape_text}, "
        f"{spec.num_classes} classes, from {s0.data_root}. Validation: {split}. Pixels "
        f"{NORMALIZED[first.data.normalize]}; augmentation "
        f"{'on' if first.data.augment.crop_padding or first.data.augment.flip or first.data.augment.erasing else 'none'}. "
        f"Loss: cross-entropy{f' with label smoothing {first.train.label_smoothing}' if first.train.label_smoothing else ''}. "
        f"Initial weights: {first.model.weights or first.init}. "
        f"Hardware: {s0.device_name} ({s0.device}), torch {s0.torch_version}."
    )))
    blocks.append(Block("table", headers=("run", "model", "optimizer", "lr", "schedule", "batch", "epochs", "seed"), rows=tuple(
        (label[r], configs[r].model.name + "".join(f", {k}={v}" for k, v in configs[r].model.kwargs.items()),
         configs[r].optim.name + (f" (momentum {configs[r].optim.momentum})" if configs[r].optim.momentum else ""),
         f"{configs[r].optim.lr:g}", configs[r].schedule.name, str(configs[r].train.batch_size),
         str(summaries[r].epochs_completed), str(configs[r].seed)) for r in runs)))

    blocks.append(Block("h2", "2. Results"))
    blocks.append(Block("table", headers=("run", "train loss", "train acc", "val acc", "test acc", "examples/s",
                                           "wall s", "params", "FLOPs/image"), rows=tuple(
        (label[r], number_text(final(summaries[r], "train_loss")), number_text(final(summaries[r], "train_acc")),
         number_text(final(summaries[r], "val_acc")), number_text(summaries[r].test_acc),
         metric_text(summaries[r].train_examples_per_sec, "examples_per_sec"),
         metric_text(summaries[r].wall_seconds, "wall_seconds"),
         number_text(summaries[r].params, grouped=True), number_text(summaries[r].flops_per_image, grouped=True))
        for r in runs)))
    if any(len(entry["seeds"]) > 1 for entry in table):  # with one seed each, the table above says it all
        blocks.append(Block("p", "Across runs (mean ± std over seeds where there are several):"))
        from cnnlab.compare import table_headers, table_rows
        blocks.append(Block("table", headers=table_headers(table), rows=tuple(map(tuple, table_rows(table)))))
    blocks.append(Block("image", "Validation accuracy per epoch, every run",
                        path=plot_sweep_curves(table, assets / "compare-curves.png", title="validation accuracy")))
    blocks.append(Block("image", "Final test accuracy per variant (error bars: std over seeds)",
                        path=plot_accuracy_bars(table, assets / "compare-bars.png", title="test accuracy")))

    blocks.append(Block("h2", "3. Models"))
    seen_models: set[str] = set()
    lenet_run = None
    for run in runs:
        cfg, summary = configs[run], summaries[run]
        blocks.append(Block("h3", f"{label[run]} ({run.name})"))
        shape = (opened[run].spec.input_shape, opened[run].spec.num_classes)  # one model's table per data shape, too
        key = json.dumps([cfg.model.model_dump(), shape], sort_keys=True, default=str)
        if key not in seen_models:
            seen_models.add(key)
            with hushed():
                layers, flops = profile(build_model(cfg, spec=opened[run].spec), opened[run].spec.input_shape)
            blocks.append(Block("table", headers=("#", "layer", "output shape", "params", "FLOPs"), rows=tuple(
                (r.name, r.layer, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.flops:,}") for r in layers)))
            blocks.append(Block("p", f"{summary.params or 0:,} parameters, {flops:,} FLOPs per image."))
        target = assets / f"{run.parent.name}-{run.name}-curves.png"
        if copy_png(run / "curves.png", target):
            blocks.append(Block("image", f"{label[run]}: train and validation loss and accuracy per epoch",
                                path=target))
        if cfg.model.name == "lenet" and lenet_run is None and (run / "checkpoints" / "best.pt").is_file():
            lenet_run = run
    if lenet_run is None and any(configs[r].model.name == "lenet" for r in runs):
        warn("no LeNet run here has checkpoints/best.pt; the report has no feature maps")

    if lenet_run is not None:
        from cnnlab.visualize import visualize

        try:
            pictures = [visualize(lenet_run, layer, out=assets / f"lenet-layer{layer}.png", trust_code=trust_code)
                        for layer in ("0", "3")]
        except UserError as err:
            warn(f"{err}; the report has no feature maps")
            return blocks, found.skipped
        blocks.append(Block("h2", "4. What the convolutions see"))
        blocks.append(Block("p", f"Outputs of layer 0 (first convolution) and layer 3 (second convolution) of "
                                 f"{summaries[lenet_run].name} for the first test image, one tile per channel."))
        for picture in pictures:
            blocks.append(Block("image", f"Layer {picture.layer}: {picture.tiles} channels", path=picture.path))
    return blocks, found.skipped


MARKDOWN_SPECIAL = re.compile(r"([\\`*_$\[\]|])")


def md(text: str) -> str:
    """Text shown literally in Markdown: HTML escaped (run names may hold any characters), and the
    characters that would start code, emphasis, links or table cells backslash-escaped."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(printable(text), quote=False)).replace("\n", " ")


def to_markdown(blocks: list[Block], base: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(block.kind[1]) + " " + md(block.text), ""]
        elif block.kind == "p":
            lines += [md(block.text), ""]
        elif block.kind == "table":
            lines.append("| " + " | ".join(md(h) for h in block.headers) + " |")
            lines.append("|" + "---|" * len(block.headers))
            lines += ["| " + " | ".join(md(cell) for cell in row) + " |" for row in block.rows]
            lines.append("")
        elif block.kind == "image":
            target = "/".join(quote_path_part(part) for part in block.path.relative_to(base).parts)
            lines += [f"![{md(block.text)}]({target})", f"*{md(block.text)}*", ""]
    return "\n".join(lines)


def quote_path_part(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f1f3f6; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def to_html(blocks: list[Block]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cnnlab report</title>"
             f"<style>{HTML_STYLE}</style></head><body>"]
    for block in blocks:
        if block.kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{block.kind}>{html.escape(printable(block.text))}</{block.kind}>")
        elif block.kind == "table":
            head = "".join(f"<th>{html.escape(printable(h))}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(printable(c))}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block.kind == "image":
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(printable(block.text))}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(printable(block.text))}</figcaption></figure>")
    # Lets a headless browser report images that failed to load (scripts/screenshot_report.sh).
    parts.append("<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
                 "document.body.dataset.images = imgs.length; document.body.dataset.brokenImages = "
                 "imgs.filter(i => !i.complete || i.naturalWidth === 0).length; });</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


@dataclass
class Written:
    paths: list[Path]  # the report's files
    skipped: list[str]  # a line for each run or folder given that could not be read (left out, warned)


def write_report(targets: list[Path], out: Path, html_too: bool = False, trust_code: bool = False) -> Written:
    """Write ``out`` (Markdown, images in ``<stem>_files/`` beside it) and, with ``html_too``, ``out.html``.

    The images are drawn into a temporary folder that replaces ``<stem>_files/`` only once the whole
    report is built: a rejected input leaves nothing behind.
    """
    out = Path(out)
    check_output_file(out, "--output")
    if html_too:
        check_output_file(out.with_suffix(".html"), "--output")
    assets = out.parent / f"{out.stem}_files"
    check_output_file(assets, "--output", folder=True)  # replaced whole: a link or a file there is refused
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.stem}_files.{secrets.token_hex(6)}"
    building.mkdir()  # with the mode any folder of the user's gets (mkdtemp's would stay private, 0700)
    try:
        blocks, skipped = build_blocks([Path(t) for t in targets], building, trust_code)
        blocks = [Block(b.kind, b.text, b.headers, b.rows, assets / b.path.relative_to(building) if b.path else None)
                  for b in blocks]
        if assets.exists():
            shutil.rmtree(assets)
        building.rename(assets)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        for folder in created:  # deepest first: leave the disk as it was
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    atomic_write_text(out, to_markdown(blocks, out.parent))
    written = [out]
    if html_too:
        page = out.with_suffix(".html")
        atomic_write_text(page, to_html(blocks))
        written.append(page)
    return Written(written, skipped)
