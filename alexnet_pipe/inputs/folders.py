"""Class-folder trees on disk: the class folders of a split and the files below each (no image is opened).

``RAW/<split>/<class>/<image>`` (or ``RAW/<class>/<image>``, train only): like torchvision's
ImageFolder, images in subfolders of a class folder belong to that class. Hidden, system
(``__MACOSX``, ``lost+found``, ...) and empty folders are never classes, links to folders are
never followed (no loops), and entries that are not regular files are never read: each is
listed as skipped, with why. The listing of a plain folder (a flat ``val/``, the loose files
beside the class folders) is here too.
"""

from __future__ import annotations

import os
from pathlib import Path

from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.entries import by_name, not_a_file, system_folder
from alexnet_pipe.inputs.table import Skip, SourceTable, SourceTableBuilder


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def list_dir(path: Path) -> tuple[list[os.DirEntry], list[os.DirEntry], list[tuple[os.DirEntry, str]]]:
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


def _files_below(folder: Path, unread: list[tuple[str, str]] | None = None,
                 exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(name relative to ``folder``, path) of every visible file below it, sorted; like
    torchvision's ImageFolder, images in subfolders of a class folder belong to that class.
    Hidden and system subfolders, links to folders (never followed: no loops) and empty
    subfolders are not entered, and entries that are not regular files (FIFOs, sockets, devices,
    broken links, link loops) are not read: each is appended to ``unread`` as (relative name,
    why). (os.path, not pathlib: pathlib interns every name part, a table that would grow by the
    million on ImageNet and never shrink.) Folders in ``exclude`` (real paths: convert's OUT) are
    passed over silently, as ``class_dirs`` does."""
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
            elif exclude and os.path.realpath(os.path.join(root, d)) in exclude:
                continue
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


def class_dirs(split_dir: Path, split: str,
               exclude: frozenset[str] = frozenset()) -> tuple[dict[str, Path], list[Skip]]:
    """class name -> folder, for the class folders of a split (their files are listed later,
    one class at a time, straight into a SourceTable); and the folders that are no class:
    hidden, system (``__MACOSX``, ``lost+found``, ...) and empty ones, as skipped. Folders in
    ``exclude`` (real paths: convert's OUT inside RAW) are passed over silently: what the tool
    writes is never an input, and listing them would make the first run and a rerun differ."""
    classes, skipped = {}, []
    with os.scandir(split_dir) as it:
        entries = sorted((e for e in it if e.is_dir() and os.path.realpath(e.path) not in exclude),
                         key=lambda e: e.name)
    for d in entries:
        what = system_folder(d.name)
        if what is None and not _has_files(d.path):
            what = "empty folder (no files)"
        if what is None:
            classes[d.name] = Path(d.path)
        else:
            skipped.append(Skip(split, d.name + "/", f"{what}, not a class"))
    return classes, skipped


def folder_table(split_dir: Path, folders: dict[str, Path], index: dict[str, int],
                 split: str, exclude: frozenset[str] = frozenset()) -> tuple[SourceTable, list[Skip]]:
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
    for cls in by_name(folders):
        unread: list[tuple[str, str]] = []
        for name, _ in _files_below(folders[cls], unread, exclude):
            table.add(f"{cls}/{name}", index[cls], location)
        skipped.extend(Skip(split, f"{cls}/{rel}", why) for rel, why in unread)
    return table.build(), skipped
