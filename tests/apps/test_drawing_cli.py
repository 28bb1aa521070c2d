"""`plot`, `inspect` and `benchmark` through the CLI: drawings in each format, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe.cli import main
from tests.helpers.datasets import tree_dataset
from tests.helpers.pixels import find_block, is_pdf, rgb, svg_text

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res, *fragments: str) -> None:
    """Exit code 1 or 2, a single error line that holds ``fragments``, and no traceback."""
    assert res.exit_code in (1, 2), res.output
    assert isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}"  # CliRunner hides tracebacks
    lines = [line for line in res.output.splitlines() if line.strip()]
    if res.exit_code == 2:  # click's usage error: its usage and --help hint, then the one error line
        lines = [line for line in lines if not line.startswith(("Usage:", "Try '"))]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 classes ("ant", "bee", "cat"), 2 train and 1 val image each, stored at short side 72."""
    return tree_dataset(tmp_path_factory.mktemp("drawing"))


def test_plot_writes_svg(tmp_path):
    rows = [{"epoch": e, "train_loss": 3.0 / e, "lr": 0.01, "img_per_s": 80.0} for e in (1, 2)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run("plot", tmp_path / "m.jsonl", "-o", tmp_path / "out" / "c.svg")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"wrote {tmp_path / 'out' / 'c.svg'}"
    assert "train loss" in svg_text(tmp_path / "out" / "c.svg")


def test_plot_mistakes_give_one_line(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04\x00\x00\x08\x00\xff\xfe binary weights")
    assert_one_line_error(run("plot", tmp_path / "w.pt", "-o", tmp_path / "c.png"), "w.pt", "not a text file")
    (tmp_path / "m.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    assert_one_line_error(run("plot", tmp_path / "m.jsonl", "-o", tmp_path / "c.jpg"), ".png, .svg or .pdf")
    (tmp_path / "plots").mkdir()
    assert_one_line_error(run("plot", tmp_path / "m.jsonl", "-o", tmp_path / "plots"), "plots")
    assert_one_line_error(run("plot", tmp_path / "plots"), "plots")  # a folder as the log
    (tmp_path / "empty.jsonl").write_text("")
    assert_one_line_error(run("plot", tmp_path / "empty.jsonl", "-o", tmp_path / "c.png"), "no per-epoch rows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "m.jsonl", "plots", "w.pt"]


@NO_GPU
def test_gpu_backend_without_a_gpu_gives_one_line(tmp_path):
    assert_one_line_error(run("inspect", tmp_path, "-b", "gpu", "-o", tmp_path / "g.png"), "-b gpu", "-b cpu")
    assert_one_line_error(run("benchmark", "-b", "gpu", "--iterations", "3"), "-b gpu", "-b cpu")


def test_inspect_draws_a_titled_grid(dataset, tmp_path):
    res = run("inspect", dataset, "-o", tmp_path / "g.svg", "--crop", "67", "-n", "4", "--epoch", "2")
    assert res.exit_code == 0, res.output
    text = svg_text(tmp_path / "g.svg")
    for expected in ("data, train split, epoch 2, seed 0", "crop 67, mean subtracted"):
        assert expected in text
    assert sum(text.count(f"{i} {name}") for i, name in enumerate(("ant", "bee", "cat"))) == 4
    res = run("inspect", dataset, "-o", tmp_path / "g.pdf", "--crop", "67", "-n", "3", "--split", "val")
    assert res.exit_code == 0, res.output
    assert is_pdf(tmp_path / "g.pdf")
    assert_one_line_error(run("inspect", dataset, "-o", tmp_path / "g.bmp"), ".png, .svg or .pdf")


def test_inspect_mean_draws_the_mean_image_under_a_title(dataset, tmp_path):
    res = run("inspect", dataset, "--mean", "-o", tmp_path / "mean.png")
    assert res.exit_code == 0, res.output
    stored = np.clip(np.rint(np.load(dataset / "mean_image.npy")), 0, 255).astype(np.uint8)
    assert stored.shape == (72, 72, 3)
    # below 96 px: drawn twice as large, each pixel as it is stored
    assert find_block(rgb(tmp_path / "mean.png"), stored.repeat(2, axis=0).repeat(2, axis=1)) is not None
    assert run("inspect", dataset, "--mean", "-o", tmp_path / "mean.svg").exit_code == 0
    assert "data: mean image 72x72, over 6 train images" in svg_text(tmp_path / "mean.svg")
