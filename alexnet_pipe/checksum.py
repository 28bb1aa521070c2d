"""The record-level checksum the manifest stores for every shard.

It hashes what a reader sees (keys and values in order), not file bytes, so ``verify`` can
recompute it through the same readers training uses, for LMDB and RecordIO alike.
"""

from __future__ import annotations

import hashlib
import struct


class RecordDigest:
    """sha256 over length-prefixed (key, value) pairs, in record order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, key: bytes, value: bytes | memoryview) -> None:
        self._h.update(struct.pack("<QQ", len(key), len(value)))
        self._h.update(key)
        self._h.update(value)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
