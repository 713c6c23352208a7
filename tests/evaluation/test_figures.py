"""The figures read on their own: titles, labels, legends and marks checked on matplotlib's objects.

Each figure is rendered from a small fixture the way ``evaluate`` / ``gradcam`` render it.
"""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_tf.explain import cam
from pneumo_tf.evaluation import report


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    labels = (rng.random(120) < 0.6).astype(int)
    probs = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, 120), 0.001, 0.999)
    return labels, probs


def _texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_roc_and_pr_carry_the_split_n_and_the_operating_point(scored):
    labels, probs = scored
    for fig_fn, name in ((report.roc_figure, "ROC curve"),
                         (report.pr_figure, "Precision-recall curve")):
        fig = fig_fn(labels, probs, 0.5, "test")
        ax = fig.axes[0]
        assert ax.get_title() == f"{name}: test split (n = 120)"
        legend = _texts(ax)
        assert any(t.startswith("threshold 0.500:") for t in legend), legend
        op = report._operating_point(labels, probs, 0.5)
        marker = [line for line in ax.get_lines() if line.get_marker() == "o"]
        assert len(marker) == 1
        x, y = marker[0].get_data()
        if name == "ROC curve":
            assert (x[0], y[0]) == pytest.approx((op["fpr"], op["tpr"]))
        else:
            assert (x[0], y[0]) == pytest.approx((op["tpr"], op["precision"]))
        report.plt.close(fig)


def test_reliability_marks_scale_with_counts_and_the_legend_covers_no_data(scored):
    labels, probs = scored
    calibrated = np.clip(probs * 0.9 + 0.05, 0, 1)
    fig = report.reliability_figure(labels, probs, calibrated, split="val")
    ax = fig.axes[0]
    assert ax.get_title().startswith("Reliability diagram: val split (n = 120)")
    before, after = ax.collections[:2]
    sizes = before.get_sizes()
    counts = [int(t.get_text()) for t in ax.texts]
    assert sum(counts) == 120 and len(sizes) == len(counts)
    assert np.argmax(sizes) == np.argmax(counts)  # the biggest marker is the busiest bin
    legend = ax.get_legend()
    fig.canvas.draw()
    legend_box = legend.get_window_extent()
    axes_box = ax.get_window_extent()
    assert legend_box.y1 <= axes_box.y0 + 1  # below the axes: over no data point
    assert any(t.startswith("before (ECE = ") for t in _texts(ax))
    report.plt.close(fig)


def test_gradcam_grid_has_a_title_captions_a_colour_bar_and_no_empty_cells():
    rng = np.random.default_rng(1)
    tiles = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    captions = [cam.tile_caption(f"test/PNEUMONIA/person{i}_bacteria_{i}.jpeg", 0.9 + i / 100)
                for i in range(6)]
    title = "Grad-CAM FN (false negatives), test split, 6 images\nthreshold 0.420 (calibration 'val')"
    fig = cam.grid_figure(tiles, captions, title)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 6 and len(fig.axes) == 7  # six tiles and the colour bar
    assert fig._suptitle.get_text() == title
    assert image_axes[0].get_title() == "person0_bacteria_0\np = 0.900"
    bar = [ax for ax in fig.axes if not ax.images][0]
    assert bar.get_ylabel() == "Grad-CAM intensity (per image, 0-1)"
    # Tiles do not touch: a gap between the first two tiles of a row.
    fig.canvas.draw()
    a, b = (ax.get_position() for ax in image_axes[:2])
    assert b.x0 - a.x1 > 0.005
    report.plt.close(fig)


@pytest.mark.parametrize("n,cols", [(6, 6), (16, 8), (12, 6), (7, 7), (11, 8), (3, 3)])
def test_grid_columns_leave_no_empty_cell_when_they_can(n, cols):
    assert cam.grid_columns(n) == cols


def test_tile_caption_shortens_long_names():
    caption = cam.tile_caption("a/" + "x" * 40 + ".png", 0.25)
    assert caption == "x" * 19 + "...\np = 0.250"


def test_confusion_and_histogram_name_the_threshold(scored):
    labels, probs = scored
    confusion = {"tn": 30, "fp": 18, "fn": 10, "tp": 62}
    fig = report.confusion_figure(confusion, 0.42)
    assert fig.axes[0].get_title() == "Confusion matrix (threshold 0.420)"
    report.plt.close(fig)
    fig = report.histogram_figure(labels, probs, 0.42)
    assert "threshold 0.420" in _texts(fig.axes[0])
    report.plt.close(fig)


def test_training_curves_name_their_y_axes_and_tick_whole_epochs():
    history = {"epoch": np.arange(4.0), "loss": np.array([0.7, 0.5, 0.4, 0.35]),
               "val_loss": np.array([0.6, 0.5, 0.45, 0.44]), "auc": np.linspace(0.7, 0.95, 4),
               "val_auc": np.linspace(0.75, 0.93, 4)}
    fig = report.training_curves_figure(history)
    fig.canvas.draw()
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["loss", "ROC AUC"]
    for ax in axes:
        assert ax.get_xlabel() == "epoch"
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
