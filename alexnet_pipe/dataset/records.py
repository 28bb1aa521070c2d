"""Random access to a converted split: record number -> (JPEG bytes, label).

Record numbers are positions in the split's stored order (shard by shard, as the manifest lists
the shards). The table that locates them is small (two int64 per record, 20 MB for ImageNet's
train split) and picklable, so DALI's reader processes can take it; each process opens the shard
files itself, lazily, on first use.

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
from pathlib import Path

import lmdb
import numpy as np

from alexnet_pipe.dataset.checksum import decode_record_sums, record_crc
from alexnet_pipe.dataset.layout import LMDB_DATA_FILE, record_sums_path
from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.errors import AlexnetPipeError, DatasetError, FormatError
from alexnet_pipe.formats.datum import datum_image_and_label
from alexnet_pipe.formats.recordio import read_index_array, unframe_record, unpack_payload


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


@dataclass(frozen=True)
class RecordTable:
    """Where every record of one split is, for one shard format."""

    kind: str  # "lmdb" or "recordio"
    root: str  # dataset root (for messages)
    paths: tuple[str, ...]  # per shard: LMDB directory or .rec file
    shard: np.ndarray  # int32 per record: index into paths
    ref: np.ndarray  # int64 per record: LMDB record id, or RecordIO byte offset
    length: np.ndarray | None  # int64 per record: RecordIO framed length (None for LMDB)
    id_width: int  # digits of the LMDB key's record id
    split: str = ""  # for messages
    names: tuple[str, ...] = ()  # per shard: its name (``train-00003``), which names its per-record sums
    starts: tuple[int, ...] = ()  # per shard: the number of its first record

    def __len__(self) -> int:
        return len(self.shard)


def _lmdb_ids(path: Path, expected: int) -> np.ndarray:
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


def _recordio_offsets(idx: Path, rec: Path, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, framed length) of every record of one .rec shard, from its .idx."""
    try:
        size = rec.stat().st_size
        offsets = read_index_array(idx, size)[:, 1]  # strictly increasing, inside the .rec
    except (OSError, FormatError) as exc:
        raise DatasetError(f"cannot read the index {idx} ({exc}); run alexnet-pipe verify") from exc
    if len(offsets) != expected or (len(offsets) and offsets[0] != 0):
        raise DatasetError(f"{idx} does not index the {expected} records of {rec}; run alexnet-pipe verify")
    return offsets, np.diff(offsets, append=size)


def record_table(ds: Dataset, split: str, kind: str) -> RecordTable:
    """Locate every record of ``split`` in the ``kind`` shards (reads keys or indices, not images).

    Raises:
        DatasetError: a shard is missing or does not match the manifest.
    """
    shards = ds.shards(split)
    if not shards:
        raise DatasetError(f"the {split} split of {ds.root} has no records")
    paths, shard_of, refs, lengths = [], [], [], []
    starts = tuple(int(n) for n in np.cumsum([0] + [s["records"] for s in shards[:-1]]))
    if kind == "lmdb":
        dirs = ds.lmdb_paths(split)
        _check_exists(dirs)
        for k, (entry, path) in enumerate(zip(shards, dirs)):
            refs.append(_lmdb_ids(path, entry["records"]))
            paths.append(str(path))
            shard_of.append(np.full(entry["records"], k, np.int32))
    else:
        recs, _ = ds.recordio_paths(split)
        idxs = [ds.root / s["recordio"]["idx"] for s in shards]
        _check_exists(recs + idxs)
        for k, (entry, rec, idx) in enumerate(zip(shards, recs, idxs)):
            offsets, length = _recordio_offsets(idx, rec, entry["records"])
            refs.append(offsets)
            lengths.append(length)
            paths.append(str(rec))
            shard_of.append(np.full(entry["records"], k, np.int32))
    return RecordTable(
        kind, str(ds.root), tuple(paths), np.concatenate(shard_of), np.concatenate(refs),
        np.concatenate(lengths) if lengths else None, int(ds.manifest.get("record_id_width", 8)),
        split, tuple(s["name"] for s in shards), starts,
    )


def _check_exists(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetError(
            f"{len(missing)} shard file(s) listed in the manifest are missing, e.g. {missing[0]}; "
            "rerun alexnet-pipe convert with the same arguments to rewrite them"
        )


_ESCAPE = {c: f"\\x{c:02x}" for c in [*range(32), 127]}  # a key from a file name stays on one line


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
        self._open: dict[int, object] = {}
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
            if t.kind == "lmdb":
                key, value = self._read_lmdb(k, int(t.ref[i]))
                if sums is not None and record_crc(value) != sums[i - t.starts[k]]:
                    raise _Damaged(bytes(key).decode(errors="replace"))
                return datum_image_and_label(value)
            payload = self._read_recordio(k, int(t.ref[i]), int(t.length[i]))
            if sums is not None and record_crc(payload) != sums[i - t.starts[k]]:
                raise _Damaged(self._recordio_key(k, i))
            header, jpeg = unpack_payload(payload)
            label = header.label[0] if isinstance(header.label, tuple) else header.label
            return jpeg, int(label)
        except _Damaged as exc:
            shard = os.path.relpath(t.paths[k], t.root)
            raise DatasetError(
                f"{t.split} shard {shard} key {exc.key.translate(_ESCAPE)}: the record's bytes differ from the "
                f"checksum convert recorded (damaged on disk), so it is not used; run alexnet-pipe verify {t.root} "
                "--repair") from None
        except (OSError, lmdb.Error, AlexnetPipeError) as exc:
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

    def _read_lmdb(self, k: int, record_id: int) -> tuple[memoryview, memoryview]:
        """(key, value) of a record, as buffers valid until the next read of shard ``k``."""
        handle = self._open.get(k)
        if handle is None:
            env = _ENVS.acquire(self.table.paths[k])
            txn = env.begin(buffers=True)
            handle = self._open[k] = (env, txn, txn.cursor())
        cursor = handle[2]
        prefix = b"%0*d_" % (self.table.id_width, record_id)
        if not cursor.set_range(prefix) or not bytes(cursor.key()).startswith(prefix):
            raise DatasetError(f"no record with id {record_id}")
        return cursor.key(), cursor.value()

    def _read_recordio(self, k: int, offset: int, length: int) -> bytes:
        fd = self._open.get(k)
        if fd is None:
            fd = self._open[k] = os.open(self.table.paths[k], os.O_RDONLY)
        return unframe_record(os.pread(fd, length, offset))

    def _recordio_key(self, k: int, i: int) -> str:
        """Record ``i``'s id, from its shard's index (read again: only for a message)."""
        path = os.path.splitext(self.table.paths[k])[0] + ".idx"
        try:
            return str(int(read_index_array(Path(path))[i - self.table.starts[k], 0]))
        except (OSError, FormatError, IndexError):
            return f"at byte {int(self.table.ref[i])}"

    def close(self) -> None:
        for handle in self._open.values():
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle[1].abort()
                _ENVS.release(handle[0])
        self._open.clear()
