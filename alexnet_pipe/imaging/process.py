"""Turn one input file into a clean RGB baseline JPEG (runs in worker processes).

The pipeline of one input, each step in a module of its own: read its bytes (read.py), decode it
completely after checking its header and the limits (decode.py), turn it upright (geometry.py),
convert it to sRGB (colour.py), resize it (geometry.py) and encode a baseline JPEG or keep the
input's own bytes (encode.py); a worker does that for a chunk of inputs and sums their centre
boxes (centre_sums.py). ``process`` is what predict uses, ``process_batch`` what convert's
workers run.

Codecs: 8-bit baseline and progressive RGB/greyscale JPEGs, nearly every input, are decoded by
libjpeg-turbo with DCT-domain scaling, then resized and encoded by OpenCV; everything else
(PNG, CMYK, 16-bit, alpha, odd JPEGs, colour-managed JPEGs, non-images) is read and decoded by
Pillow and joins the same path. Imports stay light (no torch: ~2.5 s per worker process).
Measurements: benchmarks/convert.md. Pixels are BGR inside ``imaging`` (OpenCV's order) and
statistics are returned RGB.

Any exception while processing one input becomes that input's skip reason (``process_source``):
one odd file never stops a conversion.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.dataset.mean import PixelStats
from alexnet_pipe.imaging.budget import holding
from alexnet_pipe.imaging.centre_sums import CentreSums
from alexnet_pipe.imaging.colour import icc_is_srgb, to_srgb
from alexnet_pipe.imaging.decode import (
    check_pixels,
    decode_jpeg,
    draft_with_pillow,
    jpeg_decode_cost,
    jpeg_header,
    load_with_pillow,
    open_image,
)
from alexnet_pipe.imaging.encode import Encoded, encode_jpeg, passes_through
from alexnet_pipe.imaging.geometry import (
    decode_target,
    image_orientation,
    resize,
    target_within_limit,
    upright,
    upright_target,
)
from alexnet_pipe.imaging.read import read_source
from alexnet_pipe.imaging.reasons import BadImage, one_line
from alexnet_pipe.inputs.table import Source

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """What a worker returns for one chunk of inputs."""

    results: list[Encoded | str]  # one per source, in order; str = the reason it was skipped
    mean_sum: np.ndarray | None  # (S, S, 3) RGB sum of the centre boxes placed in the canvas; None: no image
    mean_count: np.ndarray | None  # (S, S): how many images covered each canvas pixel
    stats: PixelStats | None = None  # the centre boxes' channel sums (the encoded pixels); None: no image


def _decode_with_pillow(im: Image.Image, notes: list[str]) -> tuple[np.ndarray, int]:
    """Pillow's full decode (every allowed format and mode) -> (upright sRGB as BGR, EXIF orientation)."""
    load_with_pillow(im)
    # Only after load(): reading a PNG's EXIF first let a corrupt PNG through (see image_orientation).
    orientation = image_orientation(im)
    bgr = cv2.cvtColor(np.asarray(to_srgb(im, notes)), cv2.COLOR_RGB2BGR)
    # The orientation read above, applied as on the OpenCV path (not ImageOps.exif_transpose,
    # which rewrites the EXIF block too and raises on a slightly malformed one).
    return upright(bgr, orientation), orientation


def _process(data: bytes, settings: ImageSettings, notes: list[str] | None = None) -> tuple[Encoded, np.ndarray]:
    """``process``, also returning the BGR pixels that were encoded (for the mean image).
    ``notes``: gets a line for what was done to a kept image that its user may want to know.
    The decode and resize hold their estimated peak memory in this process's budget (budget.py)."""
    notes = [] if notes is None else notes
    if not data:
        raise BadImage("empty file")
    head = jpeg_header(data)
    if head is not None and head.fast and icc_is_srgb(head.icc, head.components):
        check_pixels(head.width, head.height, settings)
        target = target_within_limit(head.width, head.height, settings)
        orientation = head.orientation
        passthrough = passes_through(data, head, target, settings.passthrough)
        scaled = None if passthrough else decode_target(target, settings, orientation)
        with holding(jpeg_decode_cost(data, head, scaled)):
            bgr = decode_jpeg(data, head, scaled)
            if passthrough:
                return Encoded(data, bgr.shape[1], bgr.shape[0], True, min(head.width, head.height)), bgr
            # The target of the full-size input (not of the DCT-scaled one: rounding differs), upright.
            bgr = resize(upright(bgr, orientation), upright_target(target, settings, orientation),
                         settings.resize_filter)
        source = min(head.width, head.height)
    else:
        with warnings.catch_warnings():
            # We apply our own pixel limit; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = open_image(data, settings)
            target = target_within_limit(*im.size, settings)
            source = min(im.size)
            with holding(draft_with_pillow(im, decode_target(target, settings, None))):
                bgr, orientation = _decode_with_pillow(im, notes)
                bgr = resize(bgr, upright_target(target, settings, orientation), settings.resize_filter)
    return Encoded(encode_jpeg(bgr, settings.quality), bgr.shape[1], bgr.shape[0], False, source), bgr


def process(data: bytes, settings: ImageSettings) -> Encoded:
    """Decode, validate, orient, convert, resize and re-encode one image.

    Args:
        data: the input file's bytes.
        settings: target size, upscaling, JPEG quality, pixel limit, pass-through.
    Returns:
        The stored JPEG with its size (the statistics are summed per chunk: ``process_batch``).
    Raises:
        BadImage: with the reason the input is skipped.
    """
    return _process(data, settings)[0]


def process_source(src: Source, settings: ImageSettings) -> Encoded | str:
    """One input: the Encoded image, or the reason (str) it was skipped."""
    return _process_source(src, settings)[0]


def _process_source(src: Source, settings: ImageSettings) -> tuple[Encoded | str, np.ndarray | None]:
    """Every input is isolated: whatever goes wrong with it becomes its skip reason."""
    notes: list[str] = []
    try:
        data = read_source(src, settings.max_file_mb)
    except BadImage as exc:
        return str(exc), None
    except OSError as exc:  # unreadable file: permissions, I/O error
        return f"cannot read input ({one_line(exc)})", None
    except Exception as exc:
        return f"cannot read input ({type(exc).__name__}: {one_line(exc)})", None
    try:
        result = _process(data, settings, notes)
    except BadImage as exc:
        return one_line(exc, 1000), None
    except Exception as exc:  # a decoder's unforeseen error on odd data: this input only
        return f"cannot convert this image ({type(exc).__name__}: {one_line(exc)})", None
    for note in notes:
        log.warning("%s: %s", src.name, note)
    return result


def process_batch(sources: list[Source], settings: ImageSettings) -> BatchResult:
    """Worker entry point: process a chunk of inputs (amortises inter-process overhead) and sum
    their centre boxes (``CentreSums``): the mean-image canvas and the channel statistics."""
    sums = CentreSums(settings.mean_size, len(sources))
    results: list[Encoded | str] = []
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core per worker: parallelism comes from the pool
    try:
        for src in sources:
            res, bgr = _process_source(src, settings)
            results.append(res)
            if bgr is not None:
                sums.add(bgr)
    finally:
        cv2.setNumThreads(threads)
    if not sums.images:
        return BatchResult(results, None, None)
    return BatchResult(results, sums.mean_sum(), sums.count(), sums.stats())
