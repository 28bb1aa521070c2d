"""The training loader's speed settings on the CPU: ROI decoding gives the same pixels, the reader
processes all work at once, and the DALI knobs reach the pipeline from `train` and the sweep."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet_pipe.cli import train as train_cmd
from alexnet_pipe.config import ConvertConfig, ImageSettings, TrainConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.loading.epoch_source import EpochSource
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.loading.pipeline import LoaderConfig, build_pipeline
from alexnet_pipe.train.loop import fit
from alexnet_pipe.train.runtime import open_run
from tests.helpers.images import make_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import dali_sweep

from tests.helpers.datasets import shapes_dataset

CROP = 67


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """4 classes of drawn shapes, 6 train / 2 val each, stored at short side 72 (and 96 on the long side)."""
    root = tmp_path_factory.mktemp("knobs")
    return shapes_dataset(root, classes=("circle", "square", "hstripes", "vstripes"), train=6, val=2, seed=5,
                          formats=("lmdb", "recordio"))


def _batches(ds, cfg: LoaderConfig, epoch: int = 0) -> list:
    loader = Loader(ds, cfg, epoch)
    try:
        return [(b.images.clone(), b.labels.clone(), b.flipped.clone()) for b in loader]
    finally:
        loader.close()


@pytest.mark.parametrize("reader", ["lmdb", "recordio"])
def test_roi_decoding_gives_the_pixels_of_a_whole_decode(shapes, reader):
    """Decoding only the crop window (fn.decoders.image_crop) places the window as crop_mirror_normalize
    did: the training batches (random crops and flips) and the val batches (centre crops) are the same
    images, pixel for pixel (DALI's CPU decoder is libjpeg-turbo in both paths; no tolerance needed)."""
    ds = load_dataset(shapes)
    for split, train in (("train", True), ("val", False)):
        base = dict(split=split, train=train, batch_size=4, crop=CROP, seed=7, reader=reader, channels_last=True,
                    mean=(120.0, 110.0, 100.0), num_threads=1)
        whole = _batches(ds, LoaderConfig(**base, roi_decode=False), epoch=2)
        roi_loader = Loader(ds, LoaderConfig(**base, roi_decode=True), 2)
        assert roi_loader.cfg.roi_decode  # every stored image is at least the crop: ROI decoding stays on
        roi_loader.close()
        roi = _batches(ds, LoaderConfig(**base, roi_decode=True), epoch=2)
        assert len(whole) == len(roi) >= 2
        for (a, la, fa), (b, lb, fb) in zip(whole, roi):
            assert torch.equal(la, lb) and torch.equal(fa, fb)
            assert torch.equal(a, b), f"{split}: max difference {float((a - b).abs().max())}"
        if train:
            assert any(f.any() for _, _, f in roi) and not all(f.all() for _, _, f in roi)


def test_roi_decoding_is_off_for_images_smaller_than_the_crop(tmp_path):
    """The ROI decoder cannot pad a window past the image (DALI fails the whole pipeline): a split
    with images below the crop (--no-upscale) falls back to decoding whole and padding."""
    make_tree(tmp_path / "raw", {"train": 4, "val": 2}, sizes=((60, 50), (120, 90)))
    run_convert(ConvertConfig(src=tmp_path / "raw", dst=tmp_path / "data", shard_size=10, workers=1, progress=False,
                              image=ImageSettings(short_side=72, upscale=False)))
    ds = load_dataset(tmp_path / "data")
    assert not ds.all_at_least("train", CROP) and ds.all_at_least("train", 40)
    loader = Loader(ds, LoaderConfig("train", True, batch_size=4, crop=CROP, num_threads=1))
    assert loader.cfg.roi_decode is False
    assert sum(len(b.labels) for b in loader) == 12
    loader.close()
    small_crop = Loader(ds, LoaderConfig("train", True, batch_size=4, crop=40, num_threads=1))
    assert small_crop.cfg.roi_decode is True  # every image holds a 40 x 40 window
    assert sum(len(b.labels) for b in small_crop) == 12
    small_crop.close()


class _SlowSource(EpochSource):
    """The real source, each batch taking 0.4 s, with when each batch was read written to a folder
    (DALI runs it in spawned reader processes: files are how they report back)."""

    def __init__(self, *args, log_dir: str, **kw):
        super().__init__(*args, **kw)
        self.log_dir = log_dir

    def __call__(self, info):
        began = time.time()
        time.sleep(0.4)
        out = super().__call__(info)
        Path(self.log_dir, f"{info.epoch_idx}-{info.iteration}").write_text(f"{began} {time.time()}")
        return out


def _most_at_once(log_dir: Path) -> int:
    spans = [tuple(map(float, p.read_text().split())) for p in log_dir.iterdir()]
    return max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)


def test_every_reader_process_has_a_batch_in_flight(shapes, tmp_path):
    """DALI hands a whole batch to one reader process and keeps the source's queue depth of batches
    in flight. With a queue of only the pipeline's prefetch (2), a third reader process never worked
    at the same time as the other two; the queue now holds a batch per reader plus the prefetch."""
    from alexnet_pipe.dataset.records import record_table
    from alexnet_pipe.loading.order import OrderConfig

    ds = load_dataset(shapes)
    cfg = LoaderConfig("train", True, batch_size=2, crop=CROP, read_workers=3, prefetch=2, num_threads=1)
    table = record_table(ds, "train", "lmdb")
    source = _SlowSource(table, OrderConfig(len(table), True, 0), cfg.batch_size, 0, log_dir=str(tmp_path))
    pipe = build_pipeline(source, cfg)
    pipe.build()
    try:
        for _ in range(6):
            pipe.run()
    finally:
        del pipe
    assert _most_at_once(tmp_path) >= 3


def test_train_flags_reach_the_loader_and_the_metrics(shapes, tmp_path):
    """--hw-decoder-load, --jpeg-fancy-upsampling, --prefetch, --data-threads, --read-workers and
    --no-roi-decode: parsed by `train`, carried by TrainConfig into the loader's settings, recorded
    in every epoch row of -o."""
    ctx = train_cmd.make_context("train", ["-w", str(shapes), "-b", "cpu", "--hw-decoder-load", "0.9",
                                           "--jpeg-fancy-upsampling", "--prefetch", "3", "--data-threads", "1",
                                           "--read-workers", "1", "--no-roi-decode"])
    p = ctx.params
    assert (p["hw_decoder_load"], p["jpeg_fancy_upsampling"], p["prefetch"], p["roi_decode"]) == (0.9, True, 3, False)
    cfg = TrainConfig(data_dir=shapes, backend="cpu", crop=CROP, batch_size=8, data_threads=1, read_workers=1,
                      hw_decoder_load=0.9, jpeg_fancy_upsampling=True, prefetch=3, roi_decode=False, epochs=1,
                      eval_freq=0, progress=False, output_file=tmp_path / "m.jsonl", lr=0.001, lr_scale="none")
    rt = open_run(cfg)
    lc = rt.loader_config("train", True)
    assert (lc.hw_decoder_load, lc.jpeg_fancy_upsampling, lc.prefetch, lc.roi_decode, lc.read_workers,
            lc.num_threads) == (0.9, True, 3, False, 1, 1)
    rt.close()
    fit(cfg)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    epoch = next(r for r in rows if r.get("epoch") == 1 and "step" not in r)
    assert epoch["loader"] == {"read_workers": 1, "data_threads": 1, "prefetch": 3, "source_queue": 4,
                               "hw_decoder_load": 0.9, "jpeg_fancy_upsampling": True, "roi_decode": False,
                               "device": "cpu"}
    with pytest.raises(ValueError, match="--hw-decoder-load"):
        TrainConfig(data_dir=shapes, hw_decoder_load=1.5)


def test_the_sweep_prints_the_train_command_of_its_best_row(shapes, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = dali_sweep.main([str(shapes), "-o", str(out), "--cpu", "--batch", "4", "--threads", "1,2",
                          "--base-threads", "1", "--prefetch", "2,3", "--seconds", "0.2", "--warmup", "1"])
    assert rc == 0
    result = json.loads(out.read_text())
    best = max((r for r in result["rows"] if r.get("img_per_s")), key=lambda r: r["img_per_s"])
    assert f"train with the best setting: {result['train_command']}" in capsys.readouterr().out
    argv = shlex.split(result["train_command"])
    assert argv[:2] == ["alexnet-pipe", "train"]
    params = train_cmd.make_context("train", argv[2:]).params
    assert (params["data_threads"], params["prefetch"], params["read_workers"], params["batch_size"]) == (
        best["threads"], best["prefetch"], best["read_workers"], best["batch_size"])
    assert params["data_dir"] == shapes and params["backend"] == "cpu"
    assert all(r["read_workers"] == 0 for r in result["rows"] if r.get("img_per_s"))  # train's default on the CPU


def test_test_command_takes_the_loader_flags(shapes):
    from alexnet_pipe.cli import test_cmd

    params = test_cmd.make_context("test", ["-w", str(shapes), "--model-file", str(shapes / "manifest.json"),
                                            "--prefetch", "4", "--no-roi-decode"]).params
    assert params["prefetch"] == 4 and params["roi_decode"] is False
