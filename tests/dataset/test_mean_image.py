"""The stored mean image (mean_image.npy, mean.binaryproto), the centre-box rule, the resize policy."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.apps.info import dataset_summary, format_summary
from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings, UpdateMeanConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import MeanImageSum, centre_box, load_dataset_mean, read_mean_file
from alexnet_pipe.dataset.update_mean import run_update_mean
from alexnet_pipe.errors import OldMeanFormatError
from alexnet_pipe.formats.blobproto import decode_blobproto
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.imaging.process import process_batch
from alexnet_pipe.inputs.table import Source
from tests.helpers.images import CLASSES, pass_through_tree, smooth_image, write_jpeg
from tests.helpers.pixels import float32_limit_sums


def convert(src: Path, dst: Path, **kw) -> dict:
    opts = {"formats": ("lmdb",), "shard_size": 4, "workers": 1, "progress": False}
    opts.update(kw)
    run_convert(ConvertConfig(src=src, dst=dst, **opts))
    return load_dataset(dst).manifest


def write_baseline(path: Path, arr: np.ndarray, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG", quality=quality)


def stored_train_images(root: Path) -> list[np.ndarray]:
    """Every stored train record, decoded by Pillow (independently of the converter's codecs)."""
    out = []
    for path in load_dataset(root).lmdb_paths("train"):
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            for _, value in txn.cursor():
                out.append(np.asarray(Image.open(io.BytesIO(decode_datum(value).data)).convert("RGB")))
    return out


def reference_mean_image(images: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) over the centre boxes, written out here rather than taken from centre_box."""
    total = np.zeros((size, size, 3), np.int64)
    count = np.zeros((size, size), np.int64)
    for arr in images:
        h, w = arr.shape[:2]
        ch, cw = min(size, h), min(size, w)
        y, x = (h - ch) // 2, (w - cw) // 2
        cy, cx = (size - ch) // 2, (size - cw) // 2
        total[cy : cy + ch, cx : cx + cw] += arr[y : y + ch, x : x + cw]
        count[cy : cy + ch, cx : cx + cw] += 1
    return total, count


# ----------------------------------------------------------------------------- the centre box


@pytest.mark.parametrize(
    "width,height,size,expected",
    [
        (341, 256, 256, (42, 0, 256, 256, 0, 0)),  # landscape: the middle 256 columns
        (256, 400, 256, (0, 72, 256, 256, 0, 0)),  # portrait
        (256, 256, 256, (0, 0, 256, 256, 0, 0)),
        (100, 80, 256, (0, 0, 100, 80, 78, 88)),  # smaller than the canvas: all of it, centred
        (300, 81, 64, (118, 8, 64, 64, 0, 0)),  # odd margins round down: (300-64)//2, (81-64)//2
        (30, 200, 64, (0, 68, 30, 64, 17, 0)),
    ],
)
def test_centre_box_rule(width, height, size, expected):
    box = centre_box(width, height, size)
    assert (box.x, box.y, box.width, box.height, box.canvas_x, box.canvas_y) == expected
    assert box.pixels == box.width * box.height


def test_mean_size_follows_the_short_side():
    assert ImageSettings().mean_size == 256
    assert ImageSettings(short_side=64).mean_size == 64
    assert ImageSettings(short_side=0).mean_size == 256  # sizes kept: the classic 256x256 mean


def test_worker_batch_sums_the_centre_boxes(tmp_path):
    """process_batch's canvas holds exactly the centre boxes of what it encoded (pass-throughs)."""
    size = 32
    sources, arrays = [], []
    for k, (w, h) in enumerate([(40, 32), (32, 50), (32, 32)]):  # short side 32: all pass through
        path = tmp_path / f"{k}.jpg"
        write_baseline(path, smooth_image(k, w, h))
        sources.append(Source(f"c/{k}.jpg", 0, str(path)))
        arrays.append(np.asarray(Image.open(path).convert("RGB")))
    sources.append(Source("c/missing.jpg", 0, str(tmp_path / "missing.jpg")))
    batch = process_batch(sources, ImageSettings(short_side=size))
    assert [r.passthrough for r in batch.results[:3]] and isinstance(batch.results[3], str)
    assert batch.mean_sum.dtype == np.uint16 and batch.mean_sum.shape == (size, size, 3)
    total, count = reference_mean_image(arrays, size)
    np.testing.assert_array_equal(batch.mean_sum, total)
    np.testing.assert_array_equal(batch.mean_count, count)
    flat = np.concatenate([reference_mean_image([a], size)[0].reshape(-1, 3) for a in arrays])  # the same boxes
    assert (batch.stats.images, batch.stats.pixels) == (3, 3 * size * size)
    assert batch.stats.sums == [int(v) for v in flat.sum(0)]
    assert batch.stats.sq_sums == [int(v) for v in (flat * flat).sum(0)]
    assert process_batch(sources[3:], ImageSettings(short_side=size)).mean_sum is None  # nothing encoded


@pytest.mark.parametrize("images", [258, 259])  # the last chunk size summed in float32, the first in float64
def test_centre_sums_are_exact_at_the_float32_limit(images):
    """258 boxes of 255 make sums of squares of 16,776,450, just under float32's 2^24 integers;
    boxes smaller than the canvas, or cut from larger images, land where centre_box puts them."""
    size = 8
    arrays, sums = float32_limit_sums(images, size)
    total, count = reference_mean_image(arrays, size)
    np.testing.assert_array_equal(sums.mean_sum(), total)
    np.testing.assert_array_equal(sums.count(), count)
    flat = np.concatenate([np.ascontiguousarray(a[(a.shape[0] - min(size, a.shape[0])) // 2:][:size,
                          (a.shape[1] - min(size, a.shape[1])) // 2:][:, :size]).reshape(-1, 3)
                           for a in arrays]).astype(np.int64)
    stats = sums.stats()
    assert (stats.images, stats.pixels) == (images, int(count.sum())) == (images, len(flat))
    assert stats.sums == [int(v) for v in flat.sum(0)]
    assert stats.sq_sums == [int(v) for v in (flat * flat).sum(0)]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def exact_tree(tmp_path) -> Path:
    """Baseline JPEGs whose short side is already 48: all pass through, so every stored pixel is
    known exactly (the stored bytes are the inputs) and the mean image must match to the bit."""
    return pass_through_tree(tmp_path / "raw")


def test_mean_image_is_exact_for_pass_through_images(exact_tree, tmp_path):
    out = tmp_path / "out"
    m = convert(exact_tree, out, image=ImageSettings(short_side=48))
    assert m["splits"]["train"]["passthrough"] == m["splits"]["train"]["records"] == 9
    assert m["mean_image"] == {"npy": "mean_image.npy", "binaryproto": "mean.binaryproto", "size": 48, "images": 9}
    total, count = reference_mean_image(stored_train_images(out), 48)
    assert (count == 9).all()
    image = np.load(out / "mean_image.npy")
    assert image.shape == (48, 48, 3) and image.dtype == np.float32
    np.testing.assert_array_equal(image, (total / count[..., None]).astype(np.float32))
    # mean.json covers the same pixels: its mean is each plane's mean of the mean image.
    mean = read_mean_file(out / "mean.json")
    np.testing.assert_allclose(mean.mean, total.reshape(-1, 3).sum(0) / (9 * 48 * 48), rtol=0, atol=1e-9)
    np.testing.assert_allclose(mean.mean, image.reshape(-1, 3).mean(0, dtype=np.float64), rtol=1e-6)
    assert mean.pixels == 9 * 48 * 48 and "centre 48x48" in mean.source
    # Caffe's layout: 1 x 3 x H x W, BGR, the same values.
    blob = decode_blobproto((out / "mean.binaryproto").read_bytes())
    assert blob.shape == (1, 3, 48, 48) and blob.dtype == np.float32
    np.testing.assert_array_equal(blob[0], image[..., ::-1].transpose(2, 0, 1))


def test_mean_image_of_reencoded_images_is_close_to_their_decoded_pixels(tmp_path):
    """Scaled images: the sums are of the pixels before JPEG encoding (see imaging.Encoded), so
    the decoded records match only to within JPEG error; the counts match exactly."""
    raw = tmp_path / "raw"
    for k, (w, h) in enumerate([(100, 80), (30, 40), (200, 130), (64, 64), (81, 300), (50, 50)]):
        write_jpeg(raw / "train" / CLASSES[k % 3] / f"{k}.jpg", smooth_image(300 + k, w, h))
    for upscale in (True, False):
        out = tmp_path / f"out-{upscale}"
        convert(raw, out, image=ImageSettings(short_side=64, upscale=upscale), shard_size=10)
        total, count = reference_mean_image(stored_train_images(out), 64)
        sums = MeanImageSum.from_bytes((out / ".parts" / "train-00000.mean.npz").read_bytes(), "sums")
        np.testing.assert_array_equal(sums.count, count)  # coverage is exact
        # Without upscaling the 30x40 and 50x50 images cover only the middle of the canvas.
        assert (count.min(), count.max()) == ((6, 6) if upscale else (4, 6))
        image = np.load(out / "mean_image.npy")
        diff = np.abs(image - total / count[..., None])
        assert diff.mean() < 1.0 and diff.max() < 8, (diff.mean(), diff.max())


def test_canvas_pixels_no_image_reaches_stay_zero(tmp_path):
    raw = tmp_path / "raw"
    write_jpeg(raw / "train" / "ant" / "a.jpg", smooth_image(7, 30, 40))
    out = tmp_path / "out"
    convert(raw, out, image=ImageSettings(short_side=64, upscale=False))
    image = np.load(out / "mean_image.npy")
    assert (image[12:52, 17:47] > 0).all()  # the 30x40 box, centred: (64-30)//2, (64-40)//2
    image[12:52, 17:47] = 0
    assert not image.any()


def test_mean_image_same_for_any_worker_count_and_after_resume(exact_tree, tmp_path):
    convert(exact_tree, tmp_path / "one", image=ImageSettings(short_side=48))
    convert(exact_tree, tmp_path / "two", image=ImageSettings(short_side=48), workers=2)
    files = ("mean_image.npy", "mean.binaryproto", "mean.json")
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    # A lost completion record and its sums: the shard is redone, the mean bytes stay the same.
    parts = tmp_path / "two" / ".parts"
    (parts / "train-00001.json").unlink()
    (parts / "train-00001.mean.npz").unlink()
    for name in files:
        (tmp_path / "two" / name).unlink()
    convert(exact_tree, tmp_path / "two", image=ImageSettings(short_side=48), workers=2)
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_missing_mean_sums_redo_their_shard(exact_tree, tmp_path):
    """The sums file is part of a finished shard: without it the shard is not complete."""
    out = tmp_path / "out"
    convert(exact_tree, out, image=ImageSettings(short_side=48))
    before = (out / "mean_image.npy").read_bytes()
    (out / ".parts" / "train-00000.mean.npz").unlink()
    (out / "manifest.json").unlink()
    convert(exact_tree, out, image=ImageSettings(short_side=48))
    assert (out / ".parts" / "train-00000.mean.npz").is_file()
    assert (out / "mean_image.npy").read_bytes() == before


def test_our_binaryproto_gives_back_mean_json(raw_tree, tmp_path):
    """update-mean on our own mean.binaryproto reproduces mean.json (every image covers 256x256)."""
    out = tmp_path / "out"
    convert(raw_tree, out)
    ours = read_mean_file(out / "mean.json")
    # With mean.json present, our binaryproto is no old format: readers and update-mean are happy.
    assert load_dataset_mean(out).mean == ours.mean
    again = run_update_mean(UpdateMeanConfig(out))
    assert again.already_current and again.written == []
    result = run_update_mean(UpdateMeanConfig(out / "mean.binaryproto"))  # keeps mean.json: it has the std
    assert result.mean.mean == pytest.approx(ours.mean, rel=1e-6)
    assert result.already_current and result.written == [] and read_mean_file(out / "mean.json") == ours
    # Only the binaryproto left: it reads as an old full-image mean, and update-mean restores mean.json.
    (out / "mean.json").unlink()
    with pytest.raises(OldMeanFormatError, match="update-mean"):
        load_dataset_mean(out)
    run_update_mean(UpdateMeanConfig(out))
    assert load_dataset_mean(out).mean == pytest.approx(ours.mean, rel=1e-6)


def test_info_lists_the_mean_image(raw_tree, tmp_path):
    out = tmp_path / "out"
    convert(raw_tree, out)
    summary = dataset_summary(load_dataset(out))
    assert summary["mean_image"]["size"] == 256 and summary["mean_image"]["images"] == 18
    assert [f["path"] for f in summary["mean_image"]["files"]] == ["mean_image.npy", "mean.binaryproto"]
    assert all(f["bytes"] > 256 * 256 * 3 * 4 for f in summary["mean_image"]["files"])
    assert "mean img  256x256 over 18 train images: mean_image.npy (768." in format_summary(summary)


# ----------------------------------------------------------------------------- resize policy


def test_small_image_gets_the_short_side_unless_no_upscale(tmp_path):
    raw = tmp_path / "raw"
    write_jpeg(raw / "train" / "ant" / "small.jpg", smooth_image(1, 100, 80))
    write_jpeg(raw / "train" / "ant" / "large.jpg", smooth_image(2, 400, 300))
    write_jpeg(raw / "val" / "ant" / "v.jpg", smooth_image(3, 90, 120))
    runner = CliRunner()
    sizes = {}
    for flag in ([], ["--no-upscale"]):
        out = tmp_path / f"out{len(flag)}"
        res = runner.invoke(main, ["convert", str(raw), str(out), "--short-side", "128", "--workers", "1",
                                   "--no-progress", *flag])
        assert res.exit_code == 0, res.output
        m = load_dataset(out).manifest
        sizes[bool(flag)] = {im.shape[:2] for im in stored_train_images(out)}
        assert m["settings"]["upscale"] is not flag
        assert m["resize"]["short_side"] == 128 and m["resize"]["upscale"] is not flag
        train, val = m["splits"]["train"], m["splits"]["val"]
        if not flag:
            assert "exactly 128" in m["resize"]["rule"] and "im2rec" in m["resize"]["rule"]
            assert train["short_side_counts"] == {"128": 2} and train["min_short_side"] == 128
            assert val["short_side_counts"] == {"128": 1}
        else:
            assert "below 128 keep their size" in m["resize"]["rule"]
            assert train["short_side_counts"] == {"80": 1, "128": 1} and train["min_short_side"] == 80
            assert val["short_side_counts"] == {"90": 1} and val["min_short_side"] == 90
    assert sizes[False] == {(128, 160), (128, 171)}  # 100x80 -> 160x128; 400x300 -> 171x128
    assert sizes[True] == {(80, 100), (128, 171)}
    # A different upscale setting is a different conversion: refused without --force.
    res = runner.invoke(main, ["convert", str(raw), str(tmp_path / "out0"), "--short-side", "128",
                               "--no-upscale", "--no-progress"])
    assert res.exit_code == 1 and "upscale: True -> False" in res.output


def test_short_side_counts_only_below_512(tmp_path):
    raw = tmp_path / "raw"
    for k, (w, h) in enumerate([(700, 600), (520, 530), (300, 200)]):
        write_jpeg(raw / "train" / "ant" / f"{k}.jpg", smooth_image(k, w, h))
    m = convert(raw, tmp_path / "out", image=ImageSettings(short_side=0))
    assert m["resize"] == {"short_side": 0, "upscale": True, "rule": "sizes kept"}
    assert m["splits"]["train"]["short_side_counts"] == {"200": 1}
    assert m["splits"]["train"]["min_short_side"] == 200
    assert m["mean_image"]["size"] == 256
    assert json.loads((tmp_path / "out" / "mean.json").read_text())["pixels"] == 2 * 256 * 256 + 256 * 200


def test_resize_filter_is_the_named_interpolation_and_part_of_the_settings(tmp_path):
    """--resize-filter linear stores what OpenCV's INTER_LINEAR makes of the decoded input (im2rec's
    resize); the default manifest does not name the filter (conversions from before the option
    still resume), a non-default one does, and changing it is a different conversion."""
    raw = tmp_path / "raw"
    src = write_jpeg(raw / "train" / "ant" / "large.jpg", smooth_image(2, 400, 300))
    write_jpeg(raw / "val" / "ant" / "v.jpg", smooth_image(3, 90, 120))
    runner = CliRunner()
    stored = {}
    for name in ("antialias", "linear", "area"):
        out = tmp_path / name
        flags = [] if name == "antialias" else ["--resize-filter", name]
        res = runner.invoke(main, ["convert", str(raw), str(out), "--short-side", "128", "--workers", "1",
                                   "--no-progress", "--no-passthrough", "--quality", "100", *flags])
        assert res.exit_code == 0, res.output
        m = load_dataset(out).manifest
        assert m["settings"].get("resize_filter") == (None if name == "antialias" else name)
        assert m["resize"].get("filter") == (None if name == "antialias" else name)
        (stored[name],) = stored_train_images(out)
    decoded = cv2.imdecode(np.fromfile(src, np.uint8), cv2.IMREAD_COLOR)
    for name, flag in (("linear", cv2.INTER_LINEAR), ("area", cv2.INTER_AREA)):
        want = cv2.resize(decoded, (171, 128), interpolation=flag)[..., ::-1]
        assert np.abs(stored[name].astype(int) - want).mean() < 1.5  # quality 100: JPEG error only
    assert np.abs(stored["linear"].astype(int) - stored["antialias"]).mean() > 0.3  # not the same filter
    res = runner.invoke(main, ["convert", str(raw), str(tmp_path / "linear"), "--short-side", "128",
                               "--no-passthrough", "--quality", "100", "--no-progress"])
    assert res.exit_code == 1 and "resize_filter: 'linear' -> the default" in res.output
