"""Labels of a flat validation set, one per image file (no image is opened).

Label files understood:
  * ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token is the wnid);
  * Caffe's ``val.txt`` (``<file> <0-based index in sorted wnid order>``);
  * the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one devkit class id (1-based) per
    line, line k = the image ``ILSVRC2012_val_<k, 8 digits>``. The number is taken from each
    file's name, never from its position in the file list: with one image missing and one stray
    file (a ``Thumbs.db``) the counts still agree, and positions would shift every later label.
Files without a label and labels without a file are both reported (flat_labels' result).

Why the devkit ids need care: they follow the order of the devkit's ``data/meta.mat`` (id 1 is
n02119789 kit fox), not sorted wnid order (n01440764 tench first). Paired with a sorted list
(synsets.txt, LOC_synset_mapping.txt, ...) nearly every image gets a wrong class and nothing
fails. So the id order comes only from the devkit itself (``meta.mat``, or the 2017 devkit's
``map_clsloc.txt``, extracted or inside ``ILSVRC2012_devkit_t12.tar.gz``), or from a list the
user names with --synsets that is not in sorted order (plausibly an export in devkit order).
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from alexnet_pipe.errors import LayoutError

CSV_LABELS = ("LOC_val_solution.csv",)
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
GT_LABELS = (DEVKIT_GT, "val_ground_truth.txt", "val.txt")
SYNSET_LISTS = ("synsets.txt", "ILSVRC2012_synsets.txt", "LOC_synset_mapping.txt", "synset_words.txt")
NAME_LISTS = ("LOC_synset_mapping.txt", "synset_words.txt")
META_MAT = "meta.mat"
MAP_CLSLOC = "map_clsloc.txt"
ID_MAPS = (META_MAT, MAP_CLSLOC)  # meta.mat first: it is the 2012 ground truth's own devkit
DEVKIT_DIR = "ILSVRC2012_devkit_t12"  # the extracted devkit; its files are in data/
DEVKIT_ARCHIVES = ("ILSVRC2012_devkit_t12.tar.gz",)
MAT_FIELDS = ("ILSVRC2012_ID", "WNID", "num_children")  # the meta.mat fields we read
# An ILSVRC validation image: its number is its line in the devkit's ground truth.
VAL_NAME = re.compile(r"ILSVRC\d{4}_val_(\d{8})(?:\.[^./]*)?")


@dataclass(frozen=True)
class IdMap:
    """The devkit's class ids -> wnids, and where they were read (for the layout string)."""

    wnid_of: dict[int, str]
    source: str  # e.g. "meta.mat", "meta.mat in ILSVRC2012_devkit_t12.tar.gz"


@dataclass(frozen=True)
class _LabelText:
    """A label file read from disk or from inside a devkit archive."""

    name: str  # for messages and the layout string
    text: str
    folder: Path | None = None  # where a meta.mat beside it would be
    archive: Path | None = None  # the devkit archive it came from


def is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LayoutError(f"{where} is not a UTF-8 text file") from None


def _archive_file(archive: Path, name: str) -> bytes | None:
    """The bytes of the first file called ``name`` (any folder) in a devkit tar(.gz), or None."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile() and PurePosixPath(member.name).name == name:
                    return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise LayoutError(
            f"{archive} is not a readable devkit archive ({_first_line(exc)}); "
            f"expected {DEVKIT_ARCHIVES[0]} as downloaded"
        ) from exc
    return None


def read_synsets(path: Path) -> tuple[list[str], dict[str, str]]:
    """A synset list: first token of each line is a wnid, the rest (optional) its name."""
    wnids, names = [], {}
    for line in _decode(path.read_bytes(), str(path)).splitlines():
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        wnids.append(parts[0])
        if len(parts) == 2:
            names[parts[0]] = parts[1]
    if not wnids:
        raise LayoutError(f"{path} lists no synsets")
    return wnids, names


def _add_class(wnid_of: dict[int, str], class_id: int, wnid: str, where: str) -> None:
    if class_id < 1:
        raise LayoutError(f"{where}: class id {class_id} of {wnid} is not a 1-based id")
    if class_id in wnid_of:
        raise LayoutError(f"{where}: class id {class_id} is given twice ({wnid_of[class_id]} and {wnid})")
    wnid_of[class_id] = wnid


def _check_unique_wnids(wnid_of: dict[int, str], where: str) -> None:
    seen: dict[str, int] = {}
    for class_id, wnid in sorted(wnid_of.items()):
        if wnid in seen:
            raise LayoutError(f"{where}: {wnid} has two class ids ({seen[wnid]} and {class_id})")
        seen[wnid] = class_id


def _mat_int(value, where: str, entry: int, field: str) -> int:
    """A MATLAB scalar (double or integer class, possibly still a 1x1 array) as an int."""
    import numpy as np

    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iuf" or not float(arr.item()).is_integer():
        raise LayoutError(f"{where}: synsets({entry}).{field} is not an integer ({value!r})")
    return int(arr.item())


def parse_meta_mat(data: bytes, where: str) -> dict[int, str]:
    """id -> wnid of the leaf classes of a devkit ``meta.mat``.

    ``synsets`` is a struct array (ILSVRC2012_ID, WNID, words, gloss, num_children, children,
    wordnet_height, num_train_images). In ILSVRC2012 entries 1..1000 are the classes
    (num_children == 0) and 1001..1860 internal WordNet nodes, which are skipped.
    """
    import numpy as np
    from scipy.io import loadmat  # deferred: only the devkit needs scipy, and it is slow to import

    try:
        mat = loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=True, variable_names=["synsets"])
    except Exception as exc:  # scipy raises many types on bad bytes (MatReadError, ValueError, zlib.error, ...)
        raise LayoutError(f"{where} is not a readable MATLAB meta.mat ({_first_line(exc)})") from exc
    synsets = mat.get("synsets")
    if synsets is None:
        raise LayoutError(f"{where} holds no 'synsets' variable; expected the devkit's data/meta.mat")
    names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    missing = [f for f in MAT_FIELDS if f not in names]
    if missing:
        raise LayoutError(
            f"{where} has no 'synsets' struct array with fields {', '.join(MAT_FIELDS)} "
            f"(missing {', '.join(missing)}); expected the devkit's data/meta.mat"
        )
    wnid_of: dict[int, str] = {}
    for entry, record in enumerate(np.atleast_1d(synsets), 1):
        if _mat_int(record["num_children"], where, entry, "num_children") != 0:
            continue  # an internal WordNet node, not a class
        wnid = record["WNID"]
        if not isinstance(wnid, str) or not wnid.strip():
            raise LayoutError(f"{where}: synsets({entry}).WNID is not a wnid ({wnid!r})")
        _add_class(wnid_of, _mat_int(record["ILSVRC2012_ID"], where, entry, "ILSVRC2012_ID"), wnid.strip(), where)
    if not wnid_of:
        raise LayoutError(f"{where} lists no leaf classes (synsets with num_children == 0)")
    _check_unique_wnids(wnid_of, where)
    return wnid_of


def _looks_like_map_clsloc(lines: list[list[str]]) -> bool:
    return bool(lines) and all(len(parts) >= 2 and parts[1].isdigit() for parts in lines)


def parse_map_clsloc(text: str, where: str) -> dict[int, str]:
    """id -> wnid of the 2017 devkit's ``map_clsloc.txt`` (lines ``n02119789 1 kit_fox``)."""
    wnid_of: dict[int, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise LayoutError(f"{where} line {n}: expected '<wnid> <id> <name>' as in map_clsloc.txt, got {line!r}")
        _add_class(wnid_of, int(parts[1]), parts[0], where)
    if not wnid_of:
        raise LayoutError(f"{where} lists no classes")
    _check_unique_wnids(wnid_of, where)
    return wnid_of


def _id_map_from_bytes(data: bytes, name: str, where: str) -> dict[int, str]:
    if name.endswith(".mat") or data.startswith(b"MATLAB"):
        return parse_meta_mat(data, where)
    return parse_map_clsloc(_decode(data, where), where)


def _id_map_in_archive(archive: Path) -> IdMap | None:
    for name in ID_MAPS:
        data = _archive_file(archive, name)
        if data is not None:
            return IdMap(_id_map_from_bytes(data, name, f"{archive}:{name}"), f"{name} in {archive.name}")
    return None


def _read_order_file(path: Path) -> IdMap | list[str]:
    """A file named by --synsets: the devkit's id map (its archive, meta.mat or map_clsloc.txt),
    else the wnids of a plain list in file order."""
    if is_archive(path):
        found = _id_map_in_archive(path)
        if found is None:
            raise LayoutError(f"{path} holds neither data/{META_MAT} nor {MAP_CLSLOC}; expected {DEVKIT_ARCHIVES[0]}")
        return found
    data = path.read_bytes()
    if path.suffix == ".mat" or data.startswith(b"MATLAB"):
        return IdMap(parse_meta_mat(data, str(path)), path.name)
    text = _decode(data, str(path))
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if _looks_like_map_clsloc(lines):
        return IdMap(parse_map_clsloc(text, str(path)), path.name)
    if not lines:
        raise LayoutError(f"{path} lists no synsets")
    return [parts[0] for parts in lines]


def class_list(path: Path) -> list[str]:
    """The wnids of a synset list, a devkit archive, meta.mat or map_clsloc.txt (any order)."""
    found = _read_order_file(path)
    return list(found.wnid_of.values()) if isinstance(found, IdMap) else found


def _explicit_id_map(path: Path, gt_name: str) -> IdMap:
    """The id order from --synsets; a plain list counts as devkit order only when it is not
    sorted (a sorted one is the usual synsets.txt, whose line k is not devkit id k)."""
    found = _read_order_file(path)
    if isinstance(found, IdMap):
        return found
    if found == sorted(found):
        raise LayoutError(
            f"--synsets {path} is in sorted wnid order, but {gt_name} holds devkit ids in the order of the "
            f"devkit's data/{META_MAT} (in ILSVRC2012 id 1 is n02119789, not n01440764); pass --synsets "
            f"{DEVKIT_ARCHIVES[0]}, its data/{META_MAT} or {MAP_CLSLOC} instead"
        )
    wnid_of: dict[int, str] = {}
    for class_id, wnid in enumerate(found, 1):
        _add_class(wnid_of, class_id, wnid, str(path))
    _check_unique_wnids(wnid_of, str(path))
    return IdMap(wnid_of, f"{path.name} (devkit order)")


def _unique(paths: Iterable[Path | None]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p is not None and p not in out:
            out.append(p)
    return out


def _devkit_archives(raw: Path, synsets: Path | None, first: Path | None = None) -> list[Path]:
    """Devkit archives to look into: the one a file came from, one named by --synsets, RAW's."""
    explicit = synsets if synsets is not None and is_archive(synsets) else None
    return [a for a in _unique([first, explicit, *(raw / n for n in DEVKIT_ARCHIVES)]) if a.is_file()]


def find_id_map(raw: Path, near: Path | None = None, archives: tuple[Path, ...] = ()) -> IdMap | None:
    """The devkit's id order found where users keep it: beside the ground truth (``near``), in
    RAW, in RAW/ILSVRC2012_devkit_t12/data/, then inside the devkit archives. None: not found."""
    for folder in _unique([near, raw, raw / DEVKIT_DIR / "data"]):
        for name in ID_MAPS:
            path = folder / name
            if path.is_file():
                return IdMap(_id_map_from_bytes(path.read_bytes(), name, str(path)), name)
    for archive in archives:
        found = _id_map_in_archive(archive)
        if found is not None:
            return found
    return None


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
        return _LabelText(val_labels.name, _decode(val_labels.read_bytes(), str(val_labels)), val_labels.parent)
    if val_labels is not None:
        archives = [val_labels]
    else:
        for path in [raw / name for name in GT_LABELS] + [raw / DEVKIT_DIR / "data" / DEVKIT_GT]:
            if path.is_file():
                return _LabelText(path.name, _decode(path.read_bytes(), str(path)), path.parent)
    for archive in archives:
        data = _archive_file(archive, DEVKIT_GT)
        if data is not None:
            where = f"{DEVKIT_GT} in {archive.name}"
            return _LabelText(where, _decode(data, f"{archive}:{DEVKIT_GT}"), archive=archive)
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
    archives = _devkit_archives(raw, synsets)
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
        id_map = _explicit_id_map(synsets, gt.name)
    else:
        id_map = find_id_map(raw, gt.folder, tuple(_devkit_archives(raw, None, gt.archive)))
    if id_map is None:
        raise _no_id_map(raw, gt)
    labels, no_file = _devkit_labels(gt, ids, id_map, index, names)
    return labels, f"{gt.name} + {id_map.source}", no_file
