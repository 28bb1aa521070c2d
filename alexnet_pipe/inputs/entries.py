"""What every input layout (class folders, archives, list files) shares about the entries it finds.

Which folders are never classes nor images (hidden and system folders: ``__MACOSX``,
``lost+found``, ``@eaDir``, ...), why an entry that is not a regular file is listed and not read
(FIFOs, sockets, devices, broken links, link loops), the order groups of names sort in, and how a
message shows a few names of a long list.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from alexnet_pipe.errors import ConfigError
from alexnet_pipe.inputs.devkit import DEVKIT_DIR
from alexnet_pipe.text import shown

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


def system_folder(name: str) -> str | None:
    """What a folder called ``name`` is, if it is a hidden or system folder (never a class)."""
    if name in (".", ".."):
        return None
    if name.startswith("."):
        return "hidden folder"
    return SYSTEM_FOLDERS.get(name.casefold())


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


def refuse_special(path: Path, what: str) -> None:
    """ConfigError when ``path`` (named by ``what``: an option, an argument) is a FIFO, socket or device:
    a FIFO would block its reader forever, a device never end. A missing file, a folder or a regular
    file is left to its reader."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ConfigError(f"{what}: {shown(path)}: {not_a_file(str(path))}; give a regular file")


def by_name(groups) -> list[str]:
    """Groups (class folders, per-class tars) in the order that sorts their members' names
    ``<group>/<file>`` globally: by ``group + "/"`` ("cat/x" sorts before "cat-1/x")."""
    return sorted(groups, key=lambda g: g + "/")


def some_names(names: list[str], k: int = 5) -> str:
    """The first ``k`` names for a message, e.g. "a, b, c, d, e and 3 more"."""
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
