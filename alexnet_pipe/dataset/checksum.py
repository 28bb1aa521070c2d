"""Checksums of stored records: one sha256 per shard (in the manifest) and a CRC-32 per record.

Both hash what a reader sees (keys and values in order; the CRC only the value), not file bytes,
so ``verify`` and the training reader can recompute them through the same readers, for LMDB and
RecordIO alike. The shard's sha256 is the authority; the per-record CRCs (written by ``convert``
to ``.parts/<shard>.<format>.crc``: ``layout.record_sums_path``) name which record of a damaged
shard differs, and let the training reader refuse a damaged record as it reads it (zlib's CRC-32
runs at a few GB/s).

A per-record sums file: the 8 bytes ``RECORD_SUMS_MAGIC``, the record count (uint64), then one
CRC-32 per record in stored order (uint32); little-endian throughout.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from array import array

import numpy as np

from alexnet_pipe.errors import FormatError

RECORD_SUMS_MAGIC = b"apcrc32\n"
_HEAD = struct.Struct("<8sQ")


def record_crc(value: bytes | memoryview) -> int:
    """The CRC-32 of one stored record value (a Datum, or a RecordIO payload)."""
    return zlib.crc32(value)


def encode_record_sums(crcs) -> bytes:
    """The bytes of a per-record sums file for ``crcs`` (in stored order)."""
    body = np.asarray(crcs, dtype="<u4")
    return _HEAD.pack(RECORD_SUMS_MAGIC, len(body)) + body.tobytes()


def decode_record_sums(data: bytes, records: int, where: str) -> np.ndarray:
    """The CRCs of a per-record sums file holding ``records`` entries.

    Raises:
        FormatError: the file is not a sums file of that many records.
    """
    if len(data) < _HEAD.size or data[:8] != RECORD_SUMS_MAGIC:
        raise FormatError(f"{where} is not a per-record checksum file")
    (count,) = struct.unpack_from("<Q", data, 8)
    if count != records or len(data) != _HEAD.size + 4 * records:
        raise FormatError(f"{where} holds {len(data)} bytes saying {count} records, for a shard of {records}")
    return np.frombuffer(data, "<u4", offset=_HEAD.size)


class RecordDigest:
    """sha256 over length-prefixed (key, value) pairs, in record order, and each value's CRC-32."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.crcs = array("I")  # 4 bytes a record

    def update(self, key: bytes, value: bytes | memoryview, crc: int | None = None) -> None:
        """Add one record; ``crc``: its value's CRC-32 when already known."""
        self._h.update(struct.pack("<QQ", len(key), len(value)))
        self._h.update(key)
        self._h.update(value)
        self.crcs.append(record_crc(value) if crc is None else crc)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
