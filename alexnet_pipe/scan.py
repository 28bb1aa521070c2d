"""Find the images of a raw ImageNet-style input and their labels (no image is opened).

Layouts understood, per split:
  1. ``RAW/<split>/<class>/<image>`` class folders (``RAW/<class>/<image>`` alone = train only);
  2. a flat ``RAW/val/`` labelled by ``LOC_val_solution.csv``, by the devkit's
     ``ILSVRC2012_validation_ground_truth.txt`` (1-based ids, one per line in sorted file-name
     order) plus a synset list giving the id order, or by a Caffe ``val.txt`` (``name label``);
  3. the original archives ``ILSVRC2012_img_train.tar`` (a tar of per-class tars) and
     ``ILSVRC2012_img_val.tar`` (flat; labelled as in 2). Members are located by byte offset so
     workers read them straight from the archive; nothing is extracted.
Classes are numbered by sorted class name (Caffe/torchvision convention).
"""

from __future__ import annotations

import csv
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LayoutError

SPLITS = ("train", "val")
TRAIN_TARS = ("ILSVRC2012_img_train.tar",)
VAL_TARS = ("ILSVRC2012_img_val.tar",)
CSV_LABELS = ("LOC_val_solution.csv",)
GT_LABELS = ("ILSVRC2012_validation_ground_truth.txt", "val_ground_truth.txt", "val.txt")
SYNSET_LISTS = ("synsets.txt", "ILSVRC2012_synsets.txt", "LOC_synset_mapping.txt", "synset_words.txt")
NAME_LISTS = ("LOC_synset_mapping.txt", "synset_words.txt")


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


def _find(root: Path, names: tuple[str, ...], override: Path | None = None) -> Path | None:
    if override is not None:
        if not override.is_file():
            raise LayoutError(f"{override} does not exist or is not a file")
        return override
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def read_synsets(path: Path) -> tuple[list[str], dict[str, str]]:
    """A synset list: first token of each line is a wnid, the rest (optional) its name."""
    wnids, names = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        wnids.append(parts[0])
        if len(parts) == 2:
            names[parts[0]] = parts[1]
    if not wnids:
        raise LayoutError(f"{path} lists no synsets")
    return wnids, names


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


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    try:
        with tarfile.open(path, "r:") as tar:
            return [m for m in tar.getmembers() if m.isfile()]
    except tarfile.TarError as exc:
        raise LayoutError(f"{path} is not a readable uncompressed tar archive ({exc})") from exc


def _train_tar_tree(path: Path) -> dict[str, list[tuple[str, int, int]]]:
    """class -> [(member name, absolute offset, size)] for a tar of per-class tars."""
    try:
        return _read_train_tar(path)
    except tarfile.TarError as exc:
        raise LayoutError(
            f"{path} is not a readable uncompressed tar of per-class tars ({exc}); "
            "expected the original ILSVRC2012_img_train.tar"
        ) from exc


def _read_train_tar(path: Path) -> dict[str, list[tuple[str, int, int]]]:
    tree: dict[str, list[tuple[str, int, int]]] = {}
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


@dataclass(frozen=True)
class _FlatFile:
    name: str
    path: str
    offset: int = 0
    size: int = -1


def _flat_val_files(raw: Path) -> tuple[list[_FlatFile], str] | None:
    val_dir = raw / "val"
    if val_dir.is_dir():
        dirs, files = _list_dir(val_dir)
        if files and not dirs:
            return [_FlatFile(f.name, f.path) for f in files], "flat val/ folder"
        return None
    tar = _find(raw, VAL_TARS)
    if tar is not None:
        members = sorted(_tar_members(tar), key=lambda m: m.name)
        return [_FlatFile(Path(m.name).name, str(tar), m.offset_data, m.size) for m in members], f"{tar.name}"
    return None


def _flat_labels(
    raw: Path, files: list[_FlatFile], classes: list[str], val_labels: Path | None, synsets: Path | None
) -> tuple[list[int | None], str]:
    """One label (or None: unlabelled) per flat val file."""
    index = {c: i for i, c in enumerate(classes)}
    csv_path = val_labels if val_labels is not None and val_labels.suffix == ".csv" else None
    if csv_path is None and val_labels is None:
        csv_path = _find(raw, CSV_LABELS)
    if csv_path is not None:
        wnid_of = {}
        with open(csv_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                pred = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not pred:
                    raise LayoutError(f"{csv_path}: expected columns ImageId,PredictionString")
                wnid_of[row["ImageId"]] = pred[0]
        labels = []
        for f in files:
            wnid = wnid_of.get(Path(f.name).stem)
            if wnid is not None and wnid not in index:
                raise LayoutError(f"{csv_path} labels {f.name} as {wnid}, which is not a known class")
            labels.append(None if wnid is None else index[wnid])
        return labels, csv_path.name
    gt_path = _find(raw, GT_LABELS, val_labels)
    if gt_path is None:
        raise LayoutError(
            f"{raw}/val is a flat folder of images but no labels were found; expected one of "
            f"{', '.join(CSV_LABELS + GT_LABELS)} in {raw} (or pass --val-labels)"
        )
    lines = [line.split() for line in gt_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and all(len(parts) == 2 for parts in lines):
        # Caffe's val.txt: "<file name> <0-based label in sorted class order>"
        label_of = {parts[0]: int(parts[1]) for parts in lines}
        labels = [label_of.get(f.name) for f in files]
        bad = [x for x in labels if x is not None and not 0 <= x < len(classes)]
        if bad:
            raise LayoutError(f"{gt_path} has label {bad[0]} outside 0..{len(classes) - 1}")
        return labels, gt_path.name
    if not all(len(parts) == 1 for parts in lines):
        raise LayoutError(f"{gt_path}: expected one label per line, or '<file> <label>' per line")
    ids = [int(parts[0]) for parts in lines]
    if len(ids) != len(files):
        raise LayoutError(
            f"{gt_path} has {len(ids)} labels but the flat validation set has {len(files)} files; "
            "the ground truth must list one label per image in sorted file-name order"
        )
    synset_path = _find(raw, SYNSET_LISTS, synsets)
    if synset_path is None:
        raise LayoutError(
            f"{gt_path} holds ILSVRC ids (1-based) whose order comes from a synset list; put one wnid "
            f"per line in {raw}/synsets.txt (line k = id k) or pass --synsets"
        )
    order, _ = read_synsets(synset_path)
    labels = []
    for value in ids:
        if not 1 <= value <= len(order):
            raise LayoutError(f"{gt_path}: id {value} is outside 1..{len(order)} of {synset_path.name}")
        wnid = order[value - 1]
        if wnid not in index:
            raise LayoutError(f"{gt_path}: id {value} is {wnid}, which is not a known class")
        labels.append(index[wnid])
    return labels, f"{gt_path.name} + {synset_path.name}"


def scan(raw: Path, val_labels: Path | None = None, synsets: Path | None = None) -> ScanResult:
    """Find every input image of ``raw`` and its label.

    Args:
        raw: the raw input directory.
        val_labels: a label file for a flat validation set (else auto-detected in ``raw``).
        synsets: the synset list that orders ILSVRC ground-truth ids (else auto-detected).
    Returns:
        A ScanResult whose splits list Sources sorted by name.
    Raises:
        LayoutError: naming what was found and what was expected.
    """
    if not raw.is_dir():
        raise LayoutError(f"{raw} is not a directory")
    trees: dict[str, dict[str, list]] = {}
    layout: dict[str, str] = {}
    tar_tree: dict[str, list[tuple[str, int, int]]] = {}
    train_tar = _find(raw, TRAIN_TARS)
    if (raw / "train").is_dir():
        trees["train"], layout["train"] = _class_folders(raw / "train"), "class folders train/<class>/"
    elif train_tar is not None:
        tar_tree, layout["train"] = _train_tar_tree(train_tar), f"{train_tar.name} (tar of per-class tars)"
    flat = _flat_val_files(raw)
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

    synset_path = _find(raw, SYNSET_LISTS, synsets)
    name_path = _find(raw, NAME_LISTS)
    class_names = read_synsets(name_path)[1] if name_path else {}
    if "train" in trees or tar_tree:
        classes = sorted(trees.get("train") or tar_tree)
    elif "val" in trees:
        classes = sorted(trees["val"])
    elif synset_path is not None:
        classes = sorted(read_synsets(synset_path)[0])
    else:
        csv_path = val_labels or _find(raw, CSV_LABELS)
        if csv_path is None or csv_path.suffix != ".csv":
            raise LayoutError(
                f"{raw} has only a flat validation set: give the classes with a synset list "
                f"({', '.join(SYNSET_LISTS)}) or LOC_val_solution.csv"
            )
        with open(csv_path, newline="", encoding="utf-8") as f:
            classes = sorted({(row.get("PredictionString") or "?").split()[0] for row in csv.DictReader(f)})
    index = {c: i for i, c in enumerate(classes)}

    result = ScanResult(layout, classes, class_names, {})
    for split, tree in trees.items():
        result.splits[split] = _folder_sources(tree, index, split)
        # Loose files beside the class folders have no class: list them, never drop them silently.
        split_dir = raw if layout[split].endswith("(train only)") else raw / split
        metadata = set(CSV_LABELS + GT_LABELS + SYNSET_LISTS + NAME_LISTS + TRAIN_TARS + VAL_TARS)
        result.skipped.extend(
            Skip(split, f.name, "not inside a class folder (no label)")
            for f in _list_dir(split_dir)[1]
            if f.name not in metadata
        )
    if tar_tree:
        result.splits["train"] = [
            Source(f"{cls}/{name}", index[cls], str(train_tar), off, size)
            for cls, members in tar_tree.items()
            for name, off, size in members
        ]
    if flat is not None:
        files, where = flat
        labels, label_source = _flat_labels(raw, files, classes, val_labels, synsets)
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
