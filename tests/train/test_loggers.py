"""Loggers: TensorBoard scalars through torch.utils.tensorboard, per-step rows, plain progress lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from alexnet_pipe import progress
from alexnet_pipe.config import TrainConfig
from alexnet_pipe.train import loop as train
from tests.helpers.datasets import shapes_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loggers")
    return shapes_dataset(root, classes=("circle", "square", "hstripes"), train=6, val=2, seed=4)


def cfg(data: Path, **kw) -> TrainConfig:
    base = dict(backend="cpu", datatype="f32", crop=67, batch_size=4, lr=0.001, lr_scale="none", progress=False,
                data_threads=1, epochs=2, log_every=1)
    return TrainConfig(data_dir=data, **{**base, **kw})


def test_tensorboard_gets_step_and_epoch_scalars(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train.fit(cfg(data, tensorboard_dir=tmp_path / "tb", output_file=tmp_path / "m.jsonl"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "lr", "val/loss", "val/top1", "speed/img_per_s", "speed/data_wait_pct",
            "train/loss_epoch"} <= tags
    assert "val/top5" not in tags  # 3 classes: top-5 says nothing, so it is not reported
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))  # 5 steps x 2 epochs, global axis
    assert [e.step for e in events.Scalars("val/top1")] == [5, 10]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "step" in r]
    assert [(r["epoch"], r["step"]) for r in step_rows] == [(e, s) for e in (1, 2) for s in range(1, 6)]
    assert all(0 <= r["data_wait_s"] for r in step_rows)
    tb = {round(e.value, 5) for e in events.Scalars("train/loss")}
    assert {round(r["train_loss"], 5) for r in step_rows} == tb  # the same figures in both


def test_plain_progress_lines_when_not_on_a_terminal(data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="alexnet_pipe.train"):
        train.fit(cfg(data, epochs=1, progress=True, progress_bar=False, eval_freq=0))
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert lines and lines[0].startswith("epoch 1/1 step 1/5: loss ")
    assert "img/s, data wait" in lines[0]
    messages = [r.getMessage() for r in caplog.records]
    train_line = next(i for i, m in enumerate(messages) if m.startswith("epoch 1: train loss"))
    assert train_line > messages.index(lines[-1])


def test_missing_tensorboard_package_says_how_to_install(data, tmp_path, monkeypatch):
    import sys

    from alexnet_pipe.errors import AlexnetPipeError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(AlexnetPipeError, match=r"pip install 'alexnet-pipe\[tensorboard\]'"):
        train.fit(cfg(data, epochs=1, tensorboard_dir=tmp_path / "tb"))
