"""torchvision's AlexNet ``state_dict`` from a local ``.pth`` (``torch.load(weights_only=True)``).

Keys ``features.{0,3,6,8,10}`` are conv1..conv5 and ``classifier.{1,4,6}`` fc6..fc8 of
``TorchvisionAlexNet``; a ``module.`` prefix (DataParallel) is accepted. Input: RGB scaled to
0..1, normalised by ImageNet's mean and std, 224 crop of the 256-resized image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alexnet_pipe.errors import FormatError
from alexnet_pipe.model import torchfile
from alexnet_pipe.model.alexnet import AlexNetConfig
from alexnet_pipe.model.weights.common import Imported, check_numeric, expect_shape, tensor

KEYS = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
        "features.10": "conv5", "classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8"}
_SHAPES = {"conv1": (64, 3, 11, 11), "conv2": (192, 64, 5, 5), "conv3": (384, 192, 3, 3), "conv4": (256, 384, 3, 3),
           "conv5": (256, 256, 3, 3), "fc6": (4096, 256 * 6 * 6), "fc7": (4096, 4096)}
MEAN_RGB = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation, on 0..1 values
STD_RGB = (0.229, 0.224, 0.225)


def load_state_dict(path: Path) -> dict:
    """The file's tensors, read with weights_only=True (no code from the file runs), once its zip
    is within torchfile's bounds (nothing is inflated before)."""
    why = torchfile.problem(path)
    if why is not None:
        raise FormatError(f"refused: {why}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or hostile file
        # torch's first sentence only: the rest is advice (weights_only=False) wrong for an untrusted file
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        said = f": {first[:200]}" if first and "weights_only" not in first else ""
        raise FormatError(f"not a readable torch file ({type(exc).__name__}{said})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError("the torch file is not a state_dict (a dict of tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def convert(sd: dict) -> Imported:
    """torchvision's layout onto TorchvisionAlexNet (same tensors, our layer names)."""
    expected = {f"{k}.{p}" for k in KEYS for p in ("weight", "bias")}
    extra = sorted(set(sd) - expected)
    missing = sorted(expected - set(sd), key=lambda k: list(KEYS).index(k.rsplit(".", 1)[0]))
    if missing:
        raise FormatError(f"the state_dict has no {missing[0]!r}" + (f" but has {extra[0]!r}" if extra else "")
                          + "; not torchvision's AlexNet")
    if extra:
        raise FormatError(f"the state_dict has {extra[0]!r}, which torchvision's AlexNet does not; "
                          "not torchvision's AlexNet")
    fc8 = sd["classifier.6.weight"]
    num_classes = fc8.shape[0] if fc8.dim() == 2 else 0
    out = {}
    for key, name in KEYS.items():
        shape = _SHAPES.get(name, (num_classes, 4096))
        w = check_numeric(f"{key}.weight", sd[f"{key}.weight"].detach().float().numpy())
        b = check_numeric(f"{key}.bias", sd[f"{key}.bias"].detach().float().numpy())
        expect_shape(f"torchvision {key}.weight ({name})", w, shape, "; not torchvision's AlexNet")
        expect_shape(f"torchvision {key}.bias ({name})", b, shape[:1])
        out[f"{name}.weight"], out[f"{name}.bias"] = tensor(w), tensor(b)
    if num_classes < 1:
        raise FormatError("torchvision classifier.6 has no outputs")
    return Imported(
        source_format="torch state_dict", network="torchvision AlexNet (64-192-384-256-256, no LRN)",
        model_config=AlexNetConfig(num_classes=num_classes, crop=224, arch="torchvision"),
        state_dict=out, channel_order="RGB", value_range=(0.0, 1.0), mean_rgb=MEAN_RGB, std_rgb=STD_RGB,
        source_class_order="the source's order (torchvision's: sorted wnids)",
    )
