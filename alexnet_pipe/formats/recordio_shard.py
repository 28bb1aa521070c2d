"""RecordIO shards: ``recordio/<shard>.rec`` with its index ``<shard>.idx``, and one combined
index per split (``recordio/<split>.idx``: DALI's MXNet reader takes exactly one).

Everything RecordIO does at the shard level lives here, behind ``formats.base.Format``: the
writer (records put in record-id order, or copied out of a scratch file in that order when no
LMDB sorts them), random access by byte offset, verify's walk over every record and the
combined index. The byte-level codec (framing, IRHeader, .idx) is formats/recordio.py.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alexnet_pipe.dataset.checksum import record_crc
from alexnet_pipe.dataset.layout import shard_paths, split_index_path
from alexnet_pipe.dataset.schema import RecordioFiles, ShardEntry, SplitEntry
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
from alexnet_pipe.formats.recordio import (
    IRHeader,
    RecordIOWriter,
    frame_record,
    iter_records,
    pack_payload,
    read_index,
    read_index_array,
    unframe_record,
    unpack_payload,
)
from alexnet_pipe.fsutil import atomic_write_bytes

# ---------------------------------------------------------------- writing


class _Writer(ShardFormatWriter):
    """Writes one shard's .rec and .idx. Given records in record-id order (``add_sorted``, from
    the LMDB writer), it writes them as they come; given them in arrival order (``add``: RecordIO
    alone), it keeps them in a scratch file (``_ArrivalFile``) and copies them out in record-id
    order, which saves building a Datum, an LMDB insert and a read-back per record (a fifth of the
    converter's main process)."""

    def __init__(self, staging: Path, shard: str, id_width: int):
        self.staging, self.shard = staging, shard
        self.rel = shard_paths(shard)
        self.rec_path, self.idx_path = staging / self.rel["rec"], staging / self.rel["idx"]
        self._arrivals: _ArrivalFile | None = None
        self._rec: RecordIOWriter | None = None

    def add(self, record_id: int, name: str, label: int, jpeg: bytes, height: int, width: int) -> None:
        if self._arrivals is None:
            self.staging.mkdir(parents=True, exist_ok=True)
            self._arrivals = _ArrivalFile(self.staging / f".{self.shard}.scratch-records")
        self._arrivals.put(record_id, pack_payload(IRHeader(0, float(label), record_id), jpeg))

    def add_sorted(self, record_id: int, label: int, jpeg: bytes) -> None:
        self._writer().write(record_id, pack_payload(IRHeader(0, float(label), record_id), jpeg))

    def _writer(self) -> RecordIOWriter:
        if self._rec is None:
            self.rec_path.parent.mkdir(parents=True, exist_ok=True)
            self._rec = RecordIOWriter(self.rec_path, self.idx_path)
        return self._rec

    def close(self, followers: list[ShardFormatWriter]) -> tuple[RecordioFiles, array]:
        rec = self._writer()
        if self._arrivals is not None:
            self._arrivals.copy_to(rec)
            self._arrivals.remove()
        rec.close()
        entry = RecordioFiles(rec=self.rel["rec"], idx=self.rel["idx"], checksum="sha256:" + rec.digest.hexdigest(),
                              bytes=os.path.getsize(self.rec_path))
        return entry, rec.digest.crcs


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


def _write_combined_index(dst: Path, split: str, shards: tuple[ShardEntry, ...]) -> str:
    """One .idx over all of a split's .rec files: DALI takes exactly one index, with offsets
    global over the files concatenated in the order they are passed."""
    lines, base = [], 0
    for shard in shards:
        rec = shard.recordio
        for key, offset in read_index(dst / rec.idx):
            lines.append(f"{key}\t{base + offset}\n")
        base += rec.bytes
    rel = split_index_path(split)
    atomic_write_bytes(dst / rel, "".join(lines).encode("ascii"))
    return rel


# ---------------------------------------------------------------- reading


def _offsets(idx: Path, rec: Path, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, framed length) of every record of one .rec shard, from its .idx."""
    try:
        size = rec.stat().st_size
        offsets = read_index_array(idx, size)[:, 1]  # strictly increasing, inside the .rec
    except (OSError, FormatError) as exc:
        raise DatasetError(f"cannot read the index {idx} ({exc}); run alexnet-pipe verify") from exc
    if len(offsets) != expected or (len(offsets) and offsets[0] != 0):
        raise DatasetError(f"{idx} does not index the {expected} records of {rec}; run alexnet-pipe verify")
    return offsets, np.diff(offsets, append=size)


class _Reader(ShardReader):
    """A read is one ``pread`` of the record's framed bytes."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def read(self, ref: int, length: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return unframe_record(os.pread(self._fd, length, ref))

    def key(self, ref: int, position: int) -> str:
        """The record's id, from the shard's index (read again: only for a message)."""
        path = os.path.splitext(self.path)[0] + ".idx"
        try:
            return str(int(read_index_array(Path(path))[position, 0]))
        except (OSError, FormatError, IndexError):
            return f"at byte {ref}"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------- verify's walk


def _jpeg_size(jpeg: bytes) -> tuple[int, int] | None:
    """Width and height from a JPEG's header (nothing decoded), or None."""
    from PIL import Image  # only verify's checkers walk records

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(jpeg), formats=["JPEG"]).size
    except Exception:  # reported by the decode check, or by the checksum under --quick
        return None


class _Scanner(ShardScanner):
    def __init__(self, root: Path, entry: RecordioFiles, version: int, repair: str):
        self.root, self.entry, self.where, self.repair = root, entry, entry.rec, repair
        self.index: list[tuple[int, int]] | None = None

    def open(self) -> tuple[list[Finding], bool]:
        try:
            size = (self.root / self.where).stat().st_size
        except OSError as exc:
            return [(self.where, f"cannot read it ({exc}); {self.repair}")], False
        found: list[Finding] = []
        if self.entry.bytes is not None and size != self.entry.bytes:
            found.append((self.where, f"is {size} bytes, the manifest says {self.entry.bytes} (cut short or "
                                      f"appended to); {self.repair}"))
        try:
            self.index = read_index(self.root / self.entry.idx, size)
        except (OSError, AlexnetPipeError) as exc:
            found.append((self.entry.idx, f"cannot read index ({exc}); {self.repair}"))
        return found, True

    def records(self) -> Iterator[tuple[int, int, bytes]]:
        for n, (offset, payload) in enumerate(iter_records(self.root / self.where)):
            yield n, offset, payload

    def parse(self, raw: tuple[int, int, bytes]) -> Scanned:
        n, offset, payload = raw
        header, jpeg = unpack_payload(payload)
        key = str(header.id)
        one_label = header.flag == 0 and float(header.label).is_integer()
        index = self.index
        problem = None
        if index is not None and (n >= len(index) or index[n] != (header.id, offset)):
            problem = f"index entry {index[n] if n < len(index) else None} does not match record at offset {offset}"
        elif not one_label:
            problem = f"expected one integer label in the header, got flag {header.flag} label {header.label}"
        return Scanned(key.encode(), key, payload, int(header.label) if one_label else None, _jpeg_size(jpeg), False,
                       jpeg, problem)

    def end(self, records: int) -> list[Finding]:
        if self.index is not None and len(self.index) != records:
            return [(self.entry.idx, f"index has {len(self.index)} entries for {records} records")]
        return []


class RecordIOFormat(Format):
    name = "recordio"
    size_rank = 0  # the JPEG plus a 24-byte frame

    def files(self, entry: RecordioFiles) -> list[str]:
        return [entry.rec, entry.idx]

    def writer(self, staging: Path, shard: str, id_width: int) -> ShardFormatWriter:
        return _Writer(staging, shard, id_width)

    def locate(self, ds, split: str) -> list[Located]:
        """Each record's byte offset and framed length, from its shard's ``.idx``."""
        recs, _ = ds.recordio_paths(split)
        shards = ds.shard_entries(split)
        idxs = [ds.root / s.recordio.idx for s in shards]
        check_exist(recs + idxs)
        return [Located(str(rec), *_offsets(idx, rec, entry.records)) for entry, rec, idx in zip(shards, recs, idxs)]

    def open_shard(self, path: str, id_width: int) -> ShardReader:
        return _Reader(path)

    def image_and_label(self, value: bytes | memoryview) -> tuple[bytes, int]:
        header, jpeg = unpack_payload(value)
        label = header.label[0] if isinstance(header.label, tuple) else header.label
        return jpeg, int(label)

    def scanner(self, root: Path, entry: RecordioFiles, version: int, repair: str) -> ShardScanner:
        return _Scanner(root, entry, version, repair)

    def finish_split(self, dst: Path, name: str, split: SplitEntry) -> SplitEntry:
        return dataclasses.replace(split, recordio_index=_write_combined_index(dst, name, split.shards))

    def check_split(self, root: Path, split: SplitEntry) -> list[Finding]:
        """The combined index is the shards' indices, concatenated with offsets made global."""
        expected, base = [], 0
        index = split.recordio_index
        try:
            for entry in split.shards:
                rec = entry.recordio
                size = (root / rec.rec).stat().st_size
                expected += [(k, base + off) for k, off in read_index(root / rec.idx, size)]
                base += size
        except (OSError, AlexnetPipeError) as exc:
            return [(index, f"cannot rebuild the combined index ({exc})")]
        try:
            actual = read_index(root / index, base)
        except (OSError, AlexnetPipeError) as exc:
            return [(index, f"cannot read combined index ({exc})")]
        if actual != expected:
            return [(index, "combined index does not match the shards' indices")]
        return []
