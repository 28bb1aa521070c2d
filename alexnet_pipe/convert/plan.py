"""The shard plan (pure): which inputs go into which shard of a split, in which order.

Records are stored in a seeded shuffled order: each input's place is the sha256 of
(seed, split, name), so the order is mixed across classes, identical on every machine and
Python version, and an input keeps its place relative to the others when files are added.
Shard k of a split holds the inputs at shuffled positions [k*S, (k+1)*S); the position is
also the record's id. A shard depends only on its own inputs, so shards can be written,
resumed or (later) spread over machines independently. How a shard's records are stored is
the formats' business (formats/).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alexnet_pipe.inputs.table import Source, SourceTable, SourceView


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
