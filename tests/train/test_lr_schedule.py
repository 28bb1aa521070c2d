"""Large-batch warm-up and the cosine schedule (issue 22, section 4): ``lr_at`` against hand-computed
values, real CPU runs that record the lr each step used, a mid-epoch resume that continues the
same lr sequence, and the options recorded (and their absence when off)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe.apps.plot import curves_figure
from alexnet_pipe.cli import main
from alexnet_pipe.config import TrainConfig
from alexnet_pipe.model import checkpoint
from alexnet_pipe.train.loop import fit, lr_at, warmup_factor
from tests.helpers.datasets import shapes_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 classes x 6 train images: 3 steps per epoch at -z 8, one at -z 256."""
    root = tmp_path_factory.mktemp("lrs")
    return shapes_dataset(root, classes=("circle", "square", "hstripes", "vstripes"), train=6, val=1, seed=5)


def tcfg(data: Path, **kw) -> TrainConfig:
    base = {"backend": "cpu", "datatype": "f32", "crop": 67, "batch_size": 8, "lr": 0.001, "lr_scale": "none",
            "progress": False, "data_threads": 1, "eval_freq": 0, "log_every": 1}
    return TrainConfig(data_dir=data, **{**base, **kw})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- lr_at


def test_warmup_is_linear_per_step_from_lr_over_k_to_the_scheduled_lr():
    # 8 GPUs x 256: k = 2048 / 128 = 16; 5 epochs of 100 steps; base 0.16 (neon's 0.01 x 16)
    kw = {"steps_per_epoch": 100, "warmup_epochs": 5, "warmup_k": warmup_factor(2048)}
    assert warmup_factor(2048) == 16 and warmup_factor(128) == 1 and warmup_factor(8) == 1
    assert lr_at(0, 0.16, **kw) == pytest.approx(0.01)  # the first step: lr / k
    assert lr_at(2, 0.16, batch_step=50, **kw) == pytest.approx(0.16 * (1 / 16 + 15 / 16 * 2.5 / 5))  # 0.085
    assert lr_at(4, 0.16, batch_step=99, **kw) == pytest.approx(0.16 * (1 / 16 + 15 / 16 * 4.99 / 5))
    assert lr_at(5, 0.16, **kw) == 0.16 and lr_at(18, 0.16, batch_step=7, **kw) == 0.16  # then neon's rule
    assert lr_at(19, 0.16, **kw) == pytest.approx(0.016)
    # warm-up climbs to what the step rule gives at that epoch (here x0.1 after epoch 2)
    assert lr_at(1, 0.16, 2, 0.1, **kw) == pytest.approx(0.016 * (1 / 16 + 15 / 16 * 1 / 5))
    # per step: strictly rising through the warm-up
    seq = [lr_at(e, 0.16, batch_step=s, **kw) for e in range(5) for s in range(100)]
    assert all(a < b for a, b in zip(seq, seq[1:]))


def test_cosine_falls_per_step_from_the_lr_to_zero_after_the_warmup():
    kw = {"steps_per_epoch": 4, "schedule": "cosine", "epochs": 10}
    assert lr_at(0, 0.1, **kw) == 0.1
    assert lr_at(5, 0.1, **kw) == pytest.approx(0.05)  # half way
    assert lr_at(2, 0.1, batch_step=2, **kw) == pytest.approx(0.05 * (1 + math.cos(math.pi * 2.5 / 10)))
    assert lr_at(9, 0.1, batch_step=3, **kw) == pytest.approx(0.05 * (1 + math.cos(math.pi * 9.75 / 10)))
    assert 0 < lr_at(9, 0.1, batch_step=3, **kw) < 1e-3
    # 2 epochs of warm-up at k = 4, then the cosine over the 8 epochs left
    warm = {**kw, "warmup_epochs": 2, "warmup_k": 4.0}
    assert lr_at(0, 0.1, **warm) == pytest.approx(0.025)
    assert lr_at(1, 0.1, batch_step=2, **warm) == pytest.approx(0.1 * (0.25 + 0.75 * 1.5 / 2))
    assert lr_at(2, 0.1, **warm) == pytest.approx(0.1)
    assert lr_at(6, 0.1, **warm) == pytest.approx(0.05)
    # the lr_step / lr_gamma of the step rule play no part in cosine
    assert lr_at(6, 0.1, 1, 0.5, **warm) == lr_at(6, 0.1, **warm)


def test_lr_at_is_a_pure_function_of_epoch_step_and_config():
    kw = {"steps_per_epoch": 7, "schedule": "cosine", "epochs": 6, "warmup_epochs": 2, "warmup_k": 3.0}
    points = [(e, s) for e in range(6) for s in range(7)]
    first = {p: lr_at(p[0], 0.05, batch_step=p[1], **kw) for p in points}
    random.Random(0).shuffle(points)  # any order, any number of calls: the same values
    assert {p: lr_at(p[0], 0.05, batch_step=p[1], **kw) for p in points} == first
    # off: neon's rule, the same at every step of an epoch
    for epoch in (0, 18, 19, 45):
        assert {lr_at(epoch, 0.01, batch_step=s, steps_per_epoch=9) for s in range(9)} == {lr_at(epoch, 0.01)}


# ---------------------------------------------------------------- real runs


def test_a_warmup_run_starts_at_lr_over_k_and_reaches_the_scheduled_lr(data, tmp_path):
    """-z 256: k = 2, the scaled lr 0.002 (--lr-scale linear); one step per epoch on 24 images."""
    metrics = tmp_path / "m.jsonl"
    res = fit(tcfg(data, batch_size=256, lr_scale="linear", epochs=2, warmup_epochs=1, output_file=metrics,
                   save_path=tmp_path / "w.pt", serialize=1))
    got = rows(metrics)
    steps = [(r["epoch"], r["step"], r["lr"]) for r in got if "step" in r]
    assert steps == [(1, 1, pytest.approx(0.001)), (2, 1, pytest.approx(0.002))]  # base / k, then the base
    epochs = [r for r in got if "step" not in r]
    assert [(r["lr"], r["lr_last"]) for r in epochs] == [(pytest.approx(0.001),) * 2, (pytest.approx(0.002),) * 2]
    assert [(r["lr_schedule"], r["warmup_epochs"]) for r in epochs] == [("step", 1)] * 2
    assert res.history == epochs
    body = checkpoint.load(tmp_path / "w.ckpt")
    assert body["train_config"]["warmup_epochs"] == 1
    assert "lr_schedule" not in body["train_config"]  # step: stored only when not neon's (config.STORED_WHEN_SET)
    assert [g["lr"] for g in body["optimizer"]["param_groups"]] == pytest.approx([0.002, 0.004])  # biases 2x
    # off (the default): nothing new in the rows or the stored config, as before these options existed
    plain = tmp_path / "p.jsonl"
    fit(tcfg(data, batch_size=256, lr_scale="linear", epochs=1, output_file=plain, save_path=tmp_path / "p.pt"))
    [row] = [r for r in rows(plain) if "step" not in r]
    assert "lr_last" not in row and "warmup_epochs" not in row and row["lr"] == pytest.approx(0.002)
    stored = checkpoint.load(tmp_path / "p.pt")["train_config"]
    assert "warmup_epochs" not in stored and "lr_schedule" not in stored


def step_lrs(path: Path) -> list[tuple]:
    return [(r["epoch"], r["step"], r["lr"]) for r in rows(path) if "step" in r]


def test_a_mid_epoch_resume_continues_the_same_lr_sequence(data, tmp_path):
    """Cosine after a 1-epoch warm-up, 2 epochs of 3 steps, a checkpoint after every step; a resume
    from inside the second epoch uses, step for step, the lrs (and so the weights) of the run never stopped."""
    run = {"epochs": 2, "lr_schedule": "cosine", "warmup_epochs": 1}
    straight = tmp_path / "a.jsonl"
    fit(tcfg(data, **run, output_file=straight, save_path=tmp_path / "a.pt", checkpoint_minutes=1e-6,
             keep_checkpoints=8))
    lrs = step_lrs(straight)
    # k = 1 at -z 8 (the warm-up holds 0.001), then cos over epoch 2: t - 1 = 0, 1/3, 2/3
    assert lrs == [(e, s, pytest.approx(lr)) for e, s, lr in [(1, 1, 0.001), (1, 2, 0.001), (1, 3, 0.001),
                                                               (2, 1, 0.001), (2, 2, 0.00075), (2, 3, 0.00025)]]
    ckpts = [checkpoint.load(p) for p in sorted(tmp_path.glob("a.ckpt*"))]
    [mid] = [b for b in ckpts if (b["epoch"], b["partial"]["step"]) == (1, 1)]
    source = tmp_path / "mid.ckpt"
    checkpoint.save(source, mid)
    resumed = tmp_path / "b.jsonl"
    shutil.copy(straight, resumed)
    fit(tcfg(data, **run, model_file=source, output_file=resumed, save_path=tmp_path / "b.pt"))
    assert step_lrs(resumed) == lrs  # the steps before the checkpoint kept, the rest identical
    a, b = checkpoint.load(tmp_path / "a.pt")["model"], checkpoint.load(tmp_path / "b.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # a resume that changes the options says so, like any other change
    changed = tmp_path / "c.jsonl"
    shutil.copy(straight, changed)
    fit(tcfg(data, epochs=2, model_file=source, output_file=changed, save_path=tmp_path / "c.pt"))
    [marker] = [r for r in rows(changed) if r.get("event") == "resumed"]
    assert marker["changed"] == {"warmup_epochs": [1, 0], "lr_schedule": ["cosine", "step"]}
    assert {lr for e, _, lr in step_lrs(changed) if e == 2} == {0.001}  # neon's rule again


def test_cli_options_and_plot_draw_the_lr_within_each_epoch(data, tmp_path):
    metrics = tmp_path / "m.jsonl"
    res = CliRunner().invoke(main, ["train", "-w", str(data), "-b", "cpu", "--crop", "67", "-z", "8", "--no-progress",
                                    "--data-threads", "1", "-e", "2", "--eval-freq", "0", "--lr", "0.001",
                                    "--lr-scale", "none", "--lr-schedule", "cosine", "--warmup-epochs", "1",
                                    "-o", str(metrics),
                                    "-s", str(tmp_path / "w.pt")])
    assert res.exit_code == 0, res.output
    epochs = [r for r in rows(metrics) if "step" not in r]
    assert epochs[1]["lr"] == pytest.approx(0.001) and epochs[1]["lr_last"] == pytest.approx(0.00025)
    ax = next(ax for ax in curves_figure(epochs).axes if ax.get_title() == "learning rate")
    [lr] = [ln for ln in ax.get_lines() if ln.get_label().startswith("lr")]
    assert list(lr.get_xdata()) == [0, 1, 1, 2]
    assert list(lr.get_ydata()) == pytest.approx([0.001, 0.001, 0.001, 0.00025])
    bad = CliRunner().invoke(main, ["train", "-w", str(data), "--lr-schedule", "linear"])
    assert bad.exit_code == 2 and "'linear' is not one of 'step', 'cosine'" in bad.output
    bad = CliRunner().invoke(main, ["train", "-w", str(data), "--warmup-epochs", "-1"])
    assert bad.exit_code == 2 and "--warmup-epochs" in bad.output
