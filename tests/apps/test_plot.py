"""plot.py: metrics log parsing, resume detection, curves and grids drawn by matplotlib as PNG/SVG/PDF."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alexnet_pipe.apps.image_grid import denormalize, draw_grid, draw_image, image_figure
from alexnet_pipe.apps.plot import RESUME_LABEL, curves_figure, epoch_rows, plot_curves, read_metrics
from alexnet_pipe.errors import AlexnetPipeError, FormatError
from alexnet_pipe.train.loggers import MetricsLog
from tests.helpers.pixels import find_block, is_pdf, rgb, svg_text


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def epoch_records(n: int, first: int = 1) -> list[dict]:
    out = []
    for e in range(first, first + n):
        out.append({
            "epoch": e, "lr": 0.01 * 0.1 ** ((e - 1) // 5), "train_loss": 6.9 * math.exp(-e / 4) + 0.5,
            "val_loss": 7.0 * math.exp(-e / 4) + 0.8, "val_top1": 60 * (1 - math.exp(-e / 3)),
            "val_top5": 85 * (1 - math.exp(-e / 3)), "img_per_s": 1000.0 + e, "world_size": 1, "global_batch": 128,
        })
    return out


def panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def line(ax, label):
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


# ---------------------------------------------------------------- read_metrics


def test_read_metrics_skips_blank_test_and_step_rows(tmp_path):
    recs = epoch_records(2)
    path = write_lines(tmp_path / "m.jsonl", [
        json.dumps(recs[0]), "", "   ", json.dumps({"event": "test", "val_top1": 40.0}),
        json.dumps({"epoch": 2, "step": 40, "loss": 2.0, "lr": 0.01}), json.dumps(recs[1]),
        json.dumps({"event": "resumed", "after_epoch": 2}),
    ])
    got = read_metrics(path)
    assert [r.get("epoch", r.get("event")) for r in got] == [1, 2, "resumed"]
    assert got[1]["val_top5"] == pytest.approx(recs[1]["val_top5"])


def test_read_metrics_names_the_malformed_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"epoch": 1}), "", '{"epoch": 2, "train_', '{"epoch": 3}'])
    with pytest.raises(FormatError, match=r"m\.jsonl:3: not valid JSON"):
        read_metrics(path)


def test_read_metrics_rejects_non_numeric_metric_with_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"epoch": 1, "img_per_s": "fast"})])
    with pytest.raises(FormatError, match=r":1: img_per_s is 'fast'"):
        read_metrics(path)


def test_read_metrics_skips_unfinished_last_line_only_after_good_ones(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"epoch": 1, "train_loss": 2.0}) + '\n{"epoch": 2, "tra')
    assert [r["epoch"] for r in read_metrics(path)] == [1]
    path.write_text("hello")  # one line of prose is no log being written
    with pytest.raises(FormatError, match=":1: not valid JSON"):
        read_metrics(path)


def test_read_metrics_without_epochs_raises(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"event": "test", "val_top1": 55.0})])
    with pytest.raises(FormatError, match="no per-epoch rows"):
        read_metrics(path)


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b'{"epoch": 1}\n\xff\xfe\n'])
def test_read_metrics_on_a_binary_file_names_it(tmp_path, data):
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=r"weights\.pt is not a text file"):
        read_metrics(path)


def test_read_metrics_names_the_byte_that_is_not_text_from_the_start_of_the_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"epoch": 1, "train_loss": 2.0}\n{"epoch": 2,\xff}\n')
    with pytest.raises(FormatError, match=r"m\.jsonl is not a text file \(byte 44 is not UTF-8 text\)"):
        read_metrics(path)


def test_read_metrics_refuses_a_line_over_the_limit_naming_it(tmp_path):
    from alexnet_pipe.apps.plot import MAX_LINE

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"epoch": 1, "train_loss": 2.0}) + "\n" + " " * (MAX_LINE + 1) + "\n")
    with pytest.raises(FormatError, match=r"m\.jsonl:2: a line over 1 MiB, not a metrics row"):
        read_metrics(path)
    path.write_text(json.dumps({"epoch": 1, "train_loss": 2.0, "pad": "x" * (MAX_LINE - 100)}) + "\n")
    assert read_metrics(path)[0]["epoch"] == 1  # up to the limit: read


PEAK = """
import sys
from pathlib import Path
from alexnet_pipe.apps.plot import read_metrics
rows = read_metrics(Path(sys.argv[1]))
print(len(rows), [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


@pytest.mark.faults
def test_a_long_log_is_read_in_little_memory(tmp_path):
    """90 epochs of per-step rows (5,000 a epoch, 70 MB): read a line at a time. It was read whole,
    as bytes, text and a list of lines: 179 MB peak."""
    import subprocess
    import sys

    path = tmp_path / "metrics.jsonl"
    step = {"train_loss": 2.0, "lr": 0.01, "img_per_s": 1234.5, "note": "x" * 60}
    with open(path, "w") as f:
        for epoch in range(1, 91):
            f.writelines(json.dumps({"epoch": epoch, "step": s, **step}) + "\n" for s in range(1, 5001))
            f.write(json.dumps(epoch_records(1, epoch)[0]) + "\n")
    assert path.stat().st_size > 60e6
    done = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, peak_kib = map(int, done.stdout.split())
    print(f"{path.stat().st_size / 1e6:.0f} MB log: peak {peak_kib / 1024:.0f} MiB")
    assert rows == 90 and peak_kib * 1024 < path.stat().st_size / 2


# ---------------------------------------------------------------- resume points


def test_epoch_rows_finds_resume_points():
    plain = epoch_records(4)
    assert epoch_rows(plain)[1] == []
    # an old log appended by a resumed run: epochs go back, the later rows win
    rows, resumes = epoch_rows(epoch_records(3) + epoch_records(3, first=2))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and resumes == [1]
    assert rows[1]["train_loss"] == epoch_records(3, first=2)[0]["train_loss"]
    assert epoch_rows(epoch_records(3, first=5))[1] == [4]  # a fresh log begun by a resumed run
    wider = epoch_records(4)
    for r in wider[2:]:
        r.update(world_size=4, global_batch=512)
    assert epoch_rows(wider)[1] == [2]
    marked = epoch_records(2) + [{"event": "resumed", "after_epoch": 2}] + epoch_records(2, first=3)
    assert epoch_rows(marked)[1] == [2]
    assert epoch_rows(epoch_records(2) + [dict(epoch_records(1, first=3)[0], resumed=True)])[1] == [2]


def test_metrics_log_marks_a_resume_that_plot_reads(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.start(None)
    for r in epoch_records(4):
        log.write(r)
    log.start(2)  # resumed from the checkpoint after epoch 2: rows 3 and 4 go, a marker comes
    for r in epoch_records(3, first=3):
        log.write(r)
    log.start(4)
    log.start(4)  # crashed again before epoch 5 ended: still one marker for it
    rows, resumes = epoch_rows(read_metrics(tmp_path / "m.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and resumes == [2, 4]


def test_a_mid_epoch_resume_is_drawn_where_it_happened(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.start(None)
    recs = [dict(r, samples=1280) for r in epoch_records(3)]  # 10 steps of 128 an epoch
    for r in recs[:2]:
        log.write(r)
    log.write({"epoch": 3, "step": 4, "train_loss": 2.0, "lr": 0.01})
    log.start(2, 4)  # stopped after 4 of epoch 3's 10 steps, then resumed there
    assert epoch_rows(read_metrics(tmp_path / "m.jsonl"))[1] == [pytest.approx(2.4)]  # not yet an epoch 3 row
    log.write(recs[2])
    rows, resumes = epoch_rows(read_metrics(tmp_path / "m.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2, 3] and resumes == [pytest.approx(2.4)]
    fig = curves_figure(read_metrics(tmp_path / "m.jsonl"))
    marks = [ln for ln in panel(fig, "loss").get_lines() if ln.get_label() == RESUME_LABEL]
    assert list(marks[0].get_xdata()) == [pytest.approx(2.4)] * 2
    on_two = [dict(r, samples=1280, world_size=2, global_batch=256) for r in epoch_records(1, first=3)]
    resumed = recs[:2] + [{"event": "resumed", "after_epoch": 2, "after_step": 2}] + on_two
    assert epoch_rows(resumed)[1] == [pytest.approx(2.4)]  # 5 steps of 2 x 128: step 2 is 40% in


# ---------------------------------------------------------------- curves


def test_curves_figure_draws_every_panel(tmp_path):
    fig = curves_figure(epoch_records(12), title="run 1")
    loss = line(panel(fig, "loss"), "train loss").get_ydata()
    assert len(loss) == 12 and loss[-1] < loss[0] / 3
    top1 = line(panel(fig, "accuracy"), "val top-1").get_ydata()
    assert top1[-1] > top1[0] + 30
    assert panel(fig, "learning rate").get_yscale() == "log"
    assert list(line(panel(fig, "throughput"), "img/s").get_xdata()) == list(range(1, 13))
    assert not any(ln.get_label() == RESUME_LABEL for ax in fig.axes for ln in ax.get_lines())
    assert panel(fig, "loss").get_xlim() == (0.5, 12.5)


def resumed_rows() -> list[dict]:
    rows = epoch_records(3) + [{"event": "resumed", "after_epoch": 3}] + epoch_records(3, first=4)
    for r in rows[4:]:
        r.update(world_size=2, global_batch=256)
    return rows


def test_resumed_run_is_marked_on_every_panel():
    fig = curves_figure(resumed_rows())
    for ax in fig.axes:
        marks = [ln for ln in ax.get_lines() if ln.get_label() == RESUME_LABEL]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [3, 3]
    assert [t.get_text() for t in panel(fig, "throughput").texts] == ["2 ranks, batch 256"]


def test_curves_in_png_svg_and_pdf(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in resumed_rows() + [{"event": "test"}]])
    out = tmp_path / "plots"
    out.mkdir()
    (out / "c.png").write_bytes(b"an older drawing")
    for suffix in ("png", "svg", "pdf"):
        assert plot_curves(read_metrics(path), out / f"c.{suffix}", title="run 7") == out / f"c.{suffix}"
    assert rgb(out / "c.png").shape == (750, 1100, 3)  # replaced
    text = svg_text(out / "c.svg")
    for expected in ("run 7", "epoch", "loss", "val top-5", "accuracy %", "lr (log scale)", "img/s", "2 ranks"):
        assert expected in text
    assert text.count(RESUME_LABEL) == 4  # the legend entry of each panel
    assert is_pdf(out / "c.pdf")
    assert sorted(p.name for p in out.iterdir()) == ["c.pdf", "c.png", "c.svg"]  # no temp file left


def test_one_epoch_log_is_drawn_around_its_point():
    fig = curves_figure([{"epoch": 1, "train_loss": 6.9, "val_loss": 7.0, "lr": 0.01, "img_per_s": 50.0}])
    ax = panel(fig, "loss")
    assert ax.get_xlim() == (0.5, 1.5)
    ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 1.5]
    assert ticks == [1]
    train = line(ax, "train loss")
    assert train.get_marker() == "o" and train.get_markersize() >= 4
    assert "not in this log" in [t.get_text() for t in panel(fig, "accuracy").texts]


def test_non_finite_values_leave_a_gap_and_a_note():
    recs = epoch_records(8)
    recs[4]["train_loss"] = float("nan")
    recs[5]["train_loss"] = float("inf")
    fig = curves_figure(recs)
    ys = line(panel(fig, "loss"), "train loss").get_ydata()
    assert np.isnan(ys[4]) and np.isnan(ys[5]) and np.isfinite(ys[[0, 3, 6, 7]]).all()
    assert "values left out (NaN, inf, lr <= 0): 2" in [t.get_text() for t in fig.texts]
    assert not [t for t in curves_figure(epoch_records(8)).texts if "left out" in t.get_text()]


def test_a_missing_value_is_bridged():
    recs = epoch_records(4)
    del recs[1]["val_loss"], recs[2]["val_loss"]  # evaluated every 3 epochs
    val = line(panel(curves_figure(recs), "loss"), "val loss")
    assert list(val.get_xdata()) == [1, 4] and np.isfinite(val.get_ydata()).all()


def test_wrong_output_paths_are_refused_before_drawing(tmp_path):
    rows = epoch_records(2)
    with pytest.raises(AlexnetPipeError, match=r"must end in \.png, \.svg or \.pdf"):
        plot_curves(rows, tmp_path / "c.gif")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(AlexnetPipeError, match="is a directory"):
        plot_curves(rows, tmp_path / "d.png")
    (tmp_path / "f").write_text("x")
    with pytest.raises(AlexnetPipeError, match="is a file, not a directory"):
        plot_curves(rows, tmp_path / "f" / "c.png")
    with pytest.raises(AlexnetPipeError, match="cannot write"):  # the aside name is too long for the file system
        draw_image(np.zeros((2, 2, 3), np.uint8), tmp_path / ("c" * 250 + ".png"))
    with pytest.raises(ValueError, match="no epoch rows"):
        plot_curves([], tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "f"]


# ---------------------------------------------------------------- grids


def test_grid_tiles_keep_their_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 100, 112, 3), dtype=np.uint8)  # >= 96 px: drawn at native size
    out = draw_grid(images, [0, 1, 2, 0, 1, 2, 0], ["ant", "bee", "cat"], tmp_path / "g.png", cols=3,
                    captions=["flipped", ""] * 3 + ["flipped"], title="tiny, train split")
    grid = rgb(out)
    spots = [find_block(grid, images[i]) for i in range(7)]
    assert None not in spots
    ys, xs = sorted({y for y, _ in spots}), sorted({x for _, x in spots})
    assert len(ys) == 3 and len(xs) == 3  # 3 columns, 3 rows, in reading order
    assert spots[4] == (ys[1], xs[1]) and spots[6] == (ys[2], xs[0])


def test_grid_draws_small_images_larger_by_a_whole_factor(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    grid = rgb(draw_grid(images, [3, 4], [], tmp_path / "g.png"))
    assert find_block(grid, images[1].repeat(12, axis=0).repeat(12, axis=1)) is not None


def test_grid_in_svg_and_pdf_with_title_and_labels(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    args = ([2, 0, 1], ["ant", "bee", "a class with a name far too long for its tile"])
    draw_grid(images, *args, tmp_path / "g.svg", captions=["flipped", "", ""], title="tiny, val split\ncrop 16")
    text = svg_text(tmp_path / "g.svg")
    for expected in ("tiny, val split", "crop 16", "2 a class with", "0 ant", "1 bee", "flipped"):
        assert expected in text
    assert "far too long for its tile" not in text  # cut to the tile's width
    draw_grid(images, *args, tmp_path / "g.pdf")
    assert is_pdf(tmp_path / "g.pdf")


def test_draw_image_keeps_pixels_under_a_title(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    drawn = rgb(draw_image(image, tmp_path / "m.png", "mean image"))
    assert find_block(drawn, image.repeat(3, axis=0).repeat(3, axis=1)) is not None  # 40 px -> x3 to reach 96
    draw_image(image, tmp_path / "m.svg", "mean image 40x30")
    assert "mean image 40x30" in svg_text(tmp_path / "m.svg")


def test_image_figure_layout_scales_with_the_grid():
    small = image_figure(np.zeros((3, 32, 32, 3), np.uint8), ["a"] * 3, cols=8)
    big = image_figure(np.zeros((7, 32, 32, 3), np.uint8), ["a"] * 7, cols=3)
    assert len(small.axes) == 3 and len(big.axes) == 9
    assert big.get_size_inches()[1] > 2 * small.get_size_inches()[1]


@pytest.mark.parametrize("images, msg", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"N x H x W x 3"),
    (np.zeros((0, 8, 8, 3), np.uint8), "not empty"),
])
def test_draw_grid_rejects_bad_input(tmp_path, images, msg):
    with pytest.raises(ValueError, match=msg):
        draw_grid(images, [0, 0], ["a"], tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


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
