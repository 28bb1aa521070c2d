"""One shard while it is written: its encoded chunks accumulated (records, counts, mean sums,
skipped inputs), then committed: put in place and recorded as complete, in the order that makes a
crash at any point safe.

A shard is written in ``OUT/.staging/<shard>`` and renamed into place when complete; a small
completion record in ``OUT/.parts/<shard>.json`` then marks it done (dataset/parts.py reads them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.convert.plan import ShardPlan
from alexnet_pipe.dataset.checksum import encode_record_sums
from alexnet_pipe.dataset.layout import (
    LMDB_DIR,
    RECORDIO_DIR,
    SHORT_SIDE_COUNTS_BELOW,
    STAGING_DIR,
    mean_sums_path,
    part_path,
    record_sums_path,
    shard_paths,
)
from alexnet_pipe.dataset.mean import MeanImageSum, PixelStats
from alexnet_pipe.dataset.parts import SOURCE_SIZE_FIELDS, Part
from alexnet_pipe.errors import SettingsMismatchError
from alexnet_pipe.formats.writer import ShardWriter
from alexnet_pipe.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, remove
from alexnet_pipe.imaging.encode import Encoded
from alexnet_pipe.imaging.process import BatchResult
from alexnet_pipe.inputs.table import Source


class ShardState:
    """Accumulates one shard while its chunks come back from the workers."""

    def __init__(self, dst: Path, plan: ShardPlan, formats: tuple[str, ...], id_width: int, settings: ImageSettings):
        self.plan = plan
        staging = dst / STAGING_DIR / plan.name
        remove(staging)
        staging.mkdir(parents=True)
        self.writer = ShardWriter(staging, plan, formats, id_width)
        self.stats = PixelStats()
        self.mean = MeanImageSum(settings.mean_size)
        self.short_sides: Counter = Counter()  # stored short side -> images, below SHORT_SIDE_COUNTS_BELOW
        self.min_short_side: int | None = None
        self.source_sides: Counter = Counter()  # the inputs' short side before scaling -> images, below the same
        self.upscaled_over_2x = 0  # images stored with a short side over twice their original one
        self.labels: Counter = Counter()
        self.skipped: list[dict] = []
        self.passthrough = 0
        self.done = 0

    def add(self, positions: tuple[int, ...], sources: tuple[Source, ...], batch: BatchResult) -> None:
        if batch.stats is not None:
            self.mean.add(batch.mean_sum, batch.mean_count)
            self.stats.merge(batch.stats)
        for position, src, res in zip(positions, sources, batch.results):
            if isinstance(res, Encoded):
                self.writer.add(self.plan.first_id + position, src, res)
                short = min(res.width, res.height)
                if short < SHORT_SIDE_COUNTS_BELOW:
                    self.short_sides[short] += 1
                self.min_short_side = short if self.min_short_side is None else min(self.min_short_side, short)
                if res.source_short_side is not None:
                    if res.source_short_side < SHORT_SIDE_COUNTS_BELOW:
                        self.source_sides[res.source_short_side] += 1
                    self.upscaled_over_2x += short > 2 * res.source_short_side
                self.labels[src.label] += 1
                self.passthrough += res.passthrough
            else:
                self.skipped.append({"split": self.plan.split, "name": src.name, "reason": res})
        self.done += len(sources)

    def part(self) -> Part:
        """The shard's completion record, without its files (``commit_shard`` adds them)."""
        return Part(
            name=self.plan.name,
            split=self.plan.split,
            index=self.plan.index,
            first_id=self.plan.first_id,
            planned=len(self.plan.sources),
            records=self.stats.images,
            passthrough=self.passthrough,
            labels={str(k): v for k, v in sorted(self.labels.items())},
            stats=self.stats.to_json(),
            short_side_counts={str(k): v for k, v in sorted(self.short_sides.items())},
            min_short_side=self.min_short_side,
            source_short_side_counts={str(k): v for k, v in sorted(self.source_sides.items())},
            upscaled_over_2x=self.upscaled_over_2x,
            skipped=self.skipped,
        )


def commit_shard(dst: Path, plan: ShardPlan, writer: ShardWriter, part: Part, mean: MeanImageSum,
                 expect: Part | None = None) -> None:
    """Close, rename into place, then record completion (the order is what makes it safe).

    A train shard's exact mean-image sums go to ``.parts/<shard>.mean.npz`` before the completion
    record, so a resumed or ``--part`` run merges the very sums an uninterrupted run would; so do
    the records' CRC-32s (``.parts/<shard>.<format>.crc``, see checksum.py).
    A shard whose every input was skipped gets no files, only its completion record.
    ``expect``: the completion record the shard had (--repair); a shard that would come out
    otherwise is not put in place (its raw inputs changed).
    """
    entries = writer.close()
    if expect is not None:
        _check_same(dst, plan, dataclasses.replace(part, **entries) if part.records else part, expect)
    if part.records and plan.split == "train":  # the mean image is the train split's
        rel = mean_sums_path(plan.name)
        atomic_write_bytes(dst / rel, mean.to_bytes())
        part = dataclasses.replace(part, mean_sums=rel)
    sums = {}
    if part.records:
        for fmt, crcs in writer.record_sums.items():
            sums[fmt] = record_sums_path(plan.name, fmt)
            atomic_write_bytes(dst / sums[fmt], encode_record_sums(crcs))
    if part.records:
        for rel in shard_paths(plan.name).values():
            staged = dst / STAGING_DIR / plan.name / rel
            if staged.exists():
                remove(dst / rel)
                os.replace(staged, dst / rel)
        for sub in (LMDB_DIR, RECORDIO_DIR):
            fsync_dir(dst / sub)
        part = dataclasses.replace(part, **entries, record_sums=sums)
    remove(dst / STAGING_DIR / plan.name)
    atomic_write_json(dst / part_path(plan.name), part.to_json())


def _check_same(dst: Path, plan: ShardPlan, part: Part, expect: Part) -> None:
    """Refuse to put a rewritten shard in place unless its records are those it had (--repair)."""
    skip = ("mean_sums", "record_sums")  # files beside the shard, written from the same data
    new = json.loads(json.dumps(part.to_json()))  # as it would be stored
    old = expect.to_json()
    added = {k for k in SOURCE_SIZE_FIELDS if k not in old}  # a record from before they were kept
    differ = sorted(k for k in set(new) | set(old) if k not in skip and k not in added and new.get(k) != old.get(k))
    if differ:
        remove(dst / STAGING_DIR / plan.name)
        raise SettingsMismatchError(
            f"{plan.name} was not rewritten: its raw inputs changed since {dst} was converted (the shard would "
            f"differ in {', '.join(differ)} from its completion record {part_path(plan.name)}, unless that "
            "record was edited), so it was left as it is; restore the inputs, or reconvert into a new directory")
