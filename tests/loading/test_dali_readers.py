"""DALI's own readers (CPU mode, device_id=None) over the files the converter wrote."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.formats.recordio import MAGIC_BYTES, frame_record, iter_records
from tests.helpers.images import CLASSES, smooth_image, write_jpeg

dali = pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy  # noqa: E402


@pipeline_def
def _read(spec: dict, shard_id: int, num_shards: int, shuffle: bool):
    common = {"shard_id": shard_id, "num_shards": num_shards, "pad_last_batch": True,
              "random_shuffle": shuffle, "name": "reader"}
    if spec["kind"] == "caffe":
        jpegs, labels = fn.readers.caffe(path=spec["paths"], **common)
    else:
        jpegs, labels = fn.readers.mxnet(path=spec["paths"], index_path=[spec["index"]], **common)
    return fn.decoders.image(jpegs, device="cpu"), labels


def _spec(root: Path, kind: str, split: str) -> dict:
    ds = load_dataset(root)
    if kind == "caffe":
        return {"kind": kind, "paths": [str(p) for p in ds.lmdb_paths(split)]}
    recs, index = ds.recordio_paths(split)
    return {"kind": kind, "paths": [str(p) for p in recs], "index": str(index)}


def _epochs(spec: dict, epochs: int, num_shards: int = 1, batch: int = 4, shuffle: bool = False):
    """Yield, per epoch, the list of (image, label) over all shards."""
    iters = []
    for sid in range(num_shards):
        pipe = _read(spec, sid, num_shards, shuffle, batch_size=batch, num_threads=1, device_id=None, seed=7 + sid)
        pipe.build()
        iters.append(DALIGenericIterator([pipe], ["image", "label"], reader_name="reader",
                                         last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True))
    for _ in range(epochs):
        seen = []
        for it in iters:
            for (batch_out,) in it:
                labels = batch_out["label"].squeeze(-1).long().tolist()
                seen += list(zip(batch_out["image"].numpy(), labels))
        yield seen


SIZES = ((96, 72), (200, 260), (600, 400), (64, 160))  # short side scaled to 256: (600, 400) -> 384x256


@pytest.fixture
def dataset(tmp_path):
    raw = tmp_path / "raw"
    sources = {}
    for k in range(12):
        cls = CLASSES[k % 3]
        w, h = SIZES[k % len(SIZES)]
        arr = smooth_image(100 + k, w, h)
        write_jpeg(raw / "train" / cls / f"{k}.jpg", arr)
        sources[k] = (arr, CLASSES.index(cls))
    out = tmp_path / "out"
    run_convert(ConvertConfig(src=raw, dst=out, formats=("lmdb", "recordio"), shard_size=5, workers=1, progress=False))
    return out, sources


def _expected(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    if min(h, w) == 256:
        return arr
    scale = 256 / min(h, w)  # up or down
    size = (round(w * scale), 256) if w > h else (256, round(h * scale))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC))


@pytest.mark.parametrize("kind", ["caffe", "mxnet"])
def test_dali_reads_every_record_with_its_label_and_pixels(dataset, kind):
    out, sources = dataset
    # batch 1: the images differ in size, and the torch iterator needs uniform batches
    (seen,) = _epochs(_spec(out, kind, "train"), epochs=1, batch=1)
    assert len(seen) == len(sources)
    matched = set()
    for image, label in seen:
        # Identify the source by content (labels repeat), then compare within JPEG tolerance.
        candidates = [k for k, (arr, _) in sources.items() if _expected(arr).shape == image.shape]
        errors = {k: np.abs(_expected(sources[k][0]).astype(int) - image.astype(int)).mean() for k in candidates}
        best = min(errors, key=errors.get)
        assert errors[best] < 3.0, f"decoded image differs from its source by {errors[best]:.2f} on average"
        assert label == sources[best][1]
        matched.add(best)
    assert matched == set(sources)


@pytest.mark.parametrize("kind", ["caffe", "mxnet"])
def test_two_shards_cover_the_set_exactly_once_per_epoch(tmp_path, kind):
    # One image per class, so a label identifies its sample.
    raw = tmp_path / "raw"
    n = 23
    for k in range(n):
        write_jpeg(raw / "train" / f"c{k:02d}" / "x.jpg", smooth_image(k, 32, 24))
    out = tmp_path / "out"
    run_convert(ConvertConfig(src=raw, dst=out, formats=("lmdb", "recordio"), shard_size=4, workers=1, progress=False))
    epochs = list(_epochs(_spec(out, kind, "train"), epochs=3, num_shards=2, batch=4, shuffle=True))
    for seen in epochs:
        labels = sorted(label for _, label in seen)
        assert labels == list(range(n))
    assert len({tuple(label for _, label in seen) for seen in epochs}) > 1  # shuffled differently


def _jpeg_with_aligned_magic(arr: np.ndarray) -> bytes:
    """A valid JPEG whose bytes hold the RecordIO magic at a 4-aligned payload offset."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    jpeg = buf.getvalue()
    # Payload = 24-byte IRHeader + JPEG. A COM segment right after SOI starts its data at
    # payload offset 24 + 2 + 4 = 30; two pad bytes put the magic at offset 32.
    comment = b"pp" + MAGIC_BYTES + b"after"
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return jpeg[:2] + segment + jpeg[2:]


def test_mxnet_reader_restores_split_records(tmp_path):
    raw = tmp_path / "raw"
    arr = smooth_image(5, 64, 48)
    data = _jpeg_with_aligned_magic(arr)
    for cls in ("a", "b"):
        (raw / "train" / cls).mkdir(parents=True)
        (raw / "train" / cls / "m.jpg").write_bytes(data)
    out = tmp_path / "out"
    # Short side 48 = the image's own: it needs no resize, so its bytes pass through.
    run_convert(ConvertConfig(src=raw, dst=out, formats=("recordio",), workers=1, progress=False,
                              image=ImageSettings(short_side=48)))
    rec = load_dataset(out).recordio_paths("train")[0][0]
    payloads = [p for _, p in iter_records(rec)]
    assert all(p[24:] == data for p in payloads)  # passed through unchanged, magic included
    assert rec.read_bytes().count(MAGIC_BYTES) > len(payloads)  # so the writer really split them
    assert frame_record(payloads[0]) in rec.read_bytes()
    (seen,) = _epochs(_spec(out, "mxnet", "train"), epochs=1, batch=2)
    assert sorted(label for _, label in seen) == [0, 1]
    for image, _ in seen:
        assert np.abs(image.astype(int) - arr.astype(int)).mean() < 3.0
