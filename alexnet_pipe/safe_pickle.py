"""Read untrusted pickles of plain data and numeric numpy arrays, running nothing from the file.

For other tools' pickles: neon's dataset cache (`update-mean`) and neon model-zoo weights
(`import-weights`), written by Python 2's cPickle or by Python 3. Python's own Unpickler cannot
be made safe by limiting ``find_class``: its REDUCE, BUILD and buffer opcodes run the allowed
globals on the file's arguments, so ``numpy.ndarray`` over a buffer at a negative offset reads
the heap and a writable BYTEARRAY8 view writes it. This module is a small pickle machine of its
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
"""

from __future__ import annotations

import codecs
import os
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alexnet_pipe.errors import FormatError, UnsafePickleError

MAX_DEPTH = 100  # nesting of containers; neon's weights nest about 10 deep
MAX_OBJECTS = 5_000_000  # objects made (and memo entries); neon's pickles hold thousands
ALLOC_FACTOR = 4  # array data and decoded bytes, as a multiple of the file's size (+ 1 MiB)
MAX_NDIM = 32
_INT_RANGE = (-(1 << 63), 1 << 64)  # int64 and uint64
_LINE_MAX = 256  # text-protocol numbers and global names
_DTYPE_CODE = re.compile(r"(b1|[iu][1248]|f[248])")
_DTYPE_KINDS = {"O": "object (Python objects)", "V": "void (structured)", "S": "bytes", "a": "bytes",
                "U": "str", "M": "datetime64", "m": "timedelta64", "c": "complex"}

# Opcodes: byte -> (name, argument reader). Names as in pickletools.
_ALLOWED_OPS = {
    b"(": ("MARK", None), b".": ("STOP", None), b"0": ("POP", None), b"1": ("POP_MARK", None),
    b"2": ("DUP", None), b"N": ("NONE", None), b"\x88": ("NEWTRUE", None), b"\x89": ("NEWFALSE", None),
    b"I": ("INT", "intnl"), b"J": ("BININT", "int4"), b"K": ("BININT1", "uint1"), b"M": ("BININT2", "uint2"),
    b"L": ("LONG", "longnl"), b"\x8a": ("LONG1", "long1"), b"\x8b": ("LONG4", "long4"),
    b"F": ("FLOAT", "floatnl"), b"G": ("BINFLOAT", "float8"),
    b"S": ("STRING", "stringnl"), b"T": ("BINSTRING", "string4"), b"U": ("SHORT_BINSTRING", "string1"),
    b"V": ("UNICODE", "unicodenl"), b"X": ("BINUNICODE", "unicode4"), b"\x8c": ("SHORT_BINUNICODE", "unicode1"),
    b"\x8d": ("BINUNICODE8", "unicode8"), b"B": ("BINBYTES", "bytes4"), b"C": ("SHORT_BINBYTES", "bytes1"),
    b"\x8e": ("BINBYTES8", "bytes8"),
    b"}": ("EMPTY_DICT", None), b"d": ("DICT", None), b"s": ("SETITEM", None), b"u": ("SETITEMS", None),
    b"]": ("EMPTY_LIST", None), b"l": ("LIST", None), b"a": ("APPEND", None), b"e": ("APPENDS", None),
    b")": ("EMPTY_TUPLE", None), b"t": ("TUPLE", None), b"\x85": ("TUPLE1", None), b"\x86": ("TUPLE2", None),
    b"\x87": ("TUPLE3", None),
    b"c": ("GLOBAL", "global"), b"\x93": ("STACK_GLOBAL", None), b"R": ("REDUCE", None), b"b": ("BUILD", None),
    b"p": ("PUT", "intnl"), b"q": ("BINPUT", "uint1"), b"r": ("LONG_BINPUT", "uint4"), b"\x94": ("MEMOIZE", None),
    b"g": ("GET", "intnl"), b"h": ("BINGET", "uint1"), b"j": ("LONG_BINGET", "uint4"),
    b"\x80": ("PROTO", "uint1"), b"\x95": ("FRAME", "uint8"),
}
_BUFFER_OPS = {b"\x96": "BYTEARRAY8", b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER"}
_OBJECT_OPS = {b"P": "PERSID", b"Q": "BINPERSID", b"i": "INST", b"o": "OBJ", b"\x81": "NEWOBJ",
               b"\x92": "NEWOBJ_EX", b"\x82": "EXT1", b"\x83": "EXT2", b"\x84": "EXT4", b"\x8f": "EMPTY_SET",
               b"\x90": "ADDITEMS", b"\x91": "FROZENSET"}

# The only globals a pickle may name: what numpy arrays, scalars and Python 3's bytes need.
_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
    ("__builtin__", "bytes"): "bytes",
    ("builtins", "bytes"): "bytes",
}
_STR_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_VALUE_OPS = _STR_OPS | {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                         "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


# ---------------------------------------------------------------- opcodes

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")


def _global_refused(module: str, name: str, pos: int) -> UnsafePickleError:
    # Names come from the file: anything but a plain dotted name is shown escaped (no newlines,
    # no terminal control codes in the one-line message).
    shown = f"{module}.{name}" if _PLAIN_NAME.fullmatch(f"{module}.{name}") else ascii(f"{module[:80]}.{name[:80]}")
    return UnsafePickleError(
        f"the pickle asks for {shown} (at byte {pos}), which is not part of a numpy array; refusing "
        "to load it (only numbers, strings, lists, dicts and numeric numpy arrays are allowed)")


def _truncated(what: str, pos: int) -> FormatError:
    return FormatError(f"not a readable pickle: {what} at byte {pos} runs past the end of the file")


class _Ops:
    """Decodes one opcode at a time: (name, argument, position). Reads only; builds nothing."""

    def __init__(self, data: bytes, scan: bool = False):
        self.data, self.pos = data, 0
        self.scan = scan  # skip long strings instead of decoding them (the prescan needs short ones only)

    def _take(self, n: int, what: str) -> bytes:
        start, end = self.pos, self.pos + n
        if n < 0 or end > len(self.data):
            raise _truncated(what, start)
        self.pos = end
        return self.data[start:end]

    def _skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise _truncated(what, self.pos)
        self.pos += n

    def _line(self, what: str, limit: int | None = _LINE_MAX) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise _truncated(what, self.pos)
        if limit is not None and end - self.pos > limit:
            raise FormatError(f"not a readable pickle: {what} at byte {self.pos} is over {limit} characters")
        line, self.pos = self.data[self.pos:end], end + 1
        return line

    def _uint(self, n: int, what: str) -> int:
        return int.from_bytes(self._take(n, what), "little")

    def _text_int(self, line: bytes, what: str, pos: int) -> int:
        try:
            return int(line)
        except ValueError:
            raise FormatError(f"not a readable pickle: {what} at byte {pos} is not an integer") from None

    def _arg(self, kind: str, name: str, pos: int) -> object:  # noqa: C901 -- one branch per wire form
        if kind in ("uint1", "uint2", "uint4", "uint8"):
            return self._uint(int(kind[4:]), name)
        if kind == "int4":
            return int.from_bytes(self._take(4, name), "little", signed=True)
        if kind == "intnl":
            line = self._line(name)
            if name == "INT" and line in (b"00", b"01"):  # how protocol 0 writes False and True
                return line == b"01"
            return self._text_int(line, name, pos)
        if kind == "longnl":
            line = self._line(name)
            return self._text_int(line[:-1] if line.endswith(b"L") else line, name, pos)
        if kind in ("long1", "long4"):
            n = self._uint(1, name) if kind == "long1" else int.from_bytes(self._take(4, name), "little", signed=True)
            if not 0 <= n <= 9:
                raise UnsafePickleError(f"the pickle holds a {n}-byte integer (at byte {pos}); integers are "
                                        "limited to 64 bits")
            return int.from_bytes(self._take(n, name), "little", signed=True)
        if kind == "floatnl":
            try:
                return float(self._line(name))
            except ValueError:
                raise FormatError(f"not a readable pickle: FLOAT at byte {pos} is not a number") from None
        if kind == "float8":
            return struct.unpack(">d", self._take(8, name))[0]
        if kind == "stringnl":  # protocol 0 str: a quoted repr with escapes
            line = self._line(name, None)
            if self.scan and len(line) > _LINE_MAX:
                return None
            if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
                raise FormatError(f"not a readable pickle: STRING at byte {pos} is not quoted")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # "invalid escape sequence"
                    return codecs.escape_decode(line[1:-1])[0].decode("latin1")
            except ValueError:
                raise FormatError(f"not a readable pickle: STRING at byte {pos} has a bad escape") from None
        if kind in ("string1", "string4", "bytes1", "bytes4", "bytes8", "unicode1", "unicode4", "unicode8"):
            width = {"1": 1, "4": 4, "8": 8}[kind[-1]]
            n = int.from_bytes(self._take(width, name), "little", signed=kind == "string4")
            if self.scan and n > _LINE_MAX:
                self._skip(n, name)
                return None
            raw = self._take(n, name)
            if kind.startswith("string"):
                return raw.decode("latin1")  # a Python 2 str, as pickle.load(encoding="latin1")
            if kind.startswith("bytes"):
                return raw
            return self._utf8(raw, name, pos)
        if kind == "unicodenl":
            line = self._line(name, None)
            if self.scan and len(line) > _LINE_MAX:
                return None
            try:
                return str(line, "raw-unicode-escape")
            except UnicodeDecodeError:
                raise FormatError(f"not a readable pickle: UNICODE at byte {pos} is not valid text") from None
        if kind == "global":
            module, attr = self._line(name), self._line(name)
            return self._utf8(module, name, pos), self._utf8(attr, name, pos)
        raise AssertionError(kind)

    @staticmethod
    def _utf8(raw: bytes, name: str, pos: int) -> str:
        try:
            return str(raw, "utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise FormatError(f"not a readable pickle: {name} at byte {pos} is not valid UTF-8") from None

    def __iter__(self) -> Iterator[tuple[str, object, int]]:
        while True:
            pos = self.pos
            if pos >= len(self.data):
                raise FormatError(f"not a readable pickle: it ends at byte {pos} without a STOP opcode "
                                  "(truncated?)")
            code = self.data[pos:pos + 1]
            self.pos += 1
            if code in _BUFFER_OPS:
                raise UnsafePickleError(
                    f"the pickle uses the {_BUFFER_OPS[code]} opcode (at byte {pos}), a protocol-5 buffer that "
                    "can alias memory; refusing it (re-save the file with pickle protocol 4 or lower)")
            if code in _OBJECT_OPS:
                raise UnsafePickleError(
                    f"the pickle uses the {_OBJECT_OPS[code]} opcode (at byte {pos}), which makes Python objects; "
                    "refusing it (only numbers, strings, lists, dicts and numeric numpy arrays are allowed)")
            if code not in _ALLOWED_OPS:
                raise FormatError(f"not a readable pickle: unknown opcode {code[0]:#04x} at byte {pos}")
            name, kind = _ALLOWED_OPS[code]
            arg = None if kind is None else self._arg(kind, name, pos)
            yield name, arg, pos
            if name == "STOP":
                return


def _prescan(data: bytes) -> None:
    """Check every opcode and every global named before building anything.

    STACK_GLOBAL takes its names from the stack; Python writes them as the two strings pushed
    (or fetched from the memo) just before it, and only that form is accepted.
    """
    memo: dict[int, str | None] = {}  # the memo's keys, with the strings it holds
    recent: list[str | None] = []  # values pushed since the last other opcode (None: not a string)
    for name, arg, pos in _Ops(data, scan=True):
        if name == "PROTO" and not 0 <= arg <= 5:
            raise FormatError(f"not a readable pickle: protocol {arg} at byte {pos} (expected 0 to 5)")
        if name == "GLOBAL":
            if arg not in _GLOBALS:
                raise _global_refused(*arg, pos)
            recent = [None]
        elif name == "STACK_GLOBAL":
            names = tuple(recent[-2:])
            if len(names) < 2 or None in names:
                raise UnsafePickleError(f"the pickle computes the name of a global (STACK_GLOBAL at byte {pos}); "
                                        "refusing it (only numpy's own pickles are allowed)")
            if names not in _GLOBALS:
                raise _global_refused(*names, pos)
            recent = [None]
        elif name in _STR_OPS:
            recent.append(arg)
        elif name in _GET_OPS:
            recent.append(memo.get(arg))
        elif name in _PUT_OPS:
            memo[len(memo) if name == "MEMOIZE" else arg] = recent[-1] if recent else None
        elif name != "FRAME":
            recent = [None] if name not in ("POP", "POP_MARK", "MARK", "STOP") else []
        del recent[:-2]


# ---------------------------------------------------------------- the machine

class _Global:
    """A global the file named; only ever an argument check, never called."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name


class _DtypePending:
    """``numpy.dtype(code)`` whose byte order BUILD may still set; fixed once used."""

    __slots__ = ("code", "order", "dtype")

    def __init__(self, code: str):
        self.code, self.order, self.dtype = code, "=", None

    def fix(self) -> np.dtype:
        if self.dtype is None:
            dt = np.dtype(self.code)
            self.dtype = dt.newbyteorder(self.order) if self.order in "<>" and dt.itemsize > 1 else dt
        return self.dtype


class _ArrayPending:
    """An array from ``_reconstruct``, until BUILD gives it dtype, shape and data."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None


_ATOMS = (str, bytes, int, float, bool, type(None), np.generic)


def _typename(obj: object) -> str:
    """What ``obj`` is, in words: "numpy.dtype" (a global), "a numpy array", "a value of type str"."""
    if isinstance(obj, _Global):
        return obj.name
    if isinstance(obj, _ArrayPending):
        return "a numpy array"
    if isinstance(obj, _DtypePending):
        return "a numpy dtype"
    return f"a value of type {type(obj).__name__}"


class _Machine:
    """Runs the allowed opcodes over plain Python containers; see the module docstring."""

    def __init__(self, data: bytes, max_objects: int):
        self.data = data
        self.stack: list[object] = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.objects_left = max_objects
        self.bytes_left = ALLOC_FACTOR * len(data) + (1 << 20)
        self.pos = 0

    # -- bookkeeping
    def _bad(self, what: str) -> FormatError:
        return FormatError(f"not a readable pickle: {what} (at byte {self.pos})")

    def _refuse(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{what} (at byte {self.pos}); refusing the pickle")

    def _count(self) -> None:
        self.objects_left -= 1
        if self.objects_left < 0:
            raise self._refuse("the pickle makes more objects than allowed")

    def _new(self, obj: object) -> None:
        self._count()
        self.stack.append(obj)

    def _alloc(self, nbytes: int) -> None:
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise self._refuse(f"the pickle asks for more memory than {ALLOC_FACTOR}x its size")

    def _pop(self) -> object:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self._bad("stack underflow")
        return self.stack.pop()

    def _top(self) -> object:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self._bad("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list[object]:
        if not self.marks:
            raise self._bad("no MARK before an opcode that needs one")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    # -- values
    def _key(self, key: object) -> object:
        ok = isinstance(key, _ATOMS) or (type(key) is tuple and all(isinstance(k, _ATOMS) for k in key))
        if not ok:
            raise self._refuse(f"a dict key is {_typename(key)}; only numbers, strings and tuples of them are allowed")
        return key

    def _raw_bytes(self, raw: object, what: str) -> bytes:
        if isinstance(raw, bytes):
            return raw
        if isinstance(raw, str):  # Python 2 str, read as latin-1 text
            self._alloc(len(raw))
            try:
                return raw.encode("latin1")
            except UnicodeEncodeError:
                raise self._bad(f"{what} is text, not bytes") from None
        raise self._refuse(f"{what} is {_typename(raw)}, not bytes (an object array?)")

    def _dtype(self, obj: object) -> np.dtype:
        if not isinstance(obj, _DtypePending):
            raise self._refuse(f"a numpy dtype is given as {_typename(obj)}")
        return obj.fix()

    def _reduce(self, func: object, args: object) -> object:
        if not isinstance(func, _Global):
            raise self._refuse(f"the pickle calls {_typename(func)}")
        if type(args) is not tuple:
            raise self._bad(f"the arguments of {func.name} are not a tuple")
        kind = func.kind
        if kind == "reconstruct":
            if (len(args) != 3 or not (isinstance(args[0], _Global) and args[0].kind == "ndarray")
                    or args[1] != (0,) or args[2] not in (b"b", "b")):
                raise self._refuse(f"{func.name} is called with other arguments than numpy's own "
                                   "(ndarray, (0,), b'b')")
            return _ArrayPending()
        if kind == "dtype":
            if len(args) != 3 or not isinstance(args[0], str) or args[1] not in (0, False) or args[2] not in (0, 1):
                raise self._refuse("numpy.dtype is called with other arguments than numpy's own (code, False, True)")
            code = args[0]
            if not _DTYPE_CODE.fullmatch(code):
                name = _DTYPE_KINDS.get(code[:1], repr(code[:20]))
                raise self._refuse(f"the pickle holds a numpy array of dtype {name}; only bool, int, uint and "
                                   "float arrays are allowed")
            return _DtypePending(code)
        if kind == "scalar":
            if len(args) != 2:
                raise self._refuse("numpy scalar() is called without data (an object scalar?)")
            dtype = self._dtype(args[0])
            raw = self._raw_bytes(args[1], "a numpy scalar's data")
            if len(raw) != dtype.itemsize:
                raise self._bad(f"a {dtype} scalar holds {len(raw)} bytes")
            return np.frombuffer(raw, dtype)[0]
        if kind == "encode":
            if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
                raise self._refuse("_codecs.encode is called with other arguments than latin-1 text")
            self._alloc(len(args[0]))
            try:
                return args[0].encode("latin1")
            except UnicodeEncodeError:
                raise self._bad("_codecs.encode is given text that is not latin-1") from None
        if kind == "bytes" and args == ():
            return b""
        raise self._refuse(f"the pickle calls {func.name} with {len(args)} arguments")

    def _build(self, target: object, state: object) -> None:
        if isinstance(target, _DtypePending):
            self._build_dtype(target, state)
        elif isinstance(target, _ArrayPending):
            self._build_array(target, state)
        else:
            raise self._refuse(f"the pickle sets the state (BUILD) of {_typename(target)}")

    def _build_dtype(self, target: _DtypePending, state: object) -> None:
        if target.dtype is not None:
            raise self._refuse("the pickle changes a numpy dtype after using it")
        ok = (type(state) is tuple and len(state) in (8, 9) and state[0] in (3, 4) and state[1] in ("<", ">", "|", "=")
              and state[2:5] == (None, None, None) and state[5:7] == (-1, -1) and type(state[7]) is int
              and (len(state) == 8 or state[8] is None or type(state[8]) is dict))
        if not ok:
            raise self._refuse("a numpy dtype has a state other than a plain number type's "
                               "(fields, subarrays or an unknown version)")
        target.order = state[1]
        target.fix()

    def _build_array(self, target: _ArrayPending, state: object) -> None:
        if target.array is not None:
            raise self._refuse("the pickle sets the data of a numpy array twice")
        if type(state) is not tuple or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise self._refuse("a numpy array has a state other than numpy's (1, shape, dtype, fortran, data)")
        shape, dtype_obj, fortran, raw = state[-4:]
        if (type(shape) is not tuple or len(shape) > MAX_NDIM
                or not all(type(d) is int and 0 <= d <= len(self.data) for d in shape)):
            raise self._bad("a numpy array's shape is not a short tuple of sizes")
        dtype = self._dtype(dtype_obj)
        if fortran not in (0, 1):
            raise self._bad("a numpy array's order flag is not a bool")
        count = 1
        for d in shape:
            count *= d
        raw = self._raw_bytes(raw, "a numpy array's data")
        if len(raw) != count * dtype.itemsize:
            raise self._bad(f"a numpy array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} "
                            f"bytes of data but holds {len(raw)}")
        self._alloc(len(raw))
        view = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")
        # Our own writable memory, never the file's buffer; native byte order, as numpy's unpickling
        # gives it (torch.from_numpy refuses anything else).
        target.array = view.astype(dtype.newbyteorder("="), order="K")

    # -- the loop
    def run(self) -> object:  # noqa: C901 -- one branch per opcode
        stack = self.stack
        for name, arg, pos in _Ops(self.data):
            self.pos = pos
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if self.marks or len(stack) != 1:
                    raise self._bad(f"STOP with {len(stack)} values and {len(self.marks)} marks left")
                return stack[0]
            if name == "MARK":
                self.marks.append(len(stack))
            elif name == "POP":
                if len(stack) > (self.marks[-1] if self.marks else 0):
                    stack.pop()
                else:
                    self._pop_mark()
            elif name == "POP_MARK":
                self._pop_mark()
            elif name == "DUP":
                stack.append(self._top())
            elif name in _PUT_OPS:
                key = len(self.memo) if name == "MEMOIZE" else arg
                if key < 0:
                    raise self._bad("negative memo index")
                self._count()
                self.memo[key] = self._top()
            elif name in _GET_OPS:
                if arg not in self.memo:
                    raise self._bad(f"memo index {arg} was never stored")
                stack.append(self.memo[arg])
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                self._new({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name in _VALUE_OPS:
                if type(arg) is int and not _INT_RANGE[0] <= arg < _INT_RANGE[1]:
                    raise self._refuse("the pickle holds an integer wider than 64 bits")
                self._new(arg)
            elif name == "GLOBAL":
                self._push_global(arg)
            elif name == "STACK_GLOBAL":
                attr, module = self._pop(), self._pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise self._refuse("the pickle computes the name of a global")
                self._push_global((module, attr))
            elif name == "EMPTY_DICT":
                self._new({})
            elif name == "EMPTY_LIST":
                self._new([])
            elif name == "EMPTY_TUPLE":
                self._new(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = [self._pop() for _ in range(n)][::-1]
                self._new(tuple(items))
            elif name == "TUPLE":
                self._new(tuple(self._pop_mark()))
            elif name == "LIST":
                self._new(self._pop_mark())
            elif name == "DICT":
                self._new(self._pairs({}, self._pop_mark()))
            elif name == "APPEND":
                value = self._pop()
                self._list(self._top()).append(value)
            elif name == "APPENDS":
                items = self._pop_mark()
                self._list(self._top()).extend(items)
            elif name == "SETITEM":
                value, key = self._pop(), self._pop()
                self._pairs(self._dict(self._top()), [key, value])
            elif name == "SETITEMS":
                items = self._pop_mark()
                self._pairs(self._dict(self._top()), items)
            elif name == "REDUCE":
                args, func = self._pop(), self._pop()
                self._new(self._reduce(func, args))
            elif name == "BUILD":
                state = self._pop()
                self._build(self._top(), state)
            else:
                raise AssertionError(name)
        raise AssertionError("unreachable: _Ops ends with STOP or raises")

    def _push_global(self, names: tuple[str, str]) -> None:
        kind = _GLOBALS.get(names)
        if kind is None:
            raise _global_refused(*names, self.pos)
        self._new(_Global(kind, ".".join(names)))

    def _list(self, target: object) -> list:
        if type(target) is not list:
            raise self._refuse(f"the pickle appends to {_typename(target)}")
        return target

    def _dict(self, target: object) -> dict:
        if type(target) is not dict:
            raise self._refuse(f"the pickle sets items of {_typename(target)}")
        return target

    def _pairs(self, target: dict, items: list[object]) -> dict:
        if len(items) % 2:
            raise self._bad("a dict is given an odd number of keys and values")
        for i in range(0, len(items), 2):
            target[self._key(items[i])] = items[i + 1]
        return target


# ---------------------------------------------------------------- the result

def _leaf(obj: object) -> object:
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, _ArrayPending):
        if obj.array is None:
            raise FormatError("not a readable pickle: a numpy array is never given its data")
        return obj.array
    if isinstance(obj, _DtypePending):
        return obj.fix()
    if isinstance(obj, _Global):
        raise UnsafePickleError(f"the pickle holds {obj.name} itself as a value; refusing it")
    raise AssertionError(type(obj))


def _finish(root: object, max_nodes: int) -> object:
    """Replace arrays under construction by the arrays; refuse cycles, deep nesting, blow-ups.

    Iterative, so a deep file cannot exhaust Python's stack; each container is done once,
    shared ones included.
    """
    if type(root) not in (dict, list, tuple):
        return _leaf(root)
    done: dict[int, tuple[object, int]] = {}  # id -> (finished object, tree size)
    open_ids = {id(root)}
    frames = [[root, list(root.values()) if type(root) is dict else list(root), 0, [], 1]]
    while True:
        frame = frames[-1]
        node, kids, i, out, size = frame
        if i < len(kids):
            frame[2] += 1
            kid = kids[i]
            if type(kid) in (dict, list, tuple):
                if id(kid) in done:
                    value, kid_size = done[id(kid)]
                    out.append(value)
                    frame[4] += kid_size
                elif id(kid) in open_ids:
                    raise UnsafePickleError("the pickle holds a container that contains itself; refusing it")
                elif len(frames) >= MAX_DEPTH:
                    raise UnsafePickleError(f"the pickle nests containers more than {MAX_DEPTH} deep; refusing it")
                else:
                    open_ids.add(id(kid))
                    frames.append([kid, list(kid.values()) if type(kid) is dict else list(kid), 0, [], 1])
                    continue
            else:
                out.append(_leaf(kid))
                frame[4] += 1
            if frame[4] > max_nodes:
                raise UnsafePickleError("the pickle's shared parts add up to a tree much larger than the file "
                                        "(a 'billion laughs'); refusing it")
            continue
        frames.pop()
        open_ids.discard(id(node))
        if type(node) is dict:
            for key, value in zip(list(node), out):
                node[key] = value
            result = node
        elif type(node) is list:
            node[:] = out
            result = node
        else:
            result = tuple(out)
        done[id(node)] = (result, size)
        if not frames:
            return result
        frames[-1][3].append(result)
        frames[-1][4] += size
        if frames[-1][4] > max_nodes:
            raise UnsafePickleError("the pickle's shared parts add up to a tree much larger than the file "
                                    "(a 'billion laughs'); refusing it")


# ---------------------------------------------------------------- entry points

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
    _prescan(data)
    root = _Machine(data, max_objects).run()
    return _finish(root, 2 * len(data) + 10_000)


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
