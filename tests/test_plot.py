"""plot.py: metrics log parsing, curve PNGs checked by pixel colour, image grids, denormalisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from alexnet_pipe.errors import FormatError
from alexnet_pipe.plot import (
    ACC_SERIES,
    CURVES_SIZE,
    LOSS_SERIES,
    denormalize,
    draw_grid,
    grid_layout,
    nice_ticks,
    plot_curves,
    read_metrics,
)

TRAIN_COLOUR = LOSS_SERIES[0][2]
TOP1_COLOUR = ACC_SERIES[0][2]
HEADER_ROWS = 62  # title and legend band; legend swatches share the series colours


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def epoch_records(n: int) -> list[dict]:
    out = []
    for e in range(1, n + 1):
        out.append({
            "epoch": e, "lr": 0.01, "train_loss": 6.9 * math.exp(-e / 4) + 0.5,
            "val_loss": 7.0 * math.exp(-e / 4) + 0.8,
            "val_top1": 60 * (1 - math.exp(-e / 3)), "val_top5": 85 * (1 - math.exp(-e / 3)),
        })
    return out


def colour_pixels(png, colour, x_range):
    """(xs, ys) of pixels exactly ``colour`` inside the plot rows and the given column range."""
    arr = np.asarray(Image.open(png).convert("RGB"))
    mask = np.all(arr == colour, axis=-1)
    mask[:HEADER_ROWS] = False
    mask[:, : x_range[0]] = False
    mask[:, x_range[1]:] = False
    ys, xs = np.nonzero(mask)
    return xs, ys


# ---------------------------------------------------------------- read_metrics


def test_read_metrics_skips_blank_and_non_epoch_lines(tmp_path):
    recs = epoch_records(2)
    path = write_lines(tmp_path / "m.jsonl", [
        json.dumps(recs[0]), "", "   ", json.dumps({"event": "test", "top1": 40.0}), json.dumps(recs[1]),
    ])
    got = read_metrics(path)
    assert [r["epoch"] for r in got] == [1, 2]
    assert got[1]["val_top5"] == pytest.approx(recs[1]["val_top5"])


def test_read_metrics_names_the_malformed_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"epoch": 1, "train_loss": 2.0}), "", '{"epoch": 2, "train_', '{"epoch": 3}'])
    with pytest.raises(FormatError, match=r"m\.jsonl:3: not valid JSON"):
        read_metrics(path)


def test_read_metrics_rejects_non_numeric_metric_with_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"epoch": 1, "train_loss": "abc"})])
    with pytest.raises(FormatError, match=r":1: train_loss is 'abc'"):
        read_metrics(path)


def test_read_metrics_skips_unfinished_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"epoch": 1, "train_loss": 2.0}) + '\n{"epoch": 2, "tra')
    assert [r["epoch"] for r in read_metrics(path)] == [1]


def test_read_metrics_without_epochs_raises(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"event": "test", "top1": 55.0})])
    with pytest.raises(FormatError, match="no per-epoch records"):
        read_metrics(path)


# ---------------------------------------------------------------- curves


def test_nice_ticks_use_1_2_5_steps():
    assert nice_ticks(1.7, 6.9) == (0.0, 8.0, [0.0, 2.0, 4.0, 6.0, 8.0])
    lo, hi, ticks = nice_ticks(1, 90, target=6, integer=True)
    assert (lo, hi) == (0, 100) and ticks[1] - ticks[0] == 20
    assert nice_ticks(3, 3, integer=True)[2] == [2.0, 3.0, 4.0]


def test_plot_curves_draws_falling_loss_and_rising_accuracy(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in epoch_records(12)] + [json.dumps({"event": "test"})])
    out = plot_curves(read_metrics(path), tmp_path / "plots" / "curves.png", title="run 1")
    half = CURVES_SIZE[0] // 2
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == CURVES_SIZE
    assert not list((tmp_path / "plots").glob(".*tmp*"))

    xs, ys = colour_pixels(out, TRAIN_COLOUR, (0, half))
    assert len(xs) > 200, "train-loss curve missing from the left panel"
    mid = np.median(xs)
    # image y grows downwards: a falling loss sits lower (larger y) on the right
    assert ys[xs > mid].mean() > ys[xs < mid].mean() + 50
    assert len(colour_pixels(out, TRAIN_COLOUR, (half, CURVES_SIZE[0]))[0]) == 0

    xs, ys = colour_pixels(out, TOP1_COLOUR, (half, CURVES_SIZE[0]))
    assert len(xs) > 200, "top-1 curve missing from the right panel"
    mid = np.median(xs)
    assert ys[xs > mid].mean() < ys[xs < mid].mean() - 50


def test_plot_curves_single_epoch_draws_a_point(tmp_path):
    out = plot_curves([{"epoch": 1, "train_loss": 6.9}], tmp_path / "one.png")
    xs, ys = colour_pixels(out, TRAIN_COLOUR, (0, CURVES_SIZE[0] // 2))
    assert 10 < len(xs) < 100  # one marker, no line
    assert xs.max() - xs.min() <= 8 and ys.max() - ys.min() <= 8


def test_plot_curves_skips_non_finite_and_keeps_the_rest(tmp_path):
    recs = epoch_records(8)
    recs[4]["train_loss"] = float("nan")
    recs[5]["train_loss"] = float("inf")
    clean = plot_curves([dict(r, train_loss=None) if i in (4, 5) else r for i, r in enumerate(recs)], tmp_path / "a.png")
    noted = plot_curves(recs, tmp_path / "b.png")
    xs, _ = colour_pixels(noted, TRAIN_COLOUR, (0, CURVES_SIZE[0] // 2))
    assert len(xs) > 100
    # the NaN/inf version differs from the bridged one: a gap in the line, and the note
    top_a = np.asarray(Image.open(clean))[:HEADER_ROWS]
    top_b = np.asarray(Image.open(noted))[:HEADER_ROWS]
    assert (top_a != top_b).any()


def test_plot_curves_without_epoch_records_raises(tmp_path):
    with pytest.raises(ValueError, match="no epoch records"):
        plot_curves([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- grid


def test_draw_grid_geometry_and_native_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 72, 80, 3), dtype=np.uint8)
    out = draw_grid(images, [0, 1, 2, 0, 1, 2, 0], ["ant", "bee", "cat"], tmp_path / "g.png", cols=3,
                    captions=["flipped"] * 7)
    layout = grid_layout(7, 72, 80, cols=3, caption_lines=2)
    assert (layout.cols, layout.rows, layout.scale) == (3, 3, 1)
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[1] == 3 * layout.cell_w and grid.shape[0] == 3 * layout.cell_h
    assert layout.cell_w >= 80 and layout.cell_h > 72 + 2 * 16
    for i in (0, 4, 6):
        x, y = layout.tile_origin(i)
        np.testing.assert_array_equal(grid[y + 36, x + 40], images[i, 36, 40])
        np.testing.assert_array_equal(grid[y:y + 72, x:x + 80], images[i])


def test_draw_grid_upscales_small_images_by_whole_factor(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = draw_grid(images, [3, 4], [], tmp_path / "g.png")
    layout = grid_layout(2, 8, 8, cols=8)
    assert layout.cols == 2 and layout.scale == 8
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[:2] == layout.size[::-1]
    x, y = layout.tile_origin(1)
    np.testing.assert_array_equal(grid[y + 32, x + 32], images[1, 4, 4])


@pytest.mark.parametrize("images, msg", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"N x H x W x 3"),
])
def test_draw_grid_rejects_bad_input(tmp_path, images, msg):
    with pytest.raises(ValueError, match=msg):
        draw_grid(images, [0, 0], ["a"], tmp_path / "g.png")


def test_draw_grid_rejects_label_mismatch(tmp_path):
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        draw_grid(np.zeros((3, 8, 8, 3), np.uint8), [0, 0], ["a"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="outside class_names"):
        draw_grid(np.zeros((1, 8, 8, 3), np.uint8), [5], ["a"], tmp_path / "g.png")


# ---------------------------------------------------------------- denormalize

MEAN = (123.68, 116.78, 103.94)
STD = (58.4, 57.1, 57.4)


@pytest.mark.parametrize("std", [STD, None])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_denormalize_inverts_normalisation(layout, std):
    pixels = np.random.default_rng(2).integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    norm = pixels.astype(np.float32) - np.float32(MEAN)
    if std is not None:
        norm /= np.float32(std)
    if layout == "NCHW":
        norm = norm.transpose(0, 3, 1, 2)
    got = denormalize(norm, MEAN, std, layout)
    assert got.dtype == np.uint8 and got.shape == (3, 5, 6, 3)
    np.testing.assert_array_equal(got, pixels)


def test_denormalize_clips_and_validates():
    out = denormalize(np.array([[[[10.0, -10.0, 0.0]]]]), MEAN, STD, "NHWC")
    assert out.tolist() == [[[[255, 0, 104]]]]
    with pytest.raises(ValueError, match="layout"):
        denormalize(np.zeros((1, 3, 2, 2)), MEAN, None, "CHW")
    with pytest.raises(ValueError, match="check the layout"):
        denormalize(np.zeros((1, 3, 2, 2)), MEAN, None, "NHWC")
