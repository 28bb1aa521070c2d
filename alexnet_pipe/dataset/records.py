"""Random access to a converted split: record number -> (JPEG bytes, label).

Record numbers are positions in the split's stored order (shard by shard, as the manifest lists
the shards). The table that locates them is small (two int64 per record, 20 MB for ImageNet's
train split) and picklable, so DALI's reader processes can take it; each process opens the shard
files itself, lazily, on first use.

Where a record is, and how it is read, is its format's business (``Format.locate``, ``open_shard``):
- LMDB: the table holds each record's id (the ``%08d`` number its key starts with), read once from
  the keys alone; a read is one B-tree seek (``set_range``) in the shard, in C.
- RecordIO: the table holds each record's byte offset and framed length from the shard's ``.idx``;
  a read is one ``pread``.
Where convert recorded a CRC-32 per record (``.parts/<shard>.<format>.crc``, checksum.py), each
record is checked as it is read (~30 us for a 110 KB record), and a damaged one stops training with
one line naming it. The sums are read per shard on its first use, in each process.
Nothing here imports torch or DALI: reader processes start fast.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import numpy as np

from alexnet_pipe.dataset.checksum import decode_record_sums, record_crc
from alexnet_pipe.dataset.layout import record_sums_path
from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.errors import AlexnetPipeError, DatasetError, FormatError
from alexnet_pipe.formats import get_format
from alexnet_pipe.formats.base import ShardReader
from alexnet_pipe.text import shown


@dataclass(frozen=True)
class RecordTable:
    """Where every record of one split is, for one shard format."""

    kind: str  # the format's name: "lmdb" or "recordio"
    root: str  # dataset root (for messages)
    paths: tuple[str, ...]  # per shard: what a reader opens (LMDB directory, .rec file)
    shard: np.ndarray  # int32 per record: index into paths
    ref: np.ndarray  # int64 per record: where it is in its shard (LMDB record id, RecordIO byte offset)
    length: np.ndarray | None  # int64 per record: bytes to read (RecordIO's framed length; None for LMDB)
    id_width: int  # digits of the LMDB key's record id
    split: str = ""  # for messages
    names: tuple[str, ...] = ()  # per shard: its name (``train-00003``), which names its per-record sums
    starts: tuple[int, ...] = ()  # per shard: the number of its first record

    def __len__(self) -> int:
        return len(self.shard)


def record_table(ds: Dataset, split: str, kind: str) -> RecordTable:
    """Locate every record of ``split`` in the ``kind`` shards (reads keys or indices, not images).

    Raises:
        DatasetError: a shard is missing or does not match the manifest.
    """
    shards = ds.shard_entries(split)
    if not shards:
        raise DatasetError(f"the {split} split of {ds.root} has no records")
    starts = tuple(int(n) for n in np.cumsum([0] + [s.records for s in shards[:-1]]))
    located = get_format(kind).locate(ds, split)
    width = ds.meta.record_id_width  # absent in manifests from before it was recorded: 8, as then
    lengths = [shard.lengths for shard in located if shard.lengths is not None]
    return RecordTable(
        kind, str(ds.root), tuple(shard.path for shard in located),
        np.concatenate([np.full(entry.records, k, np.int32) for k, entry in enumerate(shards)]),
        np.concatenate([shard.refs for shard in located]),
        np.concatenate(lengths) if lengths else None, 8 if width is None else int(width),
        split, tuple(s.name for s in shards), starts,
    )


class _Damaged(Exception):
    """A record whose CRC differs (raised and caught inside ``RecordReader.read``)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def raise_open_file_limit(wanted: int) -> None:
    """Lift the soft open-file limit toward the hard one: a process may hold a file per shard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class RecordReader:
    """Reads records by number; opens a shard on first use and keeps it open."""

    def __init__(self, table: RecordTable):
        self.table = table
        self._format = get_format(table.kind)
        self._open: dict[int, ShardReader] = {}
        self._sums: dict[int, np.ndarray | None] = {}  # per shard, loaded on first use
        raise_open_file_limit(len(table.paths) + 256)

    def read(self, i: int) -> tuple[bytes, int]:
        """(JPEG bytes, label) of record ``i``.

        Raises:
            DatasetError: the record cannot be read, or its bytes differ from its recorded CRC.
        """
        t = self.table
        k = int(t.shard[i])
        sums = self._shard_sums(k)
        try:
            shard = self._open.get(k)
            if shard is None:
                shard = self._open[k] = self._format.open_shard(t.paths[k], t.id_width)
            ref = int(t.ref[i])
            value = shard.read(ref, 0 if t.length is None else int(t.length[i]))
            if sums is not None and record_crc(value) != sums[i - t.starts[k]]:
                raise _Damaged(shard.key(ref, i - t.starts[k]))
            return self._format.image_and_label(value)
        except _Damaged as exc:
            shard = os.path.relpath(t.paths[k], t.root)
            raise DatasetError(
                f"{t.split} shard {shard} key {shown(exc.key)}: the record's bytes differ from the "
                f"checksum convert recorded (damaged on disk), so it is not used; run alexnet-pipe verify {t.root} "
                "--repair") from None
        except (OSError, AlexnetPipeError) as exc:
            raise DatasetError(
                f"record {i} of {t.paths[k]} cannot be read ({exc}); run alexnet-pipe verify {t.root}"
            ) from exc

    def _shard_sums(self, k: int) -> np.ndarray | None:
        """Shard ``k``'s per-record CRCs (None: none recorded, as in datasets converted before them).

        Raises:
            DatasetError: the sums file is there but damaged.
        """
        if k in self._sums:
            return self._sums[k]
        t = self.table
        sums = None
        rel = record_sums_path(t.names[k], t.kind) if k < len(t.names) else None
        if rel is not None and os.path.isfile(path := os.path.join(t.root, rel)):
            records = (t.starts[k + 1] if k + 1 < len(t.starts) else len(t)) - t.starts[k]
            try:
                with open(path, "rb") as f:
                    sums = decode_record_sums(f.read(4 * records + 17), records, path)
            except (OSError, FormatError) as exc:
                raise DatasetError(f"{exc}; run alexnet-pipe verify {t.root} --repair to rewrite it") from None
        self._sums[k] = sums
        return sums

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def key(self, i: int) -> str:
        """The key record ``i`` is stored under in its shard (read, and CRC-checked, to find it)."""
        self.read(i)
        k = int(self.table.shard[i])
        return self._open[k].key(int(self.table.ref[i]), i - self.table.starts[k])


def source_names(ds: Dataset, split: str, numbers: list[int]) -> list[str] | None:
    """The input file each of records ``numbers`` of ``split`` was converted from, relative to the
    split's folder (``"n01440764/n01440764_10026.JPEG"``), from the LMDB keys (``%08d_<name>``,
    ``formats/lmdb.py``: ``lmdb_key``); None where the dataset has no LMDB shards (RecordIO keeps
    no names, only the record's number). A name longer than LMDB's key limit comes back cut."""
    if "lmdb" not in ds.formats:
        return None
    reader = RecordReader(record_table(ds, split, "lmdb"))
    try:
        return [reader.key(int(i)).split("_", 1)[-1] for i in numbers]
    finally:
        reader.close()
