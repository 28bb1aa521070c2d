"""Every text the product draws lies inside its figure: the drawn extent of each text artist is
measured against the figure's box, with long class names and long paths (nothing cut at an edge)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from alexnet_pipe.apps.image_grid import image_figure
from alexnet_pipe.apps.inspect import grid_title, mean_figure
from alexnet_pipe.apps.plot import curves_figure
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.train.report import PerClass, per_class_figure
from tests.helpers.images import make_tree

LONG_DIR = "imagenet-2012-" + "with-a-very-long-folder-name-" * 5 + "end"
LONG_NAMES = ["a class whose name goes on and on well past any tile", "x" * 70, "bee",
              "Greater_Swiss_Mountain_dog_and_friends_of_the_alps", "cat"]


def outside(fig, monkeypatch) -> list[str]:
    """The texts drawn (visible, not empty) whose extent leaves ``fig.bbox``, each with its extent."""
    drawn: list[Text] = []
    draw = Text.draw

    def recording(self, renderer):
        if self.get_visible() and self.get_text():
            drawn.append(self)
        return draw(self, renderer)

    monkeypatch.setattr(Text, "draw", recording)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    monkeypatch.setattr(Text, "draw", draw)
    renderer, box = canvas.get_renderer(), fig.bbox
    assert drawn, "no text was drawn"
    bad = []
    for text in drawn:
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 0.5 or extent.y0 < box.y0 - 0.5 or extent.x1 > box.x1 + 0.5 or \
                extent.y1 > box.y1 + 0.5:
            bad.append(f"{text.get_text()!r} at {extent.bounds} in {box.bounds}")
    return bad


@pytest.mark.parametrize("n, cols", [(8, 8), (1, 8), (5, 2)])
def test_inspect_grid_texts_fit(monkeypatch, n, cols):
    images = np.zeros((n, 32, 32, 3), np.uint8)
    captions = [f"{i} {LONG_NAMES[i % len(LONG_NAMES)]}\nflipped" for i in range(n)]
    title = grid_title(Path("/data") / LONG_DIR, "train", 224, True, 0, 7)
    assert outside(image_figure(images, captions, cols, title), monkeypatch) == []


@pytest.fixture(scope="module")
def long_named_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fits")
    make_tree(root / "raw", {"train": 1}, sizes=((96, 72),))
    run_convert(ConvertConfig(src=root / "raw", dst=root / LONG_DIR, workers=1, progress=False,
                              image=ImageSettings(short_side=72)))
    return root / LONG_DIR


def test_inspect_mean_title_fits(long_named_dataset, monkeypatch):
    fig = mean_figure(long_named_dataset)
    assert LONG_DIR in " ".join(t.get_text() for t in fig.texts).replace("\n", "")  # wrapped, not cut
    assert outside(fig, monkeypatch) == []
    assert outside(mean_figure(long_named_dataset), monkeypatch) == []


@pytest.mark.parametrize("k", [2, 5, 30])
def test_per_class_figure_texts_fit(monkeypatch, k):
    rng = np.random.default_rng(k)
    confusion = rng.integers(0, 5, (k, k)) + np.diag(rng.integers(0, 20, k))
    per_class = PerClass(confusion, confusion.sum(axis=1))
    ids = [f"n{i:08d}" for i in range(k)]
    names = [LONG_NAMES[i % len(LONG_NAMES)] for i in range(k)]
    fig = per_class_figure(per_class.table(ids, names), per_class.confused_pairs(20), ids, names, 20)
    assert outside(fig, monkeypatch) == []


def test_curves_texts_fit(monkeypatch):
    rows = [{"epoch": e, "train_loss": 3.0 / e, "val_loss": float("nan") if e == 2 else 3.5 / e,
             "val_top1": 2.0 * e, "lr": 0.01, "img_per_s": 900.0 + e, "world_size": 1 if e < 30 else 8,
             "global_batch": 128 if e < 30 else 1024}
            for e in range(1, 31)]  # the run went on with 8 ranks for its last epoch: a note at the right edge
    title = str(Path("/home/someone/experiments") / LONG_DIR / "runs" / "2024-05-01" / "metrics.jsonl")
    fig = curves_figure(rows, title=title)
    assert any("8 ranks" in t.get_text() for ax in fig.axes for t in ax.texts)  # the note at the last epoch
    assert outside(fig, monkeypatch) == []
