"""Pickles for the tests: neon's files as Python 2 wrote them, and hand-made hostile ones.

Not a test module: imported by test_update_mean, test_safe_pickle and test_safe_pickle_fuzz (and
fit for the weight importer's tests). The neon layouts follow docs in
shared/reference/WEIGHT_FORMATS.md; every value is small and random.
"""

from __future__ import annotations

import codecs
import io
import pickle
import pickletools
import struct

import numpy as np

# ---------------------------------------------------------------- Python 2 style pickles

class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote: byte and text strings as STRING opcodes, not unicode.

    Protocol 0 uses the text form ``S'...'`` with repr escapes, protocols 1 and 2 the binary
    SHORT_BINSTRING/BINSTRING, as Python 2 did.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if self.proto == 0:
            self.write(b"S'" + codecs.escape_encode(data)[0] + b"'\n")  # escapes ' too
        elif len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=protocol).dump(obj)
    # Python 2's numpy 1.x named its reconstructor numpy.core.multiarray.
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def full_mean_image(values: tuple[float, float, float], size: int = 4) -> np.ndarray:
    """C x H x W float32 image whose channel c averages exactly ``values[c]`` (a +-0.5 checkerboard on top)."""
    checker = np.where((np.add.outer(np.arange(size), np.arange(size)) % 2) == 0, 0.5, -0.5)
    return np.stack([v + checker for v in values]).astype(np.float32)


def neon_cache(size: int = 4) -> dict:
    """An old-format neon cache: full RGB-planar mean with channel means R=10, G=20, B=30."""
    planar = full_mean_image((10.0, 20.0, 30.0), size).reshape(-1, 1)
    return {"img_size": size, "global_mean": planar, "nclass": 2, "label_names": ["cat", "dog"],
            "train_start": 0, "batch_prefix": "macrobatch_"}


# ---------------------------------------------------------------- neon model-zoo weights

def _init(kind: str, **config) -> dict:
    return {"type": f"neon.initializers.initializer.{kind}", "config": dict(config, name=f"{kind}Init")}


def _param_layers(name: str, kind: str, w: np.ndarray, nout: int, rng, transform: str) -> list[dict]:
    """Conv or Affine as neon v1.4 flattens it: the layer, its Bias, its Activation."""
    dtype = w.dtype
    bias = rng.standard_normal((nout, 1)).astype(dtype)
    config = {"name": name, "init": _init("Gaussian", loc=0.0, scale=0.01)}
    if kind == "Convolution":
        config.update(fshape=(3, 3, nout), strides={"str_h": 1, "str_w": 1}, padding={"pad_h": 1, "pad_w": 1},
                      bsum=False)
    else:
        config.update(nout=nout)
    return [
        {"type": f"neon.layers.layer.{kind}", "config": config, "params": {"W": w},
         "states": [np.zeros_like(w)]},
        {"type": "neon.layers.layer.Bias", "config": {"name": f"{name}_bias", "init": _init("Constant", val=0.0)},
         "params": {"W": bias}, "states": [np.zeros_like(bias)]},
        {"type": "neon.layers.layer.Activation",
         "config": {"name": f"{name}_{transform}",
                    "transform": {"type": f"neon.transforms.activation.{transform}",
                                  "config": {"name": transform}}}},
    ]


def neon_weights_layers(seed: int = 0, dtype=np.float32, channels=(4, 6, 6, 6, 4), fc=8, classes=10) -> list[dict]:
    """The 31 flat layer entries of neon's CaffeNet-like AlexNet, at toy sizes (3x3 kernels)."""
    rng = np.random.default_rng(seed)
    layers: list[dict] = []

    def conv(name: str, cin: int, cout: int) -> None:
        w = rng.standard_normal((cin * 3 * 3, cout)).astype(dtype)  # (C*R*S, K)
        layers.extend(_param_layers(name, "Convolution", w, cout, rng, "Rectlin"))

    def affine(name: str, nin: int, nout: int, transform: str = "Rectlin") -> None:
        w = rng.standard_normal((nout, nin)).astype(dtype)  # (nout, nin)
        layers.extend(_param_layers(name, "Linear", w, nout, rng, transform))

    def pool(name: str) -> None:
        layers.append({"type": "neon.layers.layer.Pooling",
                       "config": {"name": name, "fshape": 3, "strides": 2, "op": "max", "padding": 0}})

    def lrn(name: str) -> None:
        layers.append({"type": "neon.layers.layer.LRN",
                       "config": {"name": name, "depth": 5, "ascale": 0.0001, "bpower": 0.75}})

    def dropout(name: str) -> None:
        layers.append({"type": "neon.layers.layer.Dropout", "config": {"name": name, "keep": 0.5}})

    c1, c2, c3, c4, c5 = channels
    conv("conv1", 3, c1), pool("pool1"), lrn("norm1")
    conv("conv2", c1, c2), pool("pool2"), lrn("norm2")
    conv("conv3", c2, c3), conv("conv4", c3, c4), conv("conv5", c4, c5), pool("pool3")
    affine("fc6", c5 * 2 * 2, fc), dropout("drop6")
    affine("fc7", fc, fc), dropout("drop7")
    affine("fc8", fc, classes, "Softmax")
    return layers


def neon_weights_v14(seed: int = 0, dtype=np.float32) -> dict:
    """What neon v1.4.0's ``Model.serialize`` pickled (``save_obj``), at toy sizes."""
    rng_state = np.random.RandomState(seed).get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached)
    return {
        "neon_version": "1.4.0",
        "backend": {"type": "neon.backends.nervanagpu.NervanaGPU", "compat_mode": None, "rng_seed": None,
                    "rng_state": rng_state},
        "cost": {"type": "neon.layers.layer.GeneralizedCost",
                 "config": {"costfunc": {"type": "neon.transforms.cost.CrossEntropyMulti",
                                         "config": {"scale": 1}}}},
        "optimizer": {"type": "neon.optimizers.optimizer.GradientDescentMomentum",
                      "config": {"learning_rate": np.float32(0.01), "momentum_coef": 0.9,
                                 "wdecay": 0.0005, "stochastic_round": False, "num_steps": np.int64(450450)}},
        "model": {"type": "neon.layers.container.Sequential", "container": True,
                  "config": {"name": "Sequential", "layers": neon_weights_layers(seed, dtype)}},
        "epoch_index": 89,
        "train_input_shape": (3, 224, 224),
    }


def neon_weights_pre12(seed: int = 0, dtype=np.float32) -> dict:
    """A pre-v1.2 neon weights file: parameter layers only, as ``layer_params_states``."""
    entries = [layer for layer in neon_weights_layers(seed, dtype) if "params" in layer]
    return {"layer_params_states": [{"params": e["params"]["W"], "states": e["states"]} for e in entries],
            "epoch_index": 89}


# ---------------------------------------------------------------- hostile pickles, by hand

def g(module: str, name: str) -> bytes:
    """GLOBAL module.name"""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(data: str | bytes) -> bytes:
    """A Python 2 str (SHORT_BINSTRING / BINSTRING)."""
    raw = data.encode("latin1") if isinstance(data, str) else data
    return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw


def i(n: int) -> bytes:
    """An int: BININT, or LONG1 past 32 bits."""
    if -(1 << 31) <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    raw = pickle.encode_long(n)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def dct(*pairs: bytes) -> bytes:
    return b"}(" + b"".join(pairs) + b"u"


def buffer(raw: bytes) -> bytes:
    """bytes, as Python 3 writes them at protocol 2 (a Python 2 str loads as text under latin1)."""
    return call(g("_codecs", "encode"), s(raw), s("latin1"))


def dtype(code: str) -> bytes:
    return call(g("numpy", "dtype"), s(code), i(0), i(1))


def body(data: bytes) -> bytes:
    """A pickle without its PROTO header and STOP, to splice into another (it must use no memo)."""
    assert data[:1] == b"\x80" and data[-1:] == b"."
    return data[2:-1]


def array_body(arr: np.ndarray) -> bytes:
    """A numpy array as Python 2 pickled it, memo-free, to splice into a hand-made pickle."""
    out = py2_pickle(arr)
    # Drop the BINPUTs (memo stores) so the pieces can be combined freely; nothing here BINGETs.
    ops = [(op, pos) for op, _, pos in pickletools.genops(out)]
    kept = []
    for (op, pos), (_, nxt) in zip(ops, ops[1:] + [(None, len(out))]):
        if op.name != "BINPUT":
            kept.append(out[pos:nxt])
    return body(b"".join(kept))


PROTO2 = b"\x80\x02"


def valid_cache_with(key: str, value: bytes) -> bytes:
    """A neon cache (valid global_mean) with one more key whose value is the hostile part."""
    gm = array_body(full_mean_image((10.0, 20.0, 30.0)).reshape(-1, 1))
    return PROTO2 + dct(s("img_size"), i(4), s("global_mean"), gm, s(key), value) + b"."


def attack_pickles(sentinel: str) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle, a fragment the refusal must name). Each worked on the old allowlist unpickler.

    ``sentinel``: a path the code-running attacks try to create.
    """
    u1 = dtype("u1")
    return {
        # numpy.ndarray(shape, dtype, buffer, offset): a view 4 KiB before a 16-byte buffer.
        "negative-offset-view": (valid_cache_with("leak", call(g("numpy", "ndarray"), tup(i(4096)), u1,
                                                               buffer(b"\0" * 16), i(-4096))), "numpy.ndarray"),
        # A writable buffer (BYTEARRAY8 under a protocol-2 header), a view before it, SETITEMS into it.
        "bytearray8-write": (valid_cache_with("poke", call(g("numpy", "ndarray"), tup(i(4096)), u1,
                                                           b"\x96" + struct.pack("<Q", 16) + b"\0" * 16, i(-4096))
                                              + b"(" + i(0) + i(0x41) + b"u"), "BYTEARRAY8"),
        # _reconstruct allocates the shape it is given: 8 GiB from a few dozen bytes.
        "8GiB-reconstruct": (PROTO2 + g("numpy.core.multiarray", "_reconstruct") + g("numpy", "ndarray") + i(1 << 33)
                             + b"\x85" + s("b") + b"\x87R.", "_reconstruct"),
        # strides that walk far past a 16-byte buffer.
        "out-of-bounds-strides": (valid_cache_with("leak", call(g("numpy", "ndarray"), tup(i(16)), u1,
                                                                buffer(b"\0" * 16), i(0), tup(i(1 << 20)))),
                                  "numpy.ndarray"),
        # BUILD on the allowed _codecs.encode: changes that function for the rest of the process.
        "build-on-codecs-encode": (PROTO2 + g("_codecs", "encode") + tup(b"N", dct(s("__defaults__"), tup(s("utf-16"))))
                                   + b"b0" + dct(s("img_size"), i(4)) + b".", "_codecs.encode"),
        "os.system": (b"cos\nsystem\n(S'touch " + sentinel.encode() + b"'\ntR.", "os.system"),
        "eval": (b"c__builtin__\neval\n(S'open(" + repr(sentinel).encode() + b", \"w\")'\ntR.", "__builtin__.eval"),
        "global-not-allowed": (PROTO2 + dct(s("img_size"), i(4), s("x"), g("collections", "OrderedDict") + b")R")
                               + b".", "collections.OrderedDict"),
    }
