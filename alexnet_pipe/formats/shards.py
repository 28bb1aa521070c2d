"""Shard plan (pure) and the LMDB / RecordIO shard writers.

Records are stored in a seeded shuffled order: each input's place is the sha256 of
(seed, split, name), so the order is mixed across classes, identical on every machine and
Python version, and an input keeps its place relative to the others when files are added.
Shard k of a split holds the inputs at shuffled positions [k*S, (k+1)*S); the position is
also the record's id. A shard depends only on its own inputs, so shards can be written,
resumed or (later) spread over machines independently.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from alexnet_pipe.dataset.checksum import RecordDigest, record_crc
from alexnet_pipe.dataset.layout import LMDB_DATA_FILE, shard_paths
from alexnet_pipe.formats.datum import Datum, datum_image_and_label, encode_datum
from alexnet_pipe.formats.recordio import IRHeader, RecordIOWriter, frame_record, pack_payload
from alexnet_pipe.fsutil import os_error
from alexnet_pipe.imaging.process import Encoded
from alexnet_pipe.inputs.table import Source, SourceTable, SourceView

LMDB_COMMIT_EVERY = 1000  # records per write transaction, as Caffe's convert_imageset
COMMIT_BYTES = 64 << 20  # ... or fewer: a transaction's records are kept until it commits (see ShardWriter)
# The scratch LMDB's first map (address space, not disk; the shard stores its data's size): room
# for a default shard of 5,000 ImageNet images. It is doubled whenever it is full, so any shard
# fits; not reserving 1 TiB up front keeps machines with `ulimit -v` working.
SCRATCH_MAP_SIZE = 4 << 30
LMDB_MAX_KEY = 511


@dataclass(frozen=True)
class ShardPlan:
    """The inputs of one shard, in the order they are stored."""

    split: str
    index: int
    first_id: int
    sources: Sequence[Source]  # a view of the split's SourceTable: Sources are made on access

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def shuffle_key(seed: int, split: str, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{split}\0{name}".encode("utf-8", "surrogateescape")).digest()


def plan_shards(split: str, sources: SourceTable, shard_size: int, seed: int) -> list[ShardPlan]:
    """Shuffle a split's inputs deterministically and cut them into shards of ``shard_size``.

    The order is that of the inputs' ``shuffle_key``, sorted on its first 128 bits (two uint64
    columns: 16 bytes an input, not a Python bytes object each).
    """
    hi, lo = np.empty(len(sources), np.uint64), np.empty(len(sources), np.uint64)
    for i, name in enumerate(sources.names()):
        key = shuffle_key(seed, split, name)
        hi[i], lo[i] = int.from_bytes(key[:8], "big"), int.from_bytes(key[8:16], "big")
    ordered = np.lexsort((lo, hi))
    return [
        ShardPlan(split, k, start, SourceView(sources, ordered[start : start + shard_size]))
        for k, start in enumerate(range(0, len(ordered), shard_size))
    ]


def lmdb_key(record_id: int, name: str, id_width: int = 8) -> bytes:
    """Caffe's key style ``%08d_<name>``: sorts in record order and names the source."""
    key = f"{record_id:0{id_width}d}_{name}".encode("utf-8", "surrogateescape")  # undecodable names survive
    return key[:LMDB_MAX_KEY]


def dir_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def compact_lmdb(src: Path, dst: Path) -> None:
    """Copy the LMDB ``src`` to ``dst`` (a new directory), compacted, with a stored map size of
    ``src``'s data (at least the copy's, which a compacting copy can only shrink).

    LMDB keeps the map size it was written with in the file, and a reader that sets none (DALI's
    Caffe reader, Caffe itself) reserves that much address space per database: with a writer's
    reservation (version 1 stored 1 TiB), one process could open only ~120 shards. Opening ``src`` with a map size of 1
    makes LMDB round it up to the data's size, and a compacting copy stores that size.
    """
    dst.mkdir(parents=True)
    # Into a descriptor of our own: LMDB's copy to a path writes with O_DIRECT, each write waiting
    # for the disk (0.43 s against 0.10 s for 70 MB, the same bytes); one fsync then makes it durable.
    fd = os.open(dst / LMDB_DATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with lmdb.open(str(src), map_size=1, readonly=True, lock=False, subdir=True) as env:
            env.copyfd(fd, compact=True)
        os.fsync(fd)
    finally:
        os.close(fd)


def lmdb_map_size(path: Path) -> int:
    """The map size stored in an LMDB environment's header (what a reader that sets none maps)."""
    with lmdb.open(str(path), map_size=0, readonly=True, lock=False, subdir=True) as env:
        return env.info()["map_size"]


def reserves_too_much(path: Path) -> bool:
    """True when an LMDB shard's stored map size is far beyond its data (version 1's 1 TiB).

    Our shards store the size of the scratch database they were compacted from: the data's size,
    or up to ~1.5x it where records were inserted out of key order (half-full B-tree pages).
    Twice the data plus 1 MiB separates that from a writer's reservation.
    """
    return lmdb_map_size(path) > 2 * (path / LMDB_DATA_FILE).stat().st_size + (1 << 20)


class ShardWriter:
    """Writes one shard in every requested format into a staging directory.

    Records may arrive in any order (the converter reads its inputs in file order, for sequential
    I/O on folders and archives) and are stored in record-id order (the shuffled order): they go
    first into a scratch LMDB keyed as the shard will be, which then becomes the shard's LMDB by a
    compacting copy (see ``compact_lmdb``) and is read back in key order to write RecordIO.
    Nothing here is visible in the dataset: the converter renames the finished files into place
    only after ``close()``. RecordIO alone needs no LMDB: its records go to a scratch file in
    arrival order and are copied out in record-id order (``_ArrivalFile``), which saves building
    a Datum, an LMDB insert and a read-back per record (a fifth of the converter's main process).

    The scratch map grows by itself. When a record does not fit (``lmdb.MapFullError``, at a put
    or at a commit), a new scratch database with twice the map is written with the very same puts
    and commits, in the same order (the committed records read from the old one, the open
    transaction's from memory), and the old one is deleted. The same operations on a fresh
    database give the same bytes whatever its map size (LMDB's page reuse, and so the content of
    unused page space, follows the operations alone), so the shard is identical however often
    the map grew. A transaction holds at most LMDB_COMMIT_EVERY records and COMMIT_BYTES bytes.
    """

    def __init__(self, staging: Path, plan: ShardPlan, formats: tuple[str, ...], id_width: int):
        self.staging, self.plan, self.formats, self.id_width = staging, plan, formats, id_width
        self.paths = {k: staging / v for k, v in shard_paths(plan.name).items()}
        self._order: list[bytes] = []  # every key put, in order: what a larger map must repeat
        self._pending: list[tuple[bytes, bytes]] = []  # the open transaction's records
        self._pending_bytes = 0
        self._generation = 0
        self._arrivals: _ArrivalFile | None = None
        if "lmdb" in formats:
            self._open(SCRATCH_MAP_SIZE)
        else:
            staging.mkdir(parents=True, exist_ok=True)
            self._arrivals = _ArrivalFile(staging / f".{plan.name}.scratch-records")
            self._scratch = self._arrivals.path
        self.count = 0
        self.record_sums: dict[str, array] = {}  # per format, after close(): each record's CRC-32 (checksum.py)

    def _open(self, map_size: int) -> None:
        """A new, empty scratch database of ``map_size`` and its first write transaction."""
        self._map_size = map_size
        suffix = f"-{self._generation}" if self._generation else ""
        self._scratch = self.staging / f".{self.plan.name}.scratch{suffix}"
        self._scratch.mkdir(parents=True)
        # lock=False: one writer on a private directory. sync=False: a crash redoes the shard
        # anyway. meminit=True zeroes the space of newly allocated pages.
        self._env = lmdb.open(str(self._scratch), map_size=map_size, subdir=True, lock=False, sync=False,
                              meminit=True)
        self._txn = self._env.begin(write=True)

    def add(self, record_id: int, source: Source, image: Encoded) -> None:
        if self._arrivals is not None:
            self._arrivals.put(record_id, pack_payload(IRHeader(0, float(source.label), record_id), image.jpeg))
            self.count += 1
            return
        try:
            self._add(record_id, source, image)
        except lmdb.Error as exc:  # a full disk: LMDB's errors carry no errno, nor the database's path
            raise os_error(exc, self._scratch) from exc

    def _add(self, record_id: int, source: Source, image: Encoded) -> None:
        datum = Datum(image.jpeg, source.label, image.height, image.width, 3, encoded=True)
        key, value = lmdb_key(record_id, source.name, self.id_width), encode_datum(datum)
        try:
            stored = self._txn.put(key, value, overwrite=False)
        except lmdb.MapFullError:
            stored = None
        if stored is False:
            raise RuntimeError(f"record {record_id} of {self.plan.name} was written twice")
        self._order.append(key)
        self._pending.append((key, value))
        self._pending_bytes += len(key) + len(value)
        if stored is None:
            self._grow()  # puts this record too
        self.count += 1
        if self._due():
            self._commit()

    def _due(self) -> bool:
        return len(self._pending) >= LMDB_COMMIT_EVERY or self._pending_bytes >= COMMIT_BYTES

    def _commit(self, begin_next: bool = True) -> None:
        """Commit the open transaction (and begin the next one)."""
        while True:
            try:
                self._txn.commit()
                break
            except lmdb.MapFullError:  # the commit's own pages (the free list) did not fit
                self._grow()
        self._pending.clear()
        self._pending_bytes = 0
        if begin_next:
            self._txn = self._env.begin(write=True)

    def _grow(self) -> None:
        """Move to a scratch database with twice the map (or more), holding the same records
        written by the same operations, the open transaction's records put but not committed."""
        self._txn.abort()
        old_env, old_dir = self._env, self._scratch
        map_size = self._map_size
        while True:
            map_size *= 2
            self._generation += 1
            self._open(map_size)
            try:
                with old_env.begin() as old:
                    self._replay(old)
                break
            except lmdb.MapFullError:
                self._txn.abort()
                self._env.close()
                shutil.rmtree(self._scratch)
        old_env.close()
        shutil.rmtree(old_dir)

    def _replay(self, old) -> None:
        """Repeat, in the new database, every put and commit made so far (the same rule as add)."""
        committed = len(self._order) - len(self._pending)
        n = size = 0
        for key in self._order[:committed]:
            value = old.get(key)
            self._txn.put(key, value, overwrite=False)
            n, size = n + 1, size + len(key) + len(value)
            if n >= LMDB_COMMIT_EVERY or size >= COMMIT_BYTES:
                self._txn.commit()
                self._txn = self._env.begin(write=True)
                n = size = 0
        for key, value in self._pending:
            self._txn.put(key, value, overwrite=False)

    def close(self) -> dict:
        """Finish every format; return the per-format manifest entries (paths relative to root)."""
        try:
            return self._close()
        except lmdb.Error as exc:
            raise os_error(exc, self._scratch) from exc

    def _close(self) -> dict:
        rel = shard_paths(self.plan.name)
        out = {}
        rec = None
        if "recordio" in self.formats:
            self.paths["rec"].parent.mkdir(parents=True, exist_ok=True)
            rec = RecordIOWriter(self.paths["rec"], self.paths["idx"])
        if self._arrivals is not None:  # RecordIO alone
            self._arrivals.copy_to(rec)
            self._arrivals.remove()
        else:
            self._close_lmdb(rec, out)
        if rec is not None:
            rec.close()
            out["recordio"] = {
                "rec": rel["rec"],
                "idx": rel["idx"],
                "checksum": "sha256:" + rec.digest.hexdigest(),
                "bytes": os.path.getsize(self.paths["rec"]),
            }
            self.record_sums["recordio"] = rec.digest.crcs
        return out

    def _close_lmdb(self, rec: RecordIOWriter | None, out: dict) -> None:
        """The shard's LMDB, compacted from the scratch database, whose key-ordered records also
        feed ``rec``."""
        self._commit(begin_next=False)
        self._env.close()
        digest = RecordDigest()
        with lmdb.open(str(self._scratch), readonly=True, lock=False, subdir=True) as env, env.begin() as txn:
            for key, value in txn.cursor():  # key order = record-id order = stored order
                digest.update(key, value)
                if rec is not None:
                    datum = datum_image_and_label(value)
                    record_id = int(key.split(b"_", 1)[0])
                    rec.write(record_id, pack_payload(IRHeader(0, float(datum[1]), record_id), datum[0]))
        self.paths["lmdb"].parent.mkdir(parents=True, exist_ok=True)
        compact_lmdb(self._scratch, self.paths["lmdb"])
        out["lmdb"] = {
            "path": shard_paths(self.plan.name)["lmdb"],
            "checksum": "sha256:" + digest.hexdigest(),
            "bytes": dir_size(self.paths["lmdb"]),
        }
        self.record_sums["lmdb"] = digest.crcs
        shutil.rmtree(self._scratch)


class _ArrivalFile:
    """RecordIO records appended to one file as they arrive, copied out in record-id order.

    Each record is framed and its CRC-32 taken on arrival, while the workers still run; what is
    left for the shard's close is the copy itself and the shard digest (which follows the stored
    order). For the last shard of a run that close is time no worker overlaps.
    """

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb", buffering=1 << 20)
        self._where: dict[int, tuple[int, int, int]] = {}  # record id -> (offset, framed length, CRC)
        self._end = 0

    def put(self, record_id: int, payload: bytes) -> None:
        if record_id in self._where:
            raise RuntimeError(f"record {record_id} of {self.path.name} was written twice")
        framed = frame_record(payload)
        self._file.write(framed)
        self._where[record_id] = (self._end, len(framed), record_crc(payload))
        self._end += len(framed)

    def copy_to(self, rec: RecordIOWriter) -> None:
        """Every record into ``rec``, in record-id order."""
        self._file.close()
        with open(self.path, "rb") as f:
            for record_id in sorted(self._where):
                offset, length, crc = self._where[record_id]
                rec.write_framed(record_id, os.pread(f.fileno(), length, offset), crc)

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
