"""Turn one input file into a clean RGB baseline JPEG (runs in worker processes).

Every image is decoded completely before anything is written, so a truncated or corrupt
input is caught here, never by the training pipeline (DALI has no skip-bad-sample option).

Codecs: 8-bit baseline and progressive RGB/greyscale JPEGs, nearly every input, have their
header segments read here (size, frame type, EXIF orientation, ICC profile, the pixel limit) and
are decoded by libjpeg-turbo through its TurboJPEG API (simplejpeg; OpenCV's imdecode, the same
library, for what TurboJPEG declines), with DCT-domain 1/2, 1/4, 1/8 scaling for large ones;
then resized and encoded by OpenCV. Everything else (PNG, CMYK,
16-bit, alpha, odd JPEGs, colour-managed JPEGs, non-images) is read and decoded by Pillow and
joins the same path. Imports stay light (no torch: ~2.5 s per worker process). Measurements:
benchmarks/convert.md. Pixels are BGR inside this module (OpenCV's order) and statistics are
returned RGB.

Hostile inputs: only the decoders of ``ALLOWED_FORMATS`` ever see an input's bytes (Pillow is
opened with that allowlist; TurboJPEG and OpenCV only get data that starts with a JPEG
signature, which OpenCV's format sniffing hands to libjpeg); anything else is skipped with its
reason, before any parser of that format runs. Files over ``ImageSettings.max_file_mb`` are
skipped before they are read. Any exception while processing one input becomes that input's
skip reason (``process_source``): one odd file never stops a conversion. Colour: an input with
a non-sRGB ICC profile is converted to sRGB (LittleCMS through ``PIL.ImageCms``) and never passed
through; an unusable profile keeps the image, read as sRGB, with a warning in the log.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageCms, UnidentifiedImageError

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.dataset.mean import PixelStats, centre_box
from alexnet_pipe.inputs.table import Source

log = logging.getLogger(__name__)

# The only formats whose decoders see an input's bytes (Pillow's names; MPO is opened by the JPEG
# plugin). Pillow knows ~40 more (EPS runs Ghostscript where it is installed; DDS, PSD, ICO, ...):
# none is reachable from a file, whatever its name.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
ALLOWED_NAMES = "JPEG, PNG, GIF, BMP, TIFF, WebP"
_JPEG_SIGNATURE = b"\xff\xd8\xff"  # what OpenCV's format sniffing hands to libjpeg (checked before imdecode)
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


class CentreSums:
    """The centre boxes of a chunk's images summed on an S x S canvas: per-pixel sums (the mean
    image), sums of squares (the channel std) and how many images covered each pixel.

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
        self._count = np.zeros((size, size), np.uint16 if images <= np.iinfo(np.uint16).max else np.uint32)
        self._narrow = np.uint16 if images * 255 <= np.iinfo(np.uint16).max else np.uint32
        self.images = 0

    def add(self, bgr: np.ndarray) -> None:
        box = centre_box(bgr.shape[1], bgr.shape[0], self.size)
        src = bgr[box.y : box.y + box.height, box.x : box.x + box.width]
        dst = (slice(box.canvas_y, box.canvas_y + box.height), slice(box.canvas_x, box.canvas_x + box.width))
        cv2.accumulate(src, self._sum[dst])  # views: OpenCV writes through a numpy slice's strides
        cv2.accumulateSquare(src, self._sq[dst])
        self._count[dst] += 1
        self.images += 1

    def stats(self) -> PixelStats:
        """The channel sums (RGB) over every box added: exact integers."""
        # OpenCV sums float canvases in double precision (numpy's float32 -> float64 sum is 40x slower)
        sums, sq_sums = cv2.sumElems(self._sum)[2::-1], cv2.sumElems(self._sq)[2::-1]
        return PixelStats(self.images, int(self._count.sum(dtype=np.int64)), [int(v) for v in sums],
                          [int(v) for v in sq_sums])

    def mean_sum(self) -> np.ndarray:
        """(S, S, 3) RGB per-pixel sums, uint16 where no sum can pass 65535 (a quarter of the
        bytes to pass back from a worker), else uint32."""
        return np.ascontiguousarray(self._sum[..., ::-1].astype(self._narrow))

    def count(self) -> np.ndarray:
        return self._count


@dataclass
class BatchResult:
    """What a worker returns for one chunk of inputs."""

    results: list[Encoded | str]  # one per source, in order; str = the reason it was skipped
    mean_sum: np.ndarray | None  # (S, S, 3) RGB sum of the centre boxes placed in the canvas; None: no image
    mean_count: np.ndarray | None  # (S, S): how many images covered each canvas pixel
    stats: PixelStats | None = None  # the centre boxes' channel sums (the encoded pixels); None: no image


def _too_large(size: int, max_mb: int) -> BadImage:
    return BadImage(f"file too large ({size} bytes, over the limit of {max_mb} MiB set by --max-file-mb)")


def read_source(src: Source, max_mb: int | None = None) -> bytes:
    """The raw bytes of an input: a whole file, or a byte range inside an archive.

    ``max_mb``: inputs over this many MiB are refused (BadImage) before they are read; at most
    one byte more than the limit is ever read (a file that grows, or a device or pipe that never
    ends, is cut there and refused).
    """
    limit = None if max_mb is None else max_mb << 20
    # O_NONBLOCK: opening a FIFO (listed in a --list file, or swapped in after the scan) must
    # not wait for a writer; it is then refused. Regular files ignore the flag.
    fd = os.open(src.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        kind = os.fstat(fd).st_mode
        if stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind):
            raise BadImage("FIFO (named pipe) or socket, not a regular file: not read")
        if src.size < 0:
            if limit is None:
                return f.read()
            info = os.fstat(fd)
            if info.st_size > limit:
                raise _too_large(info.st_size, max_mb)
            # A regular file: its size and one byte more, which shows it grew (then on to the
            # limit). Asking for the limit itself would allocate 64 MiB per file (~0.1 ms each).
            # A device's size says nothing: up to the limit.
            want = info.st_size + 1 if stat.S_ISREG(info.st_mode) else limit + 1
            data = f.read(want)
            if len(data) == want <= limit:
                data += f.read(limit + 1 - want)
            if len(data) > limit:
                raise _too_large(os.fstat(fd).st_size, max_mb)
            return data
        if limit is not None and src.size > limit:
            raise _too_large(src.size, max_mb)
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": handled here, not news
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
    icc: bytes | None  # the ICC profile of the APP2 "ICC_PROFILE" segments, assembled as Pillow does

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
    icc_segments: list[bytes] = []
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
            return _JpegHeader(width, height, components, frame[0], precision, orientation, multi_picture, pos,
                               _assemble_icc(icc_segments))
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
        elif marker == 0xE2 and body[:12] == b"ICC_PROFILE\0":
            icc_segments.append(body)
        pos += 2 + length
    return None


def _assemble_icc(segments: list[bytes]) -> bytes | None:
    """An ICC profile split over APP2 segments (sequence number, count, data), joined exactly as
    Pillow's JPEG plugin joins it (so both decode paths see the same profile); None if absent."""
    if not segments:
        return None
    segments = sorted(segments)
    if len(segments[0]) < 14 or segments[0][13] != len(segments):
        return None  # a fragment missing: Pillow ignores the profile too
    return b"".join(s[14:] for s in segments)


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
    """Decode to BGR, scaled in the DCT domain towards ``target`` (None: full size).

    libjpeg-turbo's TurboJPEG API (simplejpeg) first: the same library OpenCV bundles, giving
    the same pixels (checked on every image of the benchmark set, scaled or not), 4-12% faster
    on 500 x 375 photographs. OpenCV decodes whatever TurboJPEG declines (a layout it cannot
    name, such as an unusual subsampling) and words the reason for a corrupt file.
    """
    width, height = head.width, head.height
    if data[:3] != _JPEG_SIGNATURE:  # OpenCV picks a decoder by the signature: only libjpeg may get it
        raise BadImage("not a JPEG")
    if not _jpeg_complete(data, head.scan):
        raise BadImage("truncated or corrupt image data (the JPEG has no end-of-image marker after its scan)")
    k, flag = _reduction(width, height, target) if target is not None else (1, cv2.IMREAD_COLOR)
    expected = (math.ceil(height / k), math.ceil(width / k), 3)
    try:
        # strict=False: libjpeg's warnings (extraneous bytes, a corrupt marker it can skip) keep
        # the image, as in OpenCV; min_factor with the expected size selects exactly 1/k.
        bgr = simplejpeg.decode_jpeg(data, "BGR", min_factor=k, min_height=expected[0], min_width=expected[1],
                                     strict=False)
        if bgr.shape == expected:
            return bgr
    except ValueError:
        pass
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | _DECODE_FLAGS)
    except cv2.error as exc:
        raise BadImage(f"truncated or corrupt image data ({str(exc).strip().splitlines()[-1]})") from exc
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


# ----------------------------------------------------------------------------- colour (ICC profiles)

_GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA")
_SAME_AS_SRGB = 2  # a profile that moves no colour of the probe by more than this is sRGB (grey levels)


class _UnusableProfile(Exception):
    """The image's ICC profile cannot be applied; the image is read as sRGB (the message says why)."""


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def _probe(mode: str) -> Image.Image:
    """Colours to compare a profile's conversion with the identity: a 6-level RGB cube or a grey ramp."""
    if mode == "L":
        return Image.fromarray(np.arange(0, 256, 5, dtype=np.uint8)[None, :], "L")
    levels = np.arange(0, 256, 51, dtype=np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3)
    return Image.fromarray(cube, "RGB")


@functools.lru_cache(maxsize=16)
def _to_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from pixels of ``mode`` (RGB, L or CMYK) described by the profile ``icc``
    to sRGB, or None when the profile is sRGB already: its conversion moves no colour by more
    than ``_SAME_AS_SRGB`` levels (every sRGB profile variant, whatever it is called).

    Cached per profile: most photographs of a collection share a handful of profiles.
    Raises ``_UnusableProfile`` for a profile LittleCMS cannot read or apply to these pixels.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
    except Exception as exc:  # a corrupt profile: LittleCMS refuses it, in whatever words
        raise _UnusableProfile(f"unreadable ICC profile ({type(exc).__name__}: {exc})") from exc
    wanted = {"RGB": "RGB", "L": "GRAY", "CMYK": "CMYK"}[mode]
    if space != wanted:
        raise _UnusableProfile(f"an ICC profile for {space or 'unknown'} colours on {wanted} pixels")
    try:
        transform = ImageCms.buildTransform(profile, _srgb_profile(), mode, "RGB")
        if mode == "CMYK":
            return transform
        probe = _probe(mode)
        moved = np.asarray(transform.apply(probe), np.int16) - np.asarray(probe.convert("RGB"), np.int16)
    except Exception as exc:
        raise _UnusableProfile(f"unusable ICC profile ({type(exc).__name__}: {exc})") from exc
    return None if np.abs(moved).max() <= _SAME_AS_SRGB else transform


def _icc_is_srgb(icc: bytes | None, components: int) -> bool:
    """True when a JPEG's pixels need no colour conversion (no profile, or an sRGB one)."""
    if icc is None:
        return True
    try:
        return _to_srgb_transform(icc, "L" if components == 1 else "RGB") is None
    except _UnusableProfile:
        return False  # Pillow's path reads it and notes why the profile is not used


def _to_srgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any Pillow mode -> 8-bit sRGB: ``_to_rgb``, through the image's ICC profile when it has one
    that is not sRGB. A profile that cannot be used (corrupt, or for other pixels than these) is
    ignored: the image is kept, read as sRGB as untagged images are, and ``notes`` says why."""
    icc = im.info.get("icc_profile")
    if not icc:
        return _to_rgb(im)
    if not isinstance(icc, (bytes, bytearray)):  # a TIFF tag of the wrong type: text, numbers
        notes.append(f"unreadable ICC profile (a {type(icc).__name__}, not bytes); colours read as sRGB")
        return _to_rgb(im)
    if im.mode == "CMYK":
        mode = "CMYK"
    elif im.mode in _GREY_MODES:
        mode = "L"
    elif im.mode in _COLOUR_MODES:
        mode = "RGB"
    else:  # YCbCr, LAB, HSV: no profile of ours describes them
        notes.append(f"ICC profile not applied to {im.mode} pixels; colours read as sRGB")
        return _to_rgb(im)
    try:
        transform = _to_srgb_transform(bytes(icc), mode)
    except _UnusableProfile as exc:
        notes.append(f"{exc}; colours read as sRGB")
        return _to_rgb(im)
    if mode == "CMYK":
        return im.convert("RGB") if transform is None else transform.apply(im)
    rgb = _to_rgb(im)  # alpha composited over white, 16-bit scaled: then the colours converted
    if transform is None:
        return rgb
    return transform.apply(rgb if mode == "RGB" else rgb.getchannel(0))


def _decode_with_pillow(im: Image.Image, target: tuple[int, int], notes: list[str]) -> tuple[np.ndarray, int]:
    """Pillow's full decode (every allowed format and mode) -> (upright sRGB as BGR, EXIF orientation)."""
    if im.format == "JPEG":
        im.draft(im.mode, target)  # DCT-domain downscaling while staying >= the target size
    try:
        im.load()  # the full decode: truncation and corrupt data surface here
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImage(f"truncated or corrupt image data ({exc})") from exc
    except Exception as exc:  # a decoder tripping over its own header fields (a TIFF tag of the wrong type)
        raise BadImage(f"corrupt image header ({type(exc).__name__}: {_one_line(exc)})") from exc
    # Only after load(): reading a PNG's EXIF first let a corrupt PNG through (see _orientation).
    orientation = _orientation(im)
    bgr = cv2.cvtColor(np.asarray(_to_srgb(im, notes)), cv2.COLOR_RGB2BGR)
    # The orientation read above, applied as on the OpenCV path (not ImageOps.exif_transpose,
    # which rewrites the EXIF block too and raises on a slightly malformed one).
    return (bgr if orientation == 1 else _UPRIGHT[orientation](bgr)), orientation


# ----------------------------------------------------------------------------- resize, encode, stats


_INTERPOLATION = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def _resize(bgr: np.ndarray, size: tuple[int, int], resize_filter: str = "antialias") -> np.ndarray:
    """Scale to ``size`` with ``resize_filter`` (config.RESIZE_FILTERS). "antialias": downscale by
    a Gaussian pre-blur + bicubic (INTER_AREA from 2x down), upscale bicubic."""
    h, w = bgr.shape[:2]
    if (w, h) == size:
        return bgr
    if resize_filter != "antialias":
        return cv2.resize(bgr, size, interpolation=_INTERPOLATION[resize_filter])
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


def _unidentified(data: bytes) -> str:
    """Why no allowed decoder opened ``data``: an allowed format whose header is broken, another
    format (named by Pillow's signature checks, which only compare the first 16 bytes: no parser
    of that format runs), or no image at all."""
    prefix = data[:16]
    Image.init()
    for fmt in ALLOWED_FORMATS + tuple(f for f in Image.ID if f not in ALLOWED_FORMATS):
        factory, accept = Image.OPEN.get(fmt, (None, None))
        try:
            hit = accept is not None and accept(prefix)
        except Exception:
            continue
        if not hit:
            continue
        if fmt not in ALLOWED_FORMATS:
            return f"not an allowed image format (looks like {fmt}); allowed: {ALLOWED_NAMES}"
        try:  # the allowed decoder's own words for what is wrong with the header
            factory(io.BytesIO(data), "")
        except Exception as exc:
            return f"unreadable {fmt} header ({_one_line(exc)})"
        return f"unreadable {fmt} header"
    return f"not an image (no allowed format recognised); allowed: {ALLOWED_NAMES}"


def _open(data: bytes, settings: ImageSettings) -> Image.Image:
    """Pillow's header parse by an allowed decoder, with the pixel limit applied before any
    pixel is decoded."""
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(_unidentified(data)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"unreadable image header ({exc})") from exc
    _check_pixels(*im.size, settings)
    return im


def _process(data: bytes, settings: ImageSettings, notes: list[str] | None = None) -> tuple[Encoded, np.ndarray]:
    """``process``, also returning the BGR pixels that were encoded (for the mean image).
    ``notes``: gets a line for what was done to a kept image that its user may want to know."""
    notes = [] if notes is None else notes
    if not data:
        raise BadImage("empty file")
    head = _jpeg_header(data)
    if head is not None and head.fast and _icc_is_srgb(head.icc, head.components):
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
            and data.endswith(b"\xff\xd9")  # bytes after the end-of-image marker are not stored
        )
        bgr = _decode_jpeg(data, head, None if passthrough else target)
        if passthrough:
            return Encoded(data, bgr.shape[1], bgr.shape[0], True), bgr
        if orientation != 1:
            bgr = _UPRIGHT[orientation](bgr)
    else:
        with warnings.catch_warnings():
            # We apply our own pixel limit; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _open(data, settings)
            target = _target(*im.size, settings)
            bgr, orientation = _decode_with_pillow(im, target, notes)
    # The target of the full-size input (not of the DCT-scaled one: rounding differs), turned
    # with the image when the orientation swaps its sides.
    bgr = _resize(bgr, target[::-1] if orientation in (5, 6, 7, 8) else target, settings.resize_filter)
    return Encoded(_encode(bgr, settings.quality), bgr.shape[1], bgr.shape[0], False), bgr


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


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _process_source(src: Source, settings: ImageSettings) -> tuple[Encoded | str, np.ndarray | None]:
    """Every input is isolated: whatever goes wrong with it becomes its skip reason."""
    notes: list[str] = []
    try:
        data = read_source(src, settings.max_file_mb)
    except BadImage as exc:
        return str(exc), None
    except OSError as exc:  # unreadable file: permissions, I/O error
        return f"cannot read input ({_one_line(exc)})", None
    except Exception as exc:
        return f"cannot read input ({type(exc).__name__}: {_one_line(exc)})", None
    try:
        result = _process(data, settings, notes)
    except BadImage as exc:
        return _one_line(exc, 1000), None
    except Exception as exc:  # a decoder's unforeseen error on odd data: this input only
        return f"cannot convert this image ({type(exc).__name__}: {_one_line(exc)})", None
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


def batch_to_pipe(conn, sources: list[Source], settings: ImageSettings) -> None:
    """Entry point of a process of its own (convert's retry after a worker died): ``process_batch``,
    its result sent back over ``conn``."""
    try:
        conn.send(process_batch(sources, settings))
    finally:
        conn.close()
