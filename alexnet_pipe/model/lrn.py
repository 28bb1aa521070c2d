"""How AlexNet's LRN layers compute: Caffe's across-channel local response normalisation three ways.

``LRN`` is an ``nn.LocalResponseNorm`` (no parameters, so state_dicts are unchanged) whose
``impl`` picks the computation (``LRN_IMPLS``): torch's own, ``lrn_shifted_sum`` (the window as
shifted adds, in the input's memory format) or a torch.compile of torch's. The network that uses
it, and the LRN's size and constants, are in ``model/alexnet.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_pipe.errors import InputError

__all__ = ["LRN", "LRN_IMPLS", "lrn_shifted_sum"]

# How the LRN layers compute (all the same function, within float rounding; tests/model/test_model.py):
# "torch" nn.LocalResponseNorm (squares padded along C into a 5-D tensor, avg_pool3d: a copy and
# layout changes, NCHW inside even for channels_last input); "sum" the window as five shifted
# adds of the squares (elementwise, keeps the memory format); "compiled" torch.compile of the
# "torch" function alone (inductor fuses it into a few kernels).
LRN_IMPLS = ("torch", "sum", "compiled")


def lrn_shifted_sum(x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                    k: float = 1.0) -> torch.Tensor:
    """Across-channel LRN ``x / (k + alpha/size * sum_window x^2)^beta`` as torch and Caffe define it
    (window ``size`` centred on each channel, zeros past the first and last channel), with the
    window summed as ``size`` shifted adds of the squares instead of a padded 5-D average pool:
    elementwise work only, in ``x``'s own memory format."""
    if x.dim() < 3:
        raise ValueError(f"LRN needs N x C x ... input, got {tuple(x.shape)}")
    sq = x * x
    acc = sq.clone()
    c = x.shape[1]
    for d in range(1, size // 2 + 1):  # channels below: acc[c] += sq[c - d]
        if d < c:
            acc[:, d:] += sq[:, : c - d]
    for d in range(1, (size - 1) // 2 + 1):  # channels above: acc[c] += sq[c + d]
        if d < c:
            acc[:, : c - d] += sq[:, d:]
    return x / (acc * (alpha / size) + k).pow(beta)


def _lrn_torch(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    return F.local_response_norm(x, size, alpha, beta, k)


_COMPILED_LRN: dict[str, object] = {}


def _compiled_lrn(backend: str):
    """torch.compile of the LRN alone, one per backend (dynamo caches per code object: both LRN
    layers, and train and eval, share it), static shapes: a graph per layer's shape instead of one
    dynamic-shape graph for both."""
    if backend not in _COMPILED_LRN:
        _COMPILED_LRN[backend] = torch.compile(_lrn_torch, backend=backend, dynamic=False)
    return _COMPILED_LRN[backend]


class LRN(nn.LocalResponseNorm):
    """nn.LocalResponseNorm (no parameters: state_dicts are unchanged) with a choice of how it
    computes (``LRN_IMPLS``): ``impl`` and, for "compiled", the torch.compile ``backend``."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, impl: str = "torch",
                 backend: str = "inductor") -> None:
        super().__init__(size, alpha, beta, k)
        self.set_impl(impl, backend)

    def set_impl(self, impl: str, backend: str = "inductor") -> None:
        if impl not in LRN_IMPLS:
            raise InputError(f"LRN impl must be one of {LRN_IMPLS}, got {impl!r}")
        self.impl, self.backend = impl, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "sum":
            return lrn_shifted_sum(x, self.size, self.alpha, self.beta, self.k)
        if self.impl == "compiled":
            return _compiled_lrn(self.backend)(x, self.size, self.alpha, self.beta, self.k)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl}"
