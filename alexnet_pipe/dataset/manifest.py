"""Opening a converted dataset: ``load_dataset`` reads and checks ``manifest.json`` into a ``Dataset``,
the manifest's typed record (schema.py) plus the directory it describes, with the accessors readers
use (shard paths per format, what the stored sizes allow).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from alexnet_pipe.dataset.layout import MANIFEST_FILE, STATE_FILE
from alexnet_pipe.dataset.manifest_checks import REWRITE_HINT
from alexnet_pipe.dataset.schema import (
    DATASET_FORMAT,
    DATASET_VERSION,
    READABLE_VERSIONS,
    Manifest,
    ShardEntry,
    SplitEntry,
)
from alexnet_pipe.errors import DatasetError

__all__ = ["DATASET_FORMAT", "DATASET_VERSION", "READABLE_VERSIONS", "Dataset", "load_dataset", "unknown_fields"]


@dataclass(frozen=True)
class Dataset:
    """A loaded manifest plus the directory it describes.

    ``meta`` is the typed manifest (schema.py), ``split_entry`` and ``shard_entries`` its parts:
    what the package reads. ``manifest`` is the same as JSON (a dict, key for key as in
    manifest.json), as are what ``classes``, ``split()`` and ``shards()`` return: kept as public
    API (docs/API.md) for scripts that index the JSON; no module of the package uses them. Treat
    them as read-only.
    """

    root: Path
    meta: Manifest

    @cached_property
    def manifest(self) -> dict:
        return self.meta.to_json()

    @property
    def version(self) -> int:
        return self.meta.version

    def upgrade_hint(self) -> str | None:
        """Why and how to upgrade an older dataset, or None when it is current."""
        if self.version == DATASET_VERSION:
            return None
        return (f"{self.root} was converted by an older alexnet-pipe (format version {self.version}): its LMDB shards "
                "reserve 1 TiB of address space each, so DALI's own Caffe reader and Caffe open only ~120 of them in "
                f"one process; run: alexnet-pipe upgrade {self.root} (rewrites no image)")

    @property
    def classes(self) -> list[dict]:
        return self.manifest["classes"]

    def devkit_order(self) -> list[str] | None:
        """The class ids in ILSVRC devkit id order (the order of neon's fc8 rows), when the dataset
        was converted with the devkit (each class has a distinct ``devkit_id``), else None."""
        ids = [c.devkit_id for c in self.meta.classes]
        if None in ids or len(set(ids)) != len(ids):
            return None
        return [c.id for c in sorted(self.meta.classes, key=lambda c: c.devkit_id)]

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    @property
    def formats(self) -> list[str]:
        return list(self.meta.settings.formats)

    def splits(self) -> list[str]:
        return list(self.meta.splits)

    def split_entry(self, name: str) -> SplitEntry:
        """The typed entry of split ``name``.

        Raises:
            DatasetError: the dataset has no such split.
        """
        try:
            return self.meta.splits[name]
        except KeyError:
            have = ", ".join(self.meta.splits) or "none"
            raise DatasetError(f"{self.root} has no {name!r} split (it has: {have})") from None

    def split(self, name: str) -> dict:
        """Split ``name`` as JSON (``split("train")["records"]``); ``split_entry`` is the typed one."""
        self.split_entry(name)
        return self.manifest["splits"][name]

    def shards(self, split: str) -> list[dict]:
        return self.split(split)["shards"]

    def shard_entries(self, split: str) -> tuple[ShardEntry, ...]:
        return self.split_entry(split).shards

    def lmdb_paths(self, split: str) -> list[Path]:
        """LMDB shard directories in order, for ``fn.readers.caffe(path=[...])``."""
        self._need("lmdb")
        return [self.root / s.lmdb.path for s in self.shard_entries(split)]

    def recordio_paths(self, split: str) -> tuple[list[Path], Path]:
        """(.rec files in order, the one combined index) for ``fn.readers.mxnet``."""
        self._need("recordio")
        recs = [self.root / s.recordio.rec for s in self.shard_entries(split)]
        return recs, self.root / self.split_entry(split).recordio_index

    def smaller_than(self, side: int) -> dict[str, int]:
        """Stored images per split whose short side is below ``side`` (only splits with some).
        From the converter's histogram of stored short sides; conversions from before it can only
        tell from the short-side setting."""
        found = {}
        for name in self.splits():
            split = self.split_entry(name)
            counts = split.short_side_counts
            if counts is None:
                short = self.meta.settings.short_side
                small = split.records if 0 < short < side else 0
            else:
                small = sum(n for s, n in counts.items() if int(s) < side)
            if small:
                found[name] = small
        return found

    def all_at_least(self, split: str, side: int) -> bool:
        """Whether every stored image of ``split`` is known to have a short side of at least ``side``."""
        counts = self.split_entry(split).short_side_counts
        if counts is not None:
            return all(int(s) >= side for s, n in counts.items() if n)
        settings = self.meta.settings  # no histogram: only an upscaling conversion can tell
        return settings.upscale and settings.short_side >= side

    def _need(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise DatasetError(
                f"{self.root} was converted without {fmt} shards (it has {', '.join(self.formats)}); "
                f"reconvert with --format {fmt} or both"
            )


def _convert_hint(root: Path) -> str:
    """What to run when ``root`` is not a converted dataset: a raw tree is converted elsewhere."""
    raw = any((root / d).is_dir() for d in ("train", "val")) or any(
        p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tar") for p in root.iterdir())
    if raw:
        out = root.parent / f"{root.name}-batches"
        return (f"it looks like raw images: convert them first, e.g. alexnet-pipe convert {root} {out}, "
                f"then pass -w {out}")
    return "pass the output directory of alexnet-pipe convert (alexnet-pipe convert RAW OUT, then -w OUT)"


def load_dataset(root: str | os.PathLike) -> Dataset:
    """Read and check ``root/manifest.json`` (public as ``alexnet_pipe.open_dataset``).

    Every field a reader uses is checked for its type and range, and every path it lists must
    stay inside ``root`` (relative, no ``..``, no symlink leading out): a damaged or edited
    manifest is refused here, with one line, before any reader follows it (manifest_checks.py).

    Raises:
        DatasetError: saying what is missing or wrong and what to run.
    """
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; pass the output directory of alexnet-pipe convert")
    if not path.is_file():
        hint = (
            "the conversion has not finished: rerun the same alexnet-pipe convert command to complete it"
            if (root / STATE_FILE).exists()
            else _convert_hint(root)
        )
        raise DatasetError(f"{root} has no {MANIFEST_FILE}; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"cannot read {path} ({_short(exc)}); {REWRITE_HINT.format(root=root)}") from exc
    return Dataset(root, Manifest.from_json(data, root))


def unknown_fields(manifest: Manifest | dict) -> list[str]:
    """Fields of a (checked) manifest that this version never writes, as dotted paths
    (``Manifest.unknown_fields``; a dict is read as JSON first)."""
    if isinstance(manifest, dict):
        manifest = Manifest.from_json(manifest)
    return manifest.unknown_fields()


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
