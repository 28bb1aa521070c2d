"""The `upgrade` job: bring a dataset converted by an older alexnet-pipe to the current format,
rewriting no image.

Each format upgrades its own shards (``Format.upgrade``). Version 1 wrote every LMDB shard with a
stored map size of 1 TiB. Readers that set no map size of their own (DALI's Caffe reader, Caffe)
reserve that much address space per shard, so one process could open only ~120 shards (ImageNet
has 257 at the default shard size). The upgrade replaces each shard's ``data.mdb`` by a compacted
copy that stores its data's size (the records, keys and checksums stay exactly as they are),
updates the shard's size in its completion record, then rewrites the manifest as version 2. It is
safe to kill and rerun: each shard file is swapped atomically, and the manifest is written last. A
write that fails (a full disk, a file size limit) is one line naming the shard or file; the shards
upgraded so far stay upgraded, the dataset stays readable as version 1, and the rerun goes on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import lmdb

from alexnet_pipe.dataset.layout import MANIFEST_FILE, part_path
from alexnet_pipe.dataset.manifest import DATASET_VERSION, Dataset, load_dataset
from alexnet_pipe.dataset.parts import Part
from alexnet_pipe.dataset.schema import Settings
from alexnet_pipe.formats import get_format
from alexnet_pipe.fsutil import atomic_write_json, output_error, read_json


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


def _update_part(root: Path, name: str, fmt: str, size: int) -> None:
    """The shard's completion record gets its new size too: a convert rerun (or --repair) rebuilds
    the manifest from the completion records."""
    path = root / part_path(name)
    try:
        part = Part.from_json(read_json(path))
    except (OSError, ValueError):
        return  # none, or damaged: convert redoes a shard without a readable completion record
    entry = getattr(part, fmt)
    if entry is not None and entry.bytes != size:
        atomic_write_json(path, dataclasses.replace(part, **{fmt: dataclasses.replace(entry, bytes=size)}).to_json())


def run_upgrade(root: Path) -> UpgradeResult:
    """Upgrade the dataset in ``root`` in place (see the module docstring).

    Raises:
        DatasetError: ``root`` is not a converted dataset, or is newer than this alexnet-pipe.
        OutputError: a write failed (a full disk, a file size limit); one line, what to do included.
    """
    ds: Dataset = load_dataset(root)
    if ds.version == DATASET_VERSION:
        return UpgradeResult(root, ds.version, 0)
    where = [root]  # what is being written: a failed write that names no file is reported at it
    try:
        return _upgrade(root, ds, where)
    except (OSError, lmdb.Error) as exc:
        error = output_error(exc, where[0], "free some space (or raise the limit), then rerun the same command: the "
                                            "shards upgraded so far are kept and it goes on from them (the dataset "
                                            "stays readable meanwhile)")
        if error is None:
            raise
        raise error from exc


def _upgrade(root: Path, ds: Dataset, where: list[Path]) -> UpgradeResult:
    version = ds.version
    splits = dict(ds.meta.splits)
    rewritten = 0
    for fmt in map(get_format, ds.formats):
        for name, split in splits.items():
            shards = list(split.shards)
            for k, shard in enumerate(shards):
                where[0] = root / fmt.data_path(shard.files(fmt.name))
                upgraded = fmt.upgrade(root, shard.files(fmt.name))
                if upgraded is None:  # nothing to upgrade in this format
                    continue
                rewrote, entry = upgraded
                rewritten += rewrote
                shards[k] = dataclasses.replace(shard, **{fmt.name: entry})
                # the completion record named as the shard's files are (a checked path, unlike "name")
                _update_part(root, Path(fmt.data_path(entry)).name, fmt.name, entry.bytes)
            splits[name] = dataclasses.replace(split, shards=tuple(shards))
    # Version 1 never upscaled: record that, so training knows small images were kept small.
    settings = dict(ds.meta.settings.values)
    settings.setdefault("upscale", False)
    manifest = dataclasses.replace(ds.meta, version=DATASET_VERSION, upgraded_from=version, settings=Settings(settings),
                                   splits=splits)
    where[0] = root / MANIFEST_FILE
    atomic_write_json(root / MANIFEST_FILE, manifest.to_json())
    return UpgradeResult(root, version, rewritten)
