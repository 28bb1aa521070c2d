"""Caffe ``.caffemodel`` (a serialized NetParameter) read without a compiled caffe.proto.

Field numbers (shared/reference/WEIGHT_FORMATS.md): NetParameter ``layers`` = 2 (V1, legacy)
and ``layer`` = 100; V1LayerParameter ``name`` = 4, ``type`` = 5 (enum), ``blobs`` = 6;
LayerParameter ``name`` = 1, ``type`` = 2 (string), ``blobs`` = 7. Blobs are BlobProtos
(``blobproto.decode_blobproto``: legacy num/channels/height/width or ``shape``).

Layers are matched by name (conv1..conv5, fc6..fc8). CaffeNet's grouped conv2, conv4 and conv5
become block-diagonal ungrouped weights: output slice g sees only input slice g, zeros elsewhere,
so the ungrouped network computes exactly what the grouped one did.

A caffemodel is not trusted: the layer count, the blobs per layer and the fields read outside
blobs are capped (a 3-byte empty layer must not cost a Python object graph), blobs are decoded only
for the layers ``convert`` uses, and names from the file reach messages escaped, shortened and few.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from alexnet_pipe.errors import FormatError
from alexnet_pipe.formats import protobuf as pb
from alexnet_pipe.formats.blobproto import decode_blobproto
from alexnet_pipe.model.alexnet import AlexNetConfig
from alexnet_pipe.model.weights.common import SHORT_SIDE, Imported, check_numeric, expect_shape, tensor

# (name, K, C, R=S) of the ungrouped CaffeNet at crop 227
_CONVS = (("conv1", 96, 3, 11), ("conv2", 256, 96, 5), ("conv3", 384, 256, 3), ("conv4", 384, 384, 3),
          ("conv5", 256, 384, 3))
_FCS = (("fc6", 4096, 256 * 6 * 6), ("fc7", 4096, 4096))
# ImageNet's mean (Caffe's ilsvrc_2012_mean.npy averaged per channel), B 104.0, G 116.7, R 122.7
MEAN_RGB = (122.67891434, 116.66876762, 104.00698793)
_V1_TYPES = {4: "Convolution", 5: "Data", 6: "Dropout", 14: "InnerProduct", 15: "LRN", 17: "Pooling", 18: "ReLU",
             21: "SoftmaxWithLoss", 20: "Softmax"}


# CaffeNet's NetParameter has 25 layers and bvlc_alexnet's 24; the largest published Caffe nets
# (ResNet-152 with its BatchNorm and Scale layers) have about a thousand. 10,000 is far above any
# real net, and caps what a file of 3-byte empty layers can cost (3 million of them in 9 MB took
# 1.15 GB and 13 s as objects) at a few MB before it is refused.
MAX_LAYERS = 10_000
# Caffe's layers hold at most 3 blobs (BatchNorm: mean, variance, scale factor; most: weight, bias).
MAX_BLOBS = 16
# Fields read outside the blobs (the net's and each layer's own: names, tops, params): CaffeNet has
# about 300. Each costs about a microsecond in Python, so this bounds the time a file of tiny
# unknown fields can take (about a second) without ever coming near a real net.
MAX_FIELDS = 1_000_000
_NAME_CHARS, _SHOWN_NAMES = 60, 8  # names from the file in a message: each at most 60 chars, 8 of them


def _shown(name: str) -> str:
    """A name from the file for a message: escaped (it may hold control characters) and at most 60 chars."""
    text = repr(name[:_NAME_CHARS + 1])
    return text if len(text) <= _NAME_CHARS + 2 else text[:_NAME_CHARS] + "..."


def _some(names: list[str]) -> str:
    """The first few names, escaped: "'a', 'b' ... and 3 more"."""
    shown = ", ".join(_shown(n) for n in names[:_SHOWN_NAMES])
    return shown + (f" ... and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


@dataclass
class CaffeLayer:
    """A layer's name and type, and its blobs still as bytes: decoded on use, as most layers are not used."""

    name: str
    type: str
    raw_blobs: list[memoryview] = field(default_factory=list)

    @property
    def blobs(self) -> list[np.ndarray]:
        """The blobs decoded (each call decodes them again)."""
        out = []
        for i, raw in enumerate(self.raw_blobs):
            try:
                out.append(decode_blobproto(raw))
            except FormatError as exc:
                raise FormatError(f"layer {_shown(self.name)}, blob {i}: {exc}") from None
        return out


class _FieldBudget:
    """``pb.iter_fields`` that stops with one line once ``MAX_FIELDS`` fields have been read, all messages together."""

    def __init__(self) -> None:
        self.left = MAX_FIELDS

    def fields(self, buf: bytes | memoryview) -> Iterator[tuple[int, int, object]]:
        for item in pb.iter_fields(buf):
            self.left -= 1
            if self.left < 0:
                raise FormatError(f"the caffemodel has more than {MAX_FIELDS:,} fields outside its weight blobs "
                                  "(CaffeNet has about 300): damaged or not a caffemodel")
            yield item


def _text(value: memoryview, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not UTF-8 text; not a caffemodel") from None


def _layer(buf: memoryview, v1: bool, index: int, budget: _FieldBudget) -> CaffeLayer:
    name_field, type_field, blob_field = (4, 5, 6) if v1 else (1, 2, 7)
    layer = CaffeLayer(name=f"#{index}", type="")
    for number, wire, value in budget.fields(buf):
        if number == name_field and wire == pb.LENGTH:
            layer.name = _text(value, f"layer {index}'s name")
        elif number == type_field:
            if v1 and wire == pb.VARINT:
                layer.type = _V1_TYPES.get(value, f"V1 type {value}")
            elif not v1 and wire == pb.LENGTH:
                layer.type = _text(value, f"layer {index}'s type")
        elif number == blob_field and wire == pb.LENGTH:
            if len(layer.raw_blobs) == MAX_BLOBS:
                raise FormatError(f"layer {index} ({_shown(layer.name)}) holds more than {MAX_BLOBS} blobs "
                                  "(Caffe's layers hold at most 3): damaged or not a caffemodel")
            layer.raw_blobs.append(value)
        elif v1 and number == 1 and wire == pb.LENGTH:
            raise FormatError("the caffemodel is in Caffe's V0 format (layers inside 'layer' connections); "
                              "upgrade it with Caffe's upgrade_net_proto_binary first")
    return layer


def read_layers(data: bytes | memoryview) -> tuple[str, list[CaffeLayer]]:
    """Every layer of a NetParameter, in file order, V1 (``layers``) and new (``layer``) alike.

    Returns:
        the net's name and its layers, their blobs still bytes (``CaffeLayer.blobs`` decodes them).
    Raises:
        FormatError: truncated or not a NetParameter, or over a cap (``MAX_LAYERS``, ``MAX_BLOBS``,
        ``MAX_FIELDS``); the count cap stops the read at the first layer past it.
    """
    name, layers, budget = "", [], _FieldBudget()
    try:
        for number, wire, value in budget.fields(data):
            if number == 1 and wire == pb.LENGTH:
                name = _text(value, "the net's name")
            elif number in (2, 100) and wire == pb.LENGTH:
                if len(layers) == MAX_LAYERS:
                    raise FormatError(f"the caffemodel has more than {MAX_LAYERS:,} layers (CaffeNet has 25, the "
                                      "largest published nets about a thousand): damaged or not a caffemodel")
                layers.append(_layer(value, number == 2, len(layers), budget))
    except FormatError as exc:
        msg = str(exc)
        if msg.startswith("protobuf:"):
            msg = f"not a complete caffemodel ({msg}); the file is truncated or damaged"
        raise FormatError(msg) from None
    if not layers:
        raise FormatError("no layers found: not a caffemodel (a NetParameter with 'layer' or 'layers')")
    return name, layers


def ungroup(w: np.ndarray, groups: int) -> np.ndarray:
    """``(K, C/g, R, S)`` grouped weights as ``(K, C, R, S)`` block-diagonal ungrouped ones."""
    k, cg = w.shape[:2]
    out = np.zeros((k, cg * groups, *w.shape[2:]), dtype=np.float32)
    kg = k // groups
    for g in range(groups):
        out[g * kg:(g + 1) * kg, g * cg:(g + 1) * cg] = w[g * kg:(g + 1) * kg]
    return out


def _blobs(by_name: dict[str, CaffeLayer], name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in by_name:
        have = _some([n for n, layer in by_name.items() if layer.raw_blobs]) or "none"
        raise FormatError(f"the caffemodel has no layer named {name!r} (layers with weights: {have}); "
                          "not CaffeNet/AlexNet")
    blobs = by_name[name].blobs
    if len(blobs) != 2:
        raise FormatError(f"caffe layer {name} holds {len(blobs)} blobs; expected a weight and a bias")
    w, b = (check_numeric(f"caffe {name} blob {i}", x) for i, x in enumerate(blobs))
    return w, b


def _bias(name: str, b: np.ndarray, n: int) -> np.ndarray:
    if b.ndim < 1 or b.shape[-1] != n or any(d != 1 for d in b.shape[:-1]):  # legacy (1, 1, 1, N) or (N,)
        raise FormatError(f"caffe {name} bias has shape {tuple(b.shape)}, expected ({n},)")
    return b.reshape(n)


def _net_name(name: str) -> str:
    """The net's name as it is when short and printable, else escaped and shortened."""
    return name if len(name) <= _NAME_CHARS and name.isprintable() else _shown(name)


def convert(net_name: str, layers: list[CaffeLayer]) -> Imported:
    """CaffeNet's weights in this project's AlexNet at Caffe's crop, 227."""
    by_name = {layer.name: layer for layer in layers}
    order = [layer.name for layer in layers]
    if "norm1" in by_name and "pool1" in by_name and order.index("norm1") < order.index("pool1"):
        raise FormatError("this caffemodel normalises before pooling (bvlc_alexnet's order); alexnet-pipe's "
                          "network pools first as CaffeNet does, so it would compute something else")
    sd, grouped = {}, []
    for name, k, c, r in _CONVS:
        w, b = _blobs(by_name, name)
        if w.ndim != 4 or w.shape[0] != k or w.shape[2:] != (r, r) or w.shape[1] < 1 or c % w.shape[1]:
            expect_shape(f"caffe {name} weight", w, (k, c, r, r), " (or with C divided by the group count)")
        groups = c // w.shape[1]
        if groups > 1:
            if k % groups:
                raise FormatError(f"caffe {name}: {k} outputs do not split into {groups} groups")
            w = ungroup(w, groups)
            grouped.append(f"{name} ({groups} groups)")
        sd[f"{name}.weight"] = tensor(w)
        sd[f"{name}.bias"] = tensor(_bias(name, b, k))
    fc8 = _blobs(by_name, "fc8")
    num_classes = fc8[0].shape[-2] if fc8[0].ndim >= 2 else 0
    for name, n, kin in (*_FCS, ("fc8", num_classes, 4096)):
        w, b = fc8 if name == "fc8" else _blobs(by_name, name)
        if w.ndim >= 2 and all(d == 1 for d in w.shape[:-2]):  # legacy (1, 1, N, K)
            w = w.reshape(w.shape[-2:])
        expect_shape(f"caffe {name} weight", w, (n, kin))
        sd[f"{name}.weight"] = tensor(w)
        sd[f"{name}.bias"] = tensor(_bias(name, b, n))
    if num_classes < 1:
        raise FormatError("caffe fc8 has no outputs")
    notes = [f"grouped convolutions expanded block-diagonally: {', '.join(grouped)}" if grouped
             else "no grouped convolutions"]
    return Imported(
        source_format="Caffe caffemodel" + (f" ({_net_name(net_name)})" if net_name else ""),
        network="CaffeNet (conv2/4/5 ungrouped)",
        model_config=AlexNetConfig(num_classes=num_classes, crop=227),
        state_dict=sd, channel_order="BGR", value_range=(0.0, 255.0), mean_rgb=MEAN_RGB, std_rgb=None,
        source_class_order="the source's order (Caffe's synsets.txt: sorted wnids)",
        notes=notes,
        # Caffe's ImageNet recipe (examples/imagenet/create_imagenet.sh: convert_imageset with
        # RESIZE_HEIGHT=256 RESIZE_WIDTH=256) squashed every image to 256x256: predict does the same.
        squash=(SHORT_SIDE, SHORT_SIDE),
    )
