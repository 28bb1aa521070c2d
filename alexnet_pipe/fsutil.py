"""Crash-safe file writes: write aside, fsync, rename, fsync the directory; and one line for a
write that fails (a full disk, a file size limit, a read-only file system)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import resource
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alexnet_pipe.errors import AlexnetPipeError, BusyError

_TEMP = re.compile(r"\..+\.tmp-(\d+)")  # what temp_path makes: .NAME.tmp-PID
FULL = "no space left on the device"
_WHY = {
    errno.ENOSPC: FULL,
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file size limit (ulimit -f) or the file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}
LOW_SPACE = 64 << 20  # below this much free space, a database write that failed is taken for a full disk


class OutputError(AlexnetPipeError):
    """An output could not be written; the message names it, says why and what to do."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where an atomic write of ``path`` puts its data first (hidden, named by the writer's pid)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never a part.
    A failed write (a full disk) removes its temporary file; a killed one leaves it (see
    ``remove_temps``)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
        raise
    fsync_dir(path.parent)


def remove_temps(folder: Path, name: str | None = None, only_dead: bool = False) -> int:
    """Delete the temporary files that atomic writes killed midway left in ``folder`` (of the
    target ``name`` only, when given). ``only_dead``: only those of processes that no longer
    exist, where others may be writing; else the caller must know that no one is. Returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or (name is not None and entry.name != f".{name}.tmp-{m.group(1)}"):
            continue
        if only_dead and _alive(int(m.group(1))):
            continue
        if entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def os_error(exc: Exception, path: Path) -> OSError:
    """The OSError that a library's write error without an errno stands for (LMDB's
    ``lmdb.Error("mdb_txn_commit: No space left on device")``), naming ``path``; the errno is
    read from the message, EIO when it names none (LMDB reports a short write so)."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    code = next((code for code in _WHY if code != errno.EIO and os.strerror(code) in text), errno.EIO)
    return OSError(code, text, os.fspath(path))


def output_error(exc: BaseException, where: Path, then: str) -> OutputError | None:
    """One line for a write under ``where`` that failed: an ``OSError`` (or a library error,
    see ``os_error``) of a full disk, a quota, a file size limit, a read-only or unwritable file
    system, an I/O error. An I/O error with a nearly full file system is named a full disk.
    ``then``: what to do once it is fixed. None for any other error."""
    if not isinstance(exc, OSError):
        if type(exc).__module__ != "lmdb":
            return None
        exc = os_error(exc, where)
    why = _WHY.get(exc.errno)
    if why is None:
        return None
    path = Path(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes)) else where
    free = _free_bytes(path)
    if exc.errno == errno.EIO:  # a short write (so LMDB reports a full disk), or a failing disk
        detail = exc.strerror or why
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if free is not None and free < LOW_SPACE:
            why = f"{FULL} ({detail})"
        elif soft != resource.RLIM_INFINITY:
            why = f"{detail}; the file size limit (ulimit -f) is {_size(soft)}"
        else:
            why = detail
    elif exc.errno == errno.EFBIG:
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            why = f"file too large for the file size limit (ulimit -f: {_size(soft)})"
    space = "" if free is None else f" ({_size(free)} free there)"
    return OutputError(f"could not write {path}: {why}{space}; {then}")


def read_json(path: Path):
    """``path``'s JSON. Raises OSError as reading does, and ValueError with the reason for what is not
    JSON: bad UTF-8, bad syntax, or nesting deeper than the parser's recursion reaches (a crafted
    ``[[[[...`` of 100,000 levels is a RecursionError inside json)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


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


def check_output_file(path: Path, option: str, example: str, new_folders: int = 1) -> None:
    """Refuse, before any work, an output file path that cannot be written: a directory, a parent
    that is a file, a directory without write permission, more missing folders than the writer may
    create (``new_folders``: the file's own folder; a mistyped path is not built whole). Creates
    nothing. ``example``: a file name that fits the option (``metrics.jsonl`` for -o), suggested
    inside a directory given."""
    if path.is_dir():
        raise AlexnetPipeError(f"{option} {path} is a directory; give a file name, e.g. {path / example}")
    if path.exists() and not path.is_file():  # a device or FIFO: never kept aside (renamed) or replaced
        raise AlexnetPipeError(f"{option} {path} is not a regular file (a device, FIFO or socket); give a file "
                               f"name, e.g. {example}")
    if path.exists() and not os.access(path, os.W_OK):
        raise AlexnetPipeError(f"{option} {path} is not writable; choose another path")
    ancestor, missing = path.absolute().parent, []
    while not ancestor.exists():
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AlexnetPipeError(f"{option} {path}: {ancestor} is a file, not a directory; choose another path")
    if len(missing) > new_folders:
        made = ", ".join(str(m) for m in reversed(missing[:new_folders]))
        raise AlexnetPipeError(f"{option} {path}: {missing[-1]} does not exist; create it first or fix the path "
                               f"(only {made} would be created)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AlexnetPipeError(f"{option} {path}: {ancestor} is not writable; choose another path")


@contextmanager
def hold_lock(lock_file: Path, busy: str, shared: bool = False, remove: bool = False) -> Iterator[None]:
    """Hold a POSIX record lock on ``lock_file`` (created if missing) for the block, or raise
    BusyError(``busy``) at once when another process holds it. Released by the kernel when the
    process dies (a killed run never blocks its rerun); honoured over NFS. ``remove``: delete the
    file when done (exclusive locks only): it is unlinked before it is unlocked, and a holder
    checks that the file it locked is still the one at the path, so a process that opened the old
    file meanwhile retries on the new one instead of sharing the output."""
    while True:
        with open(lock_file, "a+b") as f:
            try:
                fcntl.lockf(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError:
                raise BusyError(busy) from None
            if remove and _inode(lock_file) != os.fstat(f.fileno()).st_ino:
                fcntl.lockf(f, fcntl.LOCK_UN)
                continue  # unlinked by its last holder after we opened it: lock the new one
            try:
                yield
                return
            finally:
                if remove:
                    lock_file.unlink(missing_ok=True)
                fcntl.lockf(f, fcntl.LOCK_UN)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def output_lock(path: Path, what: str):
    """``.NAME.lock`` beside ``path``, held for the block and removed after it: a second process
    writing the same output (two trainings with the same -s, -o or --checkpoint) is refused in one
    line instead of the two interleaving their files. ``what``: the writer, for the message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return hold_lock(path.with_name(f".{path.name}.lock"),
                     f"another {what} is writing {path}; wait for it to finish, stop it, or choose another path",
                     remove=True)
