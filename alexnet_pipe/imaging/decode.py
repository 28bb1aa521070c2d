"""Decoding one input completely, after its header and the limits are checked (runs in worker processes).

Every image is decoded completely before anything is written, so a truncated or corrupt input is
caught here, never by the training pipeline (DALI has no skip-bad-sample option). 8-bit baseline
and progressive RGB/greyscale JPEGs, nearly every input, have their header segments read here
(size, frame type, EXIF orientation, ICC profile) and are decoded by libjpeg-turbo through its
TurboJPEG API (simplejpeg; OpenCV's imdecode, the same library, for what TurboJPEG declines), with
DCT-domain 1/2, 1/4, 1/8 scaling for large ones. Everything else (PNG, CMYK, 16-bit, alpha, odd
JPEGs, colour-managed JPEGs, non-images) is opened and decoded by Pillow.

Hostile inputs: only the decoders of ``ALLOWED_FORMATS`` ever see an input's bytes (Pillow is
opened with that allowlist; TurboJPEG and OpenCV only get data that starts with a JPEG
signature, which OpenCV's format sniffing hands to libjpeg); anything else is skipped with its
reason, before any parser of that format runs. The pixel limit (``ImageSettings.max_pixels``)
is applied to the header's size, and the scan limit (``MAX_SCANS``) to a JPEG's scans, before any
pixel is decoded.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.imaging.budget import JPEG_BYTES_PER_PIXEL, PILLOW_BYTES_PER_PIXEL, decode_cost
from alexnet_pipe.imaging.geometry import exif_orientation
from alexnet_pipe.imaging.reasons import BadImage, one_line

# The only formats whose decoders see an input's bytes (Pillow's names; MPO is opened by the JPEG
# plugin). Pillow knows ~40 more (EPS runs Ghostscript where it is installed; DDS, PSD, ICO, ...):
# none is reachable from a file, whatever its name.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
ALLOWED_NAMES = "JPEG, PNG, GIF, BMP, TIFF, WebP"
_JPEG_SIGNATURE = b"\xff\xd8\xff"  # what OpenCV's format sniffing hands to libjpeg (checked before imdecode)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
# The orientation comes from the EXIF block (geometry.py) and is applied after decoding.
_DECODE_FLAGS = cv2.IMREAD_IGNORE_ORIENTATION

# libjpeg-turbo decodes every scan a JPEG holds up to its EOI, each over every block of its components, and nothing
# in the format bounds their number: a 9000x9000 grey progressive JPEG whose last scan is repeated 1,000 times (under
# 1 MB) takes ~8 s to decode, 64 MiB of them ~100 minutes. libjpeg's progressions write 6 scans (grey) or 10
# (colour), other encoders about as many; libtiff and GDAL stop a JPEG at the same 100 scans by default
# (LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER, GDAL_JPEG_MAX_ALLOWED_SCAN_NUMBER). 100 bounds a decode at 100 passes over
# the image: 1.7 s for that grey image (0.45 s with its own 6 scans), at most ~6 s for a colour one at the pixel limit.
MAX_SCANS = 100
# The markers libjpeg acts on: any FF pair but a stuffed byte (FF 00), TEM (FF 01), a restart (FF D0-D7) or a fill
# byte (in FF FF DA the pattern matches the last FF).
_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
# The segments libjpeg reads by their length field and goes on after: SOF0-3 and 9-11, DHT, DAC, SOS, DQT, DNL,
# DRI, APPn, COM. At any other marker it stops, or (resynchronising at a restart) searches on from it, so the walk
# searches on from those too: it never skips a byte that libjpeg could read as a marker.
_SEGMENTS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC9, 0xCA, 0xCB, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE,
                       *range(0xE0, 0xF0)))
# Bounds the walks (~0.7 us a marker: at most ~50 ms; 64 MiB of 4-byte segments took 7.6 s in jpeg_header and 12 s
# in Pillow's header parse). A camera's JPEG has a few dozen markers, one with 64 MiB of metadata in 64 KiB segments
# ~1,000, one at the scan limit with a table before each scan ~300.
_MAX_MARKERS = 65_536
# Stray bytes before the first scan (libjpeg skips them with a warning): Pillow's header parse reads them one at a
# time (64 MiB: ~15 s), so more than this is refused before Pillow sees the file (~15 ms of its parse).
_MAX_STRAY = 65_536
_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)  # SOF markers of progressive frames


@dataclass(frozen=True, slots=True)
class JpegHeader:
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


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk a JPEG's segments up to the first scan (no pixel is decoded); None when the data is
    not a plain JPEG header (Pillow then reads it, and explains what is wrong), or takes more than
    ``_MAX_MARKERS`` steps (``open_image`` then bounds what Pillow's slower parse gets).

    Reading the few fields here instead of through Pillow saves ~0.25 ms per image (~8%)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    pos, end = 2, len(data)
    frame = None
    orientation, multi_picture = 1, False
    exif_seen = False
    icc_segments: list[bytes] = []
    for _ in range(_MAX_MARKERS):  # fill bytes are steps too (8 MiB of them took 0.7 s)
        if pos + 4 > end or data[pos] != 0xFF:
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
            return JpegHeader(width, height, components, frame[0], precision, orientation, multi_picture, pos,
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
            orientation = exif_orientation(body)
        elif marker == 0xE2 and body[:4] == b"MPF\0":
            multi_picture = True
        elif marker == 0xE2 and body[:12] == b"ICC_PROFILE\0":
            icc_segments.append(body)
        pos += 2 + length
    return None


def jpeg_scans(data: bytes, pos: int = 2) -> int:
    """The scans libjpeg would decode: the SOS markers from ``pos`` (a marker: SOI's end, or the first
    SOS) to the first EOI, found as libjpeg finds them. Segments are skipped by their length fields, so
    an EXIF thumbnail's SOS is not counted; whatever follows a segment (entropy-coded data, stray bytes)
    is searched for the next marker by a compiled pattern, so the walk takes linear time with no Python
    step per byte. BadImage past ``_MAX_MARKERS`` markers, or ``_MAX_STRAY`` bytes between the segments
    before the first scan."""
    scans = markers = stray = 0
    while True:
        found = _MARKER.search(data, pos)
        at = len(data) if found is None else found.start()
        if not scans:
            stray += max(at - pos, 0)
            if stray > _MAX_STRAY:
                raise BadImage(f"not a usable JPEG: more than {_MAX_STRAY} stray bytes between its header segments")
        if found is None:
            return scans  # libjpeg ends at the end of the data too (with a warning)
        pos = at
        marker = data[pos + 1]
        if marker == 0xD9:
            return scans
        markers += 1
        if markers > _MAX_MARKERS:
            if scans > MAX_SCANS:
                raise _too_many_scans(f"more than {scans}")
            raise BadImage(f"not a usable JPEG: more than {_MAX_MARKERS} markers before its end-of-image marker")
        scans += marker == 0xDA
        # A length below 2: libjpeg reads the two bytes of the field and searches on (APPn, COM) or stops.
        pos += 2 + (max(int.from_bytes(data[pos + 2 : pos + 4], "big"), 2) if marker in _SEGMENTS else 0)


def _too_many_scans(scans: int | str) -> BadImage:
    return BadImage(
        f"decompression time bomb: the JPEG has {scans} scans, over the limit of {MAX_SCANS} (each scan is another "
        f"decoding pass over the whole image; encoders write about 10): re-encode it if it is genuine"
    )


def check_scans(data: bytes, pos: int = 2) -> None:
    """The scan limit, applied before any pixel is decoded (``pos`` as in ``jpeg_scans``). The walk
    reads ~1.5 GB/s: 2-3% of a decode (40 us for a 500 x 375 photograph, 2.5 ms for 12 Mpx)."""
    scans = jpeg_scans(data, pos)
    if scans > MAX_SCANS:
        raise _too_many_scans(scans)


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


def multi_scan(data: bytes, head: JpegHeader) -> bool:
    """libjpeg goes on to a second scan only in a progressive frame or after a first scan that leaves
    components out (its has_multiple_scans), and then buffers the whole image's coefficients."""
    return head.frame in _PROGRESSIVE or int.from_bytes(data[head.scan + 4 : head.scan + 5], "big") < head.components


def decoded_size(head: JpegHeader, target: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) that ``decode_jpeg`` returns for ``target``."""
    k = _reduction(head.width, head.height, target)[0] if target is not None else 1
    return math.ceil(head.width / k), math.ceil(head.height / k)


def jpeg_decode_cost(data: bytes, head: JpegHeader, target: tuple[int, int] | None) -> int:
    """Estimated peak bytes of ``decode_jpeg`` and the work on its output (budget.py)."""
    width, height = decoded_size(head, target)
    samples = head.width * head.height * head.components if multi_scan(data, head) else 0
    return decode_cost(width * height, JPEG_BYTES_PER_PIXEL, samples)


def decode_jpeg(data: bytes, head: JpegHeader, target: tuple[int, int] | None) -> np.ndarray:
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
    # A single-scan JPEG (a baseline photograph) needs no walk (~2% of its decode): libjpeg stops after that scan.
    if multi_scan(data, head):
        check_scans(data, head.scan)  # the header's walk, on from its first scan
    k, flag = _reduction(width, height, target) if target is not None else (1, cv2.IMREAD_COLOR)
    expected = (math.ceil(height / k), math.ceil(width / k), 3)  # decoded_size's
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


def check_pixels(width: int, height: int, settings: ImageSettings) -> None:
    """The pixel limit, applied before any pixel is decoded."""
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if width * height > settings.max_pixels:
        raise BadImage(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the "
            f"limit of {settings.max_pixels}"
        )


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
            return f"unreadable {fmt} header ({one_line(exc)})"
        return f"unreadable {fmt} header"
    return f"not an image (no allowed format recognised); allowed: {ALLOWED_NAMES}"


def open_image(data: bytes, settings: ImageSettings) -> Image.Image:
    """Pillow's header parse by an allowed decoder, with the pixel limit (and a JPEG's scan limit)
    applied before any pixel is decoded."""
    if data[:3] == _JPEG_SIGNATURE:  # what Pillow opens as JPEG or MPO: walked before its slower header parse
        check_scans(data)
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImage(_unidentified(data)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"unreadable image header ({exc})") from exc
    check_pixels(*im.size, settings)
    return im


def draft_with_pillow(im: Image.Image, target: tuple[int, int]) -> int:
    """Set up Pillow's decode of an image ``open_image`` opened: a JPEG is scaled in the DCT domain
    while staying >= ``target``. Returns the decode's estimated peak bytes (budget.py)."""
    samples = 0
    if im.format == "JPEG":
        if im.info.get("progressive"):  # libjpeg buffers every coefficient of a progressive frame
            samples = im.width * im.height * len(im.getbands())
        im.draft(im.mode, target)  # im.size becomes the scaled size
    return decode_cost(im.width * im.height, PILLOW_BYTES_PER_PIXEL, samples)


def load_with_pillow(im: Image.Image) -> None:
    """Pillow's full decode of an image ``open_image`` opened (every allowed format and mode), at
    the size ``draft_with_pillow`` chose."""
    try:
        im.load()  # the full decode: truncation and corrupt data surface here
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImage(f"truncated or corrupt image data ({exc})") from exc
    except Exception as exc:  # a decoder tripping over its own header fields (a TIFF tag of the wrong type)
        raise BadImage(f"corrupt image header ({type(exc).__name__}: {one_line(exc)})") from exc
