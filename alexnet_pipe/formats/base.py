"""The interface every storage format implements, and the small types it hands its callers.

A storage format (formats/lmdb.py, formats/recordio_shard.py) owns everything about its files:
which files a shard has (from the shard's entry in the manifest), how convert writes them, how
training reads a record back by number, how verify walks every record, and what upgrade changes.
Callers reach a format through the registry (formats/__init__.py) by the name the manifest and
the command line use, so a new format is one new module and one line in the registry. This
module is the interface only (the formats import it; the registry imports the formats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet_pipe.dataset.schema import LmdbFiles, RecordioFiles, SplitEntry
from alexnet_pipe.errors import DatasetError

Finding = tuple[str, str]  # a shard-level problem: (the file it is about, relative to the root; what is wrong)
Files = LmdbFiles | RecordioFiles  # a shard's entry for one format (``ShardEntry.files(name)``)


class ShardFormatWriter(ABC):
    """One format's files of one shard, written into a staging directory.

    Convert hands over records in arrival order (``add``); a shard stores them in record-id order.
    A writer that ``sorts`` keeps them and, when it closes, passes every record on in record-id
    order to the other formats' writers (``add_sorted``), which then need no ordering of their own.
    Without a sorting writer each writer gets ``add`` and orders the records itself.
    """

    sorts = False

    @abstractmethod
    def add(self, record_id: int, name: str, label: int, jpeg: bytes, height: int, width: int) -> None:
        """One record, in arrival order (``name``: its input's name, which some keys include)."""

    @abstractmethod
    def add_sorted(self, record_id: int, label: int, jpeg: bytes) -> None:
        """One record, in record-id order (from a sorting writer's ``close``)."""

    @abstractmethod
    def close(self, followers: list[ShardFormatWriter]) -> tuple[Files, array]:
        """Finish the files (a sorting writer first passes its records to ``followers``).

        Returns:
            (the shard's entry for this format, paths relative to the dataset root: what its
            completion record and the manifest hold; each record's CRC-32 in stored order, see
            dataset/checksum.py).
        """


class ShardReader(ABC):
    """Random access to the records of one shard (opened on first use, kept open)."""

    @abstractmethod
    def read(self, ref: int, length: int) -> bytes | memoryview:
        """The stored bytes of a record (what its recorded CRC covers), valid until the next read.

        Args:
            ref, length: where the record is (``Format.locate``).
        Raises:
            OSError, AlexnetPipeError: the record cannot be read.
        """

    @abstractmethod
    def key(self, ref: int, position: int) -> str:
        """The key of the record just read (``position``: its place in the shard), for a message."""

    @abstractmethod
    def close(self) -> None: ...


@dataclass(frozen=True)
class Located:
    """Where every record of one shard is, for ``ShardReader.read``."""

    path: str  # the file or folder a reader opens
    refs: np.ndarray  # int64 per record (an LMDB record id, a RecordIO byte offset)
    lengths: np.ndarray | None  # int64 per record: bytes to read (None where a read needs none)


@dataclass(frozen=True)
class Scanned:
    """What one record says about itself, for verify (which judges it).

    verify reports the first of: ``problem``; a label outside the classes; ``late_problem``; with
    decoding on, an image that does not decode as an RGB JPEG (of ``size``, when ``size_stated``).
    """

    key: bytes  # the key as the shard's digest takes it
    name: str  # the key in messages
    value: bytes  # the stored bytes (the digest and the CRC cover them)
    label: int | None  # the one integer label it states (None: none, or not one integer)
    size: tuple[int, int] | None  # (width, height) of its image, as stored or stated (None: unknown)
    size_stated: bool  # ``size`` is what the record states (checked against the decoded image)
    jpeg: bytes | None  # the image bytes
    problem: str | None = None  # what is wrong with the record itself, checked before its label
    late_problem: str | None = None  # ... checked after its label


class ShardScanner(ABC):
    """Walks every record of one shard for verify. verify counts each record before ``parse``, and
    reports an OSError or AlexnetPipeError raised by ``records`` or ``parse`` as the shard being
    unreadable from there on."""

    @abstractmethod
    def open(self) -> tuple[list[Finding], bool]:
        """The problems found before reading any record, and whether the records can be read at all."""

    @abstractmethod
    def records(self) -> Iterator[object]:
        """Every record, raw, in stored order (each goes to ``parse``)."""

    @abstractmethod
    def parse(self, raw: object) -> Scanned: ...

    def end(self, records: int) -> list[Finding]:
        """The problems found after the last record (``records`` were read)."""
        return []


class Format(ABC):
    """A storage format: its name and everything done to its files."""

    name: str  # as the manifest (``settings.formats``, a shard's entry) and --format spell it
    size_rank: int  # lower: a shard's bytes are closer to its JPEG bytes (what shm.py estimates from)

    @abstractmethod
    def files(self, entry: Files) -> list[str]:
        """A shard's files, relative to the dataset root, from its entry for this format; the first
        is the file or folder a reader opens."""

    def data_path(self, entry: Files) -> str:
        return self.files(entry)[0]

    @abstractmethod
    def writer(self, staging: Path, shard: str, id_width: int) -> ShardFormatWriter:
        """A writer of shard ``shard``'s files into ``staging`` (record ids of ``id_width`` digits in keys)."""

    @abstractmethod
    def locate(self, ds, split: str) -> list[Located]:
        """Where every record of ``split`` is, per shard (keys or indices are read, not images).

        Raises:
            DatasetError: the dataset has no shards in this format, or one is missing or does not
            match the manifest.
        """

    @abstractmethod
    def open_shard(self, path: str, id_width: int) -> ShardReader: ...

    @abstractmethod
    def image_and_label(self, value: bytes | memoryview) -> tuple[bytes, int]:
        """(JPEG bytes, label) of a record's stored bytes (``ShardReader.read``)."""

    @abstractmethod
    def scanner(self, root: Path, entry: Files, version: int, repair: str) -> ShardScanner:
        """A scanner of the shard whose entry for this format is ``entry``, in a dataset of format
        ``version``; ``repair`` is the advice that ends a problem that a rewrite repairs."""

    def finish_split(self, dst: Path, name: str, split: SplitEntry) -> SplitEntry:
        """Files this format keeps per split, written once all the shards of split ``name`` are;
        returns its entry ``split`` with the fields they add."""
        return split

    def check_split(self, root: Path, split: SplitEntry) -> list[Finding]:
        """verify's check of the files ``finish_split`` wrote."""
        return []

    def upgrade(self, root: Path, entry: Files) -> tuple[bool, Files] | None:
        """Bring a shard converted by an older alexnet-pipe to the current version in place.

        Args:
            entry: the shard's entry for this format.
        Returns:
            (whether its files were rewritten, ``entry`` updated to match them); None when this
            format has nothing to upgrade.
        """
        return None


def check_exist(paths: list[Path]) -> None:
    """Raise when one of the shard files ``paths`` (as the manifest lists them) is missing."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetError(
            f"{len(missing)} shard file(s) listed in the manifest are missing, e.g. {missing[0]}; "
            "rerun alexnet-pipe convert with the same arguments to rewrite them"
        )
