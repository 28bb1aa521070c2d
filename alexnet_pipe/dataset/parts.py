"""A shard's completion record (``.parts/<shard>.json``): its typed record (``Part``), reading it,
listing its files, telling whether the shard is complete. convert writes these records; convert,
its --repair check, dryrun, upgrade and verify's check of mean.json read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from alexnet_pipe.dataset.layout import part_path
from alexnet_pipe.dataset.schema import JsonRecord, LmdbFiles, RecordioFiles


class _Named(Protocol):
    """A shard by name: convert's shard plan (``convert/plan.py``) is the usual one."""

    name: str


# Fields about the inputs' original sizes: absent in records from before they were kept (--repair
# rewrites such a shard all the same; the manifest then leaves them out for its split).
SOURCE_SIZE_FIELDS = ("source_short_side_counts", "upscaled_over_2x")


@dataclass(frozen=True, kw_only=True)
class Part(JsonRecord):
    """What convert recorded when a shard was complete: its plan (``split``, ``index``,
    ``first_id``, ``planned`` inputs), what it stored (``records``, ``passthrough``, ``labels``:
    ``{"<label>": records}``, ``short_side_counts``, ``min_short_side``), the inputs it skipped,
    the pixel statistics of a train shard (``stats``: ``PixelStats.to_json``) and, when it stored
    records, its files: the format entries the manifest copies, ``mean_sums`` (a train shard's
    ``.mean.npz``) and ``record_sums`` (``{"<format>": ".parts/<shard>.<format>.crc"}``; absent in
    records from before them).

    Only ``name``, ``records`` and the format entries being objects are checked (a record that
    fails is not one: its shard is redone); everything else is kept as read.
    """

    NULLABLE = frozenset({"min_short_side"})

    name: str
    split: str | None = None
    index: int | None = None
    first_id: int | None = None
    planned: int | None = None
    records: int
    passthrough: int | None = None
    labels: dict[str, int] | None = None
    stats: dict | None = None
    short_side_counts: dict[str, int] | None = None
    min_short_side: int | None = None
    source_short_side_counts: dict[str, int] | None = None  # the inputs' short sides before scaling (same rule)
    upscaled_over_2x: int | None = None  # images scaled up more than 2x
    skipped: list[dict] | None = None
    mean_sums: str | None = None
    lmdb: LmdbFiles | None = None
    recordio: RecordioFiles | None = None
    record_sums: dict[str, str] | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data) -> Part:
        """The record of parsed JSON ``data``.

        Raises:
            ValueError: ``data`` is not a completion record.
        """
        if not (isinstance(data, dict) and isinstance(data.get("name"), str) and type(data.get("records")) is int
                and all(isinstance(data.get(fmt, {}), dict) for fmt in ("lmdb", "recordio"))):
            raise ValueError("not a shard's completion record")
        typed = {k: c.from_json(data[k]) for k, c in (("lmdb", LmdbFiles), ("recordio", RecordioFiles)) if k in data}
        return cls._read(data, **typed)

    def files(self) -> list[str]:
        """The files it lists (relative to OUT)."""
        files = [self.lmdb.path if self.lmdb else None, self.recordio.rec if self.recordio else None,
                 self.recordio.idx if self.recordio else None, self.mean_sums]
        return [f for f in files if isinstance(f, str)]


def read(dst: Path, plan: _Named) -> Part | None:
    """A shard's completion record as written, or None (not there, or damaged: the shard is redone)."""
    path = dst / part_path(plan.name)
    if not path.is_file():
        return None
    try:
        part = Part.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError):
        return None
    return part if part.name == plan.name else None


def load(dst: Path, plan: _Named) -> Part | None:
    """The completion record of a shard, if the shard was fully written."""
    part = read(dst, plan)
    if part is None:
        return None
    if all((dst / f).exists() for f in part.files()):
        return part
    return None  # a file vanished since: redo the shard

