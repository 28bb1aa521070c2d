"""neon model-zoo weights (``alexnet.p``): the v1.4 and pre-v1.2 pickles, loaded with the safe unpickler.

Layouts (shared/reference/WEIGHT_FORMATS.md): conv ``W`` is ``(C*R*S, K)``, so torch's
``(K, C, R, S)`` is ``W.T.reshape(K, C, R, S)``; linear ``W`` is ``(nout, nin)`` as torch's;
biases are ``(nout, 1)``. neon matches parameters to layers by position, and so does this.

neon's dropout is not inverted: inference multiplies a dropout layer's output by ``keep``.
torch's dropout is an identity at inference, so the weight of the layer that reads a dropout's
output (fc7 and fc8 in both published networks) is multiplied by ``keep`` here; biases stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alexnet_pipe.errors import FormatError
from alexnet_pipe.model.alexnet import AlexNetConfig
from alexnet_pipe.model.weights.common import Imported, check_numeric, expect_shape, tensor
from alexnet_pipe.text import shown

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# (name, C, R=S, K) of the CaffeNet-like net (the seed's, with LRN, 58.6% top-1).
_CONVS = (("conv1", 3, 11, 96), ("conv2", 96, 5, 256), ("conv3", 256, 3, 384), ("conv4", 384, 3, 384),
          ("conv5", 384, 3, 256))
_FC6_IN = 256 * 5 * 5  # pool5 rounds down at 224: 5x5
_FC6_IN_CAFFE_COMPAT = 256 * 6 * 6  # compat_mode='caffe' pools round up: 6x6
_OLD_CONV1_K = 64  # the pre-May-2016 "one weird trick" net: 64-192-384-256-256, no LRN, conv1 pad 3
_DEFAULT_KEEP = 0.5  # the published scripts' Dropout(keep=0.5) after fc6 and fc7
MEAN_RGB = (104.0, 119.0, 127.0)  # v1.4 loader's defaults: B 127, G 119, R 104
_SHOWN_CHARS, _SHOWN_KEYS = 60, 8  # text from the file in a message: each escaped and at most 60 chars, 8 keys


def _shown(value: object) -> str:
    """A key, name or type from the file for a message: escaped (ESC[2J must not reach the terminal) and short."""
    return shown(value, _SHOWN_CHARS)


@dataclass
class NeonParams:
    """A neon file's parameter arrays in file order, and its dropout layers."""

    layout: str  # "v1.4" or "pre-1.2"
    arrays: list[np.ndarray]
    # (number of parameter arrays before the dropout layer, keep); None: the file has no layer list
    dropouts: list[tuple[int, float]] | None
    version: str | None


def _array_of(entry: object, what: str) -> np.ndarray:
    """``params`` as neon wrote it: ``{'W': array}`` (v1.4), an array or a one-array list (older)."""
    if isinstance(entry, dict) and "W" in entry:
        entry = entry["W"]
    if isinstance(entry, (list, tuple)) and len(entry) == 1:
        entry = entry[0]
    return check_numeric(what, entry)


def _walk(layers: list, out: list[np.ndarray], dropouts: list[tuple[int, float]], depth: int = 0) -> None:
    """Flatten the layer list in order (containers nest their own ``config.layers``)."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise FormatError(f"layer {i} of the neon model is a {type(layer).__name__}, not a layer description")
        config = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        kind = layer.get("type", "")
        kind = kind if isinstance(kind, str) else ""  # a type that is not text names no layer neon has
        if "params" in layer:
            out.append(_array_of(layer["params"], f"parameter array {len(out)} ({_shown(config.get('name', kind))})"))
        elif isinstance(config.get("layers"), list) and depth < 8:
            _walk(config["layers"], out, dropouts, depth + 1)
        elif kind.rsplit(".", 1)[-1] == "Dropout":
            keep = config.get("keep", _DEFAULT_KEEP)
            if isinstance(keep, bool) or not isinstance(keep, (int, float, np.floating)) or not 0 < keep <= 1:
                raise FormatError(f"dropout layer {_shown(config.get('name', i))} has keep={_shown(repr(keep))}; "
                                  "expected 0 < keep <= 1")
            dropouts.append((len(out), float(keep)))


def read_params(obj: object) -> NeonParams:
    """The parameter arrays of an unpickled neon weights file, either layout.

    Raises:
        FormatError: the pickle is not a neon weights file (the message says what it holds).
    """
    if not isinstance(obj, dict):
        raise FormatError(f"the pickle holds a {type(obj).__name__}, not a neon weights file (a dict with 'model' "
                          "or 'layer_params_states')")
    if "model" in obj:
        model = obj["model"]
        config = model.get("config") if isinstance(model, dict) else None
        layers = config.get("layers") if isinstance(config, dict) else None
        if not isinstance(layers, list):
            raise FormatError("the pickle's 'model' has no config.layers list; not a neon v1.x weights file")
        arrays: list[np.ndarray] = []
        dropouts: list[tuple[int, float]] = []
        _walk(layers, arrays, dropouts)
        version = obj.get("neon_version")
        # The version goes into the imported file's description and every message about it: escaped, short.
        return NeonParams("v1.4", arrays, dropouts, _shown(version) if version is not None else None)
    if "layer_params_states" in obj:
        entries = obj["layer_params_states"]
        if not isinstance(entries, list):
            raise FormatError("the pickle's 'layer_params_states' is not a list; not a neon weights file")
        arrays = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "params" not in entry:
                raise FormatError(f"layer_params_states[{i}] has no 'params'; not a neon weights file")
            arrays.append(_array_of(entry["params"], f"parameter array {i}"))
        return NeonParams("pre-1.2", arrays, None, None)
    names = sorted(map(str, obj))
    keys = ", ".join(map(_shown, names[:_SHOWN_KEYS])) + (f" ... and {len(names) - _SHOWN_KEYS} more"
                                                         if len(names) > _SHOWN_KEYS else "")
    raise FormatError(f"the pickle is a dict with keys {keys}, not a neon weights file (no 'model' or "
                      "'layer_params_states')")


def _identify(arrays: list[np.ndarray]) -> None:
    """Refuse, with a reason, anything but the CaffeNet-like AlexNet this project computes."""
    if not arrays:
        raise FormatError("the neon file holds no parameter arrays")
    first = arrays[0]
    if first.shape == (3 * 11 * 11, _OLD_CONV1_K):
        raise FormatError(
            "this is neon's older AlexNet (64-192-384-256-256, no LRN, conv1 pad 3, published before May 2016), "
            "a network alexnet-pipe does not implement (its 'torchvision' arch pads conv1 by 2); "
            "use neon's newer alexnet.p (the CaffeNet-like net with LRN)")
    expect_shape("neon conv1 (the first parameter array)", first, (3 * 11 * 11, 96),
                 " as (C*R*S, K); not an AlexNet of the neon model zoo")
    if len(arrays) != 2 * len(LAYERS):
        raise FormatError(f"the neon file holds {len(arrays)} parameter arrays; AlexNet has {2 * len(LAYERS)} "
                          "(a weight and a bias for each of conv1-5 and fc6-8)")


def convert(params: NeonParams) -> Imported:
    """neon's arrays in this project's AlexNet (crop 224), dropout folded into the weights."""
    arrays = params.arrays
    _identify(arrays)
    sd = {}
    for i, (name, c, r, k) in enumerate(_CONVS):
        w, b = arrays[2 * i], arrays[2 * i + 1]
        expect_shape(f"neon {name} weight", w, (c * r * r, k), " as (C*R*S, K)")
        expect_shape(f"neon {name} bias", b, (k, 1))
        sd[f"{name}.weight"] = tensor(w.T.reshape(k, c, r, r))
        sd[f"{name}.bias"] = tensor(b.reshape(k))
    fc6 = arrays[10]
    if fc6.shape == (4096, _FC6_IN_CAFFE_COMPAT):
        raise FormatError(
            "neon fc6 has 9216 inputs: the model was trained with compat_mode='caffe' (pooling rounds up, 6x6 "
            "after pool5 at 224), which alexnet-pipe's network (pooling rounds down, 5x5) does not compute")
    num_classes = arrays[14].shape[0] if arrays[14].ndim == 2 else 0
    for i, (name, nin, nout) in enumerate((("fc6", _FC6_IN, 4096), ("fc7", 4096, 4096), ("fc8", 4096, num_classes))):
        w, b = arrays[10 + 2 * i], arrays[11 + 2 * i]
        expect_shape(f"neon {name} weight", w, (nout, nin), " as (nout, nin)")
        expect_shape(f"neon {name} bias", b, (nout, 1))
        sd[f"{name}.weight"] = tensor(w)
        sd[f"{name}.bias"] = tensor(b.reshape(nout))
    if num_classes < 1:
        raise FormatError("neon fc8 has no outputs")

    # Each dropout scales the input of the next weight layer: parameter arrays come in (W, bias)
    # pairs, so a dropout after n arrays feeds layer n // 2.
    dropouts = params.dropouts if params.dropouts is not None else [(12, _DEFAULT_KEEP), (14, _DEFAULT_KEEP)]
    scaled = []
    for n, keep in dropouts:
        layer = n // 2
        if n % 2 or layer >= len(LAYERS):
            raise FormatError(f"a dropout layer sits after parameter array {n}, not between two layers")
        if keep != 1.0:
            sd[f"{LAYERS[layer]}.weight"] *= keep
            scaled.append(f"{LAYERS[layer]} x{keep:g}")
    how = "as in the published script" if params.dropouts is None else "from the file's Dropout layers"
    notes = [f"neon's dropout is not inverted: weights scaled by the keep probability ({how}): "
             f"{', '.join(scaled) or 'none'}"]
    version = f"neon {params.version} pickle" if params.version else f"neon {params.layout} pickle"
    return Imported(
        source_format=version,
        network="neon model-zoo AlexNet (CaffeNet-like with LRN, ungrouped)",
        model_config=AlexNetConfig(num_classes=num_classes, crop=224),
        state_dict=sd, channel_order="BGR", value_range=(0.0, 255.0), mean_rgb=MEAN_RGB, std_rgb=None,
        source_class_order="the ILSVRC2012 devkit's meta.mat order (neon's labels), not sorted wnids",
        notes=notes,
    )
