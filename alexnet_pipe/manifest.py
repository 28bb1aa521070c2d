"""The dataset manifest: what a converted directory holds, and the checks every reader makes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

MANIFEST_FILE = "manifest.json"
DATASET_FORMAT = "alexnet-pipe-dataset"
DATASET_VERSION = 2
# Version 1 (before LMDB shards stored the map size of their data) is still read; `upgrade` lifts it.
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Dataset:
    """A loaded manifest plus the directory it describes."""

    root: Path
    manifest: dict

    @property
    def version(self) -> int:
        return self.manifest["version"]

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

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def formats(self) -> list[str]:
        return self.manifest["settings"]["formats"]

    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> dict:
        try:
            return self.manifest["splits"][name]
        except KeyError:
            have = ", ".join(self.manifest["splits"]) or "none"
            raise DatasetError(f"{self.root} has no {name!r} split (it has: {have})") from None

    def shards(self, split: str) -> list[dict]:
        return self.split(split)["shards"]

    def lmdb_paths(self, split: str) -> list[Path]:
        """LMDB shard directories in order, for ``fn.readers.caffe(path=[...])``."""
        self._need("lmdb")
        return [self.root / s["lmdb"]["path"] for s in self.shards(split)]

    def recordio_paths(self, split: str) -> tuple[list[Path], Path]:
        """(.rec files in order, the one combined index) for ``fn.readers.mxnet``."""
        self._need("recordio")
        recs = [self.root / s["recordio"]["rec"] for s in self.shards(split)]
        return recs, self.root / self.split(split)["recordio_index"]

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
        return f"it looks like raw images: convert them first, e.g. alexnet-pipe convert {root} {out}, then pass -w {out}"
    return "pass the output directory of alexnet-pipe convert (alexnet-pipe convert RAW OUT, then -w OUT)"


def load_dataset(root: Path) -> Dataset:
    """Read and check ``root/manifest.json``.

    Raises:
        DatasetError: saying what is missing and what to run.
    """
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; pass the output directory of alexnet-pipe convert")
    if not path.is_file():
        hint = (
            "the conversion has not finished: rerun the same alexnet-pipe convert command to complete it"
            if (root / ".convert.json").exists()
            else _convert_hint(root)
        )
        raise DatasetError(f"{root} has no {MANIFEST_FILE}; {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} ({exc})") from exc
    if manifest.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{path} is not an alexnet-pipe manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise DatasetError(
            f"{path} has format version {manifest.get('version')}; this alexnet-pipe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: reconvert the dataset, or use a newer alexnet-pipe"
        )
    return Dataset(root, manifest)
