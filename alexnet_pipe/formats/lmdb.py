"""LMDB shards: one LMDB environment per shard (``lmdb/<shard>/data.mdb``) of Caffe Datum records.

Everything LMDB-specific lives here, behind ``formats.base.Format``: the keys (Caffe's
``%08d_<name>``), the writer (a scratch database that grows as needed, compacted into the shard),
the stored map size and its upgrade, the read-only environments shared within a process, random
access by record id, and verify's walk over every record. The Datum codec is formats/datum.py.
A little over 400 lines: the writer's growing scratch map is most of it, and splitting it off
would spread the key and map-size rules it shares with the readers over two modules.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from array import array
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np

from alexnet_pipe.dataset.checksum import RecordDigest
from alexnet_pipe.dataset.layout import LMDB_DATA_FILE, LMDB_LOCK_FILE, shard_paths
from alexnet_pipe.dataset.schema import LmdbFiles
from alexnet_pipe.errors import AlexnetPipeError, DatasetError, FormatError
from alexnet_pipe.formats.base import (
    Finding,
    Format,
    Located,
    Scanned,
    ShardFormatWriter,
    ShardReader,
    ShardScanner,
    check_exist,
)
from alexnet_pipe.formats.datum import Datum, datum_image_and_label, decode_datum, encode_datum
from alexnet_pipe.fsutil import fsync_dir, os_error, remove

LMDB_COMMIT_EVERY = 1000  # records per write transaction, as Caffe's convert_imageset
COMMIT_BYTES = 64 << 20  # ... or fewer: a transaction's records are kept until it commits (see _Writer)
# The scratch LMDB's first map (address space, not disk; the shard stores its data's size): room
# for a default shard of 5,000 ImageNet images. It is doubled whenever it is full, so any shard
# fits; not reserving 1 TiB up front keeps machines with `ulimit -v` working.
SCRATCH_MAP_SIZE = 4 << 30
LMDB_MAX_KEY = 511


def lmdb_key(record_id: int, name: str, id_width: int = 8) -> bytes:
    """Caffe's key style ``%08d_<name>``: sorts in record order and names the source."""
    key = f"{record_id:0{id_width}d}_{name}".encode("utf-8", "surrogateescape")  # undecodable names survive
    return key[:LMDB_MAX_KEY]


def dir_size(path: Path) -> int:
    """Bytes in the files under ``path`` (a shard's folder), or of ``path`` itself when a file."""
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


# ---------------------------------------------------------------- writing


class _Writer(ShardFormatWriter):
    """Writes one shard's LMDB; it sorts, so it also feeds the other formats (``ShardFormatWriter``).

    Records go first into a scratch LMDB keyed as the shard will be, which then becomes the shard's
    LMDB by a compacting copy (see ``compact_lmdb``) and is read back in key order (= record-id
    order) for the other formats.

    The scratch map grows by itself. When a record does not fit (``lmdb.MapFullError``, at a put
    or at a commit), a new scratch database with twice the map is written with the very same puts
    and commits, in the same order (the committed records read from the old one, the open
    transaction's from memory), and the old one is deleted. The same operations on a fresh
    database give the same bytes whatever its map size (LMDB's page reuse, and so the content of
    unused page space, follows the operations alone), so the shard is identical however often
    the map grew. A transaction holds at most LMDB_COMMIT_EVERY records and COMMIT_BYTES bytes.
    """

    sorts = True

    def __init__(self, staging: Path, shard: str, id_width: int):
        self.staging, self.shard, self.id_width = staging, shard, id_width
        self.path = staging / shard_paths(shard)["lmdb"]
        self._order: list[bytes] = []  # every key put, in order: what a larger map must repeat
        self._pending: list[tuple[bytes, bytes]] = []  # the open transaction's records
        self._pending_bytes = 0
        self._generation = 0
        self._open(SCRATCH_MAP_SIZE)

    def _open(self, map_size: int) -> None:
        """A new, empty scratch database of ``map_size`` and its first write transaction."""
        self._map_size = map_size
        suffix = f"-{self._generation}" if self._generation else ""
        self._scratch = self.staging / f".{self.shard}.scratch{suffix}"
        self._scratch.mkdir(parents=True)
        # lock=False: one writer on a private directory. sync=False: a crash redoes the shard
        # anyway. meminit=True zeroes the space of newly allocated pages.
        self._env = lmdb.open(str(self._scratch), map_size=map_size, subdir=True, lock=False, sync=False,
                              meminit=True)
        self._txn = self._env.begin(write=True)

    def add(self, record_id: int, name: str, label: int, jpeg: bytes, height: int, width: int) -> None:
        try:
            self._add(record_id, name, Datum(jpeg, label, height, width, 3, encoded=True))
        except lmdb.Error as exc:  # a full disk: LMDB's errors carry no errno, nor the database's path
            raise os_error(exc, self._scratch) from exc

    def add_sorted(self, record_id: int, label: int, jpeg: bytes) -> None:
        raise NotImplementedError("LMDB shards sort their records themselves")

    def _add(self, record_id: int, name: str, datum: Datum) -> None:
        key, value = lmdb_key(record_id, name, self.id_width), encode_datum(datum)
        try:
            stored = self._txn.put(key, value, overwrite=False)
        except lmdb.MapFullError:
            stored = None
        if stored is False:
            raise RuntimeError(f"record {record_id} of {self.shard} was written twice")
        self._order.append(key)
        self._pending.append((key, value))
        self._pending_bytes += len(key) + len(value)
        if stored is None:
            self._grow()  # puts this record too
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

    def close(self, followers: list[ShardFormatWriter]) -> tuple[LmdbFiles, array]:
        try:
            return self._close(followers)
        except lmdb.Error as exc:
            raise os_error(exc, self._scratch) from exc

    def _close(self, followers: list[ShardFormatWriter]) -> tuple[LmdbFiles, array]:
        """The shard's LMDB, compacted from the scratch database, whose key-ordered records also
        feed ``followers``."""
        self._commit(begin_next=False)
        self._env.close()
        digest = RecordDigest()
        with lmdb.open(str(self._scratch), readonly=True, lock=False, subdir=True) as env, env.begin() as txn:
            for key, value in txn.cursor():  # key order = record-id order = stored order
                digest.update(key, value)
                if followers:
                    jpeg, label = datum_image_and_label(value)
                    record_id = int(key.split(b"_", 1)[0])
                    for writer in followers:
                        writer.add_sorted(record_id, label, jpeg)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        compact_lmdb(self._scratch, self.path)
        entry = LmdbFiles(path=shard_paths(self.shard)["lmdb"], checksum="sha256:" + digest.hexdigest(),
                          bytes=dir_size(self.path))
        shutil.rmtree(self._scratch)
        return entry, digest.crcs


# ---------------------------------------------------------------- reading


class _SharedEnvs:
    """Read-only LMDB environments shared by every reader in this process.

    LMDB allows one open environment per file per process (py-lmdb refuses a second open), yet a
    train loader, a val loader and `inspect` may all read the same shard at once: they share
    one environment, closed when its last user releases it.
    """

    def __init__(self) -> None:
        self._envs: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of data.mdb -> [env, users]

    @staticmethod
    def _key(path: str) -> tuple[int, int]:
        st = os.stat(os.path.join(path, LMDB_DATA_FILE))
        return st.st_dev, st.st_ino

    def acquire(self, path: str) -> lmdb.Environment:
        key = self._key(path)
        entry = self._envs.get(key)
        if entry is None:
            # readahead=False: reads are random, so reading ahead would only waste I/O.
            env = lmdb.open(path, readonly=True, lock=False, subdir=True, readahead=False, max_spare_txns=0)
            entry = self._envs[key] = [env, 0]
        entry[1] += 1
        return entry[0]

    def release(self, env: lmdb.Environment) -> None:
        for key, entry in list(self._envs.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._envs[key]
                    env.close()
                return


_ENVS = _SharedEnvs()  # process-wide by necessity (see the class docstring)


def _record_ids(path: Path, expected: int) -> np.ndarray:
    """Record ids of one LMDB shard in key order, from the keys alone (values are not touched)."""
    try:
        env = _ENVS.acquire(str(path))
        try:
            with env.begin(buffers=True) as txn:
                ids = [int(bytes(key).split(b"_", 1)[0]) for key in txn.cursor().iternext(keys=True, values=False)]
        finally:
            _ENVS.release(env)
    except (OSError, lmdb.Error, ValueError) as exc:
        raise DatasetError(f"cannot read the keys of LMDB shard {path} ({exc}); run alexnet-pipe verify on it") from exc
    if len(ids) != expected:
        raise DatasetError(
            f"LMDB shard {path} holds {len(ids)} records, the manifest says {expected}; run alexnet-pipe verify"
        )
    return np.asarray(ids, dtype=np.int64)


class _Reader(ShardReader):
    """A read is one B-tree seek (``set_range``) to the record id's key prefix, in C."""

    def __init__(self, path: str, id_width: int):
        self.path, self.id_width = path, id_width
        self._handle: tuple | None = None  # (env, txn, cursor), on first use

    def read(self, ref: int, length: int) -> memoryview:
        try:
            return self._read(ref)
        except lmdb.Error as exc:
            raise FormatError(str(exc)) from exc

    def _read(self, record_id: int) -> memoryview:
        if self._handle is None:
            env = _ENVS.acquire(self.path)
            txn = env.begin(buffers=True)
            self._handle = (env, txn, txn.cursor())
        cursor = self._handle[2]
        prefix = b"%0*d_" % (self.id_width, record_id)
        if not cursor.set_range(prefix) or not bytes(cursor.key()).startswith(prefix):
            raise DatasetError(f"no record with id {record_id}")
        return cursor.value()

    def key(self, ref: int, position: int) -> str:
        return bytes(self._handle[2].key()).decode(errors="replace")

    def close(self) -> None:
        if self._handle is not None:
            self._handle[1].abort()
            _ENVS.release(self._handle[0])
            self._handle = None


# ---------------------------------------------------------------- verify's walk


class _Scanner(ShardScanner):
    def __init__(self, root: Path, entry: LmdbFiles, version: int, repair: str):
        self.root, self.where, self.version, self.repair = root, entry.path, version, repair
        self._env: lmdb.Environment | None = None

    def open(self) -> tuple[list[Finding], bool]:
        found: list[Finding] = []
        try:
            if self.version >= 2 and reserves_too_much(self.root / self.where):
                found.append((self.where, "stores a map size far beyond its data (DALI's Caffe reader reserves that "
                                          f"much address space per shard); run alexnet-pipe upgrade {self.root}"))
            self._env = lmdb.open(str(self.root / self.where), readonly=True, lock=False, subdir=True)
        except (OSError, lmdb.Error) as exc:
            found.append((self.where, f"cannot open LMDB ({exc}); {self.repair}"))
            return found, False
        return found, True

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        try:
            with self._env, self._env.begin(buffers=False) as txn:
                yield from txn.cursor()
        except lmdb.Error as exc:
            raise FormatError(str(exc)) from exc

    def parse(self, raw: tuple[bytes, bytes]) -> Scanned:
        key, value = raw
        name = key.decode(errors="replace")
        try:
            datum = decode_datum(value)
        except AlexnetPipeError as exc:
            return Scanned(key, name, value, None, None, False, None, f"not a Datum ({exc})")
        return Scanned(
            key, name, value, datum.label, (datum.width, datum.height), True, datum.data,
            None if datum.encoded else "Datum is not encoded (expected encoded=true JPEG bytes)",
            None if datum.channels == 3 else f"Datum says {datum.channels} channels, expected 3",
        )


# ---------------------------------------------------------------- upgrade


def _compact_in_place(path: Path) -> None:
    """Swap ``path/data.mdb`` for a compacted copy; readers see the old file or the new one."""
    tmp = path.parent / f".{path.name}.upgrade"
    remove(tmp)  # left by an interrupted run
    try:
        compact_lmdb(path, tmp)
        os.replace(tmp / LMDB_DATA_FILE, path / LMDB_DATA_FILE)
    except BaseException:  # a full disk: the part copied would hold the space and stay in view
        remove(tmp)
        raise
    remove(path / LMDB_LOCK_FILE)  # a reader's lock file from the old environment, if any
    fsync_dir(path)
    remove(tmp)


class LmdbFormat(Format):
    name = "lmdb"
    size_rank = 1  # the JPEG in a Datum, plus the B-tree

    def files(self, entry: LmdbFiles) -> list[str]:
        return [entry.path]

    def writer(self, staging: Path, shard: str, id_width: int) -> ShardFormatWriter:
        return _Writer(staging, shard, id_width)

    def locate(self, ds, split: str) -> list[Located]:
        """The record ids in each shard, read once from the keys alone."""
        dirs = ds.lmdb_paths(split)
        check_exist(dirs)
        return [Located(str(path), _record_ids(path, entry.records), None)
                for entry, path in zip(ds.shard_entries(split), dirs)]

    def open_shard(self, path: str, id_width: int) -> ShardReader:
        return _Reader(path, id_width)

    def image_and_label(self, value: bytes | memoryview) -> tuple[bytes, int]:
        return datum_image_and_label(value)

    def scanner(self, root: Path, entry: LmdbFiles, version: int, repair: str) -> ShardScanner:
        return _Scanner(root, entry, version, repair)

    def upgrade(self, root: Path, entry: LmdbFiles) -> tuple[bool, LmdbFiles]:
        """Version 1 stored a map size of 1 TiB: the shard's data.mdb becomes a compacted copy that
        stores its data's size (records, keys and checksums unchanged); the entry gets its size."""
        path = root / entry.path
        if not (path / LMDB_DATA_FILE).is_file():
            raise DatasetError(f"{path} is missing; the dataset cannot be upgraded, only reconverted")
        rewrite = reserves_too_much(path)
        if rewrite:
            _compact_in_place(path)
        return rewrite, dataclasses.replace(entry, bytes=dir_size(path))
