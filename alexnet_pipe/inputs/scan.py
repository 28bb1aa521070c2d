"""Find the images of a raw ImageNet-style input and their labels (no image is opened).

Layouts understood, per split:
  1. ``RAW/<split>/<class>/<image>`` class folders (``RAW/<class>/<image>`` alone = train only);
  2. a flat ``RAW/val/`` labelled by ``LOC_val_solution.csv``, by the devkit's
     ``ILSVRC2012_validation_ground_truth.txt`` plus the devkit's own id order (``meta.mat``),
     or by a Caffe ``val.txt`` (``name label``); see val_labels.py and devkit.py;
  3. the original archives ``ILSVRC2012_img_train.tar`` (a tar of per-class tars) and
     ``ILSVRC2012_img_val.tar`` (flat; labelled as in 2). Members are located by byte offset so
     workers read them straight from the archive; nothing is extracted. Listing the train tar
     takes minutes, so with ``cache_dir`` the member lists are kept for the next scan.
Classes are numbered by sorted class name (Caffe/torchvision convention).

Nothing is dropped silently, and nothing shifts a label:
  * an archive must be readable to its end-of-archive marker, else the scan fails naming the
    byte (tarwalk.py): a damaged header or a partial download never reads as fewer classes;
  * links, GNU sparse files and other members that are not plain files are listed as skipped;
  * system and metadata folders (``__MACOSX``, ``lost+found``, hidden folders, ``@eaDir``, ...)
    and empty folders are never classes: they are listed as skipped;
  * with a synset list (--synsets, one of SYNSET_LISTS in RAW, or the devkit), the classes found
    must be exactly its classes: missing or extra classes are an error naming them.
Hidden files (names starting with ".") are ignored, in folders and archives alike.

This module picks the layout of each split, finds the classes and checks them against a synset
list, and labels a flat validation set; the layouts themselves are read by folders.py (class
folders), archives.py (the tars, with scan_cache.py), val_labels.py (the label files) and
devkit.py (the devkit's class ids, synset lists).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.archives import TRAIN_TARS, VAL_TARS, Members, flat_tar_members, tar_table, train_tar_members
from alexnet_pipe.inputs.devkit import (
    DEVKIT_ARCHIVES,
    ID_MAPS,
    NAME_LISTS,
    SYNSET_LISTS,
    class_list,
    devkit_ids,
    find_id_map,
    read_synsets,
)
from alexnet_pipe.inputs.entries import some_names
from alexnet_pipe.inputs.folders import class_dirs, folder_table, list_dir
from alexnet_pipe.inputs.scan_cache import cached_members
from alexnet_pipe.inputs.table import ScanResult, Skip, SourceTableBuilder
from alexnet_pipe.inputs.val_labels import CSV_LABELS, GT_LABELS, flat_labels
from alexnet_pipe.text import plural

log = logging.getLogger(__name__)

# Files beside the class folders that are inputs, not stray images.
METADATA = frozenset(
    CSV_LABELS + GT_LABELS + SYNSET_LISTS + NAME_LISTS + ID_MAPS + DEVKIT_ARCHIVES + TRAIN_TARS + VAL_TARS
)

__all__ = ["scan"]


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` that is a file in ``root``."""
    return next((root / name for name in names if (root / name).is_file()), None)


def _with_images(skipped: list[Skip], lead: str = " with images (") -> str:
    """For an error: why each folder found is no class, e.g. " with images (cat/: empty folder (no files))"."""
    if not skipped:
        return ""
    return lead + some_names([f"{s.name}: {s.reason.removesuffix(', not a class')}" for s in skipped], 3) + ")"


@dataclass(frozen=True)
class _FlatFile:
    name: str
    path: str
    offset: int = 0
    size: int = -1


@dataclass
class _FlatVal:
    files: list[_FlatFile]
    where: str  # for the layout string
    skipped: list[Skip]  # folders (of a folder) or members (of a tar) that are not read


def _flat_val_files(raw: Path, cache_dir: Path | None, exclude: frozenset[str]) -> _FlatVal | None:
    """The files of a flat validation set (a val/ folder of files and no class folder, or the
    val tar), sorted by name; None if there is none."""
    val_dir = raw / "val"
    if val_dir.is_dir():
        _, files, other = list_dir(val_dir)
        folders, not_classes = class_dirs(val_dir, "val", exclude)
        if files and not folders:
            unread = [Skip("val", e.name, why) for e, why in other]
            return _FlatVal([_FlatFile(f.name, f.path) for f in files], "flat val/ folder", not_classes + unread)
        return None
    tar = _find(raw, VAL_TARS)
    if tar is not None:
        members = cached_members(tar, "flat tar", flat_tar_members, cache_dir)
        files = [_FlatFile(members.name(r).decode("utf-8", "surrogateescape"), str(tar),
                           int(members.offsets[r]), int(members.sizes[r])) for r in members.rows(0)]
        return _FlatVal(sorted(files, key=lambda f: f.name), tar.name,
                        [Skip("val", name, why) for name, why in members.skipped])
    return None


def _class_list(raw: Path, synsets: Path | None) -> tuple[list[str], str] | None:
    """The classes of a synset list, and its name: --synsets, else the first of SYNSET_LISTS in
    RAW, else the devkit's (meta.mat or map_clsloc.txt, extracted or in its archive in RAW)."""
    if synsets is not None:
        return class_list(synsets), synsets.name
    synset_path = _find(raw, SYNSET_LISTS)
    if synset_path is not None:
        return read_synsets(synset_path)[0], synset_path.name
    devkit = find_id_map(raw, archives=tuple(raw / n for n in DEVKIT_ARCHIVES if (raw / n).is_file()))
    if devkit is not None:
        return list(devkit.wnid_of.values()), devkit.source
    return None


def _check_class_list(classes: list[str], origin: str, listed: tuple[list[str], str]) -> None:
    """The classes found (from ``origin``) must be exactly those of the synset list."""
    wnids, source = listed
    extra = sorted(set(classes) - set(wnids))
    missing = sorted(set(wnids) - set(classes))
    if extra:
        raise LayoutError(
            f"{origin} has {len(extra)} {'class' if len(extra) == 1 else 'classes'} that {source} does not list: "
            f"{some_names(extra)}; is it this dataset's list? Remove those classes, or pass --synsets FILE naming "
            "this dataset's classes"
        )
    if missing:
        raise LayoutError(
            f"{origin} has {len(classes)} classes but {source} lists {len(set(wnids))}; "
            f"missing: {some_names(missing)}. "
            "The input looks incomplete (a partial copy or download?): restore those classes, or for a "
            "deliberate subset pass --synsets with a list of just the classes kept"
        )


def _classes(raw: Path, trees: dict, tar_tree: Members | None, val_labels: Path | None,
             synsets: Path | None, listed: tuple[list[str], str] | None) -> tuple[list[str], str | None]:
    """The sorted class wnids: train's folders, else val's, else a synset list or the devkit;
    and where they were found, for messages (None: from the list itself)."""
    if "train" in trees:
        return sorted(trees["train"]), "train/" if (raw / "train").is_dir() else f"{raw}/"
    if tar_tree is not None:
        return sorted(tar_tree.groups), TRAIN_TARS[0]
    if "val" in trees:
        return sorted(trees["val"]), "val/"
    if listed is not None:
        return sorted(listed[0]), None
    csv_path = val_labels or _find(raw, CSV_LABELS)
    if csv_path is None or csv_path.suffix != ".csv":
        raise LayoutError(
            f"{raw} has only a flat validation set: give the classes with a synset list "
            f"({', '.join(SYNSET_LISTS)}), the devkit ({DEVKIT_ARCHIVES[0]}) or LOC_val_solution.csv"
        )
    with open(csv_path, newline="", encoding="utf-8") as f:
        return sorted({(row.get("PredictionString") or "?").split()[0] for row in csv.DictReader(f)}), csv_path.name


def scan(
    raw: Path, val_labels: Path | None = None, synsets: Path | None = None, cache_dir: Path | None = None,
    out: Path | None = None,
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
        out: convert's OUT: when it lies inside ``raw``, its folder is never taken for a class.
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
    exclude = frozenset([os.path.realpath(out)] if out is not None else [])
    trees: dict[str, dict[str, Path]] = {}  # split -> class -> folder
    layout: dict[str, str] = {}
    not_classes: list[Skip] = []  # folders that are no class, members that are not read
    tar_tree: Members | None = None
    train_tar = _find(raw, TRAIN_TARS)
    if (raw / "train").is_dir():
        trees["train"], skipped = class_dirs(raw / "train", "train", exclude)
        if not trees["train"]:
            raise LayoutError(
                f"{raw / 'train'} has no class folders{_with_images(skipped)}; expected "
                f"{raw / 'train'}/<class>/<image>.JPEG: put each class's training images in its folder"
            )
        layout["train"] = "class folders train/<class>/"
        not_classes += skipped
    elif train_tar is not None:
        tar_tree = cached_members(train_tar, "tar of per-class tars", train_tar_members, cache_dir)
        layout["train"] = f"{train_tar.name} (tar of per-class tars)"
        not_classes += [Skip("train", name, why) for name, why in tar_tree.skipped]
    flat = _flat_val_files(raw, cache_dir, exclude)
    if flat is None and (raw / "val").is_dir():
        trees["val"], skipped = class_dirs(raw / "val", "val", exclude)
        if not trees["val"]:
            raise LayoutError(
                f"{raw / 'val'} holds no images{_with_images(skipped, ' (')}; expected "
                f"{raw / 'val'}/<class>/<image>.JPEG or a flat val/ of labelled images: add them, "
                "or remove the empty val/ folder to convert train "
                "only (--val-ratio then carves a validation split from train)"
            )
        layout["val"] = "class folders val/<class>/"
        not_classes += skipped
    elif flat is not None:
        not_classes += flat.skipped
    if not trees and tar_tree is None and flat is None:
        folders, skipped = class_dirs(raw, "train", exclude)
        if not folders:
            raise LayoutError(
                f"{raw} has no class folders{_with_images(skipped)}; expected {raw}/train/<class>/<image>.JPEG "
                f"(and val/), {raw}/<class>/<image>.JPEG, or the archives {TRAIN_TARS[0]} / {VAL_TARS[0]}"
                + ("; put each class's images in its folder" if skipped else "")
            )
        trees["train"], layout["train"] = folders, "class folders <class>/ (train only)"
        not_classes += skipped

    name_path = _find(raw, NAME_LISTS)
    class_names = read_synsets(name_path)[1] if name_path else {}
    listed = _class_list(raw, synsets)
    classes, origin = _classes(raw, trees, tar_tree, val_labels, synsets, listed)
    if listed is not None and origin is not None:
        _check_class_list(classes, origin, listed)
    index = {c: i for i, c in enumerate(classes)}

    result = ScanResult(layout, classes, class_names, {}, not_classes)
    result.devkit_ids = devkit_ids(raw, classes, synsets, val_labels)
    for split, folders in trees.items():
        # Inputs are listed one class folder at a time, straight into compact columns.
        split_dir = raw if layout[split].endswith("(train only)") else raw / split
        result.splits[split], skipped = folder_table(split_dir, folders, index, split, exclude)
        result.skipped.extend(skipped)
        # Loose files beside the class folders have no class: list them, never drop them silently.
        _, loose, other = list_dir(split_dir)
        result.skipped.extend(
            Skip(split, f.name, "not inside a class folder (no label)")
            for f in sorted(loose + [e for e, _ in other], key=lambda e: e.name)
            if f.name not in METADATA
        )
    if tar_tree is not None:
        result.splits["train"] = tar_table(train_tar, tar_tree, index)
    if flat is not None:
        files = flat.files
        labels, label_source, no_file = flat_labels(raw, [f.name for f in files], classes, val_labels, synsets)
        layout["val"] = f"{flat.where} labelled by {label_source}"
        table = SourceTableBuilder()
        for f, lab in zip(files, labels):
            if lab is not None:  # a flat file's own path is its location (its name is the file name)
                table.add(f.name, lab, f.path if f.size >= 0 else os.path.dirname(f.path), f.offset, f.size)
        result.splits["val"] = table.build()
        unlabelled = [f.name for f, lab in zip(files, labels) if lab is None]
        result.skipped.extend(Skip("val", name, f"no label in {label_source}") for name in unlabelled)
        if unlabelled or no_file:
            result.warnings.append(
                f"val ({flat.where}): {len(unlabelled)} of {len(files)} files have no label in {label_source}"
                + (f" (listed as skipped: {some_names(unlabelled)})" if unlabelled else "")
                + f"; {plural(len(no_file), 'labelled image')} {'has' if len(no_file) == 1 else 'have'} no file"
                + (f" ({some_names(no_file)})" if no_file else "")
            )
    for split in list(result.splits):
        if not len(result.splits[split]):
            gone = [f"{s.name}: {s.reason}" for s in result.skipped if s.split == split]
            raise LayoutError(
                f"the {split} split of {raw} ({layout[split]}) has no image to convert"
                + (f": {plural(len(gone), 'input')} found, all skipped ({some_names(gone, 3)})" if gone else "")
            )
    for warning in result.warnings:
        log.warning("%s", warning)
    return result
