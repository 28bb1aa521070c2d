"""Labels of a flat validation set, one per image file (no image is opened).

Label files understood:
  * ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token is the wnid);
  * Caffe's ``val.txt`` (``<file> <0-based index in sorted wnid order>``);
  * the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one devkit class id (1-based) per
    line, line k = the image ``ILSVRC2012_val_<k, 8 digits>``. The number is taken from each
    file's name, never from its position in the file list: with one image missing and one stray
    file (a ``Thumbs.db``) the counts still agree, and positions would shift every later label.
Files without a label and labels without a file are both reported (flat_labels' result).
Devkit class ids mean wnids only in the devkit's own id order, which devkit.py reads.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.devkit import (
    DEVKIT_ARCHIVES,
    DEVKIT_DIR,
    MAP_CLSLOC,
    META_MAT,
    SYNSET_LISTS,
    IdMap,
    archive_file,
    decode_text,
    devkit_archives,
    explicit_id_map,
    find_id_map,
    is_archive,
)

CSV_LABELS = ("LOC_val_solution.csv",)
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
GT_LABELS = (DEVKIT_GT, "val_ground_truth.txt", "val.txt")
# An ILSVRC validation image: its number is its line in the devkit's ground truth.
VAL_NAME = re.compile(r"ILSVRC\d{4}_val_(\d{8})(?:\.[^./]*)?")


@dataclass(frozen=True)
class _LabelText:
    """A label file read from disk or from inside a devkit archive."""

    name: str  # for messages and the layout string
    text: str
    folder: Path | None = None  # where a meta.mat beside it would be
    archive: Path | None = None  # the devkit archive it came from


def _csv_labels(csv_path: Path, names: list[str], index: dict[str, int]) -> tuple[list[int | None], list[str]]:
    wnid_of = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            pred = (row.get("PredictionString") or "").split()
            if not row.get("ImageId") or not pred:
                raise LayoutError(f"{csv_path}: expected columns ImageId,PredictionString")
            wnid_of[row["ImageId"]] = pred[0]
    labels = []
    for name in names:
        wnid = wnid_of.get(Path(name).stem)
        if wnid is not None and wnid not in index:
            raise LayoutError(f"{csv_path} labels {name} as {wnid}, which is not a known class")
        labels.append(None if wnid is None else index[wnid])
    stems = {Path(name).stem for name in names}
    return labels, sorted(image for image in wnid_of if image not in stems)


def _find_ground_truth(raw: Path, val_labels: Path | None, archives: list[Path]) -> _LabelText | None:
    """The ground-truth file: --val-labels (a file or a devkit archive), else RAW's, else the
    extracted devkit's, else the one inside a devkit archive."""
    if val_labels is not None and not is_archive(val_labels):
        return _LabelText(val_labels.name, decode_text(val_labels.read_bytes(), str(val_labels)), val_labels.parent)
    if val_labels is not None:
        archives = [val_labels]
    else:
        for path in [raw / name for name in GT_LABELS] + [raw / DEVKIT_DIR / "data" / DEVKIT_GT]:
            if path.is_file():
                return _LabelText(path.name, decode_text(path.read_bytes(), str(path)), path.parent)
    for archive in archives:
        data = archive_file(archive, DEVKIT_GT)
        if data is not None:
            where = f"{DEVKIT_GT} in {archive.name}"
            return _LabelText(where, decode_text(data, f"{archive}:{DEVKIT_GT}"), archive=archive)
    if val_labels is not None:
        raise LayoutError(f"{val_labels} holds no {DEVKIT_GT}; expected the devkit {DEVKIT_ARCHIVES[0]}")
    return None


def _int(token: str, where: str, n: int) -> int:
    try:
        return int(token)
    except ValueError:
        raise LayoutError(f"{where} line {n}: expected an integer label, got {token!r}") from None


def _caffe_labels(
    gt: _LabelText, lines: list[tuple[int, list[str]]], names: list[str], n_classes: int
) -> tuple[list[int | None], list[str]]:
    """Caffe's val.txt: ``<file name> <0-based label in sorted class order>``."""
    label_of = {}
    for n, (name, token) in lines:
        label = label_of[name] = _int(token, gt.name, n)
        if not 0 <= label < n_classes:
            raise LayoutError(f"{gt.name} has label {label} outside 0..{n_classes - 1} (line {n}; "
                              f"{n_classes} classes were found)")
    labels = [label_of.get(name) for name in names]
    present = set(names)
    return labels, sorted(name for name in label_of if name not in present)


def _devkit_labels(gt: _LabelText, ids: list[tuple[int, int]], id_map: IdMap, index: dict[str, int],
                   names: list[str]) -> tuple[list[int | None], list[str]]:
    """Labels by image number: ``ids`` holds (line number k, class id), the label of the file
    ``ILSVRC2012_val_<k>``; files named otherwise, or without a line, get None."""
    label_of: dict[int, int] = {}
    for n, class_id in ids:
        wnid = id_map.wnid_of.get(class_id)
        if wnid is None:
            raise LayoutError(
                f"{gt.name} line {n}: id {class_id} is not a class of {id_map.source} "
                f"(its classes have ids {min(id_map.wnid_of)}..{max(id_map.wnid_of)}); is it this dataset's devkit?"
            )
        if wnid not in index:
            raise LayoutError(
                f"{gt.name} line {n}: id {class_id} is {wnid} in {id_map.source}, which is not among the "
                f"{len(index)} training classes; is it this dataset's devkit?"
            )
        label_of[n] = index[wnid]
    numbers = [VAL_NAME.fullmatch(name) for name in names]
    labels = [None if m is None else label_of.get(int(m.group(1))) for m in numbers]
    if names and all(m is None for m in numbers):
        raise LayoutError(
            f"{gt.name} labels images by number (line k: ILSVRC2012_val_<k as 8 digits>), but no file of the flat "
            f"validation set is named so (e.g. {names[0]!r}); keep the original file names"
        )
    found = {int(m.group(1)) for m in numbers if m is not None}
    return labels, [f"ILSVRC2012_val_{k:08d}" for k in sorted(label_of) if k not in found]


def _no_id_map(raw: Path, gt: _LabelText) -> LayoutError:
    sorted_lists = [name for name in SYNSET_LISTS if (raw / name).is_file()]
    unused = f"; {sorted_lists[0]} is not used: synset lists are in sorted wnid order" if sorted_lists else ""
    return LayoutError(
        f"{gt.name} holds devkit class ids, whose order is in the devkit's data/{META_MAT}, not sorted "
        f"wnid order{unused}; put {DEVKIT_ARCHIVES[0]} (or its data/{META_MAT}, or the 2017 devkit's "
        f"{MAP_CLSLOC}) in {raw} or pass --synsets PATH to one of them"
    )


def flat_labels(
    raw: Path, names: list[str], classes: list[str], val_labels: Path | None, synsets: Path | None
) -> tuple[list[int | None], str, list[str]]:
    """One label (None: unlabelled) per flat validation file.

    Args:
        raw: the raw input directory (where label files are looked for).
        names: the file names of the flat validation set, sorted.
        classes: the class wnids, sorted; a label is an index into it.
        val_labels: the label file given by the user (CSV, ground truth, val.txt, devkit archive).
        synsets: the id order given by the user for the devkit ground truth.
    Returns:
        The labels; which file(s) gave them, e.g. "ILSVRC2012_validation_ground_truth.txt + meta.mat";
        and the images the labels name that are not among ``names`` (sorted).
    Raises:
        LayoutError: no labels, malformed labels, or devkit ids without the devkit's id order.
    """
    index = {c: i for i, c in enumerate(classes)}
    csv_path = val_labels if val_labels is not None and val_labels.suffix == ".csv" else None
    if csv_path is None and val_labels is None:
        csv_path = next((raw / n for n in CSV_LABELS if (raw / n).is_file()), None)
    if csv_path is not None:
        labels, no_file = _csv_labels(csv_path, names, index)
        return labels, csv_path.name, no_file
    archives = devkit_archives(raw, synsets)
    gt = _find_ground_truth(raw, val_labels, archives)
    if gt is None:
        raise LayoutError(
            f"{raw}/val is a flat folder of images but no labels were found; expected one of "
            f"{', '.join(CSV_LABELS + GT_LABELS + DEVKIT_ARCHIVES)} in {raw} (or pass --val-labels)"
        )
    lines = [(n, line.split()) for n, line in enumerate(gt.text.splitlines(), 1) if line.strip()]
    if lines and all(len(parts) == 2 for _, parts in lines):
        labels, no_file = _caffe_labels(gt, lines, names, len(classes))
        return labels, gt.name, no_file
    if not all(len(parts) == 1 for _, parts in lines):
        raise LayoutError(f"{gt.name}: expected one label per line, or '<file> <label>' per line")
    ids = [(n, _int(parts[0], gt.name, n)) for n, parts in lines]
    if synsets is not None:
        id_map = explicit_id_map(synsets, gt.name)
    else:
        id_map = find_id_map(raw, gt.folder, tuple(devkit_archives(raw, None, gt.archive)))
    if id_map is None:
        raise _no_id_map(raw, gt)
    labels, no_file = _devkit_labels(gt, ids, id_map, index, names)
    return labels, f"{gt.name} + {id_map.source}", no_file

