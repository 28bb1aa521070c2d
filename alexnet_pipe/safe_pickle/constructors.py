"""The allowed-constructor table: the only globals a pickle may name (``GLOBALS``: what numpy arrays,
scalars and dtypes and Python 3's bytes need), the values that stand for them while the machine
runs (``Global``, never called; ``DtypePending``; ``ArrayPending``), and ``ConstructorCalls``, what
REDUCE and BUILD may do with each: the argument checks, and every numpy array made here from the
file's bytes once dtype, shape and length check out (see the package docstring).
"""

from __future__ import annotations

import re

import numpy as np

MAX_NDIM = 32
_DTYPE_CODE = re.compile(r"(b1|[iu][1248]|f[248])")
_DTYPE_KINDS = {"O": "object (Python objects)", "V": "void (structured)", "S": "bytes", "a": "bytes",
                "U": "str", "M": "datetime64", "m": "timedelta64", "c": "complex"}

# The only globals a pickle may name: what numpy arrays, scalars and Python 3's bytes need.
GLOBALS = {
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


class Global:
    """A global the file named; only ever an argument check, never called."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name


class DtypePending:
    """``numpy.dtype(code)`` whose byte order BUILD may still set; fixed once used."""

    __slots__ = ("code", "order", "dtype")

    def __init__(self, code: str):
        self.code, self.order, self.dtype = code, "=", None

    def fix(self) -> np.dtype:
        if self.dtype is None:
            dt = np.dtype(self.code)
            self.dtype = dt.newbyteorder(self.order) if self.order in "<>" and dt.itemsize > 1 else dt
        return self.dtype


class ArrayPending:
    """An array from ``_reconstruct``, until BUILD gives it dtype, shape and data."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None


ATOMS = (str, bytes, int, float, bool, type(None), np.generic)


def typename(obj: object) -> str:
    """What ``obj`` is, in words: "numpy.dtype" (a global), "a numpy array", "a value of type str"."""
    if isinstance(obj, Global):
        return obj.name
    if isinstance(obj, ArrayPending):
        return "a numpy array"
    if isinstance(obj, DtypePending):
        return "a numpy dtype"
    return f"a value of type {type(obj).__name__}"


class ConstructorCalls:
    """REDUCE and BUILD on the allowed globals: a base class of ``machine.Machine``, whose ``data``,
    ``_bad``, ``_refuse`` and ``_alloc`` (the error messages and the memory budget) these use."""

    def _raw_bytes(self, raw: object, what: str) -> bytes:
        if isinstance(raw, bytes):
            return raw
        if isinstance(raw, str):  # Python 2 str, read as latin-1 text
            self._alloc(len(raw))
            try:
                return raw.encode("latin1")
            except UnicodeEncodeError:
                raise self._bad(f"{what} is text, not bytes") from None
        raise self._refuse(f"{what} is {typename(raw)}, not bytes (an object array?)")

    def _dtype(self, obj: object) -> np.dtype:
        if not isinstance(obj, DtypePending):
            raise self._refuse(f"a numpy dtype is given as {typename(obj)}")
        return obj.fix()

    def _reduce(self, func: object, args: object) -> object:
        if not isinstance(func, Global):
            raise self._refuse(f"the pickle calls {typename(func)}")
        if type(args) is not tuple:
            raise self._bad(f"the arguments of {func.name} are not a tuple")
        kind = func.kind
        if kind == "reconstruct":
            if (len(args) != 3 or not (isinstance(args[0], Global) and args[0].kind == "ndarray")
                    or args[1] != (0,) or args[2] not in (b"b", "b")):
                raise self._refuse(f"{func.name} is called with other arguments than numpy's own "
                                   "(ndarray, (0,), b'b')")
            return ArrayPending()
        if kind == "dtype":
            if len(args) != 3 or not isinstance(args[0], str) or args[1] not in (0, False) or args[2] not in (0, 1):
                raise self._refuse("numpy.dtype is called with other arguments than numpy's own (code, False, True)")
            code = args[0]
            if not _DTYPE_CODE.fullmatch(code):
                name = _DTYPE_KINDS.get(code[:1], repr(code[:20]))
                raise self._refuse(f"the pickle holds a numpy array of dtype {name}; only bool, int, uint and "
                                   "float arrays are allowed")
            return DtypePending(code)
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
        if isinstance(target, DtypePending):
            self._build_dtype(target, state)
        elif isinstance(target, ArrayPending):
            self._build_array(target, state)
        else:
            raise self._refuse(f"the pickle sets the state (BUILD) of {typename(target)}")

    def _build_dtype(self, target: DtypePending, state: object) -> None:
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

    def _build_array(self, target: ArrayPending, state: object) -> None:
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
