"""The dataset manifest: what a converted directory holds, and the checks every reader makes."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NoReturn

from alexnet_pipe.dataset.layout import LMDB_DATA_FILE, MANIFEST_FILE, STATE_FILE
from alexnet_pipe.errors import DatasetError

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

    def smaller_than(self, side: int) -> dict[str, int]:
        """Stored images per split whose short side is below ``side`` (only splits with some).
        From the converter's histogram of stored short sides; conversions from before it can only
        tell from the short-side setting."""
        found = {}
        for name in self.splits():
            split = self.split(name)
            counts = split.get("short_side_counts")
            if counts is None:
                short = self.manifest["settings"].get("short_side", 0)
                small = split["records"] if 0 < short < side else 0
            else:
                small = sum(n for s, n in counts.items() if int(s) < side)
            if small:
                found[name] = small
        return found

    def all_at_least(self, split: str, side: int) -> bool:
        """Whether every stored image of ``split`` is known to have a short side of at least ``side``."""
        counts = self.split(split).get("short_side_counts")
        if counts is not None:
            return all(int(s) >= side for s, n in counts.items() if n)
        settings = self.manifest["settings"]  # no histogram: only an upscaling conversion can tell
        return settings.get("upscale", True) and settings.get("short_side", 0) >= side

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
    manifest is refused here, with one line, before any reader follows it.

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
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"cannot read {path} ({_short(exc)}); {_REWRITE.format(root=root)}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{path} is not an alexnet-pipe manifest")
    if type(manifest.get("version")) is not int or manifest["version"] not in READABLE_VERSIONS:
        raise DatasetError(
            f"{path} has format version {manifest.get('version')!r}; this alexnet-pipe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: reconvert the dataset, or use a newer alexnet-pipe"
        )
    _Checker(root, path).check(manifest)
    return Dataset(root, manifest)


# The fields this version writes (convert, upgrade), besides the free-form "settings" and "resize".
# ``verify`` reports any other field: a renamed or edited field would otherwise go unnoticed, as
# readers treat most of them as optional (older datasets lack them). Add new manifest fields here.
KNOWN_FIELDS = {
    "manifest": {"format", "version", "created_by", "settings", "resize", "classes", "splits", "mean", "mean_image",
                 "record_id_width", "skipped", "upgraded_from"},
    "class": {"index", "id", "name"},
    "split": {"records", "inputs", "skipped", "passthrough", "class_counts", "short_side_counts", "min_short_side",
              "layout", "shards", "recordio_index"},
    "shard": {"name", "records", "first_id", "lmdb", "recordio"},
    "lmdb": {"path", "checksum", "bytes"},
    "recordio": {"rec", "idx", "checksum", "bytes"},
    "mean_image": {"npy", "binaryproto", "size", "images"},
}


def unknown_fields(manifest: dict) -> list[str]:
    """Fields of a (checked) manifest that this version never writes, as dotted paths."""
    out = [k for k in manifest if k not in KNOWN_FIELDS["manifest"]]
    out += [f"classes[{i}].{k}" for i, c in enumerate(manifest["classes"]) for k in c if k not in KNOWN_FIELDS["class"]]
    if isinstance(manifest.get("mean_image"), dict):
        out += [f"mean_image.{k}" for k in manifest["mean_image"] if k not in KNOWN_FIELDS["mean_image"]]
    for name, split in manifest["splits"].items():
        out += [f"splits.{name}.{k}" for k in split if k not in KNOWN_FIELDS["split"]]
        for n, shard in enumerate(split["shards"]):
            here = f"splits.{name}.shards[{n}]"
            out += [f"{here}.{k}" for k in shard if k not in KNOWN_FIELDS["shard"]]
            for fmt in ("lmdb", "recordio"):
                if isinstance(shard.get(fmt), dict):
                    out += [f"{here}.{fmt}.{k}" for k in shard[fmt] if k not in KNOWN_FIELDS[fmt]]
    return out


# What fixes a damaged manifest: convert's last step writes it from the shards' completion records.
_REWRITE = ("the manifest is damaged or was edited: rerun the alexnet-pipe convert command that made {root} "
            "(it rewrites the manifest from its shards), or reconvert")
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


class _Checker:
    """Checks a parsed manifest field by field; the first problem raises DatasetError."""

    def __init__(self, root: Path, path: Path):
        self.root, self.path = root, path
        self.real_root = root.resolve()
        self.seen_paths: dict[str, str] = {}

    def fail(self, field: str, what: str) -> NoReturn:
        raise DatasetError(f"{self.path}: {field} {what}; {_REWRITE.format(root=self.root)}")

    def want_object(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"is {_kind(value)}, expected an object")
        return value

    def want_list(self, value, field: str) -> list:
        if not isinstance(value, list):
            self.fail(field, f"is {_kind(value)}, expected a list")
        return value

    def want_str(self, value, field: str) -> str:
        if not isinstance(value, str):
            self.fail(field, f"is {_kind(value)}, expected a string")
        return value

    def want_int(self, value, field: str, lo: int = 0, hi: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
            self.fail(field,
                      f"is {_kind(value)}, expected an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return value

    def relpath(self, value, field: str, inner: str | None = None) -> str:
        """A path relative to the root that stays inside it, also through symlinks; each file once."""
        rel = self.want_str(value, field)
        parts = PurePosixPath(rel).parts
        if (not rel or "\0" in rel or rel.startswith("/") or PurePosixPath(rel).is_absolute() or ".." in parts
                or "\\" in rel):
            self.fail(field, f"is {rel!r}: shard paths must be relative to the dataset directory, without '..'")
        target = self.root / rel
        for candidate in (target, target / inner) if inner else (target,):
            try:
                real = candidate.resolve()
            except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long
                self.fail(field, f"is {rel!r}, which cannot be resolved ({exc})")
            if not real.is_relative_to(self.real_root):
                self.fail(field, f"is {rel!r}, which leads outside {self.root} (to {real}); refusing to read it")
        key = str(target.resolve())
        if key in self.seen_paths:
            self.fail(field, f"is {rel!r}, the same file as {self.seen_paths[key]}")
        self.seen_paths[key] = field
        return rel

    def check(self, m: dict) -> None:
        settings = self.want_object(m.get("settings"), "settings")
        formats = self.want_list(settings.get("formats"), "settings.formats")
        if (not formats or len(set(map(repr, formats))) != len(formats)
                or any(f not in ("lmdb", "recordio") for f in formats)):
            self.fail("settings.formats", f"is {formats!r}, expected one or both of 'lmdb', 'recordio'")
        self.want_int(settings.get("short_side"), "settings.short_side")
        if "shard_size" in settings:
            self.want_int(settings["shard_size"], "settings.shard_size", 1)
        classes = self.want_list(m.get("classes"), "classes")
        if not classes:
            self.fail("classes", "is empty")
        for i, c in enumerate(classes):
            self.want_object(c, f"classes[{i}]")
            if c.get("index") != i or isinstance(c.get("index"), bool):
                self.fail(f"classes[{i}].index", f"is {c.get('index')!r}, expected {i}")
            self.want_str(c.get("id"), f"classes[{i}].id")
            if "name" in c:
                self.want_str(c["name"], f"classes[{i}].name")
        splits = self.want_object(m.get("splits"), "splits")
        for name, split in splits.items():
            self.split(name, self.want_object(split, f"splits.{name}"), formats, len(classes))
        if m.get("mean") is not None:
            self.relpath(m["mean"], "mean")
        if m.get("mean_image") is not None:
            image = self.want_object(m["mean_image"], "mean_image")
            for key in ("npy", "binaryproto"):
                self.relpath(image.get(key), f"mean_image.{key}")
            for key in ("size", "images"):
                if key in image:
                    self.want_int(image[key], f"mean_image.{key}")
        if "record_id_width" in m:
            self.want_int(m["record_id_width"], "record_id_width", 1, 18)
        self.want_list(m.get("skipped"), "skipped")

    def split(self, name: str, split: dict, formats: list, num_classes: int) -> None:
        at = f"splits.{name}"
        records = self.want_int(split.get("records"), f"{at}.records")
        counts = self.want_list(split.get("class_counts"), f"{at}.class_counts")
        if len(counts) != num_classes:
            self.fail(f"{at}.class_counts", f"has {len(counts)} entries for {num_classes} classes")
        for i, n in enumerate(counts):
            self.want_int(n, f"{at}.class_counts[{i}]")
        if sum(counts) != records:
            self.fail(f"{at}.class_counts", f"sum to {sum(counts)}, the split says {records} records")
        self.want_int(split.get("skipped"), f"{at}.skipped")
        for key in ("inputs", "passthrough"):
            if key in split:
                self.want_int(split[key], f"{at}.{key}")
        if "min_short_side" in split and split["min_short_side"] is not None:
            self.want_int(split["min_short_side"], f"{at}.min_short_side")
        if "short_side_counts" in split:
            for side, n in self.want_object(split["short_side_counts"], f"{at}.short_side_counts").items():
                if not side.isascii() or not side.isdigit():
                    self.fail(f"{at}.short_side_counts", f"has the key {side!r}, expected a number of pixels")
                self.want_int(n, f"{at}.short_side_counts[{side!r}]")
        self.want_str(split.get("layout"), f"{at}.layout")
        shards = self.want_list(split.get("shards"), f"{at}.shards")
        total = 0
        for k, shard in enumerate(shards):
            here = f"{at}.shards[{k}]"
            self.want_object(shard, here)
            self.want_str(shard.get("name"), f"{here}.name")
            total += self.want_int(shard.get("records"), f"{here}.records")
            self.want_int(shard.get("first_id"), f"{here}.first_id")
            if "lmdb" in formats:
                entry = self.want_object(shard.get("lmdb"), f"{here}.lmdb")
                self.relpath(entry.get("path"), f"{here}.lmdb.path", inner=LMDB_DATA_FILE)
                self.checksum(entry.get("checksum"), f"{here}.lmdb.checksum")
                if "bytes" in entry:
                    self.want_int(entry["bytes"], f"{here}.lmdb.bytes")
            if "recordio" in formats:
                entry = self.want_object(shard.get("recordio"), f"{here}.recordio")
                self.relpath(entry.get("rec"), f"{here}.recordio.rec")
                self.relpath(entry.get("idx"), f"{here}.recordio.idx")
                self.checksum(entry.get("checksum"), f"{here}.recordio.checksum")
                if "bytes" in entry:
                    self.want_int(entry["bytes"], f"{here}.recordio.bytes")
        if total != records:
            self.fail(f"{at}.records", f"is {records}, its shards hold {total}")
        if "recordio" in formats and shards:
            self.relpath(split.get("recordio_index"), f"{at}.recordio_index")

    def checksum(self, value, field: str) -> None:
        if not isinstance(value, str) or not _CHECKSUM.fullmatch(value):
            self.fail(field, f"is {value!r}, expected 'sha256:' and 64 hex digits")


def _kind(value) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:40] + "..."
