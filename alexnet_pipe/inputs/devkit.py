"""The ILSVRC devkit's class ids and synset lists: which wnid each class id means (no image is opened).

Why the devkit ids need care: they follow the order of the devkit's ``data/meta.mat`` (id 1 is
n02119789 kit fox), not sorted wnid order (n01440764 tench first). Paired with a sorted list
(synsets.txt, LOC_synset_mapping.txt, ...) nearly every image gets a wrong class and nothing
fails. So the id order comes only from the devkit itself (``meta.mat``, or the 2017 devkit's
``map_clsloc.txt``, extracted or inside ``ILSVRC2012_devkit_t12.tar.gz``), or from a list the
user names with --synsets that is not in sorted order (plausibly an export in devkit order).
Synset lists (``synsets.txt``, ``LOC_synset_mapping.txt``, ...) give the classes and their names.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from alexnet_pipe.errors import LayoutError

SYNSET_LISTS = ("synsets.txt", "ILSVRC2012_synsets.txt", "LOC_synset_mapping.txt", "synset_words.txt")
NAME_LISTS = ("LOC_synset_mapping.txt", "synset_words.txt")
META_MAT = "meta.mat"
MAP_CLSLOC = "map_clsloc.txt"
ID_MAPS = (META_MAT, MAP_CLSLOC)  # meta.mat first: it is the 2012 ground truth's own devkit
DEVKIT_DIR = "ILSVRC2012_devkit_t12"  # the extracted devkit; its files are in data/
DEVKIT_ARCHIVES = ("ILSVRC2012_devkit_t12.tar.gz",)
MAT_FIELDS = ("ILSVRC2012_ID", "WNID", "num_children")  # the meta.mat fields we read


@dataclass(frozen=True)
class IdMap:
    """The devkit's class ids -> wnids, and where they were read (for the layout string)."""

    wnid_of: dict[int, str]
    source: str  # e.g. "meta.mat", "meta.mat in ILSVRC2012_devkit_t12.tar.gz"



def is_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LayoutError(f"{where} is not a UTF-8 text file") from None


def archive_file(archive: Path, name: str) -> bytes | None:
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
    for line in decode_text(path.read_bytes(), str(path)).splitlines():
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
    return parse_map_clsloc(decode_text(data, where), where)


def _id_map_in_archive(archive: Path) -> IdMap | None:
    for name in ID_MAPS:
        data = archive_file(archive, name)
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
    text = decode_text(data, str(path))
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


def explicit_id_map(path: Path, gt_name: str) -> IdMap:
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


def devkit_archives(raw: Path, synsets: Path | None, first: Path | None = None) -> list[Path]:
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


def devkit_ids(raw: Path, classes: list[str], synsets: Path | None = None,
               val_labels: Path | None = None) -> dict[str, int]:
    """Each class's devkit id (``meta.mat``'s ILSVRC2012_ID: neon's label, the row of its fc8),
    when the devkit itself is at hand: --synsets naming it (its archive,
    meta.mat or map_clsloc.txt), else the devkit beside --val-labels or in RAW. A plain synset list
    is never taken for the devkit's order here (a guess would mislabel imported weights silently).
    Empty when the devkit is not found or does not list every class."""
    if synsets is not None:
        found = _read_order_file(synsets)
        id_map = found if isinstance(found, IdMap) else None
    else:
        near = val_labels.parent if val_labels is not None and not is_archive(val_labels) else None
        first = val_labels if val_labels is not None and is_archive(val_labels) else None
        id_map = find_id_map(raw, near, tuple(devkit_archives(raw, None, first)))
    if id_map is None:
        return {}
    id_of = {wnid: class_id for class_id, wnid in id_map.wnid_of.items()}
    return {c: id_of[c] for c in classes} if all(c in id_of for c in classes) else {}
