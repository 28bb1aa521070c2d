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
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .checksum import RecordDigest
from .datum import Datum, encode_datum
from .imaging import Encoded
from .recordio import IRHeader, RecordIOWriter, pack_payload
from .scan import Source

LMDB_DIR = "lmdb"
RECORDIO_DIR = "recordio"
LMDB_COMMIT_EVERY = 1000  # records per write transaction, as Caffe's convert_imageset
LMDB_MAP_SIZE = 1 << 40  # address space only: the file grows with the data
LMDB_MAX_KEY = 511


@dataclass(frozen=True)
class ShardPlan:
    """The inputs of one shard, in the order they are stored."""

    split: str
    index: int
    first_id: int
    sources: tuple[Source, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def shuffle_key(seed: int, split: str, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{split}\0{name}".encode("utf-8", "surrogateescape")).digest()


def plan_shards(split: str, sources: list[Source], shard_size: int, seed: int) -> list[ShardPlan]:
    """Shuffle a split's inputs deterministically and cut them into shards of ``shard_size``."""
    ordered = sorted(sources, key=lambda s: shuffle_key(seed, split, s.name))
    return [
        ShardPlan(split, k, start, tuple(ordered[start : start + shard_size]))
        for k, start in enumerate(range(0, len(ordered), shard_size))
    ]


def lmdb_key(record_id: int, name: str, id_width: int = 8) -> bytes:
    """Caffe's key style ``%08d_<name>``: sorts in record order and names the source."""
    key = f"{record_id:0{id_width}d}_{name}".encode("utf-8", "surrogateescape")  # undecodable names survive
    return key[:LMDB_MAX_KEY]


def shard_paths(name: str) -> dict[str, str]:
    """Paths of a shard's files relative to the dataset root."""
    return {
        "lmdb": f"{LMDB_DIR}/{name}",
        "rec": f"{RECORDIO_DIR}/{name}.rec",
        "idx": f"{RECORDIO_DIR}/{name}.idx",
    }


def dir_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class _LmdbShard:
    def __init__(self, path: Path):
        path.mkdir(parents=True)
        # lock=False: one writer on a private staging directory, and no lock.mdb left behind
        # in the dataset (readers open with lock=False as well). meminit=True zeroes unused
        # page space, which makes the file bytes reproducible.
        self.env = lmdb.open(str(path), map_size=LMDB_MAP_SIZE, subdir=True, lock=False, sync=False, meminit=True)
        self.txn = self.env.begin(write=True)
        self.count = 0
        self.digest = RecordDigest()

    def write(self, key: bytes, value: bytes) -> None:
        if not self.txn.put(key, value, append=True):
            raise RuntimeError(f"LMDB refused key {key!r}")
        self.digest.update(key, value)
        self.count += 1
        if self.count % LMDB_COMMIT_EVERY == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)

    def close(self) -> None:
        self.txn.commit()
        self.env.sync(True)
        self.env.close()


class ShardWriter:
    """Writes one shard in every requested format into a staging directory.

    Nothing here is visible in the dataset: the converter renames the finished files into
    place only after ``close()``.
    """

    def __init__(self, staging: Path, plan: ShardPlan, formats: tuple[str, ...], id_width: int):
        self.staging, self.plan, self.id_width = staging, plan, id_width
        self.paths = {k: staging / v for k, v in shard_paths(plan.name).items()}
        self._lmdb = _LmdbShard(self.paths["lmdb"]) if "lmdb" in formats else None
        self._rec = None
        if "recordio" in formats:
            self.paths["rec"].parent.mkdir(parents=True, exist_ok=True)
            self._rec = RecordIOWriter(self.paths["rec"], self.paths["idx"])

    def add(self, record_id: int, source: Source, image: Encoded) -> None:
        if self._lmdb is not None:
            datum = Datum(image.jpeg, source.label, image.height, image.width, 3, encoded=True)
            self._lmdb.write(lmdb_key(record_id, source.name, self.id_width), encode_datum(datum))
        if self._rec is not None:
            self._rec.write(record_id, pack_payload(IRHeader(0, float(source.label), record_id), image.jpeg))

    def close(self) -> dict:
        """Finish every format; return the per-format manifest entries (paths relative to root)."""
        rel = shard_paths(self.plan.name)
        out = {}
        if self._lmdb is not None:
            self._lmdb.close()
            out["lmdb"] = {
                "path": rel["lmdb"],
                "checksum": "sha256:" + self._lmdb.digest.hexdigest(),
                "bytes": dir_size(self.paths["lmdb"]),
            }
        if self._rec is not None:
            self._rec.close()
            out["recordio"] = {
                "rec": rel["rec"],
                "idx": rel["idx"],
                "checksum": "sha256:" + self._rec.digest.hexdigest(),
                "bytes": os.path.getsize(self.paths["rec"]),
            }
        return out
