"""The model under torch.compile: ``FixedBatch`` pads every batch to one static shape, and
``compile_fixed_batch`` compiles a module behind it, as ``train --compile`` and the benchmarks run it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FixedBatch", "compile_fixed_batch"]


class FixedBatch(nn.Module):
    """Run ``module`` on exactly ``batch_size`` samples: a smaller batch (an epoch's partial last
    batch) is padded with zeros to ``batch_size`` and the outputs are sliced back to its own rows.

    For a torch.compile'd model (``compile_fixed_batch``): every call has one static shape, so the
    partial batch never compiles a second graph (torch would otherwise compile a dynamic-batch
    graph for it, with symbolic-shape kernels, also used for evaluation). Rows are independent in
    AlexNet (no batch statistics), so the real rows' outputs are those of the unpadded batch and
    the padded rows get no gradient. A larger batch runs as it is. Under inference mode every
    batch reaches the module as an inference tensor (see ``forward``).
    """

    def __init__(self, module: nn.Module, batch_size: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.module, self.batch_size = module, batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled() and not x.is_inference():
            # A batch made outside inference mode (a loader's first, made when it was built) would
            # fail the compiled eval graph's guard and compile another: one copy instead.
            x = x.clone()
        n = x.shape[0]
        if n >= self.batch_size:
            return self.module(x)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        full = torch.empty((self.batch_size, *x.shape[1:]), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        full[:n] = x
        full[n:] = 0
        return self.module(full)[:n]


def compile_fixed_batch(module: nn.Module, batch_size: int, **compile_kw) -> FixedBatch:
    """``torch.compile(module, dynamic=False)`` behind ``FixedBatch``: one graph per mode (train,
    eval) for every batch of an epoch, the partial last one included. ``compile_kw`` go to
    torch.compile (backend, mode, ...)."""
    return FixedBatch(torch.compile(module, dynamic=False, **compile_kw), batch_size)
