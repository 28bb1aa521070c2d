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

from .checksum import RecordDigest
from .errors import FormatError

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


def read_index(path: Path) -> list[tuple[int, int]]:
    """Parse a ``key\\toffset`` index into [(key, offset)] in file order."""
    entries = []
    with open(path, encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) != 2:
                raise FormatError(f"{path}:{lineno}: expected 'key<TAB>offset', got {line!r}")
            entries.append((int(fields[0]), int(fields[1])))
    return entries


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
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(framed)
        self.count += 1
        self.digest.update(str(key).encode(), payload)

    def close(self) -> None:
        for f in (self._rec, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
