"""The checks a manifest passes before anything reads it (``Manifest.from_json``, schema.py).

Every field a reader uses is checked for its type and range, and every path it lists must stay
inside the dataset directory (relative, no ``..``, no symlink leading out): a damaged or edited
manifest is refused, with one line naming the field and what to run, before any reader follows it.
The first problem raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import NoReturn

from alexnet_pipe.config import MAX_SIDE, RESIZE_FILTERS, RESIZE_MODES
from alexnet_pipe.dataset.layout import LMDB_DATA_FILE, MANIFEST_FILE
from alexnet_pipe.errors import DatasetError
from alexnet_pipe.text import shown

# What fixes a damaged manifest: convert's last step writes it from the shards' completion records.
REWRITE_HINT = ("the manifest is damaged or was edited: rerun the alexnet-pipe convert command that made {root} "
                "(it rewrites the manifest from its shards), or reconvert")
# What fixes a file linked in from outside (verify's check, and repair's before it reads a shard):
# rerunning convert would not, it writes the same paths.
OUTSIDE_HINT = "a dataset's files must lie inside its directory: put the file itself in place of the link"
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
# The settings readers use, each in the range convert accepts (config.py): a short side of 1e9 is
# refused here, in one line, not when train sizes its crops from it. The sizes without an upper
# bound (shard_size, the input caps) are only compared on a resume, never used to allocate.
_INT_SETTINGS = {"short_side": (0, MAX_SIDE), "min_short_side": (0, MAX_SIDE), "resize_height": (0, MAX_SIDE),
                 "resize_width": (0, MAX_SIDE), "quality": (1, 100), "shard_size": (1, None),
                 "max_pixels": (1, None), "max_file_mb": (1, None)}
_BOOL_SETTINGS = ("upscale", "passthrough")
_CHOICE_SETTINGS = {"resize": RESIZE_MODES, "resize_filter": RESIZE_FILTERS}


class ManifestChecker:
    """Checks a parsed manifest field by field; the first problem raises DatasetError.

    ``root``: the dataset directory, whose files the paths must stay inside (resolved on disk,
    symlinks followed); None checks the paths as text only, and errors name ``manifest.json`` and
    "the dataset".
    """

    def __init__(self, root: Path | None):
        self.root = root
        self.path = Path(MANIFEST_FILE) if root is None else root / MANIFEST_FILE
        self.seen_paths: dict[str, str] = {}

    def fail(self, field: str, what: str, hint: str | None = None) -> NoReturn:
        root = "the dataset" if self.root is None else self.root
        # Shown escaped: split names, paths and symlink targets come from the file or the disk.
        raise DatasetError(shown(f"{self.path}: {field} {what}; {hint or REWRITE_HINT.format(root=root)}"))

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
        if self.root is None:  # no directory to look into: the same file is the same text
            key = str(PurePosixPath(rel))
        else:
            why = leads_outside(self.root, rel, inner)
            if why is not None:
                self.fail(field, f"is {rel!r}, which {why}; refusing to read it", OUTSIDE_HINT)
            key = str((self.root / rel).resolve())
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
        self.settings(settings)
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
            if "devkit_id" in c:
                self.want_int(c["devkit_id"], f"classes[{i}].devkit_id", 1)
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
        for k, entry in enumerate(self.want_list(m.get("skipped"), "skipped")):
            if isinstance(entry, dict) and "count" in entry:  # one entry for many (inputs/listfile.py)
                self.want_int(entry["count"], f"skipped[{k}].count", 1)

    def settings(self, settings: dict) -> None:
        """The settings readers use, each in the range convert accepts (short_side is required)."""
        self.want_int(settings.get("short_side"), "settings.short_side", *_INT_SETTINGS["short_side"])
        for key, (lo, hi) in _INT_SETTINGS.items():
            if key in settings:
                self.want_int(settings[key], f"settings.{key}", lo, hi)
        for key in _BOOL_SETTINGS:
            if key in settings and not isinstance(settings[key], bool):
                self.fail(f"settings.{key}", f"is {_kind(settings[key])}, expected true or false")
        for key, choices in _CHOICE_SETTINGS.items():
            if key in settings and settings[key] not in choices:
                self.fail(f"settings.{key}", f"is {_kind(settings[key])}, expected one of {', '.join(choices)}")
        if "val_ratio" in settings:
            ratio = settings["val_ratio"]
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
                self.fail("settings.val_ratio", f"is {_kind(ratio)}, expected a number between 0 and 1")
        if settings.get("resize") == "squash":
            for key in ("resize_height", "resize_width"):  # Settings.squash reads both
                self.want_int(settings.get(key), f"settings.{key}", 1, MAX_SIDE)

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


def leads_outside(root: Path, rel: str, inner: str | None = None) -> str | None:
    """Why ``root/rel`` (and ``root/rel/inner``, a folder's file) is not a file of ``root``: a symlink leads
    it outside ("leads outside ROOT (to PATH)"), or it cannot be resolved (a link loop); None when it
    stays inside. Only links are followed, nothing is opened: callers ask before reading."""
    target = root / rel
    for candidate in (target, target / inner) if inner else (target,):
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long
            return f"cannot be resolved ({exc})"
        if not real.is_relative_to(root.resolve()):
            return f"leads outside {root} (to {real})"
    return None


def _kind(value) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:40] + "..."
