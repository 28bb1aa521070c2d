"""Tiny converted datasets and trained weights, made through the real converter and CLI."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree
from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert

# One quick CPU epoch at the network's smallest crop.
TRAIN_FAST = ["-b", "cpu", "--crop", "67", "-z", "4", "--no-progress", "--data-threads", "1", "-e", "1",
              "--eval-freq", "0"]


def shapes_dataset(root: Path, short_side: int = 72, classes: tuple[str, ...] = ("circle", "square"), train: int = 4,
                   val: int = 2, seed: int = 2, formats: tuple[str, ...] = ("lmdb",), shard_size: int = 10) -> Path:
    """Drawn shapes (``train`` / ``val`` per class) in ``root/raw``, converted to ``root/data`` at ``short_side``."""
    make_image_tree(SynthConfig(root / "raw", train, val, (96, 72), classes, seed=seed))
    run_convert(ConvertConfig(src=root / "raw", dst=root / "data", formats=formats, shard_size=shard_size, workers=1,
                              progress=False, image=ImageSettings(short_side=short_side)))
    return root / "data"


def train_one_epoch(data: Path, weights: Path) -> Path:
    """``alexnet-pipe train`` for one quick epoch on ``data``; the weights file written."""
    res = CliRunner().invoke(main, ["train", "-w", str(data), *TRAIN_FAST, "-s", str(weights)])
    assert res.exit_code == 0, res.output
    return weights


def tree_dataset(root: Path, train: int = 2, val: int = 1, short_side: int = 72) -> Path:
    """``make_tree``'s smooth JPEGs (classes "ant", "bee", "cat"; ``train`` / ``val`` each, 96x72)
    in ``root/raw``, converted to ``root/data`` at ``short_side``."""
    from tests.helpers.images import make_tree

    make_tree(root / "raw", {"train": train, "val": val}, sizes=((96, 72),))
    run_convert(ConvertConfig(src=root / "raw", dst=root / "data", workers=1, progress=False,
                              image=ImageSettings(short_side=short_side)))
    return root / "data"
