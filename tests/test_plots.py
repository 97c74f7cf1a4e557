"""The figures read at a glance: every point visible, whole-number epochs, bars from zero, no caption
over a picture. Tested on the figure objects the plot functions build, drawn as they are saved."""


import numpy as np
import pytest
from PIL import Image

from cnnlab.plots import (
    FEW_POINTS,
    accuracy_bars_figure,
    curves_figure,
    error_grid_figure,
    plot_curves,
    plt,
    sweep_curves_figure,
    tune_progress_figure,
)
from cnnlab.results import write_metrics_csv


def metric_rows(epochs: int) -> list[dict[str, float]]:
    return [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.8 - 0.1 / e, "val_loss": 1.1 / e, "val_acc": 0.78 - 0.1 / e,
             "lr": 0.1, "epoch_seconds": 3.0, "train_examples_per_sec": 100.0} for e in range(1, epochs + 1)]


@pytest.fixture
def close_figures():
    yield
    plt.close("all")


def shown_xticks(ax) -> list[str]:
    """The x tick labels matplotlib draws (inside the axis limits), after a draw."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]


def assert_whole_number_ticks(ax, last: int):
    labels = shown_xticks(ax)
    assert labels and all(text.isdigit() for text in labels), labels
    assert {int(text) for text in labels} <= set(range(1, last + 1)), labels


@pytest.mark.parametrize("epochs", [1, 2, 20])
def test_run_curves_show_every_point_both_losses_and_whole_epochs(epochs, close_figures):
    fig = curves_figure(metric_rows(epochs), "lenet")
    loss, acc = fig.axes
    assert [line.get_label() for line in loss.get_lines()] == ["train loss", "val loss"]
    assert [line.get_label() for line in acc.get_lines()] == ["train accuracy", "val accuracy"]
    for ax in (loss, acc):
        for line in ax.get_lines():
            assert line.get_marker() not in (None, "None", "", " "), line.get_label()  # one epoch is a dot, not nothing
            assert len(line.get_xdata()) == epochs
        assert_whole_number_ticks(ax, epochs)
    if epochs <= 2:
        assert shown_xticks(loss) == [str(e) for e in range(1, epochs + 1)]


def test_long_curves_are_plain_lines(close_figures):
    fig = curves_figure(metric_rows(FEW_POINTS + 1), "lenet")
    assert all(line.get_marker() in (None, "None", "") for line in fig.axes[0].get_lines())


def test_plot_curves_writes_the_png_of_a_one_epoch_run(tmp_path):
    write_metrics_csv(tmp_path / "metrics.csv", metric_rows(1))
    out = plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", title="one epoch")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > image.height


@pytest.mark.parametrize("epochs", [1, 2, 20])
def test_sweep_curves_mark_points_and_tick_whole_epochs(epochs, tmp_path, close_figures):
    table = []
    for name in ("lenet_k3", "lenet_k5"):
        run = tmp_path / name
        run.mkdir()
        write_metrics_csv(run / "metrics.csv", metric_rows(epochs))
        table.append({"name": name, "run_dirs": [str(run)]})
    fig = sweep_curves_figure(table, "kernels")
    [ax] = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["lenet_k3", "lenet_k5"]
    assert all(line.get_marker() not in (None, "None", "") for line in ax.get_lines())
    assert_whole_number_ticks(ax, epochs)  # one epoch used to be ticked 0.95, 0.975, 1.0, ...


def test_bars_start_at_zero_with_each_value_written(close_figures):
    table = [{"name": n, "test_acc": (m, 0.002), "val_acc": (None, None)}
             for n, m in (("lenet_k3", 0.533), ("lenet_k5", 0.633), ("lenet_k7", 0.546), ("tiny", 0.05))]
    [ax] = accuracy_bars_figure(table, "kernels").axes
    assert ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.texts] == ["0.533", "0.633", "0.546", "0.050"]
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for text, bar in zip(ax.texts, ax.patches):  # inside its bar, or just above a bar too short to hold it
        box, top = text.get_window_extent(renderer), bar.get_window_extent(renderer)
        assert top.x0 <= box.x0 and box.x1 <= top.x1
        assert box.y1 <= top.y1 or box.y0 >= top.y1
    assert not ax.title.get_window_extent(renderer).overlaps(ax.texts[1].get_window_extent(renderer))
    assert len(ax.containers) == 2  # the bars and their error bars over seeds


LONG_NAMES = ["lenet[model.activation=relu,optim.lr=0.05,train.batch_size=128]", "lenet[model.activation=sigmoid]",
              "lenet", "resnet18_with_a_name_longer_than_any_bar_is_wide", "lenet[data.root=/data/some/where/else]",
              "vgg11[optim.name=adamw,optim.weight_decay=0.05]", "nin", "googlenet[model.width=0.5]"]


@pytest.mark.parametrize("bars", [2, 4, 8])
def test_long_variant_names_under_bars_never_overprint(bars, tmp_path):
    table = [{"name": name, "test_acc": (0.5 + 0.01 * i, 0.0), "val_acc": (None, None)}
             for i, name in enumerate(LONG_NAMES[:bars])]
    fig = accuracy_bars_figure(table, "kernels")
    [ax] = fig.axes
    fig.savefig(tmp_path / "bars.png")  # laid out as it is saved
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels()]
    assert [label.get_text().replace("\n", "") for label in ax.get_xticklabels()] == LONG_NAMES[:bars]
    for i, box in enumerate(boxes):
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0, (i, box, fig.bbox)
        for other in boxes[i + 1:]:
            assert not box.overlaps(other), (box, other)
    plt.close(fig)


def test_bars_of_single_runs_draw_no_error_bars(close_figures):
    table = [{"name": n, "test_acc": (m, 0.0), "val_acc": (None, None)} for n, m in (("a", 0.5), ("b", 0.6))]
    [ax] = accuracy_bars_figure(table).axes
    assert len(ax.containers) == 1  # a zero spread is one seed, not a measured spread: no caps


def test_bars_say_when_they_fall_back_to_validation_accuracy(close_figures):
    table = [{"name": "a", "test_acc": (None, None), "val_acc": (0.7, 0.0)}]
    assert accuracy_bars_figure(table).axes[0].get_ylabel() == "test accuracy (validation where no test)"


@pytest.mark.parametrize("tiles", [0, 1, 7, 36])
def test_error_tile_captions_stay_clear_of_the_picture_above(tiles, close_figures):
    pictures = [(np.full((28, 28), 40 * (i % 6), dtype=np.uint8), f"#{i}\nAnkle boot\n-> T-shirt/top") for i in range(tiles)]
    fig = error_grid_figure(pictures, "first misclassified test images (true -> predicted)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    for k in range(6, tiles):
        caption, above = axes[k].title.get_window_extent(renderer), axes[k - 6].get_window_extent(renderer)
        assert caption.y1 <= above.y0, f"the caption of tile {k} reaches into the picture above it"
    top_row = max(axis.title.get_window_extent(renderer).y1 for axis in axes[:6])
    assert fig.get_suptitle() and fig._suptitle.get_window_extent(renderer).y0 >= top_row


@pytest.mark.parametrize("trials", [1, 2, 20])
def test_tune_progress_ticks_whole_trials(trials, close_figures):
    [ax] = tune_progress_figure([0.5 + 0.01 * i for i in range(trials)], "val_acc", "max", "lenet").axes
    assert_whole_number_ticks(ax, trials)
