"""The `upgrade` job: bring a dataset converted by an older alexnet-pipe to the current format,
rewriting no image.

Version 1 wrote every LMDB shard with a stored map size of 1 TiB. Readers that set no map size of
their own (DALI's Caffe reader, Caffe) reserve that much address space per shard, so one process
could open only ~120 shards (ImageNet has 257 at the default shard size). The upgrade replaces each
shard's ``data.mdb`` by a compacted copy that stores its data's size (the records, keys and
checksums stay exactly as they are), then rewrites the manifest as version 2. It is safe to kill
and rerun: each shard file is swapped atomically, and the manifest is written last.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from alexnet_pipe.dataset.layout import LMDB_DATA_FILE, LMDB_LOCK_FILE, MANIFEST_FILE, part_path
from alexnet_pipe.dataset.manifest import DATASET_VERSION, Dataset, load_dataset
from alexnet_pipe.errors import DatasetError
from alexnet_pipe.formats.shards import compact_lmdb, dir_size, reserves_too_much
from alexnet_pipe.fsutil import atomic_write_json, fsync_dir, remove


@dataclass(frozen=True)
class UpgradeResult:
    root: Path
    from_version: int
    shards_rewritten: int

    def summary(self) -> str:
        if self.from_version == DATASET_VERSION:
            return f"{self.root} is already at format version {DATASET_VERSION}; nothing to do"
        return (f"upgraded {self.root} from format version {self.from_version} to {DATASET_VERSION}: "
                f"{self.shards_rewritten} LMDB shards now store the map size of their data")


def _compact_in_place(path: Path) -> None:
    """Swap ``path/data.mdb`` for a compacted copy; readers see the old file or the new one."""
    tmp = path.parent / f".{path.name}.upgrade"
    remove(tmp)  # left by an interrupted run
    compact_lmdb(path, tmp)
    os.replace(tmp / LMDB_DATA_FILE, path / LMDB_DATA_FILE)
    remove(path / LMDB_LOCK_FILE)  # a reader's lock file from the old environment, if any
    fsync_dir(path)
    remove(tmp)


def _update_part(root: Path, name: str, size: int) -> None:
    """The shard's completion record gets its new size too: a convert rerun (or --repair) rebuilds
    the manifest from the completion records."""
    part = root / part_path(name)
    try:
        record = json.loads(part.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none, or damaged: convert redoes a shard without a readable completion record
    if isinstance(record.get("lmdb"), dict) and record["lmdb"].get("bytes") != size:
        record["lmdb"]["bytes"] = size
        atomic_write_json(part, record)


def run_upgrade(root: Path) -> UpgradeResult:
    """Upgrade the dataset in ``root`` in place (see the module docstring).

    Raises:
        DatasetError: ``root`` is not a converted dataset, or is newer than this alexnet-pipe.
    """
    ds: Dataset = load_dataset(root)
    version = ds.version
    if version == DATASET_VERSION:
        return UpgradeResult(root, version, 0)
    manifest = json.loads(json.dumps(ds.manifest))  # a copy to edit
    rewritten = 0
    if "lmdb" in ds.formats:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                path = root / shard["lmdb"]["path"]
                if not (path / LMDB_DATA_FILE).is_file():
                    raise DatasetError(f"{path} is missing; the dataset cannot be upgraded, only reconverted")
                if reserves_too_much(path):
                    _compact_in_place(path)
                    rewritten += 1
                shard["lmdb"]["bytes"] = dir_size(path)
                _update_part(root, path.name, shard["lmdb"]["bytes"])
    # Version 1 never upscaled: record that, so training knows small images were kept small.
    manifest["settings"].setdefault("upscale", False)
    manifest["version"] = DATASET_VERSION
    manifest["upgraded_from"] = version
    atomic_write_json(root / MANIFEST_FILE, manifest)
    return UpgradeResult(root, version, rewritten)
