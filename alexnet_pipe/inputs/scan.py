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

Nothing is dropped silently, and nothing shifts a label:
  * an archive must be readable to its end-of-archive marker, else the scan fails naming the
    byte (tarwalk.py): a damaged header or a partial download never reads as fewer classes;
  * links, GNU sparse files and other members that are not plain files are listed as skipped;
  * system and metadata folders (``__MACOSX``, ``lost+found``, hidden folders, ``@eaDir``, ...)
    and empty folders are never classes: they are listed as skipped;
  * with a synset list (--synsets, one of SYNSET_LISTS in RAW, or the devkit), the classes found
    must be exactly its classes: missing or extra classes are an error naming them.
Hidden files (names starting with ".") are ignored, in folders and archives alike.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import zipfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet_pipe.errors import LayoutError
from alexnet_pipe.fsutil import atomic_write_bytes
from alexnet_pipe.inputs.table import Source, SourceTable, SourceTableBuilder
from alexnet_pipe.inputs.tarwalk import corrupt, open_tar, skip_reason
from alexnet_pipe.inputs.tarwalk import members as tar_members
from alexnet_pipe.inputs.val_labels import (
    CSV_LABELS,
    DEVKIT_ARCHIVES,
    DEVKIT_DIR,
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
CACHE_VERSION = 3  # 3: archives checked to their end-of-archive marker; skipped members kept
# Folders that operating systems, file systems and NAS boxes make: never classes, never images.
# (Hidden folders, names starting with ".", are skipped too: .Trash-1000, .AppleDouble, .git ...)
SYSTEM_FOLDERS = {
    "__macosx": "macOS archive metadata folder",
    "lost+found": "file system recovery folder",
    "@eadir": "Synology thumbnail folder",
    "#recycle": "NAS recycle bin",
    "#snapshot": "NAS snapshot folder",
    "$recycle.bin": "Windows recycle bin",
    "recycler": "Windows recycle bin",
    "system volume information": "Windows system folder",
    DEVKIT_DIR.casefold(): "the ILSVRC devkit",
}

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
    warnings: list[str] = field(default_factory=list)  # also logged: e.g. labels that have no file


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def system_folder(name: str) -> str | None:
    """What a folder called ``name`` is, if it is a hidden or system folder (never a class)."""
    if name in (".", ".."):
        return None
    if name.startswith("."):
        return "hidden folder"
    return SYSTEM_FOLDERS.get(name.casefold())


def some_names(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def not_a_file(path: str) -> str | None:
    """None for a regular file (or a link to one); else why the entry is listed and not read.
    A FIFO would block the reader forever, a device may never end, a socket cannot be opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop, not read"
        if os.path.islink(path):
            return "broken symbolic link (its target does not exist), not read"
        return f"cannot read it ({exc.strerror or type(exc).__name__})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe), not a regular file: not read"
    if stat.S_ISSOCK(mode):
        return "socket, not a regular file: not read"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file, not a regular file: not read"
    if stat.S_ISDIR(mode):
        return "symbolic link to a folder, not followed"
    return "not a regular file: not read"


def _list_dir(path: Path) -> tuple[list[os.DirEntry], list[os.DirEntry], list[tuple[os.DirEntry, str]]]:
    """(subdirectories, files, other entries with why they are not read) of a directory, hidden
    entries dropped, sorted by name."""
    with os.scandir(path) as it:
        entries = _visible(it)
    dirs = [e for e in entries if e.is_dir()]
    files, other = [], []
    for e in entries:
        if not e.is_dir():
            why = not_a_file(e.path)
            if why is None:
                files.append(e)
            else:
                other.append((e, why))
    return dirs, files, other


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` that is a file in ``root``."""
    return next((root / name for name in names if (root / name).is_file()), None)


def _files_below(folder: Path, unread: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """(name relative to ``folder``, path) of every visible file below it, sorted; like
    torchvision's ImageFolder, images in subfolders of a class folder belong to that class.
    Hidden and system subfolders, links to folders (never followed: no loops) and empty
    subfolders are not entered, and entries that are not regular files (FIFOs, sockets, devices,
    broken links, link loops) are not read: each is appended to ``unread`` as (relative name,
    why). (os.path, not pathlib: pathlib interns every name part, a table that would grow by the
    million on ImageNet and never shrink.)"""
    out = []
    unread = [] if unread is None else unread
    top = os.fspath(folder)
    for root, dirs, files in os.walk(top):
        rel = os.path.relpath(root, top)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        kept = []
        for d in dirs:
            what = system_folder(d)
            if what is not None:
                unread.append((prefix + d + "/", f"{what}, not read"))
            elif os.path.islink(os.path.join(root, d)):  # os.walk lists it and does not enter it
                unread.append((prefix + d + "/", "symbolic link to a folder, not followed"))
            else:
                kept.append(d)
        dirs[:] = kept
        visible = 0
        for name in files:
            if name.startswith("."):
                continue
            visible += 1
            path = os.path.join(root, name)
            why = not_a_file(path)
            if why is None:
                out.append((prefix + name, path))
            else:
                unread.append((prefix + name, why))
        if prefix and not visible and not kept:
            unread.append((prefix, "empty folder (no files), not read"))
    unread.sort()
    return sorted(out)


def _with_images(skipped: list[Skip], lead: str = " with images (") -> str:
    """For an error: why each folder found is no class, e.g. " with images (cat/: empty folder (no files))"."""
    if not skipped:
        return ""
    return lead + some_names([f"{s.name}: {s.reason.removesuffix(', not a class')}" for s in skipped], 3) + ")"


def _has_files(folder: str) -> bool:
    """Whether ``folder`` holds a visible entry other than a folder (a file, or what _files_below
    lists as not read), also in its subfolders; stops at the first. Links are not followed."""
    subdirs = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir(follow_symlinks=False):
                return True
            if system_folder(entry.name) is None:
                subdirs.append(entry.path)
    return any(_has_files(d) for d in subdirs)


def _class_dirs(split_dir: Path, split: str) -> tuple[dict[str, Path], list[Skip]]:
    """class name -> folder, for the class folders of a split (their files are listed later,
    one class at a time, straight into a SourceTable); and the folders that are no class:
    hidden, system (``__MACOSX``, ``lost+found``, ...) and empty ones, as skipped."""
    classes, skipped = {}, []
    with os.scandir(split_dir) as it:
        entries = sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
    for d in entries:
        what = system_folder(d.name)
        if what is None and not _has_files(d.path):
            what = "empty folder (no files)"
        if what is None:
            classes[d.name] = Path(d.path)
        else:
            skipped.append(Skip(split, d.name + "/", f"{what}, not a class"))
    return classes, skipped


def _by_name(groups) -> list[str]:
    """Groups (class folders, per-class tars) in the order that sorts their members' names
    ``<group>/<file>`` globally: by ``group + "/"`` ("cat/x" sorts before "cat-1/x")."""
    return sorted(groups, key=lambda g: g + "/")


def _folder_table(split_dir: Path, folders: dict[str, Path], index: dict[str, int],
                  split: str) -> tuple[SourceTable, list[Skip]]:
    """The inputs of a split's class folders, and what in them is not read (see _files_below)."""
    for cls in folders:
        if cls not in index:
            raise LayoutError(
                f"{split}/ has a class folder {cls!r} that the training classes do not have; "
                "every class must appear in train/ (or the synset list)"
            )
    table = SourceTableBuilder()
    skipped = []
    location = str(split_dir)
    for cls in _by_name(folders):
        unread: list[tuple[str, str]] = []
        for name, _ in _files_below(folders[cls], unread):
            table.add(f"{cls}/{name}", index[cls], location)
        skipped.extend(Skip(split, f"{cls}/{rel}", why) for rel, why in unread)
    return table.build(), skipped


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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (member name, why it is not read)

    def rows(self, g: int) -> range:
        return range(int(self.group_ends[g - 1]) if g else 0, int(self.group_ends[g]))

    def name(self, row: int) -> bytes:
        return self.names[int(self.name_ends[row - 1]) if row else 0 : int(self.name_ends[row])]


class _MembersBuilder:
    def __init__(self) -> None:
        self.groups: list[str] = []
        self.group_ends, self.name_ends, self.offsets, self.sizes = array("q"), array("q"), array("q"), array("q")
        self.names = bytearray()
        self.skipped: list[tuple[str, str]] = []

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
                       col(self.offsets), col(self.sizes), list(self.skipped))


def _system_parent(name: str) -> tuple[str, str] | None:
    """(folder, what it is) for a member name inside a hidden or system folder, else None.
    (String operations: this runs for each of 1.28M members.)"""
    folder = name.rpartition("/")[0]
    if not folder:
        return None
    parts = folder.split("/")
    for k, part in enumerate(parts):
        what = system_folder(part) if part else None
        if what is not None:
            return "/".join(parts[: k + 1]), what
    return None


class _TarFiles:
    """The plain files of one archive (a flat tar or a per-class tar), by file name (the name
    without its folders), and the members that are not read, with why."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # "<class>/" for the members of a per-class tar, in skip names
        self.files: dict[str, tuple[int, int, str]] = {}  # file name -> (offset, size, member name)
        self.skipped: list[tuple[str, str]] = []
        self._folders: dict[str, str] = {}

    def add(self, member: tarfile.TarInfo, offset: int) -> None:
        """``member`` of the archive, whose data starts at ``offset`` of the archive file."""
        why = skip_reason(member)
        if why == "":  # a directory: nothing to read, nothing to list
            return
        if why is not None:
            self.skipped.append((self.prefix + member.name, why))
            return
        system = _system_parent(member.name)
        if system is not None:  # listed once per folder, like a folder of a class folder
            self._folders.setdefault(system[0], system[1])
            return
        name = member.name.rpartition("/")[2]
        if name.startswith("."):  # hidden files are ignored, as in folders
            return
        earlier = self.files.get(name)
        if earlier is not None:  # tar semantics: the later member of a name replaces the earlier
            self.skipped.append((self.prefix + earlier[2], f"a later member {member.name!r} has the same file name"))
        self.files[name] = (offset, member.size, member.name)

    def rows(self) -> list[tuple[str, int, int]]:
        return [(name, offset, size) for name, (offset, size, _) in self.files.items()]

    def all_skipped(self) -> list[tuple[str, str]]:
        return self.skipped + [(f"{self.prefix}{d}/", f"{what}, not read") for d, what in sorted(self._folders.items())]


def _archive_size(tar: tarfile.TarFile) -> int:
    return os.fstat(tar.fileobj.fileno()).st_size


def _tar_members(path: Path) -> Members:
    """The members of a flat tar (the validation archive), as one group "" named by file name."""
    fail = corrupt(path)
    found = _TarFiles()
    try:
        with open_tar(path, fail=fail) as tar:
            for member in tar_members(tar, _archive_size(tar), fail):
                found.add(member, member.offset_data)
    except OSError as exc:
        raise LayoutError(f"could not read {path} ({exc})") from exc
    built = _MembersBuilder()
    built.add_group("", found.rows())
    built.skipped = found.all_skipped()
    return built.build()


def _train_tar_tree(path: Path) -> Members:
    """class -> members, for a tar of per-class tars."""
    try:
        return _read_train_tar(path)
    except OSError as exc:
        raise LayoutError(f"could not read {path} ({exc})") from exc


def _read_train_tar(path: Path) -> Members:
    built = _MembersBuilder()
    fail = corrupt(path)
    seen: dict[str, str] = {}  # class -> its member name
    with open_tar(path, fail=fail) as outer:
        for member in tar_members(outer, _archive_size(outer), fail):
            why = skip_reason(member)
            if why == "":
                continue
            if why is not None:
                built.skipped.append((member.name, why))
                continue
            system = _system_parent(member.name)
            file_name = member.name.rpartition("/")[2]
            if system is not None or file_name.startswith("."):
                built.skipped.append((member.name, f"{system[1] if system else 'hidden file'}, not a class"))
                continue
            if not file_name.endswith(".tar"):
                built.skipped.append((member.name, "not a per-class .tar archive"))
                continue
            cls = file_name[: -len(".tar")]
            if cls in seen:
                raise LayoutError(f"{path} holds two archives of class {cls}: {seen[cls]} and {member.name}; "
                                  "expected the original ILSVRC2012_img_train.tar (one .tar per class)")
            seen[cls] = member.name
            found = _TarFiles(prefix=f"{cls}/")
            start = member.offset_data
            # The failure names the byte of the outer archive file, and the class archive.
            inner_fail = lambda at, why, _start=start, _name=member.name: fail(_start + at, f"in {_name}: {why}")  # noqa: E731
            with open_tar(fileobj=outer.extractfile(member), fail=inner_fail) as inner:
                for m in tar_members(inner, member.size, inner_fail):
                    # Inner offsets are relative to the inner tar, which starts at the outer
                    # member's data: the sum is the JPEG's byte offset in the archive file.
                    found.add(m, start + m.offset_data)
            built.skipped.extend(found.all_skipped())
            if found.files:
                built.add_group(cls, found.rows())
            else:
                built.skipped.append((member.name, "holds no images, not a class"))
    if not built.groups:
        raise LayoutError(f"{path} holds no per-class .tar members; expected ILSVRC2012_img_train.tar")
    return built.build()


# The scan cache: one .npz file per archive (numpy arrays only, read with allow_pickle=False):
# "key" (the archive's resolved path, size and mtime, as one JSON string), "groups" (the group
# names, NUL-separated), the Members columns, and "skipped" (JSON: [[member, reason], ...]).
# Only an archive read to its end-of-archive marker is cached. About 45 bytes per member: ~58 MB for
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
            skipped = json.loads(str(z["skipped"]))
            members = Members(groups, z["group_ends"], bytes(z["names"]), z["name_ends"], z["offsets"], z["sizes"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if not (isinstance(skipped, list)
            and all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in skipped)):
        return None
    members.skipped = [(name, reason) for name, reason in skipped]
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
             offsets=members.offsets, sizes=members.sizes, skipped=np.array(json.dumps(members.skipped)))
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


@dataclass
class _FlatVal:
    files: list[_FlatFile]
    where: str  # for the layout string
    skipped: list[Skip]  # folders (of a folder) or members (of a tar) that are not read


def _flat_val_files(raw: Path, cache_dir: Path | None) -> _FlatVal | None:
    """The files of a flat validation set (a val/ folder of files and no class folder, or the
    val tar), sorted by name; None if there is none."""
    val_dir = raw / "val"
    if val_dir.is_dir():
        _, files, other = _list_dir(val_dir)
        folders, not_classes = _class_dirs(val_dir, "val")
        if files and not folders:
            unread = [Skip("val", e.name, why) for e, why in other]
            return _FlatVal([_FlatFile(f.name, f.path) for f in files], "flat val/ folder", not_classes + unread)
        return None
    tar = _find(raw, VAL_TARS)
    if tar is not None:
        members = _members(tar, "flat tar", _tar_members, cache_dir)
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
    not_classes: list[Skip] = []  # folders that are no class, members that are not read
    tar_tree: Members | None = None
    train_tar = _find(raw, TRAIN_TARS)
    if (raw / "train").is_dir():
        trees["train"], skipped = _class_dirs(raw / "train", "train")
        if not trees["train"]:
            raise LayoutError(
                f"{raw / 'train'} has no class folders{_with_images(skipped)}; expected "
                f"{raw / 'train'}/<class>/<image>.JPEG: put each class's training images in its folder"
            )
        layout["train"] = "class folders train/<class>/"
        not_classes += skipped
    elif train_tar is not None:
        tar_tree = _members(train_tar, "tar of per-class tars", _train_tar_tree, cache_dir)
        layout["train"] = f"{train_tar.name} (tar of per-class tars)"
        not_classes += [Skip("train", name, why) for name, why in tar_tree.skipped]
    flat = _flat_val_files(raw, cache_dir)
    if flat is None and (raw / "val").is_dir():
        trees["val"], skipped = _class_dirs(raw / "val", "val")
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
        folders, skipped = _class_dirs(raw, "train")
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
    for split, folders in trees.items():
        # Inputs are listed one class folder at a time, straight into compact columns.
        split_dir = raw if layout[split].endswith("(train only)") else raw / split
        result.splits[split], skipped = _folder_table(split_dir, folders, index, split)
        result.skipped.extend(skipped)
        # Loose files beside the class folders have no class: list them, never drop them silently.
        _, loose, other = _list_dir(split_dir)
        result.skipped.extend(
            Skip(split, f.name, "not inside a class folder (no label)")
            for f in sorted(loose + [e for e, _ in other], key=lambda e: e.name)
            if f.name not in METADATA
        )
    if tar_tree is not None:
        result.splits["train"] = _tar_table(train_tar, tar_tree, index)
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
                + f"; {len(no_file)} labelled images have no file" + (f" ({some_names(no_file)})" if no_file else "")
            )
    for split in list(result.splits):
        if not len(result.splits[split]):
            gone = [f"{s.name}: {s.reason}" for s in result.skipped if s.split == split]
            raise LayoutError(
                f"the {split} split of {raw} ({layout[split]}) has no image to convert"
                + (f": all {len(gone)} inputs found are skipped ({some_names(gone, 3)})" if gone else "")
            )
    for warning in result.warnings:
        log.warning("%s", warning)
    return result
