"""verify's dataset-level checks: what the manifest says about the dataset as a whole (fields,
mean.json, the mean image, per-class counts and stored sizes)
against the files and against what the shard checks read; and ``Problem``, the one line verify
reports per thing wrong (here, below verify.py, which re-exports it, so both can use it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from alexnet_pipe.dataset.layout import LMDB_LOCK_FILE, MANIFEST_FILE, MEAN_FILE, PARTS_DIR
from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.dataset.mean import ChannelMean, PixelStats, load_dataset_mean
from alexnet_pipe.dataset.parts import Part
from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.text import plural, shown


@dataclass(frozen=True)
class Problem:
    where: str  # e.g. "lmdb/train-00003"
    key: str | None
    message: str

    def __str__(self) -> str:
        """One line: control characters (from damaged keys or messages) are escaped."""
        return shown(f"{self.where}" + (f" key {self.key}" if self.key else "") + f": {self.message}")


def _train_part_stats(ds: Dataset) -> PixelStats | None:
    """The train split's exact pixel sums from convert's completion records, or None when they
    are not there or do not describe exactly this dataset's train shards."""
    parts = ds.root / PARTS_DIR
    if "train" not in ds.splits() or not parts.is_dir():
        return None
    stats, names = PixelStats(), set()
    try:
        for path in sorted(parts.glob("train-*.json")):
            if not path.is_file():
                return None
            part = Part.from_json(json.loads(path.read_text(encoding="utf-8")))  # ValueError: not a record
            if "split" not in part.key_order:  # a record without one describes no known shard
                return None
            if part.split != "train":
                continue
            stats.merge(PixelStats.from_json(part.stats))
            if part.records:
                names.add((part.name, part.records))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if names != {(s.name, s.records) for s in ds.shard_entries("train")}:
        return None
    return stats


def verify_mean(ds: Dataset) -> list[Problem]:
    """mean.json is valid, and (when convert computed it) agrees with the data it was computed from."""
    try:
        mean: ChannelMean = load_dataset_mean(ds.root)
    except AlexnetPipeError as exc:
        return [Problem(MEAN_FILE, None, str(exc))]
    if not mean.images:  # an upgraded old mean (update-mean): nothing here to check it against
        return []
    problems = []
    train = ds.split_entry("train").records if "train" in ds.splits() else 0
    if mean.images != train:
        problems.append(Problem(MEAN_FILE, None, f"says it averages {plural(mean.images, 'image')}, the train "
                                                 f"split holds {plural(train, 'record')}"))
    stats = _train_part_stats(ds)
    if stats is not None and stats.pixels:
        expected = stats.to_mean(mean.source)
        # The same integer sums give the same floats, and JSON keeps floats exactly: compare exactly.
        if (mean.channel_order, mean.mean, mean.std, mean.pixels) != (expected.channel_order, expected.mean,
                                                                       expected.std, expected.pixels):
            problems.append(Problem(MEAN_FILE, None, (
                f"mean {list(mean.mean)} (std {mean.std and list(mean.std)}, {mean.pixels} pixels) is not what the "
                f"pixel sums convert recorded in {PARTS_DIR}/ give: {list(expected.mean)} (std {list(expected.std)}, "
                f"{expected.pixels} pixels); the file was edited or damaged: rerun the alexnet-pipe convert command "
                f"that made {ds.root} to rewrite it")))
        elif expected.covariance is not None and mean.covariance != expected.covariance:
            problems.append(Problem(MEAN_FILE, None, (
                f"covariance {mean.covariance and [list(r) for r in mean.covariance]} is not what the pixel sums "
                f"convert recorded in {PARTS_DIR}/ give: {[list(r) for r in expected.covariance]}; the file was "
                f"edited or damaged: rerun the alexnet-pipe convert command that made {ds.root} to rewrite it")))
    return problems


def _split_totals(tasks: list, outcomes: list, split: str, fmt: str) -> list | None:
    """The outcomes of one split's shards in one format, or None when a checker died on one."""
    outs = [out for task, out in zip(tasks, outcomes) if task.split == split and task.fmt == fmt]
    return None if any(out.labels is None for out in outs) else outs


def verify_counts(ds: Dataset, tasks: list, outcomes: list) -> list[Problem]:
    """The manifest's per-class counts and stored short sides against what the shards hold, per format.

    ``tasks`` and ``outcomes``: verify's shard checks and their outcomes, in the same order (a task
    has ``split`` and ``fmt``; an outcome ``labels``, ``sides`` and ``min_side``, ``labels`` None when
    its checker died)."""
    problems = []
    for split in ds.splits():
        entry = ds.split_entry(split)
        for fmt in ds.formats:
            outs = _split_totals(tasks, outcomes, split, fmt)
            if outs is None:
                continue
            found = [sum(col) for col in zip(*(out.labels for out in outs))] if outs else [0] * ds.num_classes
            stated = list(entry.class_counts)
            if found != stated:
                diff = [f"class {i}: {a} stated, {b} read" for i, (a, b) in enumerate(zip(stated, found)) if a != b]
                problems.append(Problem(f"manifest {split}", None, (
                    f"class_counts do not match the labels read from the {fmt} shards ("
                    + "; ".join(diff[:5]) + ("; ..." if len(diff) > 5 else "") + ")")))
            sides: dict[str, int] = {}
            for out in outs:
                for side, n in out.sides.items():
                    sides[str(side)] = sides.get(str(side), 0) + n
            if (entry.short_side_counts is not None
                    and entry.short_side_counts != dict(sorted(sides.items(), key=lambda kv: int(kv[0])))):
                problems.append(Problem(f"manifest {split}", None, (
                    f"short_side_counts {entry.short_side_counts} do not match the images in the {fmt} shards "
                    f"({dict(sorted(sides.items(), key=lambda kv: int(kv[0])))})")[:500]))
            smallest = min((out.min_side for out in outs if out.min_side is not None), default=None)
            # recorded (null included: a split that stored nothing), unless the conversion predates it
            if "min_short_side" in entry.key_order and entry.min_short_side != smallest:
                problems.append(Problem(f"manifest {split}", None, f"min_short_side is {entry.min_short_side}, the "
                                                                   f"smallest image in the {fmt} shards is {smallest}"))
    return problems


def verify_mean_image(ds: Dataset) -> list[Problem]:
    """The mean image files the manifest lists are there, the .npy with the shape it should have."""
    entry = ds.meta.mean_image
    if entry is None:
        return []
    problems = []
    size = entry.size
    for rel in (entry.npy, entry.binaryproto):
        path = ds.root / rel
        if not path.is_file():
            problems.append(Problem(rel, None, f"is missing (the manifest lists it as the mean image); rerun "
                                               f"the alexnet-pipe convert command that made {ds.root}"))
    npy = ds.root / entry.npy
    if size is not None and npy.is_file():
        try:
            with open(npy, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format version {version}")
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)  # the header only
                data_at = f.tell()
            want = (size, size, 3)
            if shape != want or dtype != np.float32 or fortran or npy.stat().st_size != data_at + 4 * 3 * size * size:
                problems.append(Problem(entry.npy, None, f"holds {dtype} {shape} in {npy.stat().st_size} bytes; "
                                                         f"expected float32 {want}"))
        except (OSError, ValueError, SyntaxError, TypeError) as exc:
            problems.append(Problem(entry.npy, None, f"is not a readable .npy ({exc})"))
    return problems


def verify_sizes(ds: Dataset) -> list[Problem]:
    """Each shard's recorded size on disk (``bytes``: what ``info`` and the scale tools report) is
    its files' size: the records' checksums do not cover it. LMDB's lock file, which readers may
    create in the shard's folder, is not counted. Not for a dataset awaiting ``upgrade``: it compacts
    shards in place and records their sizes last, so one stopped midway has sizes of both kinds."""
    if ds.upgrade_hint() is not None:
        return []
    problems = []
    for split in ds.splits():
        for entry in ds.shard_entries(split):
            for rel, recorded in ((entry.lmdb.path if entry.lmdb else None, entry.lmdb and entry.lmdb.bytes),
                                  (entry.recordio.rec if entry.recordio else None,
                                   entry.recordio and entry.recordio.bytes)):
                path = ds.root / rel if rel else None
                if recorded is None or path is None or not path.exists():
                    continue  # not recorded (older datasets), or missing: the record checks name it
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                size = sum(p.stat().st_size for p in files if p.name != LMDB_LOCK_FILE)
                if size != recorded:
                    problems.append(Problem(rel, None, f"holds {size:,} bytes; the manifest says {recorded:,}: the "
                                                       "manifest was edited or damaged, or the shard replaced"))
    return problems


def verify_fields(ds: Dataset) -> list[Problem]:
    unknown = ds.meta.unknown_fields()
    return [Problem(MANIFEST_FILE, None,
                    f"has fields this alexnet-pipe never writes ({', '.join(map(repr, unknown[:5]))}"
                    f"{', ...' if len(unknown) > 5 else ''}): the manifest was edited or damaged; "
                    f"rerun the alexnet-pipe convert command that made {ds.root} to rewrite it")
            ] if unknown else []
