"""The safe unpickler: same result as pickle.load on plain data, refusal of everything else."""

from __future__ import annotations

import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from alexnet_pipe.errors import AlexnetPipeError, FormatError, UnsafePickleError
from alexnet_pipe.safe_pickle import MAX_DEPTH, load_file, loads
from tests.helpers.pickle_samples import (
    PROTO2,
    array_body,
    attack_pickles,
    buffer,
    call,
    dct,
    dtype,
    g,
    i,
    neon_cache,
    neon_weights_pre12,
    neon_weights_v14,
    py2_pickle,
    s,
    tup,
)


def same(a, b) -> bool:
    """Deep equality that compares arrays by dtype, shape, layout and bytes, and keeps types."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.flags.f_contiguous == b.flags.f_contiguous and a.tobytes("A") == b.tobytes("A"))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN


def every_kind() -> dict:
    """Each value kind the loader accepts."""
    rng = np.random.default_rng(1)
    arrays = {code: rng.integers(0, 100, (2, 3)).astype(code)
              for code in ("?", "i1", "<i2", ">i4", "<i8", "u1", ">u2", "<u4", "<u8", "<f2", ">f4", "<f8")}
    return {
        "arrays": arrays,
        "fortran": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32)),
        "zero-d": np.array(7.5), "empty": np.zeros((0, 5), np.uint16),
        "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(200), np.float16(0.25)],
        "dtype": np.dtype(">f8"),
        "plain": [None, True, False, 0, -1, 255, 65536, -(2 ** 63), 2 ** 64 - 1, 1.5, float("inf"), float("nan"),
                  "text", "ünïcode", b"", b"\x00\xffbytes", (), (1, (2, "x")), [], {}],
        ("tuple", 1): {1: "int key", 2.5: "float key", None: "none key"},
    }


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4])
def test_python3_pickles_load_as_pickle_loads_them(protocol):
    data = pickle.dumps(every_kind(), protocol=protocol)
    out = loads(data)
    assert same(out, pickle.loads(data))
    arr = out["arrays"][">i4"]
    assert arr.flags.writeable and arr.flags.owndata  # our own copy, never a view into the file


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_python2_pickles_load_as_with_latin1(protocol):
    data = py2_pickle(every_kind(), protocol)
    assert same(loads(data), pickle.loads(data, encoding="latin1"))


@pytest.mark.parametrize("make", [neon_weights_v14, neon_weights_pre12, neon_cache])
@pytest.mark.parametrize("protocol", [0, 2])
def test_neon_pickles_load(make, protocol):
    data = py2_pickle(make(), protocol)
    assert same(loads(data), pickle.loads(data, encoding="latin1"))


def test_neon_v14_weights_layout():
    out = loads(py2_pickle(neon_weights_v14(dtype=np.float16)))
    layers = out["model"]["config"]["layers"]
    assert len(layers) == 31 and out["neon_version"] == "1.4.0"
    conv1, bias1 = layers[0], layers[1]
    assert conv1["type"] == "neon.layers.layer.Convolution" and conv1["params"]["W"].shape == (3 * 3 * 3, 4)
    assert conv1["params"]["W"].dtype == np.float16 and conv1["states"][0].shape == (27, 4)
    assert bias1["config"]["name"] == "conv1_bias" and bias1["params"]["W"].shape == (4, 1)
    assert layers[-3]["params"]["W"].shape == (10, 8)  # fc8: (nout, nin)
    rng_state = out["backend"]["rng_state"]
    assert rng_state[0] == "MT19937" and rng_state[1].dtype == np.uint32 and rng_state[1].shape == (624,)
    assert type(out["optimizer"]["config"]["learning_rate"]) is np.float32


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("name", list(attack_pickles("/nonexistent/SENTINEL")))
def test_crafted_attacks_are_refused(name):
    data, fragment = attack_pickles("/nonexistent/SENTINEL")[name]
    with pytest.raises(UnsafePickleError) as caught:
        loads(data)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def evil(func, *args):
    class Evil:
        def __reduce__(self):
            return func, args
    return Evil()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_code_running_globals_are_refused(protocol):
    import os
    with pytest.raises(UnsafePickleError, match=r"(os|posix)\.system"):
        loads(pickle.dumps({"x": evil(os.system, "true")}, protocol=protocol))


@pytest.mark.parametrize("obj, message", [
    (np.zeros(2, np.complex64), "dtype complex"),
    (np.array(["a"], dtype=object), "dtype object"),
    (np.zeros(2, [("a", "f4")]), "dtype void"),
    (np.zeros(2, "U3"), "dtype str"),
    (np.zeros(2, "S3"), "dtype bytes"),
    (np.zeros(2, "M8[s]"), "dtype datetime64"),
    (np.zeros((2, 2), "f16") if hasattr(np, "float128") else np.zeros(2, "c16"), "dtype"),
    ({1, 2}, "EMPTY_SET"),
    (frozenset([1]), "FROZENSET"),
    (2 ** 64, "wider than 64 bits"),
    (-(2 ** 63) - 1, "wider than 64 bits"),
], ids=["complex", "object", "structured", "str", "bytes", "datetime", "longdouble", "set", "frozenset",
        "int-too-big", "int-too-small"])
def test_other_types_are_refused(obj, message):
    with pytest.raises(UnsafePickleError, match=message):
        loads(pickle.dumps(obj, protocol=4))


def test_protocol5_buffers_are_refused_with_advice():
    data = pickle.dumps(np.arange(4), protocol=5)  # in-band: BYTEARRAY8
    with pytest.raises(UnsafePickleError, match="_frombuffer|BYTEARRAY8"):
        loads(data)
    for code, name in ((b"\x96" + struct.pack("<Q", 2) + b"ab", "BYTEARRAY8"), (b"\x97", "NEXT_BUFFER"),
                       (b"\x98", "READONLY_BUFFER")):
        with pytest.raises(UnsafePickleError, match=f"{name}.*protocol 4 or lower"):
            loads(PROTO2 + b"N" + code + b".")


def with_array_then(tail: bytes, size: int) -> bytes:
    """A big valid array, then ``tail``: a refused opcode must stop the load before the array is made."""
    return PROTO2 + b"(" + array_body(np.zeros(size, np.uint8)) + tail + b"l."


@pytest.mark.parametrize("tail, error", [
    (g("os", "system"), UnsafePickleError),
    (b"\x96" + struct.pack("<Q", 1) + b"x", UnsafePickleError),
    (b"\xff", FormatError),
], ids=["global", "buffer-opcode", "unknown-opcode"])
def test_refused_before_anything_is_built(tail, error):
    size = 20 << 20
    data = with_array_then(tail, size)
    tracemalloc.start()
    try:
        with pytest.raises(error):
            loads(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size // 2, f"{peak:,} bytes allocated: the array was built before the refusal"


def test_the_same_data_in_many_arrays_is_capped():
    """One 1 MiB buffer in the memo, then 100 arrays that each copy it: 100 MiB from a 1 MiB file."""
    raw = b"\0" * (1 << 20)
    first = (g("numpy.core.multiarray", "_reconstruct") + tup(g("numpy", "ndarray"), tup(i(0)), buffer(b"b")) + b"R"
             + tup(i(1), tup(i(len(raw))), dtype("u1"), b"\x89", s(raw) + b"q\x01") + b"b")
    again = (g("numpy.core.multiarray", "_reconstruct") + tup(g("numpy", "ndarray"), tup(i(0)), buffer(b"b")) + b"R"
             + tup(i(1), tup(i(len(raw))), dtype("u1"), b"\x89", b"h\x01") + b"b")
    data = PROTO2 + b"(" + first + again * 100 + b"l."
    assert len(loads(PROTO2 + b"(" + first + again + b"l.")) == 2  # a second copy is fine
    with pytest.raises(UnsafePickleError, match="more memory than 4x its size"):
        loads(data)


def test_billion_laughs_is_refused():
    # Each list holds the previous one twice: 2**60 leaves from a few hundred bytes.
    data = PROTO2 + b"]q\x000" + b"".join(b"(h%ch%clq%c0" % (k, k, k + 1) for k in range(60)) + b"h<."
    with pytest.raises(UnsafePickleError, match="billion laughs"):
        loads(data)
    shared = [1, 2, 3]
    assert loads(pickle.dumps([shared] * 5, protocol=2)) == [[1, 2, 3]] * 5  # a little sharing is fine


def test_deep_nesting_and_cycles_are_refused():
    with pytest.raises(UnsafePickleError, match=f"more than {MAX_DEPTH} deep"):
        loads(PROTO2 + b"N" + b"\x85" * 100_000 + b".")  # 100,000 nested tuples
    assert loads(PROTO2 + b"N" + b"\x85" * (MAX_DEPTH - 1) + b".") is not None
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(UnsafePickleError, match="contains itself"):
        loads(pickle.dumps(cycle, protocol=2))
    a: dict = {}
    a["t"] = ([a],)
    with pytest.raises(UnsafePickleError, match="contains itself"):
        loads(pickle.dumps(a, protocol=2))


def test_object_count_is_capped():
    data = pickle.dumps(list(range(1000)), protocol=2)
    assert len(loads(data, max_objects=2000)) == 1000
    with pytest.raises(UnsafePickleError, match="more objects"):
        loads(data, max_objects=500)


@pytest.mark.parametrize("data, message", [
    (PROTO2 + b"}(" + b"]" + i(1) + b"u.", "dict key is a value of type list"),
    (PROTO2 + b"}" + g("numpy", "dtype") + i(1) + b"s.", "dict key is numpy.dtype"),
    (PROTO2 + i(1) + i(2) + b"a.", "appends to a value of type int"),
    (PROTO2 + b")" + b"(" + i(1) + i(2) + b"u.", "sets items of a value of type tuple"),
    (PROTO2 + b"}" + dct() + b"b.", "sets the state \\(BUILD\\) of a value of type dict"),
    (PROTO2 + dct(s("x"), g("numpy", "ndarray")) + b".", "numpy.ndarray itself as a value"),
    (PROTO2 + b"(" + s("numpy") + b")0" + s("dtype") + b"\x93.", "computes the name of a global"),
    (PROTO2 + call(g("numpy", "dtype"), s("f4"), i(0), i(1)) + tup(i(3), s("<"), b"N", b"N", b"N", i(-1), i(-1), i(0))
     + b"b" + tup(i(3), s(">"), b"N", b"N", b"N", i(-1), i(-1), i(0)) + b"b.", "after using it"),
    (PROTO2 + call(g("numpy", "dtype"), s("V8"), i(0), i(1)) + b".", "dtype void"),
    (PROTO2 + call(g("numpy", "dtype"), s("f4"), i(0), i(1)) + tup(i(3), s("|"), b"N", tup(s("a")), b"N", i(-1),
                                                                    i(-1), i(0)) + b"b.", "fields, subarrays"),
    (PROTO2 + call(g("numpy.core.multiarray", "scalar"), dtype("O8"), s("x")) + b".", "dtype object"),
    (PROTO2 + call(g("_codecs", "encode"), s("x"), s("utf-16")) + b".", "latin-1 text"),
    (PROTO2 + call(g("__builtin__", "bytes"), i(1 << 30)) + b".", "bytes with 1 arguments"),
], ids=["list-key", "global-key", "append-to-int", "setitems-on-tuple", "build-on-dict", "bare-global",
        "computed-global-name", "dtype-changed-after-use", "void-dtype", "dtype-with-fields", "object-scalar",
        "encode-utf16", "bytes-of-size"])
def test_misuse_is_refused(data, message):
    with pytest.raises(UnsafePickleError, match=message):
        loads(data)


def array_state(shape: bytes, raw: bytes, code: str = "f4") -> bytes:
    return (PROTO2 + g("numpy.core.multiarray", "_reconstruct") + tup(g("numpy", "ndarray"), tup(i(0)), s("b"))
            + b"R" + tup(i(1), shape, dtype(code), b"\x89", buffer(raw)) + b"b.")


@pytest.mark.parametrize("data, message", [
    (array_state(tup(i(2), i(3)), b"\0" * 23), r"needs 24 bytes of data but holds 23"),
    (array_state(tup(i(2), i(3)), b"\0" * 25), r"needs 24 bytes of data but holds 25"),
    (array_state(tup(i(1 << 40)), b"\0" * 4), "shape is not a short tuple"),
    (array_state(tup(i(-1)), b""), "shape is not a short tuple"),
    (array_state(tup(*[i(1)] * 40), b"\0" * 4), "shape is not a short tuple"),
    (PROTO2 + g("numpy.core.multiarray", "_reconstruct") + tup(g("numpy", "ndarray"), tup(i(0)), s("b")) + b"R.",
     "never given its data"),
], ids=["short-data", "long-data", "huge-shape", "negative-dim", "too-many-dims", "never-built"])
def test_array_state_is_checked(data, message):
    assert array_state(tup(i(2), i(3)), b"\0" * 24)  # the well-formed one loads (below)
    assert loads(array_state(tup(i(2), i(3)), b"\0" * 24)).shape == (2, 3)
    with pytest.raises(FormatError, match=message):
        loads(data)


def test_refused_names_are_shown_escaped_on_one_line():
    data = PROTO2 + b"\x8c\x04os\n\x1b\x8c\x06system\x93."  # a newline and an ESC in the module name
    with pytest.raises(UnsafePickleError) as caught:
        loads(data)
    assert "'os\\n\\x1b.system'" in str(caught.value) and "\n" not in str(caught.value)


def test_every_truncation_is_a_format_error():
    data = py2_pickle(neon_cache())
    for cut in range(len(data)):
        with pytest.raises(FormatError, match="not a readable pickle") as caught:
            loads(data[:cut])
        assert "\n" not in str(caught.value)


def test_load_file_caps_the_size(tmp_path):
    path = tmp_path / "alexnet.p"
    path.write_bytes(py2_pickle(neon_weights_pre12()))
    assert len(load_file(path, 1 << 20)["layer_params_states"]) == 16
    with pytest.raises(FormatError, match="more than the 1,000 allowed"):
        load_file(path, 1000)
    path.write_bytes(b"garbage")
    with pytest.raises(AlexnetPipeError, match="alexnet.p: not a readable pickle"):
        load_file(path, 1 << 20)
