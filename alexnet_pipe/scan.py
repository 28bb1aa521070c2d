"""Find the images of a raw ImageNet-style input and their labels (no image is opened).

Layouts understood, per split:
  1. ``RAW/<split>/<class>/<image>`` class folders (``RAW/<class>/<image>`` alone = train only);
  2. a flat ``RAW/val/`` labelled by ``LOC_val_solution.csv``, by the devkit's
     ``ILSVRC2012_validation_ground_truth.txt`` plus the devkit's own id order (``meta.mat``),
     or by a Caffe ``val.txt`` (``name label``); see val_labels.py;
  3. the original archives ``ILSVRC2012_img_train.tar`` (a tar of per-class tars) and
     ``ILSVRC2012_img_val.tar`` (flat; labelled as in 2). Members are located by byte offset so
     workers read them straight from the archive; nothing is extracted. Listing the train tar
     takes minutes, so with ``cache_dir`` the member lists are kept for the next scan.
Classes are numbered by sorted class name (Caffe/torchvision convention).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tarfile
import zipfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LayoutError
from .fsutil import atomic_write_bytes
from .sources import Source, SourceTable, SourceTableBuilder
from .val_labels import (
    CSV_LABELS,
    DEVKIT_ARCHIVES,
    GT_LABELS,
    ID_MAPS,
    NAME_LISTS,
    SYNSET_LISTS,
    class_list,
    find_id_map,
    flat_labels,
    read_synsets,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
TRAIN_TARS = ("ILSVRC2012_img_train.tar",)
VAL_TARS = ("ILSVRC2012_img_val.tar",)
# Files beside the class folders that are inputs, not stray images.
METADATA = frozenset(
    CSV_LABELS + GT_LABELS + SYNSET_LISTS + NAME_LISTS + ID_MAPS + DEVKIT_ARCHIVES + TRAIN_TARS + VAL_TARS
)
CACHE_FORMAT = "alexnet-pipe scan cache"
CACHE_VERSION = 2

__all__ = ["Source", "SourceTable", "ScanResult", "Skip", "scan"]


@dataclass(frozen=True)
class Skip:
    """An input that was found but will not be converted, and why."""

    split: str
    name: str
    reason: str


@dataclass
class ScanResult:
    layout: dict[str, str]  # split -> how it was read, for the manifest and messages
    classes: list[str]
    class_names: dict[str, str]
    splits: dict[str, SourceTable]  # inputs of each split, sorted by name
    skipped: list[Skip] = field(default_factory=list)


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _list_dir(path: Path) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """(subdirectories, files) of a directory, hidden entries dropped, sorted by name."""
    with os.scandir(path) as it:
        entries = _visible(it)
    dirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if e.is_file()]
    return dirs, files


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` that is a file in ``root``."""
    return next((root / name for name in names if (root / name).is_file()), None)


def _files_below(folder: Path) -> list[tuple[str, str]]:
    """(name relative to ``folder``, path) of every visible file below it, sorted; like
    torchvision's ImageFolder, images in subfolders of a class folder belong to that class.
    (os.path, not pathlib: pathlib interns every name part, a table that would grow by the
    million on ImageNet and never shrink.)"""
    out = []
    top = os.fspath(folder)
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, top)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in files:
            path = os.path.join(root, name)
            if not name.startswith(".") and os.path.isfile(path):
                out.append((prefix + name, path))
    return sorted(out)


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    """class name -> folder, for the class folders of a split (their files are listed later,
    one class at a time, straight into a SourceTable)."""
    return {d.name: Path(d.path) for d in _list_dir(split_dir)[0]}


def _by_name(groups) -> list[str]:
    """Groups (class folders, per-class tars) in the order that sorts their members' names
    ``<group>/<file>`` globally: by ``group + "/"`` ("cat/x" sorts before "cat-1/x")."""
    return sorted(groups, key=lambda g: g + "/")


def _folder_table(split_dir: Path, folders: dict[str, Path], index: dict[str, int], split: str) -> SourceTable:
    for cls in folders:
        if cls not in index:
            raise LayoutError(
                f"{split}/ has a class folder {cls!r} that the training classes do not have; "
                "every class must appear in train/ (or the synset list)"
            )
    table = SourceTableBuilder()
    location = str(split_dir)
    for cls in _by_name(folders):
        for name, _ in _files_below(folders[cls]):
            table.add(f"{cls}/{name}", index[cls], location)
    return table.build()


@dataclass
class Members:
    """An archive's member lists, column-wise (1.28M train members: ~50 MB, not ~300 as tuples).
    Group g (a class, or "" for a flat tar) holds rows ``ends[g-1]:ends[g]``, sorted by name."""

    groups: list[str]
    group_ends: np.ndarray  # int64
    names: bytes  # the member names (the file name part), UTF-8, concatenated
    name_ends: np.ndarray  # int64
    offsets: np.ndarray  # int64: byte offset of the member's data in the archive file
    sizes: np.ndarray  # int64

    def rows(self, g: int) -> range:
        return range(int(self.group_ends[g - 1]) if g else 0, int(self.group_ends[g]))

    def name(self, row: int) -> bytes:
        return self.names[int(self.name_ends[row - 1]) if row else 0 : int(self.name_ends[row])]


class _MembersBuilder:
    def __init__(self) -> None:
        self.groups: list[str] = []
        self.group_ends, self.name_ends, self.offsets, self.sizes = array("q"), array("q"), array("q"), array("q")
        self.names = bytearray()

    def add_group(self, group: str, members: list[tuple[str, int, int]]) -> None:
        for name, offset, size in sorted(members):
            self.names += name.encode("utf-8", "surrogateescape")
            self.name_ends.append(len(self.names))
            self.offsets.append(offset)
            self.sizes.append(size)
        self.groups.append(group)
        self.group_ends.append(len(self.offsets))

    def build(self) -> Members:
        col = lambda a: np.frombuffer(a, np.int64).copy()  # noqa: E731
        return Members(self.groups, col(self.group_ends), bytes(self.names), col(self.name_ends),
                       col(self.offsets), col(self.sizes))


def _tar_members(path: Path) -> Members:
    """The members of a flat tar (the validation archive), as one group ""."""
    built = _MembersBuilder()
    try:
        with tarfile.open(path, "r:") as tar:
            built.add_group("", [(m.name, m.offset_data, m.size) for m in tar if m.isfile()])
    except tarfile.TarError as exc:
        raise LayoutError(f"{path} is not a readable uncompressed tar archive ({exc})") from exc
    return built.build()


def _train_tar_tree(path: Path) -> Members:
    """class -> members, for a tar of per-class tars."""
    try:
        return _read_train_tar(path)
    except tarfile.TarError as exc:
        raise LayoutError(
            f"{path} is not a readable uncompressed tar of per-class tars ({exc}); "
            "expected the original ILSVRC2012_img_train.tar"
        ) from exc


def _read_train_tar(path: Path) -> Members:
    built = _MembersBuilder()
    with tarfile.open(path, "r:") as outer:
        for member in outer:
            if not member.isfile() or not member.name.endswith(".tar"):
                continue
            cls = Path(member.name).name[: -len(".tar")]
            inner_file = outer.extractfile(member)
            with tarfile.open(fileobj=inner_file, mode="r:") as inner:
                # Inner offsets are relative to the inner tar, which starts at the outer
                # member's data: the sum is the JPEG's byte offset in the archive file.
                built.add_group(cls, [
                    (Path(m.name).name, member.offset_data + m.offset_data, m.size)
                    for m in inner
                    if m.isfile() and not Path(m.name).name.startswith(".")
                ])
    if not built.groups:
        raise LayoutError(f"{path} holds no per-class .tar members; expected ILSVRC2012_img_train.tar")
    return built.build()


# The scan cache: one .npz file per archive (numpy arrays only, read with allow_pickle=False):
# "key" (the archive's resolved path, size and mtime, as one JSON string), "groups" (the group
# names, NUL-separated), and the Members columns. About 45 bytes per member: ~58 MB for
# ILSVRC2012_img_train.tar, read back in well under a second instead of minutes of tar headers.
# Another path, size or mtime means the archive changed (or the file belongs to another one)
# and it is listed again; a file that is not well formed is ignored and rewritten.


def _cache_key(archive: Path, kind: str) -> str:
    resolved = archive.resolve()
    st = resolved.stat()
    return json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "kind": kind, "archive": str(resolved),
                       "size": st.st_size, "mtime_ns": st.st_mtime_ns}, sort_keys=True)


def _cache_file(cache_dir: Path, archive: Path, kind: str) -> Path:
    digest = hashlib.sha256(f"{kind}\0{archive.resolve()}".encode()).hexdigest()[:16]
    return cache_dir / f"{archive.name}.{digest}.npz"


def _load_cache(path: Path, key: str, archive_size: int) -> Members | None:
    """The cached members of the archive ``key`` describes; None if absent, stale or malformed."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            groups = bytes(z["groups"]).decode("utf-8", "surrogateescape").split("\0")
            members = Members(groups, z["group_ends"], bytes(z["names"]), z["name_ends"], z["offsets"], z["sizes"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n = len(members.offsets)
    columns_ok = (
        all(a.dtype == np.int64 and a.ndim == 1 for a in (members.group_ends, members.name_ends, members.offsets,
                                                          members.sizes))
        and len(members.name_ends) == len(members.sizes) == n and len(members.group_ends) == len(groups) > 0
        and bool(np.all(np.diff(members.group_ends) >= 0)) and members.group_ends[0] >= 0
        and members.group_ends[-1] == n and bool(np.all(np.diff(members.name_ends) >= 0))
        and (n == 0 or (members.name_ends[0] >= 0 and members.name_ends[-1] == len(members.names)))
    )
    if not columns_ok:
        return None
    if n and (members.offsets.min() < 0 or members.sizes.min() < 0
              or (members.offsets + members.sizes).max() > archive_size):
        return None
    return members


def _save_cache(path: Path, key: str, members: Members) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), groups=np.frombuffer("\0".join(members.groups).encode("utf-8", "surrogateescape"),
                                                          np.uint8),
             group_ends=members.group_ends, names=np.frombuffer(members.names, np.uint8), name_ends=members.name_ends,
             offsets=members.offsets, sizes=members.sizes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:  # the cache only saves time: never fail a scan over it
        log.warning("could not write the scan cache %s (%s); the next scan lists the archive again", path, exc)


def _members(archive: Path, kind: str, read: Callable[[Path], Members], cache_dir: Path | None) -> Members:
    """``read(archive)``, through the cache in ``cache_dir`` when one is given."""
    if cache_dir is None:
        return read(archive)
    key = _cache_key(archive, kind)  # stat before reading: a change during the read shows next time
    path = _cache_file(cache_dir, archive, kind)
    members = _load_cache(path, key, archive.resolve().stat().st_size)
    if members is not None:
        log.info("member list of %s read from the scan cache %s", archive.name, path)
        return members
    members = read(archive)
    _save_cache(path, key, members)
    return members


def _tar_table(tar: Path, members: Members, index: dict[str, int]) -> SourceTable:
    """The train split of a tar of per-class tars, sorted by name ``<class>/<member>``."""
    table = SourceTableBuilder()
    location = str(tar)
    position = {g: k for k, g in enumerate(members.groups)}
    for cls in _by_name(members.groups):
        g = position[cls]
        for row in members.rows(g):
            name = members.name(row).decode("utf-8", "surrogateescape")
            table.add(f"{cls}/{name}", index[cls], location, int(members.offsets[row]), int(members.sizes[row]))
    return table.build()


@dataclass(frozen=True)
class _FlatFile:
    name: str
    path: str
    offset: int = 0
    size: int = -1


def _flat_val_files(raw: Path, cache_dir: Path | None) -> tuple[list[_FlatFile], str] | None:
    val_dir = raw / "val"
    if val_dir.is_dir():
        dirs, files = _list_dir(val_dir)
        if files and not dirs:
            return [_FlatFile(f.name, f.path) for f in files], "flat val/ folder"
        return None
    tar = _find(raw, VAL_TARS)
    if tar is not None:
        members = _members(tar, "flat tar", _tar_members, cache_dir)
        files = [_FlatFile(Path(members.name(r).decode("utf-8", "surrogateescape")).name, str(tar),
                           int(members.offsets[r]), int(members.sizes[r])) for r in members.rows(0)]
        return sorted(files, key=lambda f: f.name), tar.name
    return None


def _classes(raw: Path, trees: dict, tar_tree: Members | None, val_labels: Path | None,
             synsets: Path | None) -> list[str]:
    """The sorted class wnids: train's folders, else val's, else a synset list or the devkit."""
    if "train" in trees:
        return sorted(trees["train"])
    if tar_tree is not None:
        return sorted(tar_tree.groups)
    if "val" in trees:
        return sorted(trees["val"])
    if synsets is not None:
        return sorted(class_list(synsets))
    synset_path = _find(raw, SYNSET_LISTS)
    if synset_path is not None:
        return sorted(read_synsets(synset_path)[0])
    devkit = find_id_map(raw, archives=tuple(raw / n for n in DEVKIT_ARCHIVES if (raw / n).is_file()))
    if devkit is not None:
        return sorted(devkit.wnid_of.values())
    csv_path = val_labels or _find(raw, CSV_LABELS)
    if csv_path is None or csv_path.suffix != ".csv":
        raise LayoutError(
            f"{raw} has only a flat validation set: give the classes with a synset list "
            f"({', '.join(SYNSET_LISTS)}), the devkit ({DEVKIT_ARCHIVES[0]}) or LOC_val_solution.csv"
        )
    with open(csv_path, newline="", encoding="utf-8") as f:
        return sorted({(row.get("PredictionString") or "?").split()[0] for row in csv.DictReader(f)})


def scan(
    raw: Path, val_labels: Path | None = None, synsets: Path | None = None, cache_dir: Path | None = None
) -> ScanResult:
    """Find every input image of ``raw`` and its label.

    Args:
        raw: the raw input directory.
        val_labels: a label file for a flat validation set (else auto-detected in ``raw``); may be
            the devkit archive, whose ground truth is then used.
        synsets: the devkit's id order for ILSVRC ground-truth ids: the devkit archive, its
            meta.mat, map_clsloc.txt, or a wnid list in devkit (not sorted) order. Else the devkit
            is looked for in ``raw``; a sorted synset list is never used for the ids.
        cache_dir: keep the member lists of the tar archives here (created if missing), so the
            next scan of an unchanged archive does not read it again.
    Returns:
        A ScanResult whose splits hold their inputs (SourceTable) sorted by name.
    Raises:
        LayoutError: naming what was found and what was expected.
    """
    if not raw.is_dir():
        raise LayoutError(f"{raw} is not a directory")
    for given in (val_labels, synsets):
        if given is not None and not given.is_file():
            raise LayoutError(f"{given} does not exist or is not a file")
    trees: dict[str, dict[str, Path]] = {}  # split -> class -> folder
    layout: dict[str, str] = {}
    tar_tree: Members | None = None
    train_tar = _find(raw, TRAIN_TARS)
    if (raw / "train").is_dir():
        trees["train"], layout["train"] = _class_dirs(raw / "train"), "class folders train/<class>/"
    elif train_tar is not None:
        tar_tree = _members(train_tar, "tar of per-class tars", _train_tar_tree, cache_dir)
        layout["train"] = f"{train_tar.name} (tar of per-class tars)"
    flat = _flat_val_files(raw, cache_dir)
    if flat is None and (raw / "val").is_dir():
        trees["val"], layout["val"] = _class_dirs(raw / "val"), "class folders val/<class>/"
    if not trees and tar_tree is None and flat is None:
        dirs, _ = _list_dir(raw)
        if dirs:
            trees["train"], layout["train"] = _class_dirs(raw), "class folders <class>/ (train only)"
        else:
            raise LayoutError(
                f"{raw} has no class folders; expected {raw}/train/<class>/<image>.JPEG (and val/), "
                f"{raw}/<class>/<image>.JPEG, or the archives {TRAIN_TARS[0]} / {VAL_TARS[0]}"
            )

    name_path = _find(raw, NAME_LISTS)
    class_names = read_synsets(name_path)[1] if name_path else {}
    classes = _classes(raw, trees, tar_tree, val_labels, synsets)
    index = {c: i for i, c in enumerate(classes)}

    result = ScanResult(layout, classes, class_names, {})
    for split, folders in trees.items():
        # Inputs are listed one class folder at a time, straight into compact columns.
        split_dir = raw if layout[split].endswith("(train only)") else raw / split
        result.splits[split] = _folder_table(split_dir, folders, index, split)
        # Loose files beside the class folders have no class: list them, never drop them silently.
        result.skipped.extend(
            Skip(split, f.name, "not inside a class folder (no label)")
            for f in _list_dir(split_dir)[1]
            if f.name not in METADATA
        )
    if tar_tree is not None:
        result.splits["train"] = _tar_table(train_tar, tar_tree, index)
    if flat is not None:
        files, where = flat
        labels, label_source = flat_labels(raw, [f.name for f in files], classes, val_labels, synsets)
        layout["val"] = f"{where} labelled by {label_source}"
        table = SourceTableBuilder()
        for f, lab in zip(files, labels):
            if lab is not None:  # a flat file's own path is its location (its name is the file name)
                table.add(f.name, lab, f.path if f.size >= 0 else os.path.dirname(f.path), f.offset, f.size)
        result.splits["val"] = table.build()
        result.skipped.extend(
            Skip("val", f.name, f"no label in {label_source}") for f, lab in zip(files, labels) if lab is None
        )
    for split in list(result.splits):
        if not len(result.splits[split]):
            raise LayoutError(f"the {split} split of {raw} ({layout[split]}) holds no files")
    return result
