"""`upgrade`: a version-1 dataset (LMDB shards storing a 1 TiB map size) becomes current without
rewriting a record, and DALI's own Caffe reader then opens its shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings, VerifyConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.convert.upgrade import run_upgrade
from alexnet_pipe.convert.verify import run_verify
from alexnet_pipe.dataset.manifest import DATASET_VERSION, load_dataset
from alexnet_pipe.formats.lmdb import dir_size, lmdb_map_size, reserves_too_much


def _records(path: Path) -> list[tuple[bytes, bytes]]:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return list(txn.cursor())


def make_version_1(raw: Path, dst: Path) -> Path:
    """What alexnet-pipe wrote before: the same records, each shard written with a 1 TiB map."""
    run_convert(ConvertConfig(raw, dst, formats=("lmdb", "recordio"), image=ImageSettings(short_side=64),
                              shard_size=5, workers=1, progress=False))
    manifest = json.loads((dst / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = dst / shard["lmdb"]["path"]
            records = _records(path)
            shutil.rmtree(path)
            with lmdb.open(str(path), map_size=1 << 40, lock=False) as env, env.begin(write=True) as txn:
                for key, value in records:
                    txn.put(key, value, append=True)
            with lmdb.open(str(path), map_size=1 << 40, lock=False) as env:  # free pages, as rewrites leave
                with env.begin(write=True) as txn:
                    txn.put(b"~scratch", bytes(200_000))
                with env.begin(write=True) as txn:
                    txn.delete(b"~scratch")
            shard["lmdb"]["bytes"] = dir_size(path)
            part_file = dst / ".parts" / f"{path.name}.json"  # version 1's completion records said so too
            part = json.loads(part_file.read_text())
            part["lmdb"]["bytes"] = shard["lmdb"]["bytes"]
            part_file.write_text(json.dumps(part))
    manifest["version"] = 1
    manifest["settings"].pop("upscale", None)  # version 1 had no such setting
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_upgrade_stores_small_map_sizes_and_keeps_every_record(raw_tree, tmp_path):
    data = make_version_1(raw_tree, tmp_path / "v1")
    ds = load_dataset(data)
    paths = ds.lmdb_paths("train") + ds.lmdb_paths("val")
    before = {p.name: _records(p) for p in paths}
    assert all(lmdb_map_size(p) == 1 << 40 for p in paths)
    assert ds.version == 1 and "alexnet-pipe upgrade" in ds.upgrade_hint()
    verified = run_verify(VerifyConfig(data, workers=1, progress=False))
    assert verified.ok and "alexnet-pipe upgrade" in verified.notes[0]  # readable, with a note

    res = CliRunner().invoke(main, ["upgrade", str(data)])
    assert res.exit_code == 0 and f"to {DATASET_VERSION}: {len(paths)} LMDB shards" in res.output, res.output
    ds = load_dataset(data)
    assert ds.version == DATASET_VERSION and ds.upgrade_hint() is None
    assert ds.manifest["settings"]["upscale"] is False  # version 1 never upscaled
    for p in paths:
        assert not reserves_too_much(p)
        assert _records(p) == before[p.name]
        assert sorted(f.name for f in p.iterdir()) == ["data.mdb"]
    verified = run_verify(VerifyConfig(data, workers=1, progress=False))
    assert verified.ok and not verified.notes
    for shard in ds.shards("train") + ds.shards("val"):  # a convert rerun rebuilds the manifest from these
        part = json.loads((data / ".parts" / f"{Path(shard['lmdb']['path']).name}.json").read_text())
        assert part["lmdb"]["bytes"] == shard["lmdb"]["bytes"] == dir_size(data / shard["lmdb"]["path"])
    assert "already at format version" in run_upgrade(data).summary()
    # DALI's own Caffe reader reads the upgraded shards: every record, its label intact.
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(before["train-00000"]), num_threads=1, device_id=None)
    def caffe():
        jpegs, labels = fn.readers.caffe(path=[str(p) for p in ds.lmdb_paths("train")], name="reader")
        return jpegs, labels

    pipe = caffe()
    pipe.build()
    assert pipe.epoch_size("reader") == sum(len(v) for k, v in before.items() if k.startswith("train")) == 18
    _, labels = pipe.run()
    assert all(0 <= int(x) < 3 for x in labels.as_array().reshape(-1))


def test_upgrade_resumes_after_a_crash_between_shards(raw_tree, tmp_path):
    """A run killed after some shards: leftovers of the interrupted swap are cleaned, all end small."""
    data = make_version_1(raw_tree, tmp_path / "v1")
    first = load_dataset(data).lmdb_paths("train")[0]
    (first.parent / f".{first.name}.upgrade").mkdir()  # what a kill inside the swap leaves
    run_upgrade(data)
    assert not list(first.parent.glob(".*.upgrade"))
    assert all(not reserves_too_much(p) for p in load_dataset(data).lmdb_paths("train"))


def test_current_datasets_fail_verify_if_a_shard_stores_a_huge_map(raw_tree, tmp_path):
    data = tmp_path / "v2"
    run_convert(ConvertConfig(raw_tree, data, image=ImageSettings(short_side=64), shard_size=5, workers=1,
                              progress=False))
    path = load_dataset(data).lmdb_paths("train")[0]
    records = _records(path)
    shutil.rmtree(path)
    with lmdb.open(str(path), map_size=1 << 40, lock=False) as env, env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value, append=True)
    result = run_verify(VerifyConfig(data, workers=1, progress=False))
    assert not result.ok and "alexnet-pipe upgrade" in str(result.problems[0])
