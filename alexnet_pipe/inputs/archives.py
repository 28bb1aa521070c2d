"""The original ILSVRC archives, read in place: the member lists of the train and val tars.

``ILSVRC2012_img_train.tar`` is a tar of per-class tars (``<wnid>.tar``), ``ILSVRC2012_img_val.tar``
a flat tar. Members are located by byte offset so that workers read them straight from the
archive; nothing is extracted. An archive must be readable to its end-of-archive marker, else the
scan fails naming the byte (tarwalk.py): a damaged header or a partial download never reads as
fewer classes. Links, GNU sparse files and other members that are not plain files, members in
hidden or system folders, and per-class tars without images are listed as skipped, with why.
The lists are held column-wise (``Members``), which is also what the scan cache stores.
"""

from __future__ import annotations

import os
import tarfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.entries import by_name, system_folder
from alexnet_pipe.inputs.table import SourceTable, SourceTableBuilder
from alexnet_pipe.inputs.tarwalk import corrupt, open_tar, skip_reason
from alexnet_pipe.inputs.tarwalk import members as tar_members

TRAIN_TARS = ("ILSVRC2012_img_train.tar",)
VAL_TARS = ("ILSVRC2012_img_val.tar",)


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


def flat_tar_members(path: Path) -> Members:
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


def train_tar_members(path: Path) -> Members:
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


def tar_table(tar: Path, members: Members, index: dict[str, int]) -> SourceTable:
    """The train split of a tar of per-class tars, sorted by name ``<class>/<member>``."""
    table = SourceTableBuilder()
    location = str(tar)
    position = {g: k for k, g in enumerate(members.groups)}
    for cls in by_name(members.groups):
        g = position[cls]
        for row in members.rows(g):
            name = members.name(row).decode("utf-8", "surrogateescape")
            table.add(f"{cls}/{name}", index[cls], location, int(members.offsets[row]), int(members.sizes[row]))
    return table.build()
