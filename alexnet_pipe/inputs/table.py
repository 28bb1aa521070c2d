"""The inputs of a conversion: one ``Source`` per image, held column-wise in a ``SourceTable``.

A list of 1.28M Source objects (two strings and a small object each) costs ~300 bytes an input,
~400 MB in the converter's main process for ImageNet, growing with every input. The table keeps
the same information in a handful of arrays: the names as one UTF-8 blob, labels, offsets and
sizes as numpy columns, and each input's directory or archive as an index into a short list. That
is ~60 bytes an input (~80 MB for ImageNet); Source objects are made on access, a shard at a time.

What a scan of any input (a raw tree, the archives, list files) hands on is a ``ScanResult``: a
table per split, and each input found that will not be converted, as a ``Skip`` with why.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

_ENCODING = ("utf-8", "surrogateescape")  # undecodable file names survive the round trip


@dataclass(frozen=True, slots=True)
class Source:
    """One input image: where its bytes are and which class it belongs to."""

    name: str  # stable relative name, e.g. "n01440764/n01440764_10026.JPEG"
    label: int
    path: str  # a plain file, or the archive holding the bytes
    offset: int = 0
    size: int = -1  # -1: the whole file


class SourceTable(Sequence[Source]):
    """A split's inputs in a fixed order; ``table[i]`` makes the i-th Source.

    An input is a whole file at ``os.path.join(location, name)`` (size -1), or ``size`` bytes at
    ``offset`` of the archive at ``location``.
    """

    def __init__(self, names: bytes | bytearray, name_ends: np.ndarray, labels: np.ndarray, locations: tuple[str, ...],
                 location_ids: np.ndarray, offsets: np.ndarray, sizes: np.ndarray):
        self._names, self._ends = names, name_ends
        self.labels, self.locations, self._where = labels, locations, location_ids
        self.offsets, self.sizes = offsets, sizes

    def __len__(self) -> int:
        return len(self._ends)

    def name(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._names[start : int(self._ends[i])].decode(*_ENCODING)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        name, location, size = self.name(i), self.locations[self._where[i]], int(self.sizes[i])
        path = os.path.join(location, name) if size < 0 else location
        return Source(name, int(self.labels[i]), path, int(self.offsets[i]), size)

    def __iter__(self) -> Iterator[Source]:
        return (self[i] for i in range(len(self)))

    def names(self) -> Iterator[str]:
        """Every name in order, without making Source objects."""
        blob, start = self._names, 0
        for end in self._ends.tolist():
            yield blob[start:end].decode(*_ENCODING)
            start = end

    def take(self, rows: np.ndarray) -> SourceTable:
        """A new table of the given rows, in the given order."""
        out = SourceTableBuilder()
        for i in rows.tolist():
            out.add(self.name(i), int(self.labels[i]), self.locations[self._where[i]], int(self.offsets[i]),
                    int(self.sizes[i]))
        return out.build()

    def __eq__(self, other) -> bool:
        if not isinstance(other, SourceTable):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # compared by value, like a list

    def __add__(self, other) -> list[Source]:
        return list(self) + list(other)

    def __repr__(self) -> str:
        return f"SourceTable({len(self)} inputs)"


class SourceTableBuilder:
    """Collects inputs one at a time into compact columns (no per-input Python objects)."""

    def __init__(self) -> None:
        self._names = bytearray()
        self._ends, self._offsets, self._sizes = array("q"), array("q"), array("q")
        self._labels, self._where = array("i"), array("i")
        self._locations: dict[str, int] = {}

    def add(self, name: str, label: int, location: str, offset: int = 0, size: int = -1) -> None:
        """A whole file ``location/name`` (size -1), or ``size`` bytes at ``offset`` of the archive ``location``."""
        self._names += name.encode(*_ENCODING)
        self._ends.append(len(self._names))
        self._labels.append(label)
        self._where.append(self._locations.setdefault(location, len(self._locations)))
        self._offsets.append(offset)
        self._sizes.append(size)

    def build(self) -> SourceTable:
        """The table, sharing this builder's buffers (no copy: the peak stays one table's size)."""
        return SourceTable(
            self._names, np.frombuffer(self._ends, np.int64), np.frombuffer(self._labels, np.int32),
            tuple(self._locations), np.frombuffer(self._where, np.int32),
            np.frombuffer(self._offsets, np.int64), np.frombuffer(self._sizes, np.int64),
        )


class SourceView(Sequence[Source]):
    """Some rows of a table, in a given order (a shard's inputs)."""

    def __init__(self, table: SourceTable, rows: np.ndarray):
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.table[int(r)] for r in self.rows[i]]
        return self.table[int(self.rows[i])]

    def __iter__(self) -> Iterator[Source]:
        return (self.table[int(r)] for r in self.rows)


@dataclass(frozen=True)
class Skip:
    """An input that was found but will not be converted, and why."""

    split: str
    name: str
    reason: str
    count: int = 1  # > 1: one entry for this many inputs, not named one by one (a list's many missing files)


@dataclass
class ScanResult:
    layout: dict[str, str]  # split -> how it was read, for the manifest and messages
    classes: list[str]
    class_names: dict[str, str]
    splits: dict[str, SourceTable]  # inputs of each split, sorted by name
    skipped: list[Skip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also logged: e.g. labels that have no file
    devkit_ids: dict[str, int] = field(default_factory=dict)  # class -> ILSVRC devkit id, when the devkit is known
