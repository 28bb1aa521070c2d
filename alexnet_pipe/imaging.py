"""Turn one input file into a clean RGB baseline JPEG (runs in worker processes).

Every image is decoded completely before anything is written, so a truncated or corrupt
input is caught here, never by the training pipeline (DALI has no skip-bad-sample option).

Codecs: 8-bit baseline and progressive RGB/greyscale JPEGs, nearly every input, have their
header segments read here (size, frame type, EXIF orientation, the pixel limit) and are decoded
by OpenCV (about 35% faster than Pillow on 500 x 375 photos; DCT-domain 1/2, 1/4, 1/8 scaling
for large ones), then resized and encoded by OpenCV. Everything else (PNG, CMYK, 16-bit, alpha,
odd JPEGs, non-images) is read and decoded by Pillow and joins the same path. Imports stay light
(no torch: ~2.5 s per worker process). Measurements: benchmarks/convert.md.
Pixels are BGR inside this module (OpenCV's order) and statistics are returned RGB.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ImageSettings
from .mean import centre_box
from .sources import Source

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_DECODE_FLAGS = cv2.IMREAD_IGNORE_ORIENTATION  # orientation comes from Pillow's EXIF reading, applied below
# EXIF orientation -> what makes the stored pixels upright (as Pillow's ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
# Downscaling blur: a Gaussian of sigma 0.4 * sqrt(r^2 - 1) input pixels tops the blur the image
# already has up to that of a pixel at the output scale r (how scale-space pyramids do it).
# Then bicubic sampling. Measured on photographs (benchmarks/convert.md): 3x faster than
# INTER_AREA (whose non-integer path is scalar code) and closer to an antialiased Lanczos.
_BLUR_PER_SCALE = 0.4


class BadImage(Exception):
    """The input cannot become a training image; the message is the reason recorded."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """A ready-to-store image and the pixel statistics of its centre box.

    The statistics cover the centre ``min(S, h) x min(S, w)`` of the stored image (S = the
    mean-image size, see ``mean.centre_box``) and are those of the pixels that were
    JPEG-encoded. For a pass-through that is exactly the stored bytes decoded. For a re-encoded
    image, decoding the stored JPEG gives them only to within JPEG error: channel means agree to
    ~0.01 grey level on photographs (up to ~1 level, and RMS up to a few, on tiny images of
    saturated colour blocks, where 4:2:0 chroma subsampling blurs every edge). That is ample for
    a dataset mean, and saves decoding every output again.
    """

    jpeg: bytes
    width: int
    height: int
    passthrough: bool  # the input's own bytes were kept
    sums: tuple[int, int, int]  # per-channel sums over the centre box, RGB (exact: merges are order-free)
    sq_sums: tuple[int, int, int]  # per-channel sums of squares over the centre box
    pixels: int  # pixels in the centre box


@dataclass
class BatchResult:
    """What a worker returns for one chunk of inputs."""

    results: list[Encoded | str]  # one per source, in order; str = the reason it was skipped
    mean_sum: np.ndarray | None  # (S, S, 3) RGB sum of the centre boxes placed in the canvas; None: no image
    mean_count: np.ndarray | None  # (S, S): how many images covered each canvas pixel


def read_source(src: Source) -> bytes:
    """The raw bytes of an input: a whole file, or a byte range inside an archive."""
    with open(src.path, "rb") as f:
        if src.size < 0:
            return f.read()
        f.seek(src.offset)
        data = f.read(src.size)
    if len(data) != src.size:
        raise BadImage(f"archive ends inside this member ({len(data)} of {src.size} bytes)")
    return data


def target_size(width: int, height: int, short_side: int, upscale: bool = True) -> tuple[int, int]:
    """The stored size: the shorter side becomes exactly ``short_side``, the aspect ratio kept.

    As ``im2rec --resize``: up or down (the long side is rounded). ``upscale=False`` never scales
    up (a smaller image keeps its size); ``short_side`` 0 keeps every size. Both sides are treated
    alike, so the target of a rotated image is the rotated target. Example: 500x375 -> 341x256,
    100x80 -> 320x256 (kept as 100x80 without upscaling).
    """
    short = min(width, height)
    if short_side == 0 or short == short_side or (short < short_side and not upscale):
        return width, height
    scale = short_side / short
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


# ----------------------------------------------------------------------------- decoding


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 = upright) of an image Pillow decoded. Call only after
    ``im.load()``: for a PNG ``getexif()`` itself decodes the pixels, and a decode error swallowed
    here would leave a half-decoded image that a later ``load()`` accepts as complete."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return 1
    return value if 1 <= value <= 8 else 1


@dataclass(frozen=True, slots=True)
class _JpegHeader:
    """What the converter needs from a JPEG's header segments (up to the first scan)."""

    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK
    frame: int  # SOF marker: 0xC0 baseline, 0xC1 extended sequential, 0xC2 progressive, ...
    precision: int  # bits per sample
    orientation: int  # EXIF orientation, 1 when absent or unreadable
    multi_picture: bool  # an MPO (APP2 "MPF"): more pictures follow the first one's EOI
    scan: int  # offset of the first SOS marker

    @property
    def fast(self) -> bool:
        """OpenCV decodes it exactly as Pillow would: 8-bit Huffman grey or colour, sequential or progressive."""
        return self.frame in (0xC0, 0xC1, 0xC2) and self.precision == 8 and self.components in (1, 3)


def _exif_orientation(segment: bytes) -> int:
    """Orientation (tag 0x0112 of IFD0) from an APP1 "Exif" payload; 1 if absent or malformed."""
    tiff = segment[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    try:
        if order is None or struct.unpack(order + "H", tiff[2:4])[0] != 42:
            return 1
        ifd = struct.unpack(order + "I", tiff[4:8])[0]
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
            if tag == _EXIF_ORIENTATION:
                fmt = {3: "H", 4: "I"}.get(kind)  # SHORT as the standard says; LONG from odd writers
                value = struct.unpack(order + fmt, tiff[entry + 8 : entry + 8 + struct.calcsize(fmt)])[0] if fmt else 1
                return value if 1 <= value <= 8 else 1
    except struct.error:  # offsets past the end: a broken EXIF block must not lose a good image
        return 1
    return 1


def _jpeg_header(data: bytes) -> _JpegHeader | None:
    """Walk a JPEG's segments up to the first scan (no pixel is decoded); None when the data is
    not a plain JPEG header (Pillow then reads it, and explains what is wrong).

    Reading the few fields here instead of through Pillow saves ~0.25 ms per image (~8%)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data)
    frame = None
    orientation, multi_picture = 1, False
    exif_seen = False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            if frame is None:
                return None
            precision, height, width, components = frame[1], frame[2], frame[3], frame[4]
            if width < 1 or height < 1:
                return None  # height 0: defined later by a DNL marker, which OpenCV does not read
            return _JpegHeader(width, height, components, frame[0], precision, orientation, multi_picture, pos)
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # standalone markers (EOI before any scan: not an image)
            if marker == 0xD9:
                return None
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        body = data[pos + 4 : pos + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and frame is None:
            if len(body) < 6:
                return None
            frame = (marker, body[0], int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5])
        elif marker == 0xE1 and body[:6] == b"Exif\0\0" and not exif_seen:  # the first, as Pillow reads it
            exif_seen = True
            orientation = _exif_orientation(body)
        elif marker == 0xE2 and body[:4] == b"MPF\0":
            multi_picture = True
        pos += 2 + length
    return None


def _jpeg_complete(data: bytes, scan: int) -> bool:
    """The compressed data ends with EOI. libjpeg only *warns* at a premature end and fills the
    rest with grey, so a cut-off file would otherwise be stored. Inside scan data 0xFF is always
    followed by 0x00 or a restart marker, so an FF D9 after the first SOS is the real EOI (searched
    from the end, where it normally is)."""
    return data.rfind(b"\xff\xd9") > scan


def _reduction(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """(k, imdecode flag) of the largest DCT scaling 1/k that keeps both sides >= the target."""
    for k, flag in _REDUCED:
        if math.ceil(width / k) >= target[0] and math.ceil(height / k) >= target[1]:
            return k, flag
    return 1, cv2.IMREAD_COLOR


def _decode_jpeg(data: bytes, head: _JpegHeader, target: tuple[int, int] | None) -> np.ndarray:
    """OpenCV decode to BGR, scaled in the DCT domain towards ``target`` (None: full size)."""
    width, height = head.width, head.height
    if not _jpeg_complete(data, head.scan):
        raise BadImage("truncated or corrupt image data (the JPEG has no end-of-image marker after its scan)")
    k, flag = _reduction(width, height, target) if target is not None else (1, cv2.IMREAD_COLOR)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | _DECODE_FLAGS)
    except cv2.error as exc:
        raise BadImage(f"truncated or corrupt image data ({str(exc).strip().splitlines()[-1]})") from exc
    expected = (math.ceil(height / k), math.ceil(width / k), 3)
    if bgr is None or bgr.shape != expected:
        got = "nothing" if bgr is None else f"{bgr.shape[1]}x{bgr.shape[0]}"
        raise BadImage(f"truncated or corrupt image data (the JPEG decoder returned {got})")
    return bgr


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited over white; 16-bit is scaled, not clipped."""
    mode = im.mode
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        # PNG tRNS: a palette alpha table, or one grey/RGB value that means "fully transparent".
        # Pillow applies either when converting to RGBA; composite like any other alpha.
        im = im.convert("RGBA")
        mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGB")
        mode = im.mode
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale (PNG/TIFF): map 0..65535 onto 0..255; Pillow's convert would clip.
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, CMYK (Adobe-inverted handled by the decoder), YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:
        raise BadImage(f"unsupported image mode {mode} ({exc})") from exc


def _decode_with_pillow(im: Image.Image, target: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Pillow's full decode (every format and mode it knows) -> (upright BGR, EXIF orientation)."""
    if im.format == "JPEG":
        im.draft(im.mode, target)  # DCT-domain downscaling while staying >= the target size
    try:
        im.load()  # the full decode: truncation and corrupt data surface here
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImage(f"truncated or corrupt image data ({exc})") from exc
    # Only after load(): reading a PNG's EXIF first let a corrupt PNG through (see _orientation).
    orientation = _orientation(im)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return cv2.cvtColor(np.asarray(_to_rgb(im)), cv2.COLOR_RGB2BGR), orientation


# ----------------------------------------------------------------------------- resize, encode, stats


def _resize(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale: Gaussian pre-blur + bicubic (INTER_AREA from 2x down); upscale: bicubic."""
    h, w = bgr.shape[:2]
    if (w, h) == size:
        return bgr
    rx, ry = w / size[0], h / size[1]
    if rx >= 2 and ry >= 2:  # only past 8x DCT scaling, or non-JPEG inputs; area is sharp enough here
        return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    if rx > 1 or ry > 1:
        sx = _BLUR_PER_SCALE * math.sqrt(max(rx * rx - 1, 0))
        sy = _BLUR_PER_SCALE * math.sqrt(max(ry * ry - 1, 0))
        bgr = cv2.GaussianBlur(bgr, (0, 0), sigmaX=max(sx, 1e-3), sigmaY=max(sy, 1e-3))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_CUBIC)


def _encode(bgr: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG, 4:2:0, no metadata: what the GPU decoder's fast path wants."""
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage(f"the JPEG encoder failed on a {bgr.shape[1]}x{bgr.shape[0]} image")
    return buf.tobytes()


def _centre_stats(bgr: np.ndarray, size: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Exact RGB sums, sums of squares and pixel count of the centre box, from 3 x 256 histograms."""
    box = centre_box(bgr.shape[1], bgr.shape[0], size)
    pixels = bgr[box.y : box.y + box.height, box.x : box.x + box.width]
    if box.pixels < 1 << 24:  # calcHist counts in float32: exact below 2^24 per bin
        hist = np.stack([cv2.calcHist([pixels], [c], None, [256], [0, 256]).ravel() for c in range(3)])
    else:
        hist = np.stack([np.bincount(pixels[..., c].ravel(), minlength=256) for c in range(3)])
    hist = hist.astype(np.int64)[::-1]  # BGR -> RGB
    values = np.arange(256, dtype=np.int64)
    return tuple(int(x) for x in hist @ values), tuple(int(x) for x in hist @ (values * values)), box.pixels


def _finish(jpeg: bytes, bgr: np.ndarray, passthrough: bool, settings: ImageSettings) -> Encoded:
    sums, sq_sums, pixels = _centre_stats(bgr, settings.mean_size)
    return Encoded(jpeg, bgr.shape[1], bgr.shape[0], passthrough, sums, sq_sums, pixels)


# ----------------------------------------------------------------------------- one image


def _check_pixels(width: int, height: int, settings: ImageSettings) -> None:
    """The pixel limit, applied before any pixel is decoded."""
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if width * height > settings.max_pixels:
        raise BadImage(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the "
            f"limit of {settings.max_pixels}"
        )


def _target(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """The stored size; a sliver scaled up to the short side must not become a memory bomb."""
    tw, th = target_size(width, height, settings.short_side, settings.upscale)
    if tw * th > settings.max_pixels:
        raise BadImage(
            f"scaling {width}x{height} to short side {settings.short_side} gives {tw}x{th} = {tw * th} pixels, "
            f"over the limit of {settings.max_pixels}"
        )
    return tw, th


def _open(data: bytes, settings: ImageSettings) -> Image.Image:
    """Pillow's header parse, with the pixel limit applied before any pixel is decoded."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image (no known image format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"unreadable image header ({exc})") from exc
    _check_pixels(*im.size, settings)
    return im


def _process(data: bytes, settings: ImageSettings) -> tuple[Encoded, np.ndarray]:
    """``process``, also returning the BGR pixels that were encoded (for the mean image)."""
    if not data:
        raise BadImage("empty file")
    head = _jpeg_header(data)
    if head is not None and head.fast:
        _check_pixels(head.width, head.height, settings)
        target = _target(head.width, head.height, settings)
        orientation = head.orientation
        passthrough = (
            settings.passthrough
            and head.frame == 0xC0  # baseline
            and head.components == 3
            and not head.multi_picture  # its extra pictures would be stored too
            and orientation == 1
            and target == (head.width, head.height)
        )
        bgr = _decode_jpeg(data, head, None if passthrough else target)
        if passthrough:
            return _finish(data, bgr, True, settings), bgr
        if orientation != 1:
            bgr = _UPRIGHT[orientation](bgr)
    else:
        with warnings.catch_warnings():
            # We apply our own pixel limit; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _open(data, settings)
            target = _target(*im.size, settings)
            bgr, orientation = _decode_with_pillow(im, target)
    # The target of the full-size input (not of the DCT-scaled one: rounding differs), turned
    # with the image when the orientation swaps its sides.
    bgr = _resize(bgr, target[::-1] if orientation in (5, 6, 7, 8) else target)
    return _finish(_encode(bgr, settings.quality), bgr, False, settings), bgr


def process(data: bytes, settings: ImageSettings) -> Encoded:
    """Decode, validate, orient, convert, resize and re-encode one image.

    Args:
        data: the input file's bytes.
        settings: target size, upscaling, JPEG quality, pixel limit, pass-through.
    Returns:
        The stored JPEG with its size and the pixel statistics of its centre box.
    Raises:
        BadImage: with the reason the input is skipped.
    """
    return _process(data, settings)[0]


def process_source(src: Source, settings: ImageSettings) -> Encoded | str:
    """One input: the Encoded image, or the reason (str) it was skipped."""
    return _process_source(src, settings)[0]


def _process_source(src: Source, settings: ImageSettings) -> tuple[Encoded | str, np.ndarray | None]:
    try:
        return _process(read_source(src), settings)
    except BadImage as exc:
        return str(exc), None
    except OSError as exc:  # unreadable file: permissions, I/O error
        return f"cannot read input ({exc})", None


def _add_to_canvas(canvas_sum: np.ndarray, canvas_count: np.ndarray, image: np.ndarray) -> None:
    """Add an image's centre box into the mean-image canvas (same channel order as the canvas)."""
    box = centre_box(image.shape[1], image.shape[0], canvas_sum.shape[0])
    cy, cx = box.canvas_y, box.canvas_x
    canvas_sum[cy : cy + box.height, cx : cx + box.width] += image[box.y : box.y + box.height, box.x : box.x + box.width]
    canvas_count[cy : cy + box.height, cx : cx + box.width] += 1


def process_batch(sources: list[Source], settings: ImageSettings) -> BatchResult:
    """Worker entry point: process a chunk of inputs (amortises inter-process overhead) and sum
    their centre boxes into the S x S mean-image canvas.

    The canvas is uint16 when even ``len(sources)`` images of 255 cannot overflow it (<= 257
    images, as in every chunk convert sends: a quarter of the bytes to pass back), else uint32.
    """
    size = settings.mean_size
    dtype = np.uint16 if len(sources) * 255 <= np.iinfo(np.uint16).max else np.uint32
    canvas_sum = np.zeros((size, size, 3), dtype)  # BGR until returned
    canvas_count = np.zeros((size, size), dtype)
    results: list[Encoded | str] = []
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core per worker: parallelism comes from the pool
    try:
        for src in sources:
            res, bgr = _process_source(src, settings)
            results.append(res)
            if bgr is not None:
                _add_to_canvas(canvas_sum, canvas_count, bgr)
    finally:
        cv2.setNumThreads(threads)
    if not any(isinstance(r, Encoded) for r in results):
        return BatchResult(results, None, None)
    return BatchResult(results, np.ascontiguousarray(canvas_sum[..., ::-1]), canvas_count)
