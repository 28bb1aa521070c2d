"""MXNet RecordIO: record framing, IRHeader, .rec/.idx writer and readers.

Framing (dmlc-core ``RecordIOWriter``): uint32 magic 0xced7230a, uint32
``lrec = cflag << 29 | length``, payload, zero padding to 4 bytes. When the magic occurs at
a 4-byte-aligned offset inside the payload the writer cuts the payload there and drops that
magic: parts get cflag 1 (first), 2 (middle), 3 (last); readers re-insert the magic between
parts. Payload = IRHeader ``struct 'IfQQ'`` (flag, label, id, id2) + the image bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from alexnet_pipe.dataset.checksum import RecordDigest
from alexnet_pipe.errors import FormatError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_LENGTH = (1 << 29) - 1
IRHEADER = struct.Struct("<IfQQ")


@dataclass(frozen=True)
class IRHeader:
    flag: int  # 0: scalar label in `label`; N > 0: N float32 labels follow the header
    label: float | tuple[float, ...]
    id: int
    id2: int = 0


def pack_payload(header: IRHeader, image: bytes) -> bytes:
    """IRHeader (+ label array when flag > 0) followed by the image bytes."""
    if isinstance(header.label, tuple):
        labels = header.label
        head = IRHEADER.pack(len(labels), 0.0, header.id, header.id2)
        return head + struct.pack(f"<{len(labels)}f", *labels) + image
    return IRHEADER.pack(0, header.label, header.id, header.id2) + image


def unpack_payload(payload: bytes | memoryview) -> tuple[IRHeader, bytes]:
    if len(payload) < IRHEADER.size:
        raise FormatError(f"RecordIO payload of {len(payload)} bytes is shorter than an IRHeader")
    flag, label, rid, rid2 = IRHEADER.unpack_from(payload)
    offset = IRHEADER.size
    if flag > 0:
        end = offset + 4 * flag
        if end > len(payload):
            raise FormatError(f"IRHeader says {flag} labels but the payload is too short")
        label = struct.unpack_from(f"<{flag}f", payload, offset)
        offset = end
    return IRHeader(flag, label, rid, rid2), bytes(payload[offset:])


def _lrec(cflag: int, length: int) -> bytes:
    return MAGIC_BYTES + struct.pack("<I", (cflag << 29) | length)


def frame_record(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc-core's writer does (splitting on aligned magic)."""
    if len(payload) > MAX_LENGTH:
        raise FormatError(f"RecordIO records must be < 2^29 bytes, got {len(payload)}")
    out = []
    start = 0
    pos = payload.find(MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            out.append(_lrec(1 if start == 0 else 2, pos - start))
            out.append(payload[start:pos])
            start = pos + 4
            pos = payload.find(MAGIC_BYTES, start)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    out.append(_lrec(3 if start else 0, len(payload) - start))
    out.append(payload[start:])
    out.append(b"\0" * (-len(payload) % 4))
    return b"".join(out)


def read_record(f: BinaryIO) -> bytes | None:
    """Read one (possibly split) record's payload from a stream; None at a clean end."""
    parts: list[bytes] = []
    while True:
        head = f.read(8)
        if not head and not parts:
            return None
        if len(head) < 8:
            raise FormatError("RecordIO: file ends inside a record header")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise FormatError(f"RecordIO: bad magic 0x{magic:08x} at byte {f.tell() - 8}")
        cflag, length = lrec >> 29, lrec & MAX_LENGTH
        if (cflag in (0, 1)) != (not parts):
            raise FormatError(f"RecordIO: continuation flag {cflag} out of sequence at byte {f.tell() - 8}")
        data = f.read(length)
        if len(data) < length:
            raise FormatError("RecordIO: file ends inside a record")
        f.read(-length % 4)
        parts.append(data)
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts)


def unframe_record(buf: bytes | memoryview) -> bytes:
    """The payload of one framed record (all its parts, magic re-inserted), e.g. read by offset."""
    view = memoryview(buf)
    parts: list[bytes] = []
    pos = 0
    while True:
        if pos + 8 > len(view):
            raise FormatError("RecordIO: record ends inside a header")
        magic, lrec = struct.unpack_from("<II", view, pos)
        if magic != MAGIC:
            raise FormatError(f"RecordIO: bad magic 0x{magic:08x}")
        cflag, length = lrec >> 29, lrec & MAX_LENGTH
        if (cflag in (0, 1)) != (not parts):
            raise FormatError(f"RecordIO: continuation flag {cflag} out of sequence")
        start = pos + 8
        if start + length > len(view):
            raise FormatError("RecordIO: record ends inside its payload")
        parts.append(bytes(view[start : start + length]))
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts)
        pos = start + length + (-length % 4)


def iter_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (offset of the record's first magic, payload) for every record of a .rec file."""
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            offset = f.tell()
            payload = read_record(f)
            if payload is None:
                return
            yield offset, payload


INDEX_ALLOWED = b"0123456789\t \r\n"  # what a ``key<TAB>offset`` line may hold
INDEX_MAX_DIGITS = 18  # any such number fits an int64


def parse_index(data: bytes, where: str, data_size: int | None = None) -> np.ndarray:
    """Parse the bytes of a ``key\\toffset`` index into an (n, 2) int64 array, in file order.

    Strict, because a damaged index makes readers seek to the wrong bytes: every line holds two
    unsigned decimal numbers, keys are unique, offsets strictly increase and (given
    ``data_size``, the size of the data they point into) lie inside the data.

    Raises:
        FormatError: one line naming the file, the line and what is wrong with it.
    """
    junk = data.translate(None, INDEX_ALLOWED)
    if junk:
        pos = next(i for i, b in enumerate(data) if b not in INDEX_ALLOWED)
        lineno = data.count(b"\n", 0, pos) + 1
        shown = f" {chr(data[pos])!r}" if 32 < data[pos] < 127 else ""
        raise FormatError(f"{where}:{lineno}: byte 0x{data[pos]:02x}{shown} at byte {pos}; an index line holds "
                          "only 'key<TAB>offset' in decimal digits")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    fields: list[bytes] = []
    for lineno, line in enumerate(lines, 1):
        cols = line.split()
        if len(cols) != 2:
            raise FormatError(f"{where}:{lineno}: expected 'key<TAB>offset', got {len(cols)} fields ({line[:60]!r})")
        if len(cols[0]) > INDEX_MAX_DIGITS or len(cols[1]) > INDEX_MAX_DIGITS:
            raise FormatError(f"{where}:{lineno}: number too large ({line[:60]!r})")
        fields += cols
    table = np.array(fields, dtype=np.int64).reshape(-1, 2) if fields else np.zeros((0, 2), np.int64)
    keys, offsets = table[:, 0], table[:, 1]
    if len(table) > 1:
        bad = np.flatnonzero(np.diff(offsets) <= 0)
        if len(bad):
            n = int(bad[0]) + 2
            raise FormatError(f"{where}:{n}: offset {offsets[n - 1]} does not follow the previous one "
                              f"({offsets[n - 2]}); offsets must increase")
        ordered = np.sort(keys)
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(same):
            dup = int(ordered[same[0]])
            lineno = [int(i) + 1 for i in np.flatnonzero(keys == dup)[:2]]
            raise FormatError(f"{where}:{lineno[1]}: key {dup} appears twice (lines {lineno[0]} and {lineno[1]})")
    if data_size is not None and len(table) and offsets[-1] >= data_size:
        n = int(np.argmax(offsets >= data_size)) + 1
        raise FormatError(f"{where}:{n}: offset {offsets[n - 1]} is past the end of the data ({data_size} bytes)")
    return table


def read_index_array(path: Path, data_size: int | None = None) -> np.ndarray:
    """``parse_index`` of a file (raises OSError when it cannot be read)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise FormatError(f"{path} is not a regular file")
    return parse_index(path.read_bytes(), str(path), data_size)


def read_index(path: Path, data_size: int | None = None) -> list[tuple[int, int]]:
    """Parse a ``key\\toffset`` index into [(key, offset)] in file order (see ``parse_index``)."""
    return [(k, off) for k, off in read_index_array(path, data_size).tolist()]


class RecordIOWriter:
    """Writes a .rec and its .idx; keeps a running digest of (key, payload) pairs."""

    def __init__(self, rec_path: Path, idx_path: Path):
        self.rec_path, self.idx_path = rec_path, idx_path
        self._rec = open(rec_path, "wb", buffering=1 << 20)
        self._idx = open(idx_path, "w", encoding="ascii")
        self._offset = 0
        self.count = 0
        self.digest = RecordDigest()

    def write(self, key: int, payload: bytes) -> None:
        framed = frame_record(payload)
        self._append(key, framed)
        self.digest.update(str(key).encode(), payload)

    def write_framed(self, key: int, framed: bytes, crc: int) -> None:
        """A record framed beforehand (``frame_record``) whose payload's CRC-32 is ``crc``: the
        same bytes and digest as ``write`` of that payload."""
        self._append(key, framed)
        self.digest.update(str(key).encode(), unframe_record(framed), crc)

    def _append(self, key: int, framed: bytes) -> None:
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(framed)
        self.count += 1

    def close(self) -> None:
        for f in (self._rec, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
