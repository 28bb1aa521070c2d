"""The network definitions: the neon model-zoo AlexNet (CaffeNet's layout without weight grouping)
and torchvision's variant, the layer tables and spatial arithmetic both are built from,
``AlexNetConfig``, ``build_model`` and the weight initialisation.

conv1..conv5 and fc6..fc8 keep Caffe's layer names, so ``state_dict`` keys read
``conv1.weight`` ... ``fc8.bias`` and weight importers (neon pickles, Caffe
caffemodels with grouped conv2/4/5 expanded block-diagonally, torchvision) can map
onto them by name. See shared/reference/NEON_ALEXNET.md for the source of every number.
How the LRN layers compute is ``model/lrn.py``; running under torch.compile, ``model/compiled.py``;
the optimizer's parameter groups, ``model/params.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_pipe.config import MIN_CROP  # 67: the smallest crop for which pool5 is at least 1x1
from alexnet_pipe.errors import InputError
from alexnet_pipe.model.lrn import LRN

__all__ = [
    "MIN_CROP",
    "AlexNet",
    "AlexNetConfig",
    "ARCHS",
    "INPUT_CHANNELS",
    "INIT_SCHEMES",
    "TorchvisionAlexNet",
    "build_model",
    "fc6_in_features",
    "init_weights",
    "pool5_size",
]


class _Conv(NamedTuple):
    name: str
    out_channels: int
    kernel: int
    stride: int
    pad: int
    bias: float  # neon's constant bias init; 1 on some layers keeps their ReLUs alive early
    pool: bool  # max 3x3/2 after the ReLU (followed by LRN on conv1 and conv2)


class _Fc(NamedTuple):
    name: str
    out_features: int | None  # None: the number of classes
    std: float
    bias: float


# The single source of the layer sizes: the constructor, init_weights and the spatial
# arithmetic below all read these, so they cannot drift apart.
_CONVS = (
    _Conv("conv1", 96, 11, 4, 0, 0.0, True),
    _Conv("conv2", 256, 5, 1, 2, 1.0, True),
    _Conv("conv3", 384, 3, 1, 1, 0.0, False),
    _Conv("conv4", 384, 3, 1, 1, 1.0, False),
    _Conv("conv5", 256, 3, 1, 1, 1.0, True),
)
_FCS = (
    _Fc("fc6", 4096, 0.005, 1.0),
    _Fc("fc7", 4096, 0.005, 1.0),
    _Fc("fc8", None, 0.01, 0.0),
)
_CONV_STD = 0.01
# torchvision's AlexNet ("one weird trick", 64-192-384-256-256, no LRN). Its biases here are
# only used by the "neon" init scheme (torchvision's own init is "kaiming").
_TV_CONVS = (
    _Conv("conv1", 64, 11, 4, 2, 0.0, True),
    _Conv("conv2", 192, 5, 1, 2, 1.0, True),
    _Conv("conv3", 384, 3, 1, 1, 0.0, False),
    _Conv("conv4", 256, 3, 1, 1, 1.0, False),
    _Conv("conv5", 256, 3, 1, 1, 1.0, True),
)
_TV_POOL = 6  # torchvision's adaptive average pool to 6x6 before fc6 (256 * 36 = 9216 inputs)
ARCHS = ("neon", "torchvision")
_POOL_KERNEL, _POOL_STRIDE = 3, 2
# Caffe's LRN: x / (k + alpha/size * sum_{window} x^2)^beta. torch divides alpha by size
# and counts the zero padding at the borders exactly as Caffe does.
_LRN = dict(size=5, alpha=1e-4, beta=0.75, k=1.0)
INPUT_CHANNELS = (3, 4)  # 4: conv1 takes a zero 4th channel (DALI's pad_output) with a zero filter plane


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output size of a conv/pool along one axis, floor division as torch does; 0 if none."""
    if size + 2 * pad < kernel:
        return 0
    return (size + 2 * pad - kernel) // stride + 1


def pool5_size(crop: int) -> int:
    """Height (= width) of pool5's output for a ``crop`` x ``crop`` input; 0 if it vanishes.

    Pooling rounds down (torch's default, neon's too). Caffe rounds up, which gives the
    same sizes at its 227 crop (55, 27, 13, 6) but 27 rather than 26 after pool1 at 224.

    Example: 224 -> conv1 54 -> pool1 26 -> conv2 26 -> pool2 12 -> conv3..5 12 -> pool5 5.
    """
    s = crop
    for c in _CONVS:
        s = _out_size(s, c.kernel, c.stride, c.pad)
        if c.pool:
            s = _out_size(s, _POOL_KERNEL, _POOL_STRIDE, 0)
    return s




def fc6_in_features(crop: int) -> int:
    """Number of inputs of fc6: 256 * s * s with s = pool5_size(crop).

    6400 at 224 (neon), 9216 at 227 (Caffe), 1024 at 112.

    Raises:
        ValueError: the crop is too small for pool5 to have any output.
    """
    s = pool5_size(crop)
    if s < 1:
        raise InputError(
            f"crop {crop} is too small for AlexNet: pool5 would be empty; "
            f"the smallest crop is {MIN_CROP} (neon uses 224, Caffe 227)"
        )
    return _CONVS[-1].out_channels * s * s


@dataclass(frozen=True)
class AlexNetConfig:
    """What defines the network's shape; saved with checkpoints and weight files."""

    num_classes: int = 1000
    crop: int = 224  # input height = width; fixes fc6's fan-in
    dropout: float = 0.5  # drop probability after fc6 and fc7
    arch: str = "neon"  # "neon" (AlexNet) or "torchvision" (TorchvisionAlexNet)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InputError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("num_classes", "crop"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.crop < MIN_CROP:
            raise InputError(
                f"crop must be >= {MIN_CROP} so that pool5 is at least 1x1, got {self.crop} "
                f"(neon uses 224, Caffe 227)"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {self.dropout!r}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """Plain JSON-friendly dict, the inverse of ``from_dict``.

        ``arch`` is written only when it is not "neon": neon files stay exactly as before, so
        older alexnet-pipe versions (whose ``from_dict`` refuses unknown keys) still read them.
        """
        d = asdict(self)
        if d["arch"] == "neon":
            del d["arch"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> AlexNetConfig:
        """Rebuild a config from ``to_dict`` output; missing keys take their defaults.

        Raises:
            ValueError: ``d`` holds keys this config does not know (e.g. from a newer version).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(
                f"unknown AlexNetConfig keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**dict(d))


def _add_fcs(net: nn.Module, in_features: int, num_classes: int) -> None:
    """fc6..fc8 from ``_FCS`` (uninitialised: ``init_weights`` fills them)."""
    for f in _FCS:
        out_f = num_classes if f.out_features is None else f.out_features
        setattr(net, f.name, nn.utils.skip_init(nn.Linear, in_features, out_f))
        in_features = out_f


class AlexNet(nn.Module):
    """neon/CaffeNet AlexNet returning logits (softmax lives in the loss).

    conv1 -> relu -> pool1 -> norm1 -> conv2 -> relu -> pool2 -> norm2 -> conv3 -> relu
    -> conv4 -> relu -> conv5 -> relu -> pool5 -> flatten -> fc6 -> relu -> drop6
    -> fc7 -> relu -> drop7 -> fc8. Pool comes before LRN as in CaffeNet (the 2012
    paper has LRN first).

    Two speed options change how it computes, not what (``set_fast_paths``; neither is part of
    ``AlexNetConfig`` nor of the state_dict, so weights move freely between them):
    ``input_channels=4`` takes N x 4 x crop x crop input whose 4th channel DALI pads
    (``crop_mirror_normalize(pad_output=True)``, ``LoaderConfig.pad_channels``): conv1's stored
    weight stays 96 x 3 x 11 x 11 and is padded with a zero 4th filter plane in ``forward``, so the
    network is the 3-channel one (same outputs within float rounding, the same gradients for the
    stored weight) while cuDNN gets 4-channel NHWC input, which suits its tensor-core kernels.
    ``lrn`` picks the LRN layers' implementation (``LRN_IMPLS``).

    Args:
        cfg: the network's shape.
        generator: passed to ``init_weights``; with one, construction leaves the global
            RNG untouched.
        input_channels: 3, or 4 (see above).
        lrn: "torch", "sum" or "compiled" (see ``LRN_IMPLS``).
        lrn_backend: the torch.compile backend of a "compiled" LRN.
    """

    convs = _CONVS

    def __init__(self, cfg: AlexNetConfig, *, generator: torch.Generator | None = None, init: str = "neon",
                 input_channels: int = 3, lrn: str = "torch", lrn_backend: str = "inductor") -> None:
        super().__init__()
        if not isinstance(cfg, AlexNetConfig):
            raise TypeError(f"cfg must be an AlexNetConfig, got {type(cfg).__name__}")
        if cfg.arch != "neon":
            raise ValueError(f"AlexNet is the neon network; arch {cfg.arch!r} needs build_model(cfg)")
        self.cfg = cfg
        # skip_init: init_weights overwrites every parameter anyway, so torch's default
        # init would only cost time and draw from the global RNG.
        in_ch = 3
        for c in _CONVS:
            conv = nn.utils.skip_init(nn.Conv2d, in_ch, c.out_channels, c.kernel, stride=c.stride, padding=c.pad)
            setattr(self, c.name, conv)
            in_ch = c.out_channels
        self.pool1 = nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE)
        self.norm1 = LRN(**_LRN)
        self.pool2 = nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE)
        self.norm2 = LRN(**_LRN)
        self.pool5 = nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE)
        _add_fcs(self, fc6_in_features(cfg.crop), cfg.num_classes)
        self.drop6 = nn.Dropout(cfg.dropout)
        self.drop7 = nn.Dropout(cfg.dropout)
        init_weights(self, generator, init)
        self.input_channels = 3
        self.set_fast_paths(input_channels=input_channels, lrn=lrn, lrn_backend=lrn_backend)

    def set_fast_paths(self, *, input_channels: int | None = None, lrn: str | None = None,
                       lrn_backend: str = "inductor") -> AlexNet:
        """Choose the input's channel count (3 or 4) and the LRN implementation; None keeps the
        current one. Returns the model."""
        if input_channels is not None:
            if input_channels not in INPUT_CHANNELS:
                raise InputError(f"input_channels must be one of {INPUT_CHANNELS}, got {input_channels!r}")
            self.input_channels = input_channels
        if lrn is not None:
            for norm in (self.norm1, self.norm2):
                norm.set_impl(lrn, lrn_backend)
        return self

    def _conv1(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv1
        if self.input_channels == conv.in_channels:
            return conv(x)
        # A zero filter plane for each padded input channel: they add nothing, and the parameter
        # (and so the state_dict, the optimizer and the gradients) stays 3-channel.
        w = F.pad(conv.weight, (0, 0, 0, 0, 0, self.input_channels - conv.in_channels))
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            w = w.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, conv.bias, conv.stride, conv.padding)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """pool5's output, N x 256 x s x s (s = pool5_size(crop)), before flattening."""
        x = self.norm1(self.pool1(F.relu(self._conv1(x))))
        x = self.norm2(self.pool2(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return self.pool5(F.relu(self.conv5(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, N x num_classes, for N x 3 x crop x crop float input (any memory format);
        N x 4 x crop x crop with ``input_channels=4``."""
        crop, channels = self.cfg.crop, self.input_channels
        if x.dim() != 4 or tuple(x.shape[1:]) != (channels, crop, crop):
            raise InputError(
                f"expected input N x {channels} x {crop} x {crop}, got {tuple(x.shape)}; "
                f"the model's crop must match the pipeline's (AlexNetConfig(crop=...))"
            )
        # flatten is in (C, H, W) order whatever the memory format, as Caffe and neon
        # flatten; fc6 weights imported from them rely on it.
        x = torch.flatten(self.features(x), 1)
        x = self.drop6(F.relu(self.fc6(x)))
        x = self.drop7(F.relu(self.fc7(x)))
        return self.fc8(x)


class TorchvisionAlexNet(nn.Module):
    """torchvision's AlexNet (``torchvision.models.alexnet``), returning logits.

    conv1 (64, 11x11/4, pad 2) -> relu -> pool1 -> conv2 (192, 5x5) -> relu -> pool2 -> conv3
    (384) -> relu -> conv4 (256) -> relu -> conv5 (256) -> relu -> pool5 -> adaptive average
    pool to 6x6 -> flatten -> drop5 -> fc6 -> relu -> drop6 -> fc7 -> relu -> fc8. No LRN, and
    dropout sits before fc6 and fc7 (torchvision's ``classifier``), not after them. Layer names
    follow AlexNet's (conv1..fc8) so that code addressing layers by name serves both; the
    importer maps torchvision's ``features.N`` / ``classifier.N`` keys onto them.
    """

    convs = _TV_CONVS

    def __init__(self, cfg: AlexNetConfig, *, generator: torch.Generator | None = None, init: str = "kaiming") -> None:
        super().__init__()
        if not isinstance(cfg, AlexNetConfig) or cfg.arch != "torchvision":
            raise ValueError("TorchvisionAlexNet needs AlexNetConfig(arch='torchvision')")
        self.cfg = cfg
        in_ch = 3
        for c in _TV_CONVS:
            setattr(self, c.name, nn.utils.skip_init(nn.Conv2d, in_ch, c.out_channels, c.kernel, stride=c.stride,
                                                     padding=c.pad))
            in_ch = c.out_channels
        self.pool1 = nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE)
        self.pool2 = nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE)
        self.pool5 = nn.MaxPool2d(_POOL_KERNEL, _POOL_STRIDE)
        self.avgpool = nn.AdaptiveAvgPool2d((_TV_POOL, _TV_POOL))
        _add_fcs(self, in_ch * _TV_POOL * _TV_POOL, cfg.num_classes)
        self.drop5 = nn.Dropout(cfg.dropout)
        self.drop6 = nn.Dropout(cfg.dropout)
        init_weights(self, generator, init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 6x6 average-pooled features, N x 256 x 6 x 6, before flattening."""
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return self.avgpool(self.pool5(F.relu(self.conv5(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, N x num_classes, for N x 3 x crop x crop float input."""
        crop = self.cfg.crop
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, crop, crop):
            raise InputError(f"expected input N x 3 x {crop} x {crop}, got {tuple(x.shape)}")
        x = torch.flatten(self.features(x), 1)
        x = F.relu(self.fc6(self.drop5(x)))
        x = F.relu(self.fc7(self.drop6(x)))
        return self.fc8(x)


def build_model(cfg: AlexNetConfig, *, generator: torch.Generator | None = None, init: str | None = None) -> nn.Module:
    """The network ``cfg.arch`` names: AlexNet ("neon") or TorchvisionAlexNet ("torchvision").

    ``init`` defaults to each architecture's own: neon's Gaussians, torchvision's kaiming.
    """
    if cfg.arch == "torchvision":
        return TorchvisionAlexNet(cfg, generator=generator, init=init or "kaiming")
    return AlexNet(cfg, generator=generator, init=init or "neon")


INIT_SCHEMES = ("neon", "kaiming")


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator | None = None, scheme: str = "neon") -> None:
    """Initialise in place.

    ``neon`` (the model zoo's, the default): Gaussian weights (conv 0.01, fc6/fc7 0.005, fc8
    0.01) and constant biases conv1 0, conv2 1, conv3 0, conv4 1, conv5 1, fc6 1, fc7 1, fc8 0.
    ``kaiming`` (torchvision's AlexNet init): He-normal convs (fan_out, ReLU gain), N(0, 0.01)
    fully connected layers, zero biases. With neon's init, fc7's output is nearly the constant
    bias for every input, so on small data sets the first hundreds of steps learn nothing
    (measured: 10 drawn-shape classes stay at chance for 300 steps of 32 at lr 1e-3, where the
    kaiming init reaches 31% after 150); ImageNet's thousands of steps per epoch hide this.

    Args:
        model: the network to initialise in place.
        generator: draw from this (on the parameters' device) instead of the global RNG,
            so a seed reproduces the weights without disturbing other random streams.
        scheme: one of INIT_SCHEMES.
    """
    if scheme not in INIT_SCHEMES:
        raise InputError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    convs = getattr(model, "convs", _CONVS)
    if scheme == "neon":
        layers = [(c.name, _CONV_STD, c.bias) for c in convs] + [(f.name, f.std, f.bias) for f in _FCS]
    else:
        layers = [(c.name, (2.0 / (c.out_channels * c.kernel * c.kernel)) ** 0.5, 0.0) for c in convs]
        layers += [(f.name, 0.01, 0.0) for f in _FCS]
    for name, std, bias in layers:
        layer = getattr(model, name)
        layer.weight.normal_(0.0, std, generator=generator)
        layer.bias.fill_(bias)
