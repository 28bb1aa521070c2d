"""tools/dali_sweep.py over a real converted dataset on the CPU, and the Loader's GPU start-up message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from alexnet_pipe.config import ConvertConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.errors import TrainingError
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.loading.pipeline import LoaderConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import dali_sweep


@pytest.fixture
def data(tmp_path, raw_tree) -> Path:
    run_convert(ConvertConfig(src=raw_tree, dst=tmp_path / "data", formats=("lmdb",), workers=1, progress=False))
    return tmp_path / "data"


def test_sweep_writes_a_row_per_setting_and_the_best(data, tmp_path):
    out = tmp_path / "sweep.json"
    rc = dali_sweep.main([str(data), "-o", str(out), "--cpu", "--batch", "4", "--threads", "1,2",
                          "--base-threads", "1", "--prefetch", "1,2", "--seconds", "0.2", "--warmup", "1"])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["varied"], r["threads"], r["prefetch"]) for r in rows[:3]] == [
        ("base", 1, 2), ("threads", 2, 2), ("prefetch", 1, 1)]
    assert rows[-1]["varied"] == "best"
    for r in rows:
        assert r["kind"] == "loader" and r["img_per_s"] > 0 and r["timed_images"] > 0
        assert r["hw_decoder_load"] is None  # no hardware-decoder rows where decoding is on the CPU
    # the last row combines each knob's best value among the rows that vary it (and the base)
    for knob in ("threads", "prefetch"):
        cands = [r for r in rows[:-1] if r["varied"] in ("base", knob)]
        assert rows[-1][knob] == max(cands, key=lambda r: r["img_per_s"])[knob]


def test_sweep_budget_skips_the_rest(data, tmp_path):
    out = tmp_path / "sweep.json"
    dali_sweep.main([str(data), "-o", str(out), "--cpu", "--batch", "4", "--threads", "1,2", "--base-threads", "1",
                     "--prefetch", "2", "--seconds", "0.2", "--warmup", "1", "--budget-s", "0"])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["img_per_s"] > 0  # the first setting always runs
    assert all(r.get("skipped") == "budget spent" for r in rows[1:]) and len(rows) == 3


def test_prefetch_depth_keeps_the_batches(data):
    ds = load_dataset(data)
    a = [b.labels for b in Loader(ds, LoaderConfig("train", True, 4, crop=32, seed=3))]
    b = [b.labels for b in Loader(ds, LoaderConfig("train", True, 4, crop=32, seed=3, prefetch=4))]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_gpu_loader_without_a_gpu_says_so_in_one_line(data):
    with pytest.raises(TrainingError) as info:
        Loader(load_dataset(data), LoaderConfig("train", True, 4, crop=32, device_id=0))
    text = str(info.value)
    assert text.startswith("cannot start DALI on GPU 0: DALI cannot reach an NVIDIA GPU") and "\n" not in text
