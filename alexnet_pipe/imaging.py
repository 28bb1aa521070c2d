"""Turn one input file into a clean RGB baseline JPEG (runs in worker processes).

Every image is decoded completely before anything is written, so a truncated or corrupt
input is caught here, never by the training pipeline (DALI has no skip-bad-sample option).
Imports stay light (Pillow, numpy, torch's CPU resize) because every worker imports this.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ImageSettings
from .scan import Source

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """The input cannot become a training image; the message is the reason recorded."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """A ready-to-store image and its pixel statistics.

    The statistics are those of the pixels that were JPEG-encoded. For a pass-through that is
    exactly the stored bytes decoded. For a re-encoded image, decoding the stored JPEG gives them
    only to within JPEG error: channel means agree to ~0.01 grey level on photographs (up to ~1
    level, and RMS up to a few, on tiny images of saturated colour blocks, where 4:2:0 chroma
    subsampling blurs every edge). That is ample for a dataset mean, and saves decoding every
    output again (about +25% CPU per image).
    """

    jpeg: bytes
    width: int
    height: int
    sums: tuple[int, int, int]  # per-channel sum of pixel values (exact, so merges are order-free)
    sq_sums: tuple[int, int, int]  # per-channel sum of squared pixel values
    passthrough: bool  # the input's own bytes were kept


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


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale so the shorter side becomes ``short_side``; never up; 0 keeps the size."""
    short = min(width, height)
    if short_side == 0 or short <= short_side:
        return width, height
    scale = short_side / short
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def _channel_stats(im: Image.Image) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Exact per-channel sums and sums of squares from the 3x256 histogram (fast, in C)."""
    hist = np.asarray(im.histogram(), dtype=np.int64).reshape(3, 256)
    values = np.arange(256, dtype=np.int64)
    return tuple(int(x) for x in hist @ values), tuple(int(x) for x in hist @ (values * values))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited over white; 16-bit is scaled, not clipped."""
    mode = im.mode
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        # PNG tRNS: a palette alpha table, or one grey/RGB value that means "fully transparent".
        # Pillow applies either when converting to RGBA; composite like any other alpha.
        # (Before, a grey/RGB key colour was kept as an opaque colour instead of becoming white.)
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


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased bicubic resize. torch's uint8 kernel matches Pillow's to +-1 and is ~2x faster."""
    if im.size == size:
        return im
    import torch  # deferred: only workers that resize pay for the import
    import torch.nn.functional as F

    arr = np.array(im)  # writable copy; torch refuses to alias read-only buffers
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # NCHW view over HWC = channels_last
    y = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True)
    return Image.fromarray(y[0].permute(1, 2, 0).contiguous().numpy(), "RGB")


def _is_passthrough(im: Image.Image, size: tuple[int, int], orientation: int, settings: ImageSettings) -> bool:
    """A JPEG that needs no change: baseline, YCbCr/RGB 3-channel, upright, already small enough.

    ``size`` is the size the file declares: after ``draft`` ``im.size`` may be a reduced one.
    """
    return (
        settings.passthrough
        and im.format == "JPEG"
        and im.mode == "RGB"
        and orientation == 1
        and not im.info.get("progressive")
        and not im.info.get("progression")
        and target_size(*size, settings.short_side) == size
    )


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 = upright). Call only after ``im.load()``: for PNG,
    ``getexif()`` itself decodes the pixels, and a decode error swallowed here would leave a
    half-decoded image that a later ``load()`` accepts as complete."""
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return 1


def process(data: bytes, settings: ImageSettings) -> Encoded:
    """Decode, validate, orient, convert, resize and re-encode one image.

    Args:
        data: the input file's bytes.
        settings: target size, JPEG quality, pixel limit.
    Returns:
        The stored JPEG with its size and pixel statistics.
    Raises:
        BadImage: with the reason the input is skipped.
    """
    if not data:
        raise BadImage("empty file")
    with warnings.catch_warnings():
        # We apply our own pixel limit below; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise BadImage(f"decompression bomb ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise BadImage("not an image (no known image format)") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"unreadable image header ({exc})") from exc
        width, height = im.size
        if width < 1 or height < 1:
            raise BadImage(f"image has no pixels ({width}x{height})")
        if width * height > settings.max_pixels:
            raise BadImage(
                f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the "
                f"limit of {settings.max_pixels}"
            )
        if im.format == "JPEG":
            # DCT-domain downscaling (1/2, 1/4, 1/8) while staying at or above the target size.
            # The EXIF orientation is not needed here: target_size treats both sides alike, so
            # the target of the rotated image is the rotated target. An image that is resized
            # is never passed through, so drafting cannot cost a pass-through.
            target = target_size(width, height, settings.short_side)
            if target != (width, height):
                im.draft(im.mode, target)
        try:
            im.load()  # the full decode: truncation and corrupt data surface here
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise BadImage(f"truncated or corrupt image data ({exc})") from exc
        # Only after load(): reading EXIF first let a corrupt PNG through (see _orientation).
        orientation = _orientation(im)
        passthrough = _is_passthrough(im, (width, height), orientation, settings)
    if passthrough:
        sums, sq_sums = _channel_stats(im)
        return Encoded(data, width, height, sums, sq_sums, True)

    if orientation != 1:
        im = ImageOps.exif_transpose(im)
        width, height = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    im = _to_rgb(im)
    im = _resize(im, target_size(width, height, settings.short_side))
    out = io.BytesIO()
    # Baseline (non-progressive), metadata dropped: the GPU decoder's fast path wants this.
    im.save(out, "JPEG", quality=settings.quality)
    sums, sq_sums = _channel_stats(im)
    return Encoded(out.getvalue(), im.width, im.height, sums, sq_sums, False)


def process_source(src: Source, settings: ImageSettings) -> Encoded | str:
    """Worker entry point: the Encoded image, or the reason (str) it was skipped."""
    try:
        return process(read_source(src), settings)
    except BadImage as exc:
        return str(exc)
    except OSError as exc:  # unreadable file: permissions, I/O error
        return f"cannot read input ({exc})"


def process_batch(sources: list[Source], settings: ImageSettings) -> list[Encoded | str]:
    """Process a chunk of inputs in one task (amortises inter-process overhead)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per worker; parallelism comes from the pool
    try:
        return [process_source(s, settings) for s in sources]
    finally:
        torch.set_num_threads(threads)
