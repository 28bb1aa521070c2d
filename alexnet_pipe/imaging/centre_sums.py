"""The centre boxes of a worker chunk's images, summed: the mean image and the channel statistics.

Pixels arrive BGR (OpenCV's order, as everywhere in ``imaging``); the statistics are returned RGB.
"""

from __future__ import annotations

import cv2
import numpy as np

from alexnet_pipe.dataset.mean import PixelStats, centre_box

_NEXT = [1, 2, 0]  # each BGR channel's partner in the cross products


class CentreSums:
    """The centre boxes of a chunk's images summed on an S x S canvas: per-pixel sums (the mean
    image), sums of squares (the channel std), sums of cross-channel products (with the squares:
    the RGB covariance) and how many images covered each pixel.

    OpenCV's accumulate/accumulateSquare add a box in one vectorised pass each (2-3x faster
    than three histograms per image plus a numpy add). The canvases are float32 while every sum
    stays an exact integer there (below 2^24: up to 258 images of 255^2), else float64, so the
    totals are exact integers and merging chunks in any order gives the same bytes.
    """

    def __init__(self, size: int, images: int):
        self.size = size
        dtype = np.float32 if images * 255 * 255 < 1 << 24 else np.float64
        self._sum = np.zeros((size, size, 3), dtype)  # BGR, as the pixels inside this module
        self._sq = np.zeros((size, size, 3), dtype)
        # Products of each channel with the next (B*G, G*R, R*B): the covariance's off-diagonal sums
        self._cross = np.zeros((size, size, 3), dtype)
        self._count = np.zeros((size, size), np.uint16 if images <= np.iinfo(np.uint16).max else np.uint32)
        self._narrow = np.uint16 if images * 255 <= np.iinfo(np.uint16).max else np.uint32
        self.images = 0

    def add(self, bgr: np.ndarray) -> None:
        box = centre_box(bgr.shape[1], bgr.shape[0], self.size)
        src = bgr[box.y : box.y + box.height, box.x : box.x + box.width]
        dst = (slice(box.canvas_y, box.canvas_y + box.height), slice(box.canvas_x, box.canvas_x + box.width))
        cv2.accumulate(src, self._sum[dst])  # views: OpenCV writes through a numpy slice's strides
        cv2.accumulateSquare(src, self._sq[dst])
        cv2.accumulateProduct(src, np.ascontiguousarray(src[..., _NEXT]), self._cross[dst])
        self._count[dst] += 1
        self.images += 1

    def stats(self) -> PixelStats:
        """The channel sums (RGB) over every box added: exact integers."""
        # OpenCV sums float canvases in double precision (numpy's float32 -> float64 sum is 40x slower)
        sums, sq_sums = cv2.sumElems(self._sum)[2::-1], cv2.sumElems(self._sq)[2::-1]
        bg, gr, rb = cv2.sumElems(self._cross)[:3]
        return PixelStats(self.images, int(self._count.sum(dtype=np.int64)), [int(v) for v in sums],
                          [int(v) for v in sq_sums], [int(gr), int(rb), int(bg)])

    def mean_sum(self) -> np.ndarray:
        """(S, S, 3) RGB per-pixel sums, uint16 where no sum can pass 65535 (a quarter of the
        bytes to pass back from a worker), else uint32."""
        return np.ascontiguousarray(self._sum[..., ::-1].astype(self._narrow))

    def count(self) -> np.ndarray:
        return self._count
