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
import json
import logging
import operator
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LayoutError
from .fsutil import atomic_write_bytes
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
CACHE_VERSION = 1

# An archive's member lists: group (class, or "" for a flat tar) -> [(name, byte offset, size)].
Members = dict[str, list[tuple[str, int, int]]]


@dataclass(frozen=True, slots=True)
class Source:
    """One input image: where its bytes are and which class it belongs to."""

    name: str  # stable relative name, e.g. "n01440764/n01440764_10026.JPEG"
    label: int
    path: str  # a plain file, or the archive holding the bytes
    offset: int = 0
    size: int = -1  # -1: the whole file


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
    splits: dict[str, list[Source]]
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
    torchvision's ImageFolder, images in subfolders of a class folder belong to that class."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(folder)
        for name in files:
            if not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                out.append(((rel / name).as_posix(), os.path.join(root, name)))
    return sorted(out)


def _class_folders(split_dir: Path) -> dict[str, list[tuple[str, str]]]:
    dirs, _ = _list_dir(split_dir)
    return {d.name: _files_below(Path(d.path)) for d in dirs}


def _folder_sources(tree: dict[str, list[tuple[str, str]]], index: dict[str, int], split: str) -> list[Source]:
    sources = []
    for cls, files in tree.items():
        if cls not in index:
            raise LayoutError(
                f"{split}/ has a class folder {cls!r} that the training classes do not have; "
                "every class must appear in train/ (or the synset list)"
            )
        sources.extend(Source(f"{cls}/{name}", index[cls], path) for name, path in files)
    return sources


def _tar_members(path: Path) -> Members:
    """{"": [(member name, offset, size)]} of a flat tar (the validation archive)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return {"": [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]}
    except tarfile.TarError as exc:
        raise LayoutError(f"{path} is not a readable uncompressed tar archive ({exc})") from exc


def _train_tar_tree(path: Path) -> Members:
    """class -> [(member name, absolute offset, size)] for a tar of per-class tars."""
    try:
        return _read_train_tar(path)
    except tarfile.TarError as exc:
        raise LayoutError(
            f"{path} is not a readable uncompressed tar of per-class tars ({exc}); "
            "expected the original ILSVRC2012_img_train.tar"
        ) from exc


def _read_train_tar(path: Path) -> Members:
    tree: Members = {}
    with tarfile.open(path, "r:") as outer:
        for member in outer:
            if not member.isfile() or not member.name.endswith(".tar"):
                continue
            cls = Path(member.name).name[: -len(".tar")]
            inner_file = outer.extractfile(member)
            with tarfile.open(fileobj=inner_file, mode="r:") as inner:
                # Inner offsets are relative to the inner tar, which starts at the outer
                # member's data: the sum is the JPEG's byte offset in the archive file.
                tree[cls] = sorted(
                    (Path(m.name).name, member.offset_data + m.offset_data, m.size)
                    for m in inner
                    if m.isfile() and not Path(m.name).name.startswith(".")
                )
    if not tree:
        raise LayoutError(f"{path} holds no per-class .tar members; expected ILSVRC2012_img_train.tar")
    return tree


# The scan cache: one compact JSON file per archive, e.g.
#   {"format": "alexnet-pipe scan cache", "version": 1, "kind": "tar of per-class tars",
#    "archive": "/data/ILSVRC2012_img_train.tar", "size": 147897477120, "mtime_ns": 1340000000000000000,
#    "groups": {"n01440764": {"names": ["n01440764_10026.JPEG", ...], "offsets": [...], "sizes": [...]}}}
# Parallel lists, not one dict per member, and no whitespace: about 42 bytes per member, i.e.
# ~42 MB per million members (~53 MB for ILSVRC2012_img_train.tar, read back in a few seconds
# instead of minutes). Everything but "groups" is the key: another path, size or mtime means
# the archive changed (or the file belongs to another one) and it is listed again.


def _cache_key(archive: Path, kind: str) -> dict:
    resolved = archive.resolve()
    st = resolved.stat()
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "kind": kind, "archive": str(resolved),
            "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_file(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(f"{key['kind']}\0{key['archive']}".encode()).hexdigest()[:16]
    return cache_dir / f"{Path(key['archive']).name}.{digest}.json"


def _cached_group(columns, archive_size: int) -> list[tuple[str, int, int]] | None:
    """A group's members if ``columns`` is well formed and fits in the archive, else None."""
    if not isinstance(columns, dict):
        return None
    names, offsets, sizes = columns.get("names"), columns.get("offsets"), columns.get("sizes")
    if not (isinstance(names, list) and isinstance(offsets, list) and isinstance(sizes, list)):
        return None
    if not len(names) == len(offsets) == len(sizes):
        return None
    # set(map(type, ...)) runs in C: this check costs ~0.1 s for the 1.28M train members.
    if set(map(type, names)) - {str} or set(map(type, offsets)) - {int} or set(map(type, sizes)) - {int}:
        return None
    if names and (min(offsets) < 0 or min(sizes) < 0 or max(map(operator.add, offsets, sizes)) > archive_size):
        return None
    return list(zip(names, offsets, sizes))


def _load_cache(path: Path, key: dict) -> Members | None:
    """The cached members of the archive ``key`` describes; None if absent, stale or malformed."""
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing, unreadable, or not JSON (ValueError covers decoding)
        return None
    if not isinstance(obj, dict) or any(obj.get(k) != v for k, v in key.items()):
        return None
    groups = obj.get("groups")
    if not isinstance(groups, dict) or not groups:
        return None
    members: Members = {}
    for group, columns in groups.items():
        found = _cached_group(columns, key["size"])
        if found is None:
            return None
        members[group] = found
    return members


def _save_cache(path: Path, key: dict, members: Members) -> None:
    groups = {
        group: {"names": [m[0] for m in items], "offsets": [m[1] for m in items], "sizes": [m[2] for m in items]}
        for group, items in members.items()
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic_write_json indents (+36% here: 73 MB instead of 53); same atomic write, compact JSON.
        atomic_write_bytes(path, json.dumps({**key, "groups": groups}, separators=(",", ":")).encode())
    except OSError as exc:  # the cache only saves time: never fail a scan over it
        log.warning("could not write the scan cache %s (%s); the next scan lists the archive again", path, exc)


def _members(archive: Path, kind: str, read: Callable[[Path], Members], cache_dir: Path | None) -> Members:
    """``read(archive)``, through the cache in ``cache_dir`` when one is given."""
    if cache_dir is None:
        return read(archive)
    key = _cache_key(archive, kind)  # stat before reading: a change during the read shows next time
    path = _cache_file(cache_dir, key)
    members = _load_cache(path, key)
    if members is not None:
        log.info("member list of %s read from the scan cache %s", archive.name, path)
        return members
    members = read(archive)
    _save_cache(path, key, members)
    return members


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
        members = sorted(_members(tar, "flat tar", _tar_members, cache_dir)[""])
        return [_FlatFile(Path(name).name, str(tar), offset, size) for name, offset, size in members], tar.name
    return None


def _classes(raw: Path, trees: dict, tar_tree: Members, val_labels: Path | None, synsets: Path | None) -> list[str]:
    """The sorted class wnids: train's folders, else val's, else a synset list or the devkit."""
    if "train" in trees or tar_tree:
        return sorted(trees.get("train") or tar_tree)
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
        A ScanResult whose splits list Sources sorted by name.
    Raises:
        LayoutError: naming what was found and what was expected.
    """
    if not raw.is_dir():
        raise LayoutError(f"{raw} is not a directory")
    for given in (val_labels, synsets):
        if given is not None and not given.is_file():
            raise LayoutError(f"{given} does not exist or is not a file")
    trees: dict[str, dict[str, list]] = {}
    layout: dict[str, str] = {}
    tar_tree: Members = {}
    train_tar = _find(raw, TRAIN_TARS)
    if (raw / "train").is_dir():
        trees["train"], layout["train"] = _class_folders(raw / "train"), "class folders train/<class>/"
    elif train_tar is not None:
        tar_tree = _members(train_tar, "tar of per-class tars", _train_tar_tree, cache_dir)
        layout["train"] = f"{train_tar.name} (tar of per-class tars)"
    flat = _flat_val_files(raw, cache_dir)
    if flat is None and (raw / "val").is_dir():
        trees["val"], layout["val"] = _class_folders(raw / "val"), "class folders val/<class>/"
    if not trees and not tar_tree and flat is None:
        dirs, _ = _list_dir(raw)
        if dirs:
            trees["train"], layout["train"] = _class_folders(raw), "class folders <class>/ (train only)"
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
    for split, tree in trees.items():
        result.splits[split] = _folder_sources(tree, index, split)
        # Loose files beside the class folders have no class: list them, never drop them silently.
        split_dir = raw if layout[split].endswith("(train only)") else raw / split
        result.skipped.extend(
            Skip(split, f.name, "not inside a class folder (no label)")
            for f in _list_dir(split_dir)[1]
            if f.name not in METADATA
        )
    if tar_tree:
        result.splits["train"] = [
            Source(f"{cls}/{name}", index[cls], str(train_tar), off, size)
            for cls, members in tar_tree.items()
            for name, off, size in members
        ]
    if flat is not None:
        files, where = flat
        labels, label_source = flat_labels(raw, [f.name for f in files], classes, val_labels, synsets)
        layout["val"] = f"{where} labelled by {label_source}"
        result.splits["val"] = [
            Source(f.name, lab, f.path, f.offset, f.size) for f, lab in zip(files, labels) if lab is not None
        ]
        result.skipped.extend(
            Skip("val", f.name, f"no label in {label_source}") for f, lab in zip(files, labels) if lab is None
        )
    for split in list(result.splits):
        result.splits[split].sort(key=lambda s: s.name)
        if not result.splits[split]:
            raise LayoutError(f"the {split} split of {raw} ({layout[split]}) holds no files")
    return result
