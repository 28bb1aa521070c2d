"""The memory budget that the decodes running at once share (convert's worker processes, predict's threads).

An image just under the pixel limit is cheap to send and dear to decode: a 9400x9400 lossless WebP of
3.4 KB peaks at 1.55 GB while it is decoded, converted and resized, so N workers that each draw one
need N times that. Each decode holds its estimated peak (``decode_cost``, from the header: no pixel is
decoded yet) while it runs, and waits while the decodes already running hold too much for it to fit;
one estimated above the whole budget waits for the others and then runs alone. An ordinary photograph
costs a few MB and never waits.

The estimate bounds the rise of a process's peak resident memory over one ``process`` call
(tests/imaging/test_budget.py checks it for each allowed format and mode, decoded at full size and
scaled). Measured at 2400x1800, per pixel the decoder outputs: Pillow's decoders up to 23.5 bytes
(lossy and lossless WebP 23, palette or alpha PNGs 20-21, 16-bit and 32-bit TIFFs 15-18, BMP and CMYK
14-16, RGB PNG 11), hence ``PILLOW_BYTES_PER_PIXEL`` with a margin; libjpeg-turbo's path (nearly every
photograph, scaled in the DCT domain) 3.4 at full size. A multi-scan (progressive) JPEG also keeps its
whole image's DCT coefficients, 2 bytes a sample, whatever its output scale; every decode some MB of
buffers (``DECODE_OVERHEAD``).

A budget is shared by threads (``DecodeBudget(total)``) or by processes (``DecodeBudget(total, ctx)``:
multiprocessing primitives, handed to each process when it starts). ``install`` makes it the budget of
this process's decodes; without one they run unbounded (one process decoding one image at a time).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

PILLOW_BYTES_PER_PIXEL = 28  # peak bytes per output pixel of Pillow's decode and conversion to BGR
JPEG_BYTES_PER_PIXEL = 12  # the same for libjpeg-turbo's (simplejpeg or OpenCV) decode
COEFFICIENT_BYTES = 2  # a multi-scan JPEG's coefficient buffer: one int16 per sample of the whole image
DECODE_OVERHEAD = 8 << 20  # a decoder's own buffers, the encoded output


def decode_cost(pixels: int, bytes_per_pixel: int, coefficient_samples: int = 0) -> int:
    """Estimated peak bytes of decoding to ``pixels`` output pixels (and converting, resizing and
    encoding them), plus a multi-scan JPEG's ``coefficient_samples`` (full size, all components)."""
    return DECODE_OVERHEAD + pixels * bytes_per_pixel + coefficient_samples * COEFFICIENT_BYTES


class DecodeBudget:
    """Admits decodes while the sum of their estimated costs fits ``total`` bytes.

    ``ctx``: a multiprocessing context, for a budget shared by that context's processes (pass the
    object to each process as it starts); None: shared by this process's threads.
    """

    def __init__(self, total: int, ctx=None):
        self.total = total
        if ctx is None:
            self._cond, self._used = threading.Condition(), SimpleNamespace(value=0)
        else:
            self._cond, self._used = ctx.Condition(), ctx.RawValue("q", 0)  # guarded by the condition's lock

    @property
    def used(self) -> int:
        return self._used.value

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        """Wait until ``cost`` bytes fit, hold them while the block runs. A cost above the whole
        budget is taken as the whole budget: it waits for the rest, then runs alone."""
        cost = min(max(cost, 0), self.total)
        with self._cond:
            self._cond.wait_for(lambda: self._used.value + cost <= self.total)
            self._used.value += cost
        try:
            yield
        finally:
            with self._cond:
                self._used.value -= cost
                self._cond.notify_all()


_installed: DecodeBudget | None = None


def install(budget: DecodeBudget | None) -> None:
    """Make ``budget`` the one this process's decodes hold (None: unbounded). A worker process's
    initializer installs the budget shared by its pool."""
    global _installed
    _installed = budget


@contextmanager
def installed(budget: DecodeBudget) -> Iterator[DecodeBudget]:
    """``install(budget)`` for the block's duration (predict's run), then the one before."""
    before = _installed
    install(budget)
    try:
        yield budget
    finally:
        install(before)


@contextmanager
def holding(cost: int) -> Iterator[None]:
    """Hold ``cost`` bytes of the installed budget while the block runs (no budget: just run it)."""
    budget = _installed
    if budget is None:
        yield
        return
    with budget.hold(cost):
        yield
