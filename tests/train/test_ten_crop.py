"""`test --ten-crop` (and `train --eval-ten-crop`): the four corners and the centre of each stored
val image, each mirrored too, through the model in one batch, softmax averaged per image
(Krizhevsky et al. 2012). Checked against a reference cut with numpy from the same records,
decoded by the converter's decoder, and through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe.apps.predict import crop_anchor, decode_stored
from alexnet_pipe.cli import main
from alexnet_pipe.config import TrainConfig
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import load_dataset_mean
from alexnet_pipe.dataset.records import RecordReader, record_table
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.loading.pipeline import TEN_CROP_VIEWS, LoaderConfig
from alexnet_pipe.model.alexnet import AlexNet, AlexNetConfig
from alexnet_pipe.train.evaluate import evaluate_ten_crop
from alexnet_pipe.train.runtime import open_run
from tests.helpers.datasets import TRAIN_FAST, shapes_dataset, train_one_epoch

CROP = 67  # stored images are 96 x 72 (short side 72): every view's window is a different one


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("tencrop"), short_side=72)


@pytest.fixture(scope="module")
def weights(data, tmp_path_factory) -> Path:
    return train_one_epoch(data, tmp_path_factory.mktemp("tencrop_w") / "w.pt")


def _reference_views(data: Path, mean: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(records x 10) x 3 x CROP x CROP and the labels: each val record decoded by the converter's
    decoder (libjpeg-turbo, as DALI's CPU decoder), cut by numpy slicing at the corners of the stored
    image and at DALI's centre (``crop_anchor``), mirrored, minus the dataset mean in float32."""
    table = record_table(load_dataset(data), "val", "lmdb")
    reader = RecordReader(table)
    views, labels = [], []
    try:
        for i in range(len(table)):
            jpeg, label = reader.read(i)
            rgb = decode_stored(jpeg)
            h, w = rgb.shape[:2]
            labels.append(label)
            for x, y, mirror in TEN_CROP_VIEWS:
                x0 = {0.0: 0, 1.0: w - CROP, 0.5: crop_anchor(w, CROP)}[x]
                y0 = {0.0: 0, 1.0: h - CROP, 0.5: crop_anchor(h, CROP)}[y]
                view = rgb[y0:y0 + CROP, x0:x0 + CROP].astype(np.float32) - np.asarray(mean, np.float32)
                views.append((view[:, ::-1] if mirror else view).transpose(2, 0, 1))
    finally:
        reader.close()
    return torch.from_numpy(np.ascontiguousarray(np.stack(views))), torch.tensor(labels)


def test_the_views_are_the_corners_and_centre_of_the_stored_image_and_their_mirrors(data):
    ds = load_dataset(data)
    mean, _ = load_dataset_mean(data).rgb()
    expected, labels = _reference_views(data, mean)
    assert len(labels) == 4 and len({tuple(v.flatten()[:50].tolist()) for v in expected[:10]}) == 10  # all differ
    for channels_last in (False, True):
        loader = Loader(ds, LoaderConfig("val", False, 3, crop=CROP, mean=mean, ten_crop=True, num_threads=1,
                                         channels_last=channels_last))
        try:
            batches = list(loader)
        finally:
            loader.close()
        assert [(b.views, b.images.shape[0], len(b.labels)) for b in batches] == [(10, 30, 3), (10, 10, 1)]
        got = torch.cat([b.images for b in batches])
        # Same decoder (libjpeg-turbo, islow, fancy upsampling), same float32 subtraction: equal pixels.
        assert torch.equal(got, expected), (got - expected).abs().max()
        assert torch.equal(torch.cat([b.labels for b in batches]), labels)


def test_the_averaged_softmax_matches_plain_torch(data):
    """evaluate_ten_crop over the pipeline vs the same model on the reference views. The pixels are
    equal (test above), so the only difference is float32 summation order between batch shapes and
    memory layouts (channels_last here, contiguous in the reference): 1e-5 on probabilities in 0..1."""
    rt = open_run(TrainConfig(data_dir=data, backend="cpu", crop=CROP, batch_size=3, data_threads=1, progress=False))
    try:
        torch.manual_seed(0)
        model = AlexNet(AlexNetConfig(num_classes=2, crop=CROP), generator=torch.Generator().manual_seed(3),
                        init="kaiming").eval()
        result = evaluate_ten_crop(model, rt, per_class=True)
    finally:
        rt.close()
    views, labels = _reference_views(data, rt.input.pixel_normalization()[0])
    with torch.inference_mode():
        probs = model(views).softmax(1).view(len(labels), 10, 2).mean(1).double()
    score, predicted = probs.max(1)
    assert not torch.allclose(probs[:, 0], probs[0, 0].expand(len(labels)))  # the images get different answers
    np.testing.assert_allclose(result.per_class.score, score.numpy(), rtol=0, atol=1e-5)
    assert result.per_class.predicted.tolist() == predicted.tolist()
    assert result.per_class.true.tolist() == labels.tolist()
    assert result.samples == 4
    assert result.top1 == pytest.approx(100.0 * (predicted == labels).double().mean().item())
    nll = -probs[torch.arange(len(labels)), labels].log().mean().item()
    assert result.loss == pytest.approx(nll, abs=1e-5)
    # Ten views are not one: the centre crop alone answers otherwise for at least one image here.
    with torch.inference_mode():
        centre = model(views[::10]).softmax(1).double()
    assert not torch.allclose(centre, probs, atol=1e-3)


def _test(data: Path, weights: Path, tmp_path: Path, *extra: str):
    res = CliRunner().invoke(main, ["test", "-w", str(data), "-b", "cpu", "--model-file", str(weights),
                                    "--no-progress", "--data-threads", "1", "-o", str(tmp_path / "m.jsonl"), *extra])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    return [line for line in res.output.splitlines() if "LogLoss" in line], row


def test_cli_prints_the_single_crop_line_then_the_ten_crop_one(data, weights, tmp_path):
    plain, plain_row = _test(data, weights, tmp_path / "plain")
    lines, row = _test(data, weights, tmp_path / "ten", "--ten-crop", "--per-class", str(tmp_path / "pc.json"))
    assert len(plain) == 1 and not any("ten_crop" in key for key in plain_row)
    assert lines[0] == plain[0]  # the single-crop figures stay as they were, first
    assert len(lines) == 2 and lines[1].startswith("Ten crops: LogLoss: ")
    for key in ("val_loss", "val_top1", "val_top5"):
        assert row[key] == plain_row[key]
    assert {"val_ten_crop_loss", "val_ten_crop_top1", "val_ten_crop_top5"} <= set(row)
    assert f"{row['val_ten_crop_top1']:.1f} % (Top-1)" in lines[1]
    body = json.loads((tmp_path / "pc.json").read_text())
    confusion = np.array(body["ten_crop_confusion"])
    assert confusion.sum() == 4 and confusion.shape == (2, 2)
    for k, cls in enumerate(body["classes"]):
        assert {"top1", "ten_crop_top1", "ten_crop_top5"} <= set(cls)
        assert cls["ten_crop_top1"] == pytest.approx(100.0 * confusion[k, k] / confusion[k].sum())
    assert 100.0 * np.trace(confusion) / 4 == pytest.approx(row["val_ten_crop_top1"])


def test_train_eval_ten_crop_reports_the_last_epoch(data, tmp_path):
    runner = CliRunner()
    fast = [a for a in TRAIN_FAST if a not in ("--eval-freq", "0")]
    res = runner.invoke(main, ["train", "-w", str(data), *TRAIN_FAST, "--eval-ten-crop", "-s", str(tmp_path / "a.pt")])
    assert res.exit_code != 0 and "--eval-ten-crop" in res.output and "--eval-freq 0" in res.output
    assert len(res.output.strip().splitlines()) == 1  # one line, no traceback
    res = runner.invoke(main, ["train", "-w", str(data), *fast, "-e", "2", "--eval-ten-crop", "-s",
                               str(tmp_path / "w.pt"), "-o", str(tmp_path / "m.jsonl")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "val_top1" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert "val_ten_crop_top1" not in epochs[0] and "val_ten_crop_top1" in epochs[1]  # the final epoch's only
    assert res.output.count("Ten crops: LogLoss") == 1
    stored = torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=False)
    assert stored["train_config"]["ten_crop"] is True
