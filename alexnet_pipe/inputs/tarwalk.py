"""Walk a tar archive to its end-of-archive marker, or fail naming the byte where it breaks.

Python's ``tarfile`` ends its iteration without an error at the first header it cannot read
(a bad checksum, a short block, a block of zeros, the end of a truncated file): one flipped bit
in a header, or a partial download cut at a member boundary, reads as a smaller archive. So
:func:`members` iterates with ``TarFile.next()`` and, where that stops, checks that the archive
really ends there: two zero blocks (the end-of-archive marker) at that offset, then nothing but
zero padding (GNU tar pads to its record size, 10 KiB by default) to the end of the file.
Anything else raises :class:`CorruptArchiveError`, one line: "<archive>: incomplete or corrupt
archive at byte N (why); ...".

Only headers are read (512 bytes each, as ``tarfile`` does) plus the marker and the padding
after it: no member data.

:func:`skip_reason` says which members are not plain contiguous files (links, devices, GNU
sparse files, unknown types), so that callers list them as skipped instead of reading them.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator

from alexnet_pipe.errors import LayoutError

BLOCK = 512
MARKER = 2 * BLOCK  # the end-of-archive marker: two zero blocks
MAX_PADDING = 1 << 20  # zero padding allowed after the marker: a record of up to 2048 blocks
# What tarfile raises on bytes it cannot parse (beyond TarError: numeric fields of pax records,
# sparse maps, undecodable names).
_PARSE_ERRORS = (tarfile.TarError, ValueError, UnicodeError, EOFError, OverflowError, IndexError, KeyError)

Fail = Callable[[int, str], Exception]  # (byte offset in the archive file, why) -> the error to raise


class CorruptArchiveError(LayoutError):
    """A tar archive that is truncated or damaged: it cannot be listed to its end."""


def corrupt(archive: os.PathLike | str, what_to_do: str | None = None) -> Fail:
    """The ``fail`` callback of :func:`members` for an archive file: one line naming it and the byte."""
    name = os.fspath(archive)
    advice = what_to_do or "re-download it (or compare its md5 with the published one) and run again"

    def fail(at: int, why: str) -> CorruptArchiveError:
        return CorruptArchiveError(f"{name}: incomplete or corrupt archive at byte {at} ({why}); {advice}")

    return fail


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return {
        "unexpected end of data": "the file ends inside a member's data",
        "bad checksum": "bad header checksum",
        "invalid header": "invalid header",
        "empty file": "empty file",
        "truncated header": "the file ends inside a header",
    }.get(text, f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _compression(path, fileobj) -> str | None:
    try:
        if fileobj is not None:
            fileobj.seek(0)
            head = fileobj.read(6)
        else:
            with open(path, "rb") as f:
                head = f.read(6)
    except (OSError, tarfile.TarError):
        return None
    return next((kind for magic, kind in COMPRESSED.items() if head.startswith(magic)), None)


def open_tar(path: os.PathLike | str | None = None, fileobj=None, fail: Fail | None = None) -> tarfile.TarFile:
    """``tarfile.open(path or fileobj, "r:")`` (uncompressed only); a first header that cannot be
    read raises ``fail(0, why)``."""
    try:
        return tarfile.open(path, "r:", fileobj=fileobj)
    except _PARSE_ERRORS as exc:
        kind = _compression(path, fileobj)
        why = f"{kind}-compressed data, not an uncompressed tar" if kind else _why(exc)
        raise fail(0, why) from None


def _describe_block(block: bytes) -> str:
    """Why a block where the archive should have ended, or gone on, is not a header."""
    if len(block) < BLOCK:
        return "the file ends inside a header" if block else "the file ends before the end-of-archive marker"
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return "a block of zeros where a header should be"
    except tarfile.HeaderError as exc:
        return _why(exc)
    return "a header that could not be read"


def _read(fileobj, at: int, n: int, fail: Fail) -> bytes:
    """Up to ``n`` bytes at ``at``. (A nested archive's file object raises ReadError where the
    file holding it ends early.)"""
    try:
        fileobj.seek(at)
        return fileobj.read(n)
    except tarfile.ReadError:
        raise fail(at, "the file ends before this archive does") from None


def _check_end(fileobj, at: int, length: int, fail: Fail) -> None:
    """The archive read by ``fileobj`` (``length`` bytes) must end at ``at``: the marker, then zeros."""
    marker = _read(fileobj, at, MARKER, fail)
    if marker[:BLOCK] != bytes(BLOCK):  # a damaged header, or the end of a truncated file
        raise fail(min(at, length), _describe_block(marker[:BLOCK]))
    if marker != bytes(MARKER):
        second = marker[BLOCK:]
        why = ("the file ends inside the end-of-archive marker" if len(second) < BLOCK
               else f"one zero block, then {_describe_block(second)}")
        raise fail(at + BLOCK if len(second) == BLOCK else length, why)
    rest = length - (at + MARKER)
    if rest > MAX_PADDING:
        raise fail(at, f"the archive ends here but {rest} more bytes follow: a damaged or zeroed header, "
                              "or an unfinished download")
    padding = _read(fileobj, at + MARKER, rest, fail)
    if len(padding) != rest or padding.count(0) != rest:
        first = next((i for i, b in enumerate(padding) if b), len(padding))
        raise fail(at + MARKER + first, "data after the end-of-archive marker")


def members(tar: tarfile.TarFile, length: int, fail: Fail) -> Iterator[tarfile.TarInfo]:
    """Every member of ``tar`` (opened by :func:`open_tar` on a seekable file of ``length``
    bytes), then a check that the archive ends at its end-of-archive marker.

    Args:
        tar: the archive, before its first ``next()``.
        length: the size of the archive (of the file, or of the outer member holding it).
        fail: makes the error to raise from (byte offset in ``tar``, why); a nested archive's
            callback adds the offset where it starts in its file.
    Raises:
        what ``fail`` makes: the archive cannot be read to its end-of-archive marker.
    """
    previous = -1
    while True:
        try:
            member = tar.next()
        except _PARSE_ERRORS as exc:
            raise fail(min(tar.offset, length), _why(exc)) from None
        if member is None:
            break
        tar.members.clear()  # tarfile keeps every TarInfo; the caller keeps what it needs
        # A negative size (base-256 or pax) moves tarfile back to a header it read: it would loop.
        if member.size < 0 or tar.offset <= previous:
            raise fail(member.offset, "negative member size")
        previous = tar.offset
        yield member
    _check_end(tar.fileobj, tar.offset, length, fail)


def skip_reason(member: tarfile.TarInfo) -> str | None:
    """None for a regular file whose ``size`` bytes lie contiguously at ``offset_data``; "" for a
    directory (nothing to list); else why the member is not read as a file."""
    if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE:
        return "GNU sparse file: its bytes are not stored contiguously in the archive (extract it with GNU tar)"
    if member.isreg():
        return None
    if member.isdir():
        return ""
    if member.issym():
        return f"symbolic link to {member.linkname!r}: links are not followed"
    if member.islnk():
        return f"hard link to {member.linkname!r}: links are not followed"
    if member.ischr() or member.isblk():
        return "device file, not a regular file"
    if member.isfifo():
        return "FIFO, not a regular file"
    return f"tar member of type {member.type.decode('latin-1')!r}, not a regular file"
