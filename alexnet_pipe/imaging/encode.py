"""The stored JPEG: a baseline re-encode of the pixels, or the input's own bytes passed through.

Baseline, 4:2:0, no metadata: what the GPU decoder's fast path wants. An input that is already
such a JPEG at the stored size, upright and without extra pictures or trailing bytes, is kept
byte for byte (``ImageSettings.passthrough``; --no-passthrough re-encodes every image).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from alexnet_pipe.imaging.decode import JpegHeader
from alexnet_pipe.imaging.reasons import BadImage


@dataclass(frozen=True, slots=True)
class Encoded:
    """A ready-to-store image.

    The statistics of the pixels that were JPEG-encoded (their centre box, see
    ``mean.centre_box``) are summed per worker chunk, not per image (``CentreSums``). For a
    pass-through they are exactly those of the stored bytes decoded. For a re-encoded image,
    decoding the stored JPEG gives them only to within JPEG error: channel means agree to ~0.01
    grey level on photographs (up to ~1 level, and RMS up to a few, on tiny images of saturated
    colour blocks, where 4:2:0 chroma subsampling blurs every edge). That is ample for a dataset
    mean, and saves decoding every output again.
    """

    jpeg: bytes
    width: int
    height: int
    passthrough: bool  # the input's own bytes were kept
    source_short_side: int | None = None  # the input's short side before scaling


def passes_through(data: bytes, head: JpegHeader, target: tuple[int, int], passthrough: bool) -> bool:
    """Whether the JPEG ``data`` (its header ``head``) is stored as it is: ``passthrough`` is on
    (not --no-passthrough), it is baseline colour, upright, a single picture, already of the ``target``
    size, and nothing follows its end-of-image marker."""
    return (
        passthrough
        and head.frame == 0xC0  # baseline
        and head.components == 3
        and not head.multi_picture  # its extra pictures would be stored too
        and head.orientation == 1
        and target == (head.width, head.height)
        and data.endswith(b"\xff\xd9")  # bytes after the end-of-image marker are not stored
    )


def encode_jpeg(bgr: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG, 4:2:0, no metadata: what the GPU decoder's fast path wants."""
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage(f"the JPEG encoder failed on a {bgr.shape[1]}x{bgr.shape[0]} image")
    return buf.tobytes()
