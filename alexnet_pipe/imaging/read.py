"""The bytes of one input: a whole file, or a byte range inside an archive (runs in worker processes).

Files over ``ImageSettings.max_file_mb`` are skipped before they are read, and at most one byte
more than the limit is ever read; a FIFO or socket (listed in a --list file, or swapped in after
the scan) is refused without waiting for a writer.
"""

from __future__ import annotations

import os
import stat

from alexnet_pipe.imaging.reasons import BadImage
from alexnet_pipe.inputs.table import Source


def _too_large(size: int, max_mb: int) -> BadImage:
    return BadImage(f"file too large ({size} bytes, over the limit of {max_mb} MiB set by --max-file-mb)")


def read_source(src: Source, max_mb: int | None = None) -> bytes:
    """The raw bytes of an input: a whole file, or a byte range inside an archive.

    ``max_mb``: inputs over this many MiB are refused (BadImage) before they are read; at most
    one byte more than the limit is ever read (a file that grows, or a device or pipe that never
    ends, is cut there and refused).
    """
    limit = None if max_mb is None else max_mb << 20
    # O_NONBLOCK: opening a FIFO (listed in a --list file, or swapped in after the scan) must
    # not wait for a writer; it is then refused. Regular files ignore the flag.
    fd = os.open(src.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        kind = os.fstat(fd).st_mode
        if stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind):
            raise BadImage("FIFO (named pipe) or socket, not a regular file: not read")
        if src.size < 0:
            if limit is None:
                return f.read()
            info = os.fstat(fd)
            if info.st_size > limit:
                raise _too_large(info.st_size, max_mb)
            # A regular file: its size and one byte more, which shows it grew (then on to the
            # limit). Asking for the limit itself would allocate 64 MiB per file (~0.1 ms each).
            # A device's size says nothing: up to the limit.
            want = info.st_size + 1 if stat.S_ISREG(info.st_mode) else limit + 1
            data = f.read(want)
            if len(data) == want <= limit:
                data += f.read(limit + 1 - want)
            if len(data) > limit:
                raise _too_large(os.fstat(fd).st_size, max_mb)
            return data
        if limit is not None and src.size > limit:
            raise _too_large(src.size, max_mb)
        f.seek(src.offset)
        data = f.read(src.size)
    if len(data) != src.size:
        raise BadImage(f"archive ends inside this member ({len(data)} of {src.size} bytes)")
    return data
