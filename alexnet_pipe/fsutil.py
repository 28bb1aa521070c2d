"""Crash-safe file writes: write aside, fsync, rename, fsync the directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def remove(path: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def backup_path(path: Path) -> Path:
    """A free name for a backup of ``path``: ``name.bak``, ``name.bak1``, ..."""
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak{n}")
        n += 1
    return candidate


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: a directory, a parent
    that is a file, a directory without write permission. Creates nothing."""
    from .errors import AlexnetPipeError

    if path.is_dir():
        raise AlexnetPipeError(f"{option} {path} is a directory; give a file name, e.g. {path / 'alexnet.pt'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise AlexnetPipeError(f"{option} {path} is not writable; choose another path")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AlexnetPipeError(f"{option} {path}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AlexnetPipeError(f"{option} {path}: {ancestor} is not writable; choose another path")
