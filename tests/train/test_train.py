"""Training system on tiny converted data: schedule, steps, resume, evaluation, pipeline, errors."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings, TrainConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import load_dataset_mean
from alexnet_pipe.errors import CheckpointError, OldMeanFormatError
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.loading.pipeline import LoaderConfig
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNet, AlexNetConfig
from alexnet_pipe.model.params import param_groups
from alexnet_pipe.train.evaluate import EvalResult, run_test, topk_correct
from alexnet_pipe.train.loop import fit, lr_at
from alexnet_pipe.train.runtime import Runtime
from tests.helpers.datasets import shapes_dataset
from tests.helpers.images import make_tree
from tests.helpers.pixels import find_block

CROP = 67  # the smallest crop the network takes: fast CPU steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 classes of drawn shapes, 6 train / 2 val each, stored at short side 72."""
    root = tmp_path_factory.mktemp("tiny")
    return shapes_dataset(root, classes=("circle", "square", "hstripes", "vstripes"), train=6, val=2, seed=3,
                          formats=("lmdb", "recordio"))


def tcfg(data: Path, **kw) -> TrainConfig:
    base = {"backend": "cpu", "datatype": "f32", "crop": CROP, "batch_size": 8, "lr": 0.001, "lr_scale": "none",
            "progress": False, "data_threads": 1}
    base.update(kw)
    return TrainConfig(data_dir=data, **base)


def test_learning_rate_schedule_matches_neon_for_90_epochs():
    for epoch in range(91):
        assert lr_at(epoch, 0.01) == pytest.approx(0.01 * 0.1 ** math.floor((epoch + 1) / 20))
        assert lr_at(epoch, 0.02) == pytest.approx(0.02 * 0.1 ** math.floor((epoch + 1) / 20))
    assert lr_at(18, 0.01) == pytest.approx(0.01) and lr_at(19, 0.01) == pytest.approx(0.001)
    assert lr_at(89, 0.01) == pytest.approx(0.01 * 1e-4)


def test_fit_applies_schedule_to_both_parameter_groups(tiny, tmp_path):
    res = fit(tcfg(tiny, epochs=3, lr=0.001, lr_step=2, eval_freq=0, save_path=tmp_path / "w.pt",
                   serialize=1))
    assert [r["lr"] for r in res.history] == pytest.approx([0.001, 1e-4, 1e-4])
    body = checkpoint.load(tmp_path / "w.ckpt")
    groups = body["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["weights", "biases"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 2e-4])
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]


def test_one_step_lowers_the_loss():
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=4, crop=CROP), generator=torch.Generator().manual_seed(0))
    # lr 0.001: on pixel-scale inputs the full 0.01 overshoots in one step (see NEON_ALEXNET.md)
    opt = torch.optim.SGD(param_groups(model, 0.001, 5e-4), lr=0.001, momentum=0.9)
    x, y = torch.randn(8, 3, CROP, CROP) * 50, torch.arange(8) % 4
    model.eval()  # no dropout: the comparison is about the update, not the mask
    before = F.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    after = F.cross_entropy(model(x), y)
    assert after.item() < before.item()


def test_small_set_is_overfitted():
    """The network and the optimizer recipe (two groups, momentum, weight decay) memorise 8 images.

    Dropout off, since memorisation is what is tested; the kaiming init, since with neon's the
    first hundreds of steps on tiny data learn nothing (see model.init_weights).
    """
    import numpy as np

    from alexnet_pipe.apps.synthetic import draw_image

    rng = np.random.default_rng(0)
    classes = ("circle", "square", "hstripes", "vstripes")
    images = [np.asarray(draw_image(c, (CROP, CROP), rng, texture=0.3), np.float32) for c in classes for _ in range(2)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    x = x - x.mean(dim=(0, 2, 3), keepdim=True)
    y = torch.tensor([k for k in range(4) for _ in range(2)])
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=4, crop=CROP, dropout=0.0), generator=torch.Generator().manual_seed(1),
                    init="kaiming")
    opt = torch.optim.SGD(param_groups(model, 0.002, 5e-4), lr=0.002, momentum=0.9)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert (logits.argmax(1) == y).all()
    assert F.cross_entropy(logits, y).item() < 0.05 * first


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path):
    straight = fit(tcfg(tiny, epochs=3, save_path=tmp_path / "a.pt", eval_freq=0))
    fit(tcfg(tiny, epochs=1, save_path=tmp_path / "b1.pt", serialize=1, eval_freq=0))
    assert checkpoint.load(tmp_path / "b1.ckpt")["epoch"] == 1
    resumed = fit(tcfg(tiny, epochs=3, model_file=tmp_path / "b1.ckpt", save_path=tmp_path / "b.pt", eval_freq=0))
    a, b = checkpoint.load(tmp_path / "a.pt")["model"], checkpoint.load(tmp_path / "b.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    # a different seed really gives different weights (the comparison above can fail)
    fit(tcfg(tiny, epochs=1, save_path=tmp_path / "c.pt", eval_freq=0, rng_seed=5))
    c = checkpoint.load(tmp_path / "c.pt")["model"]
    assert not torch.equal(c["conv1.weight"], checkpoint.load(tmp_path / "b1.pt")["model"]["conv1.weight"])


def test_weights_file_loads_with_weights_only_and_carries_its_settings(tiny, tmp_path):
    fit(tcfg(tiny, epochs=1, save_path=tmp_path / "w.pt", eval_freq=0))
    body = torch.load(tmp_path / "w.pt", weights_only=True)
    assert body["kind"] == "weights" and body["model_config"] == {"num_classes": 4, "crop": CROP, "dropout": 0.5}
    assert body["data"]["classes"] == ["circle", "hstripes", "square", "vstripes"]
    assert body["data"]["mean_rgb"] == pytest.approx(list(load_dataset_mean(tiny).mean))
    assert body["train_config"]["lr"] == 0.001
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left nothing behind


def test_topk_on_known_logits():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 0, 0, 0, 0, 9], [0, 9, 8, 7, 6, 5]])
    labels = torch.tensor([0, 0, 0, 0])
    top1, top5 = topk_correct(logits, labels, (1, 5))
    # sample 0: rank 1; sample 1: rank 6; sample 2: rank 2; sample 3: rank 6
    assert (top1.item(), top5.item()) == (1, 2)
    top1, top5 = topk_correct(logits[:, :3], labels, (1, 5))  # fewer classes than k: top-3
    assert top5.item() == 4


def test_test_only_equals_a_direct_computation(tiny, tmp_path):
    fit(tcfg(tiny, epochs=1, save_path=tmp_path / "w.pt", eval_freq=0))
    reported = run_test(tcfg(tiny, test_only=True, model_file=tmp_path / "w.pt", output_file=tmp_path / "m.jsonl"))
    # Direct: load the weights, run the same validation pipeline, compute the numbers by hand.
    ds = load_dataset(tiny)
    rt = Runtime(tcfg(tiny), ds, load_dataset_mean(tiny))
    model = AlexNet(AlexNetConfig(num_classes=4, crop=CROP))
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True)["model"])
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in rt.loader("val", False, 0):
            logits.append(model(batch.images))
            labels.append(batch.labels)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert len(labels) == 8
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)
    assert reported.samples == 8
    assert reported.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert reported.top1 == pytest.approx(100.0 * (ranks < 1).float().mean().item())
    assert reported.top5 is None  # 4 classes: every label is in the top 5, so no top-5 is reported
    assert (ranks < 5).all()
    line = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert line["event"] == "test" and line["val_top1"] == reported.top1
    assert EvalResult(1.8712, 58.6, 81.1, 1).neon_line() == "LogLoss: 1.87, Accuracy: 58.6 % (Top-1), 81.1 % (Top-5)"
    assert EvalResult(1.8712, 58.6, None, 1).neon_line() == "LogLoss: 1.87, Accuracy: 58.6 % (Top-1)"


def _stored_images(data: Path) -> list[np.ndarray]:
    out = []
    for path in load_dataset(data).lmdb_paths("train"):
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            out += [np.asarray(Image.open(io.BytesIO(decode_datum(v).data)).convert("RGB")) for _, v in txn.cursor()]
    return out


def test_train_pipeline_crops_flips_and_normalizes_within_bounds(tiny):
    ds = load_dataset(tiny)
    mean = np.array(load_dataset_mean(tiny).rgb()[0], np.float32)
    stored = _stored_images(tiny)
    loader = Loader(ds, LoaderConfig("train", True, batch_size=24, crop=CROP, mean=tuple(mean), seed=11,
                                     channels_last=True))
    (batch,) = list(loader)
    assert batch.images.shape == (24, 3, CROP, CROP) and batch.images.dtype == torch.float32
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.dtype == torch.int64 and set(batch.labels.tolist()) <= {0, 1, 2, 3}
    flips = batch.flipped.tolist()
    assert 0 < sum(flips) < 24  # both flipped and unflipped samples occur
    positions = set()
    for img, flipped in zip(batch.images.permute(0, 2, 3, 1).numpy() + mean, flips):
        # Find the stored image and window this crop came from; it must lie inside the image.
        best = (1e9, None)
        for k, src in enumerate(stored):
            h, w = src.shape[:2]
            src = src[:, ::-1] if flipped else src
            for y in range(h - CROP + 1):
                for x in range(w - CROP + 1):
                    err = np.abs(src[y : y + CROP, x : x + CROP].astype(np.float32) - img).mean()
                    if err < best[0]:
                        best = (err, (k, y, x))
        assert best[0] < 2.0, f"a training crop matches no window of any stored image (error {best[0]:.1f})"
        positions.add(best[1][1:])
    assert len(positions) > 3  # crops are random, not all centred


def test_val_pipeline_is_centre_crop_and_counts_every_sample_once(tiny):
    ds = load_dataset(tiny)
    for reader in ("lmdb", "recordio"):
        loader = Loader(ds, LoaderConfig("val", False, batch_size=3, crop=CROP, reader=reader))
        batches = list(loader)
        assert sum(b.labels.shape[0] for b in batches) == 8 and [b.labels.shape[0] for b in batches] == [3, 3, 2]
        assert not any(b.flipped.any() for b in batches)
        assert sorted(torch.cat([b.labels for b in batches]).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_old_mean_format_is_refused_with_the_update_mean_command(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    (data / "mean.json").unlink()
    (data / "mean.npy").write_bytes(b"")  # an old full-image mean sits there instead
    with pytest.raises(OldMeanFormatError, match=f"alexnet-pipe update-mean {data}"):
        fit(tcfg(data, epochs=1))
    res = CliRunner().invoke(main, ["train", "-w", str(data), "-b", "cpu", "--crop", str(CROP), "--no_progress_bar"])
    assert res.exit_code == 1 and "alexnet-pipe update-mean" in res.output


def test_incompatible_model_file_is_explained(tiny, tmp_path):
    fit(tcfg(tiny, epochs=1, save_path=tmp_path / "w.pt", eval_freq=0))
    with pytest.raises(CheckpointError, match="--crop 67"):
        run_test(tcfg(tiny, test_only=True, model_file=tmp_path / "w.pt", crop=99))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not an alexnet-pipe weights file \\(torch cannot read it"):
        run_test(tcfg(tiny, test_only=True, model_file=tmp_path / "junk.pt"))


def test_cli_train_test_plot_inspect(tiny, tmp_path):
    runner = CliRunner()
    common = ["-w", str(tiny), "-b", "cpu", "--crop", str(CROP), "-z", "8", "--no_progress_bar", "--data-threads", "1"]
    res = runner.invoke(main, ["train", *common, "-e", "2", "--lr", "0.001", "-s", str(tmp_path / "w.pt"),
                               "-o", str(tmp_path / "m.jsonl")])
    assert res.exit_code == 0, res.output
    assert "LogLoss:" in res.output and "(Top-1)" in res.output and "(Top-5)" not in res.output  # 4 classes
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"lr", "train_loss", "val_loss", "val_top1", "val_top5", "img_per_s", "seconds"} <= records[0].keys()
    res = runner.invoke(main, ["test", *common, "--model_file", str(tmp_path / "w.pt")])
    assert res.exit_code == 0 and res.output.startswith("LogLoss:")
    res = runner.invoke(main, ["plot", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 0 and Image.open(tmp_path / "c.png").size[0] > 500
    res = runner.invoke(main, ["inspect", str(tiny), "-o", str(tmp_path / "g.png"), "--crop", str(CROP), "-n", "8"])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "g.png").size[0] >= 8 * CROP


def test_subset_pct_trains_on_part_of_the_epoch(tiny):
    res = fit(tcfg(tiny, epochs=1, subset_pct=50, eval_freq=0))
    assert res.history[0]["samples"] == 12  # half of the 24 samples, drawn afresh from the whole split


def test_weights_from_other_classes_are_refused(tiny, tmp_path):
    fit(tcfg(tiny, epochs=1, save_path=tmp_path / "w.pt", eval_freq=0))
    body = torch.load(tmp_path / "w.pt", weights_only=True)
    body["data"]["classes"] = ["circle", "hstripes", "square", "zebra"]
    torch.save(body, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="class 3 is 'zebra' there, 'vstripes'"):
        run_test(tcfg(tiny, test_only=True, model_file=tmp_path / "other.pt"))


def test_corrupt_record_gives_a_clear_error_not_a_dali_trace(tiny, tmp_path):
    import subprocess
    import sys

    from alexnet_pipe.errors import DatasetError
    from alexnet_pipe.formats.datum import Datum, encode_datum

    fit(tcfg(tiny, epochs=1, save_path=tmp_path / "w.pt", eval_freq=0))
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    for crc in (data / ".parts").glob("*.crc"):  # no per-record checksums (as converted before them):
        crc.unlink()  # the damaged record reaches DALI's decoder (with them, test_repair.py)
    path = load_dataset(data).lmdb_paths("val")[0]
    with lmdb.open(str(path), lock=False) as env, env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor()))
        d = decode_datum(value)
        # Bytes zeroed inside the entropy-coded data, then the JPEG cut short. (DALI 2.4's CPU
        # decoder reports this as an error in batches up to 32 but crashes the process (SIGSEGV)
        # in batches of 64 or more, which no Python code can turn into a message: `verify` and
        # the converter's full decode are the defence there.)
        broken = d.data[:200] + b"\x00" * 50 + d.data[250:400]
        txn.put(key, encode_datum(Datum(broken, d.label, d.height, d.width, 3, encoded=True)))
    # The CLI in its own process: DALI is not reliable after a critical error in the same one.
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", "test", "-w", str(data), "-b", "cpu", "--crop",
                          str(CROP), "-z", "8", "--model_file", str(tmp_path / "w.pt"), "--no_progress_bar"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "alexnet-pipe verify" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(DatasetError, match=f"val shards of {data} could not be read.*alexnet-pipe verify"):
        list(Loader(load_dataset(data), LoaderConfig("val", False, batch_size=4, crop=CROP)))


def test_reader_processes_give_the_same_batches(tiny):
    """DALI's parallel external source (records read in a spawned process) changes nothing."""
    cfg = LoaderConfig("train", True, batch_size=8, crop=CROP, seed=4)
    ds = load_dataset(tiny)
    batches = {}
    for workers in (0, 1):
        loader = Loader(ds, LoaderConfig(**{**cfg.__dict__, "read_workers": workers}), epoch=3)
        batches[workers] = [(b.images.clone(), b.labels.clone()) for b in loader]
        loader.close()
    assert len(batches[0]) == 3
    for (img0, lab0), (img1, lab1) in zip(batches[0], batches[1]):
        assert torch.equal(lab0, lab1) and torch.equal(img0, img1)


def test_ranks_of_the_val_loader_count_every_image_once(tiny):
    """3 ranks over 8 val images: 3 each, one padded sample marked invalid, the union exact."""
    ds = load_dataset(tiny)
    labels = []
    for rank in range(3):
        loader = Loader(ds, LoaderConfig("val", False, batch_size=2, crop=CROP, rank=rank, world_size=3))
        batches = list(loader)
        loader.close()
        assert sum(len(b.labels) for b in batches) == 3
        for b in batches:
            keep = b.valid if b.valid is not None else torch.ones(len(b.labels), dtype=torch.bool)
            labels += b.labels[keep].tolist()
    assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_one_loader_serves_consecutive_epochs_like_fresh_ones(tiny):
    """fit keeps one pipeline for all epochs: its second pass is epoch e+1, as a fresh loader's is."""
    ds = load_dataset(tiny)
    cfg = LoaderConfig("train", True, batch_size=8, crop=CROP, seed=2)
    kept = Loader(ds, cfg, epoch=0)
    passes = [torch.cat([b.labels for b in kept]) for _ in range(2)]
    assert kept.epoch == 2
    kept.close()
    fresh = Loader(ds, cfg, epoch=1)
    assert torch.equal(torch.cat([b.labels for b in fresh]), passes[1])
    fresh.close()
    assert not torch.equal(passes[0], passes[1])  # a new order each epoch


def test_images_smaller_than_the_crop_are_reported(tmp_path, caplog):
    """--no-upscale keeps small images small: training says how many crops will be padded."""
    make_tree(tmp_path / "raw", {"train": 4, "val": 2}, sizes=((60, 50), (120, 90)))  # every other one small
    for upscale, name in ((False, "small"), (True, "upscaled")):
        run_convert(ConvertConfig(src=tmp_path / "raw", dst=tmp_path / name, shard_size=10, workers=1, progress=False,
                                  image=ImageSettings(short_side=72, upscale=upscale)))
    from alexnet_pipe.train.runtime import small_image_warning

    message = small_image_warning(load_dataset(tmp_path / "small"), CROP)
    assert message is not None and "6 of 12 train images and 3 of 6 val images" in message
    assert "without --no-upscale" in message
    assert small_image_warning(load_dataset(tmp_path / "upscaled"), CROP) is None
    with caplog.at_level("WARNING"):
        fit(tcfg(tmp_path / "small", epochs=1, eval_freq=0))
    assert any("padded with the mean colour" in r.message for r in caplog.records)


def test_inspect_mean_draws_the_mean_image(tiny, tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tiny), "--mean", "-o", str(tmp_path / "mean.png")])
    assert res.exit_code == 0, res.output
    drawn = np.asarray(Image.open(tmp_path / "mean.png").convert("RGB"))
    stored = np.load(tiny / "mean_image.npy")
    assert stored.shape == (72, 72, 3)
    # drawn under a title, each stored pixel (rounded) as a 2 x 2 block: small images are shown larger
    block = np.clip(np.rint(stored), 0, 255).astype(np.uint8).repeat(2, axis=0).repeat(2, axis=1)
    assert find_block(drawn, block) is not None
    (tmp_path / "old").mkdir()
    shutil.copytree(tiny, tmp_path / "old" / "d")
    (tmp_path / "old" / "d" / "mean_image.npy").unlink()
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "old" / "d"), "--mean", "-o", str(tmp_path / "m.png")])
    assert res.exit_code == 1 and "has no mean_image.npy" in res.output


def test_resume_applies_a_changed_lr_records_it_and_refuses_a_changed_seed(tiny, tmp_path):
    ckpt, metrics = tmp_path / "c.ckpt", tmp_path / "m.jsonl"
    fit(tcfg(tiny, epochs=1, eval_freq=0, serialize=1, checkpoint_path=ckpt, output_file=metrics))
    res = fit(tcfg(tiny, epochs=2, eval_freq=0, model_file=ckpt, lr=0.002, output_file=metrics))
    assert [r["lr"] for r in res.history] == pytest.approx([0.001, 0.002])  # applied, not silently ignored
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    [marker] = [r for r in rows if r.get("event") == "resumed"]
    assert marker["changed"] == {"epochs": [1, 2], "lr": [0.001, 0.002], "serialize": [1, 0],
                                 "lr_used": [0.001, 0.002]}  # the rate the steps use, after any scaling
    with pytest.raises(CheckpointError, match=r"trained with -r/--rng-seed 0, this run asks for 7"):
        fit(tcfg(tiny, epochs=2, eval_freq=0, model_file=ckpt, rng_seed=7))
    with pytest.raises(CheckpointError, match=r"takes input not divided by the std, this run asks for --normalize-std"):
        fit(tcfg(tiny, epochs=2, eval_freq=0, model_file=ckpt, normalize_std=True))
