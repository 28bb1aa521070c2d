"""Shard counts at and beyond ImageNet's: DALI's own readers open them all in one process.

Each LMDB shard stores the map size of its data (``shards.compact_lmdb``): DALI's Caffe reader
reserves the stored size in address space for every shard, and with the 1 TiB a writer needs a
process could open only ~120.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.formats.lmdb import lmdb_map_size, reserves_too_much

SHARDS = 300  # ImageNet has 257 train shards at the default size; `make scale-check` opens more


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """300 one-record shards of 8x8 JPEGs (4 classes), both formats."""
    root = tmp_path_factory.mktemp("many")
    for c in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 60 * c, np.uint8)).save(buf, "JPEG", quality=90)
        folder = root / "raw" / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(SHARDS // 4):
            (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())
    run_convert(ConvertConfig(root / "raw", root / "data", formats=("lmdb", "recordio"),
                              image=ImageSettings(short_side=8), shard_size=1, workers=2, progress=False))
    return root / "data"


def _read_all(pipe) -> np.ndarray:
    pipe.build()
    labels = []
    for _ in range(SHARDS // 50):
        (_, lab) = pipe.run()
        labels.append(np.array(lab.as_tensor()).reshape(-1))
    return np.concatenate(labels)


def test_shards_store_the_map_size_of_their_data(many):
    ds = load_dataset(many)
    for path in ds.lmdb_paths("train")[:50]:
        assert not reserves_too_much(path)


def test_dali_caffe_reader_opens_300_lmdb_shards(many):
    from nvidia.dali import fn, pipeline_def

    ds = load_dataset(many)
    paths = [str(p) for p in ds.lmdb_paths("train")]
    assert len(paths) == SHARDS

    @pipeline_def(batch_size=50, num_threads=1, device_id=None)
    def caffe():
        jpegs, labels = fn.readers.caffe(path=paths, random_shuffle=False)
        return jpegs, labels

    labels = _read_all(caffe())  # before the fix: "LMDB Error: Invalid argument" past ~120 shards
    assert len(labels) == SHARDS and np.bincount(labels).tolist() == [SHARDS // 4] * 4


def test_dali_mxnet_reader_opens_300_recordio_shards(many):
    from nvidia.dali import fn, pipeline_def

    ds = load_dataset(many)
    recs, index = ds.recordio_paths("train")

    @pipeline_def(batch_size=50, num_threads=1, device_id=None)
    def mxnet():
        jpegs, labels = fn.readers.mxnet(path=[str(r) for r in recs], index_path=[str(index)], random_shuffle=False)
        return jpegs, labels

    labels = _read_all(mxnet()).astype(np.int64)
    assert len(labels) == SHARDS and np.bincount(labels).tolist() == [SHARDS // 4] * 4


def test_a_dali_build_failure_keeps_the_real_cause(tmp_path):
    """DALI's error is pages long; ``dali_cause`` keeps the operator and the cause, drops the rest."""
    from nvidia.dali import fn, pipeline_def

    from alexnet_pipe.loading.loader import dali_cause

    missing = tmp_path / "no-such-shard"

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def caffe():
        jpegs, labels = fn.readers.caffe(path=[str(missing)])
        return jpegs, labels

    with pytest.raises(RuntimeError) as info:
        pipe = caffe()
        pipe.build()
        pipe.run()
    cause = dali_cause(info.value)
    assert "readers.caffe" in cause and str(missing) in cause
    assert "C++ context" not in cause and "\n" not in cause
    assert "LMDB Error" in cause  # the real cause, not only DALI's first line ("Critical error ...")


def test_a_shard_of_many_records_in_file_order_passes_verify(tmp_path):
    """Records inserted out of key order (inputs are read in file order) leave the scratch
    database larger than the compacted shard: the stored map size stays near the data's, and
    verify accepts it (the demo's 1,200-record shard once failed here)."""
    from alexnet_pipe.config import VerifyConfig
    from alexnet_pipe.convert.verify import run_verify

    for c in range(3):
        folder = tmp_path / "raw" / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(400):
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 24, 3), (c * 80 + i) % 256, np.uint8)).save(buf, "JPEG", quality=90)
            (folder / f"{i:04d}.jpg").write_bytes(buf.getvalue())
    run_convert(ConvertConfig(tmp_path / "raw", tmp_path / "data", image=ImageSettings(short_side=24),
                              shard_size=1200, workers=1, progress=False))
    (path,) = load_dataset(tmp_path / "data").lmdb_paths("train")
    size = (path / "data.mdb").stat().st_size
    assert size <= lmdb_map_size(path) <= 2 * size  # the scratch's size: near the data's, never 1 TiB
    assert run_verify(VerifyConfig(tmp_path / "data", workers=1, progress=False)).ok
