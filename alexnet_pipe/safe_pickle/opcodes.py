"""The pickle's wire format, read only: which opcodes are allowed and which are refused, ``OpReader``,
which decodes one opcode and its argument at a time and builds nothing, and ``prescan``, which checks
every opcode and every global the file names before anything is built (see the package docstring).
"""

from __future__ import annotations

import codecs
import re
import struct
import warnings
from collections.abc import Iterator

from alexnet_pipe.errors import FormatError, UnsafePickleError
from alexnet_pipe.safe_pickle.constructors import GLOBALS

_LINE_MAX = 256  # text-protocol numbers and global names

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
STR_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
VALUE_OPS = STR_OPS | {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                         "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
GET_OPS = {"GET", "BINGET", "LONG_BINGET"}

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.]{1,200}")


def global_refused(module: str, name: str, pos: int) -> UnsafePickleError:
    # Names come from the file: anything but a plain dotted name is shown escaped (no newlines,
    # no terminal control codes in the one-line message).
    shown = f"{module}.{name}" if _PLAIN_NAME.fullmatch(f"{module}.{name}") else ascii(f"{module[:80]}.{name[:80]}")
    return UnsafePickleError(
        f"the pickle asks for {shown} (at byte {pos}), which is not part of a numpy array; refusing "
        "to load it (only numbers, strings, lists, dicts and numeric numpy arrays are allowed)")


def _truncated(what: str, pos: int) -> FormatError:
    return FormatError(f"not a readable pickle: {what} at byte {pos} runs past the end of the file")


class OpReader:
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


def prescan(data: bytes) -> None:
    """Check every opcode and every global named before building anything.

    STACK_GLOBAL takes its names from the stack; Python writes them as the two strings pushed
    (or fetched from the memo) just before it, and only that form is accepted.
    """
    memo: dict[int, str | None] = {}  # the memo's keys, with the strings it holds
    recent: list[str | None] = []  # values pushed since the last other opcode (None: not a string)
    for name, arg, pos in OpReader(data, scan=True):
        if name == "PROTO" and not 0 <= arg <= 5:
            raise FormatError(f"not a readable pickle: protocol {arg} at byte {pos} (expected 0 to 5)")
        if name == "GLOBAL":
            if arg not in GLOBALS:
                raise global_refused(*arg, pos)
            recent = [None]
        elif name == "STACK_GLOBAL":
            names = tuple(recent[-2:])
            if len(names) < 2 or None in names:
                raise UnsafePickleError(f"the pickle computes the name of a global (STACK_GLOBAL at byte {pos}); "
                                        "refusing it (only numpy's own pickles are allowed)")
            if names not in GLOBALS:
                raise global_refused(*names, pos)
            recent = [None]
        elif name in STR_OPS:
            recent.append(arg)
        elif name in GET_OPS:
            recent.append(memo.get(arg))
        elif name in PUT_OPS:
            memo[len(memo) if name == "MEMOIZE" else arg] = recent[-1] if recent else None
        elif name != "FRAME":
            recent = [None] if name not in ("POP", "POP_MARK", "MARK", "STOP") else []
        del recent[:-2]
