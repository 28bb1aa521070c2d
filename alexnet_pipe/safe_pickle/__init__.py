"""Read untrusted pickles of plain data and numeric numpy arrays, running nothing from the file.

For other tools' pickles: neon's dataset cache (`update-mean`) and neon model-zoo weights
(`import-weights`), written by Python 2's cPickle or by Python 3. Python's own Unpickler cannot
be made safe by limiting ``find_class``: its REDUCE, BUILD and buffer opcodes run the allowed
globals on the file's arguments, so ``numpy.ndarray`` over a buffer at a negative offset reads
the heap and a writable BYTEARRAY8 view writes it. This package is a small pickle machine of its
own instead. It decodes the opcodes itself, interprets only those that build plain data, and
makes every numpy array itself from the file's bytes once dtype, shape and length check out.
Nothing the file names is imported or called.

Accepted, at protocols 0 to 4 (as Python 2 and 3 write them):

- None, bool, int (64-bit), float, str, bytes, and tuples, lists and dicts of them (dict keys:
  atoms, or tuples of atoms);
- numpy arrays as numpy pickles them (``multiarray._reconstruct`` + BUILD) of dtype bool,
  int8..64, uint8..64 or float16/32/64, either byte order (made native, as numpy does), C or
  Fortran order; numpy scalars
  (``multiarray.scalar``) and dtypes of those types;
- bytes as Python 3 writes them at protocol 0 to 2 (``_codecs.encode(text, 'latin1')``,
  ``bytes()``). Python 2 ``str`` comes back as latin-1 text, as with
  ``pickle.load(encoding="latin1")``; array data held that way is turned back into bytes.

Refused by a scan before anything is built: every other opcode (objects, persistent ids, the
extension registry, sets, the protocol-5 buffer opcodes BYTEARRAY8, NEXT_BUFFER and
READONLY_BUFFER) and every other global. Refused while building: calls other than the above,
SETITEM(S)/APPEND(S)/BUILD on anything but dicts, lists and arrays or dtypes under construction,
cycles, nesting deeper than ``MAX_DEPTH``, a tree larger than twice the file when shared parts
are counted each time they appear (so code that walks the result stays linear), more than
``ALLOC_FACTOR`` times the file's size in array data and decoded bytes, and more than
``max_objects`` objects.

Layout: ``opcodes.py`` decodes the file and scans it before anything is built,
``constructors.py`` holds the allowed globals and what REDUCE and BUILD may do with them,
``machine.py`` runs the opcodes and finishes the result; here are the entry points.
"""

from __future__ import annotations

import os
from pathlib import Path

from alexnet_pipe.errors import FormatError, UnsafePickleError
from alexnet_pipe.safe_pickle.constructors import MAX_NDIM
from alexnet_pipe.safe_pickle.machine import ALLOC_FACTOR, MAX_DEPTH, MAX_OBJECTS, Machine, finish
from alexnet_pipe.safe_pickle.opcodes import prescan

__all__ = ["ALLOC_FACTOR", "MAX_DEPTH", "MAX_NDIM", "MAX_OBJECTS", "load_file", "loads", "read_capped"]


def loads(data: bytes, *, max_objects: int = MAX_OBJECTS) -> object:
    """Load an untrusted pickle of plain data and numeric numpy arrays (Python 2 or 3).

    Args:
        data: the whole pickle.
        max_objects: refuse a pickle that makes more objects than this.
    Returns:
        dicts, lists, tuples, str, bytes, int, float, bool, None, numpy arrays (always our own,
        writable copies), numpy scalars and dtypes. Python 2 str comes back as latin-1 text.
    Raises:
        UnsafePickleError: the pickle needs something not allowed (the message says what).
        FormatError: the bytes are not a readable pickle.
    """
    data = bytes(data)
    prescan(data)
    root = Machine(data, max_objects).run()
    return finish(root, 2 * len(data) + 10_000)


def read_capped(path: Path, max_bytes: int, what: str) -> bytes:
    """The whole file, refused with a one-line reason if it is larger than ``max_bytes``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FormatError(f"{path} is {size:,} bytes, more than the {max_bytes:,} allowed for {what}; "
                              "is it the right file?")
        data = f.read(size + 1)  # not max_bytes + 1: read() allocates what it is asked for
    if len(data) != size:
        raise FormatError(f"{path} changed size while being read; try again once nothing writes it")
    return data


def load_file(path: Path, max_bytes: int, what: str = "a pickle") -> object:
    """``loads`` of a file no larger than ``max_bytes``; errors name the file."""
    data = read_capped(path, max_bytes, what)
    try:
        return loads(data)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from exc
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from exc
