"""Trained-weight files of the other tools, written the way they write them: neon's v1.4 pickle
layout, Caffe's NetParameter (V1 and new layer forms), torchvision's AlexNet state_dict. The
arrays are random (at full AlexNet size; fc8 has ``classes`` outputs); the layouts are each tool's."""

from __future__ import annotations

import numpy as np
import torch

CLASSES = 10  # fc8's outputs: any count works, and 10 keeps the files smaller


def randn(rng, shape, fan_in: int, dtype=np.float32) -> np.ndarray:
    """Weights scaled so activations stay O(1) through eight layers."""
    return (rng.standard_normal(shape, dtype=np.float32) * (2.0 / fan_in) ** 0.5).astype(dtype)


NEON_CONVS = [("conv1", 3, 11, 96, 4, 0), ("conv2", 96, 5, 256, 1, 2), ("conv3", 256, 3, 384, 1, 1),
              ("conv4", 384, 3, 384, 1, 1), ("conv5", 384, 3, 256, 1, 1)]
NEON_FCS = [("fc6", 6400, 4096), ("fc7", 4096, 4096), ("fc8", 4096, CLASSES)]
KEEP6, KEEP7 = 0.5, 0.8  # unequal, so a test sees which dropout scales which layer


def neon_arrays(seed=0, dtype=np.float16, classes=CLASSES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """neon's layouts at full AlexNet size: conv (C*R*S, K), linear (nout, nin), bias (nout, 1).
    float16, as neon -d f16 saved them, halving the file."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, c, r, k, _, _ in NEON_CONVS:
        out[name] = (randn(rng, (c * r * r, k), c * r * r, dtype), (0.1 * rng.standard_normal((k, 1))).astype(dtype))
    for name, nin, nout in NEON_FCS:
        nout = classes if name == "fc8" else nout
        out[name] = (randn(rng, (nout, nin), nin, dtype), (0.1 * rng.standard_normal((nout, 1))).astype(dtype))
    return out


def neon_v14(arrays) -> dict:
    """v1.4's flat layer list (31 entries) around the arrays, as Model.serialize wrote it."""
    def param(kind, name, w, b, act):
        return [{"type": f"neon.layers.layer.{kind}", "config": {"name": name}, "params": {"W": w}},
                {"type": "neon.layers.layer.Bias", "config": {"name": f"{name}_bias"}, "params": {"W": b}},
                {"type": "neon.layers.layer.Activation", "config": {"name": f"{name}_{act}"}}]

    def other(kind, name, **config):
        return [{"type": f"neon.layers.layer.{kind}", "config": {"name": name, **config}}]

    layers = []
    for name, *_ in NEON_CONVS:
        layers += param("Convolution", name, *arrays[name], "Rectlin")
        if name in ("conv1", "conv2"):
            layers += other("Pooling", f"pool{name[-1]}") + other("LRN", f"norm{name[-1]}", depth=5)
    layers += other("Pooling", "pool3")
    layers += param("Linear", "fc6", *arrays["fc6"], "Rectlin") + other("Dropout", "drop6", keep=KEEP6)
    layers += param("Linear", "fc7", *arrays["fc7"], "Rectlin") + other("Dropout", "drop7", keep=KEEP7)
    layers += param("Linear", "fc8", *arrays["fc8"], "Softmax")
    assert len(layers) == 31
    return {"neon_version": "1.4.0", "backend": {"type": "neon.backends.nervanagpu.NervanaGPU"},
            "model": {"type": "neon.layers.container.Sequential", "container": True,
                      "config": {"name": "Sequential", "layers": layers}},
            "epoch_index": 89}


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def fld(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: an int as a varint, bytes as length-delimited."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def blob(arr: np.ndarray, legacy: bool) -> bytes:
    """A BlobProto: legacy num/channels/height/width (4-D, padded with 1s) or shape, packed floats."""
    if legacy:
        dims = (1,) * (4 - arr.ndim) + arr.shape
        head = b"".join(fld(i + 1, d) for i, d in enumerate(dims))
    else:
        head = fld(7, fld(1, b"".join(varint(d) for d in arr.shape)))
    return b"".join([head, fld(5, arr.astype("<f4").tobytes())])


V1_TYPE = {"Data": 5, "Convolution": 4, "ReLU": 18, "Pooling": 17, "LRN": 15, "InnerProduct": 14,
           "Dropout": 6, "SoftmaxWithLoss": 21}


def caffemodel(layers: list[tuple[str, str, list[np.ndarray]]], form: str) -> bytes:
    """A NetParameter: V1 ``layers`` (field 2) with legacy dims, or ``layer`` (100) with shape dims."""
    parts = [fld(1, b"CaffeNet")]
    for name, kind, blobs in layers:
        if form == "v1":
            head = fld(4, name.encode()) + fld(5, V1_TYPE[kind])
            parts.append(fld(2, b"".join([head, *(fld(6, blob(b, True)) for b in blobs)])))
        else:
            head = fld(1, name.encode()) + fld(2, kind.encode())
            parts.append(fld(100, b"".join([head, *(fld(7, blob(b, False)) for b in blobs)])))
    return b"".join(parts)


CAFFE_CONVS = [("conv1", (96, 3, 11, 11), 4, 0, 1), ("conv2", (256, 48, 5, 5), 1, 2, 2),
               ("conv3", (384, 256, 3, 3), 1, 1, 1), ("conv4", (384, 192, 3, 3), 1, 1, 2),
               ("conv5", (256, 192, 3, 3), 1, 1, 2)]


def caffenet_weights(seed=0, classes=CLASSES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, *_ in CAFFE_CONVS:
        out[name] = (randn(rng, shape, int(np.prod(shape[1:]))), 0.1 * rng.standard_normal(shape[0]).astype(np.float32))
    for name, nin, nout in (("fc6", 9216, 4096), ("fc7", 4096, 4096), ("fc8", 4096, classes)):
        out[name] = (randn(rng, (nout, nin), nin), 0.1 * rng.standard_normal(nout).astype(np.float32))
    return out


def caffenet_layers(w) -> list:
    layers = [("data", "Data", [])]
    for name, *_ in CAFFE_CONVS:
        n = name[-1]
        layers += [(name, "Convolution", list(w[name])), (f"relu{n}", "ReLU", [])]
        if n in "12":
            layers += [(f"pool{n}", "Pooling", []), (f"norm{n}", "LRN", [])]
    layers += [("pool5", "Pooling", [])]
    for name in ("fc6", "fc7", "fc8"):
        layers += [(name, "InnerProduct", list(w[name]))]
        if name != "fc8":
            layers += [(f"relu{name[-1]}", "ReLU", []), (f"drop{name[-1]}", "Dropout", [])]
    return layers + [("loss", "SoftmaxWithLoss", [])]


TV_SHAPES = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5), "features.6": (384, 192, 3, 3),
             "features.8": (256, 384, 3, 3), "features.10": (256, 256, 3, 3), "classifier.1": (4096, 9216),
             "classifier.4": (4096, 4096), "classifier.6": (CLASSES, 4096)}


def tv_state_dict(seed=0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in TV_SHAPES.items():
        sd[f"{key}.weight"] = torch.from_numpy(randn(rng, shape, int(np.prod(shape[1:]))))
        sd[f"{key}.bias"] = torch.from_numpy(0.01 * rng.standard_normal(shape[0]).astype(np.float32))
    return sd
