"""The JPEG fast path's two decoders: TurboJPEG (simplejpeg) first, OpenCV for what it declines.

Both wrap libjpeg-turbo; a dataset must not depend on which one decoded an image, so the pixels
are compared layout by layout (subsampling, progressive, restart markers, grey) at every DCT
scaling the converter uses, and the fallback is exercised by making TurboJPEG decline.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.imaging import decode
from alexnet_pipe.imaging.process import process
from alexnet_pipe.imaging.reasons import BadImage


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus texture: a JPEG with real chroma and high frequencies."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    noise = np.random.default_rng(seed).normal(0, 18, (height, width, 3))
    base = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin((x + y) / 17)], -1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _cv_jpeg(bgr: np.ndarray, **params) -> bytes:
    flags = []
    for key, value in params.items():
        flags += [getattr(cv2, f"IMWRITE_JPEG_{key.upper()}"), value]
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90, *flags])
    assert ok
    return buf.tobytes()


def _layouts() -> dict[str, bytes]:
    bgr = _photo(333, 517)
    out = {f"subsampling {name}": _cv_jpeg(bgr, sampling_factor=getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{name}"))
           for name in ("444", "422", "420", "440", "411")}
    out["restart markers"] = _cv_jpeg(bgr, rst_interval=3)
    out["progressive"] = _cv_jpeg(bgr, progressive=1)
    out["grey"] = _cv_jpeg(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    buf = io.BytesIO()
    Image.fromarray(bgr[..., ::-1]).save(buf, "JPEG", quality=75, progressive=True, subsampling=1)
    out["Pillow progressive 4:2:2"] = buf.getvalue()
    return out


LAYOUTS = _layouts()


def _decline(*args, **kwargs):
    raise ValueError("tjDecompressHeader3(): Could not determine subsampling level of JPEG image")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_turbojpeg_and_opencv_give_the_same_pixels(monkeypatch, name, k):
    data = LAYOUTS[name]
    head = decode.jpeg_header(data)
    assert head is not None and head.fast
    target = (-(-head.width // k), -(-head.height // k))  # the smallest size 1/k still covers
    turbo = decode.decode_jpeg(data, head, target)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), dict(decode._REDUCED).get(k, cv2.IMREAD_COLOR)
                             | cv2.IMREAD_IGNORE_ORIENTATION)
    assert turbo.shape == reference.shape == (target[1], target[0], 3)
    np.testing.assert_array_equal(turbo, reference)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", _decline)
    np.testing.assert_array_equal(decode.decode_jpeg(data, head, target), reference)


def test_an_image_turbojpeg_declines_is_converted_by_opencv_identically(monkeypatch):
    data = LAYOUTS["subsampling 420"]
    settings = ImageSettings(short_side=160)
    fast = process(data, settings)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", _decline)
    assert process(data, settings) == fast


def test_a_corrupt_scan_is_still_refused_with_opencvs_reason(monkeypatch):
    """TurboJPEG's refusal of broken data is not the verdict: OpenCV's decode words it."""
    data = bytearray(LAYOUTS["subsampling 420"])
    head = decode.jpeg_header(bytes(data))
    data[head.scan + 2 : head.scan + 4] = b"\xff\xff"  # the scan header's length: no longer a scan
    with pytest.raises(BadImage, match=r"^truncated or corrupt image data \("):
        process(bytes(data), ImageSettings(short_side=160))
