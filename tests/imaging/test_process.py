"""Odd and broken inputs: each is converted to a clean RGB baseline JPEG or skipped with a reason.

Every input is made with a real codec (Pillow) from known pixel values; the few byte-level
fakes (a 16-bit RGB PNG Pillow cannot write, a decompression-bomb header) are built with zlib.
Colours are compared as means over the inside of 16x16 blocks, where JPEG error is small.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image, ImageOps

from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import centre_box
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.formats.recordio import iter_records, unpack_payload
from alexnet_pipe.imaging.encode import Encoded
from alexnet_pipe.imaging.geometry import target_size
from alexnet_pipe.imaging.process import process, process_batch, process_source
from alexnet_pipe.imaging.read import read_source
from alexnet_pipe.imaging.reasons import BadImage
from alexnet_pipe.inputs.table import Source
from tests.helpers.image_builders import (
    BAD_INPUTS,
    BLUE,
    GREEN,
    RED,
    STORED_ROTATION,
    TOL,
    WHITE,
    _corrupt_png,
    _truncated_png,
    assert_colour,
    blocks,
    bomb_png,
    cut,
    decoded,
    display_image,
    encode,
    noisy_jpeg,
    png_bytes,
    smooth_rgb,
    sof_marker,
    with_exif_orientation,
)

# ----------------------------------------------------------------------------- builders
























# ----------------------------------------------------------------------------- checks










@pytest.fixture
def settings() -> ImageSettings:
    # Colour modes and bad inputs are checked at the input's own size (small test images would
    # otherwise be scaled up to the short side); scaling has its own tests under geometry.
    return ImageSettings(upscale=False)


# ----------------------------------------------------------------------------- colour modes


def test_adobe_cmyk_jpeg_becomes_rgb(settings):
    """Photoshop-style CMYK (Adobe APP14, inverted samples) keeps its colours, including K."""
    cmyk = blocks([
        [(0, 0, 0, 0), (0, 255, 255, 0), (255, 0, 255, 0)],
        [(255, 255, 0, 0), (0, 0, 0, 128), (0, 0, 0, 255)],
    ])
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert b"Adobe" in data[:200] and Image.open(io.BytesIO(data)).mode == "CMYK"
    enc = process(data, settings)
    arr = decoded(enc)
    assert not enc.passthrough
    want = {(0, 0): WHITE, (0, 1): RED, (0, 2): GREEN, (1, 0): BLUE, (1, 1): (127, 127, 127), (1, 2): (0, 0, 0)}
    for (r, c), colour in want.items():
        assert_colour(arr, r, c, colour)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_greyscale_becomes_three_equal_channels(settings, fmt):
    grey = blocks([[(0,), (90,), (200,)], [(255,), (30,), (128,)]])[..., 0]
    data = encode(Image.fromarray(grey, "L"), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    enc = process(data, settings)
    arr = decoded(enc).astype(int)
    assert not enc.passthrough
    assert np.abs(arr[..., 0] - arr[..., 1]).max() <= 2 and np.abs(arr[..., 1] - arr[..., 2]).max() <= 2
    for r, row in enumerate([(0, 90, 200), (255, 30, 128)]):
        for c, v in enumerate(row):
            assert_colour(arr, r, c, (v, v, v), tol=3)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png(settings, transparent):
    """Palette index 0 is red; when it is the tRNS index it is composited over white."""
    im = Image.fromarray(blocks([[(0,), (1,), (2,)]])[..., 0], "P")
    im.putpalette([*RED, *BLUE, *GREEN] + [0] * (256 * 3 - 9))
    data = encode(im, "PNG", **({"transparency": 0} if transparent else {}))
    arr = decoded(process(data, settings))
    assert_colour(arr, 0, 0, WHITE if transparent else RED)
    assert_colour(arr, 0, 1, BLUE)
    assert_colour(arr, 0, 2, GREEN)


def test_rgba_png_is_composited_over_white(settings):
    """alpha 0 -> white (the documented background), 255 -> the colour, 128 -> the blend."""
    rgba = blocks([[(200, 30, 30, 0), (30, 30, 200, 255), (0, 0, 0, 128)]])
    arr = decoded(process(encode(Image.fromarray(rgba, "RGBA"), "PNG"), settings))
    assert_colour(arr, 0, 0, WHITE)
    assert_colour(arr, 0, 1, (30, 30, 200))
    assert_colour(arr, 0, 2, (127, 127, 127))  # 0*128/255 + 255*127/255


def test_la_png_is_composited_over_white(settings):
    la = blocks([[(50, 0), (50, 255)]])
    im = Image.fromarray(la, "LA")
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    arr = decoded(process(data, settings))
    assert_colour(arr, 0, 0, WHITE)
    assert_colour(arr, 0, 1, (50, 50, 50))


@pytest.mark.parametrize("mode,key,other", [("RGB", (10, 200, 30), (30, 60, 90)), ("L", (77,), (160,))])
def test_png_colour_key_transparency_is_composited(settings, mode, key, other):
    """A grey/RGB PNG's tRNS value is "transparent" like a palette tRNS index: it becomes white."""
    arr_in = blocks([[key, other]])
    im = Image.fromarray(arr_in[..., 0] if mode == "L" else arr_in, mode)
    data = encode(im, "PNG", transparency=key[0] if mode == "L" else key)
    arr = decoded(process(data, settings))
    assert_colour(arr, 0, 0, WHITE)
    assert_colour(arr, 0, 1, other * 3 if mode == "L" else other)


def test_16bit_grey_png_is_scaled_not_clipped(settings):
    values = np.array([[0, 32768, 65535, 25700]], np.uint16)
    grey16 = np.kron(values, np.ones((16, 16), np.uint16))
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr = decoded(process(data, settings))
    for c, v in enumerate([0, 128, 255, 100]):
        assert_colour(arr, 0, c, (v, v, v), tol=2)


def test_16bit_rgb_png(settings):
    rgb16 = np.kron(np.array([[[65535, 32768, 0], [0, 0, 65535]]], np.uint16), np.ones((16, 16, 1), np.uint16))
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb16)
    data = png_bytes(rgb16.shape[1], rgb16.shape[0], 16, 2, rows)
    arr = decoded(process(data, settings))
    assert_colour(arr, 0, 0, (255, 128, 0))
    assert_colour(arr, 0, 1, BLUE)


def test_png_named_jpeg(tmp_path, settings):
    """ImageNet's n02105855_2933.JPEG is a PNG: the content decides, not the name."""
    path = tmp_path / "n02105855_2933.JPEG"
    path.write_bytes(encode(Image.fromarray(blocks([[RED, BLUE]])), "PNG"))
    enc = process_source(Source("n02105855/n02105855_2933.JPEG", 0, str(path)), settings)
    assert isinstance(enc, Encoded) and not enc.passthrough
    arr = decoded(enc)
    assert_colour(arr, 0, 0, RED)
    assert_colour(arr, 0, 1, BLUE)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(settings, orientation):
    shown = display_image()
    stored = np.ascontiguousarray(np.rot90(shown, STORED_ROTATION[orientation]))
    enc = process(with_exif_orientation(stored, orientation), settings)
    assert not enc.passthrough  # small, baseline, RGB: only the rotation forces a re-encode
    arr = decoded(enc)
    assert (enc.width, enc.height) == (48, 32)
    assert_colour(arr, 0, 0, RED)
    assert_colour(arr, 0, 2, GREEN)
    assert_colour(arr, 1, 1, WHITE)


def test_exif_rotated_large_jpeg_is_rotated_then_downscaled():
    """Orientation 6 with a resize (the decoder's DCT draft path): the target is the upright one."""
    shown = np.kron(display_image(), np.ones((4, 4, 1), np.uint8))  # 192x128 displayed
    stored = np.ascontiguousarray(np.rot90(shown, STORED_ROTATION[6]))  # 128x192 stored
    enc = process(with_exif_orientation(stored, 6), ImageSettings(short_side=32))
    arr = decoded(enc)
    assert (enc.width, enc.height) == (48, 32)
    assert_colour(arr, 0, 0, RED)
    assert_colour(arr, 0, 2, GREEN)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(settings, orientation):
    """OpenCV decodes, the EXIF orientation is applied as Pillow's exif_transpose applies it."""
    stored = np.kron(display_image(), np.ones((2, 2, 1), np.uint8))  # 96x64
    data = with_exif_orientation(stored, orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    enc = process(data, settings)
    arr = decoded(enc).astype(int)
    assert arr.shape == want.shape
    assert np.abs(arr - want).mean() < 3


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize("order", [">", "<"])
def test_exif_orientation_read_in_either_byte_order(settings, order):
    """Big-endian (MM, most cameras) and little-endian (II) EXIF blocks, written by hand."""
    stored = np.ascontiguousarray(np.rot90(display_image(), STORED_ROTATION[6]))
    jpeg = encode(Image.fromarray(stored), "JPEG", quality=95)
    mark = b"MM" if order == ">" else b"II"
    ifd = struct.pack(order + "H", 1) + struct.pack(order + "HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(order + "I", 0)
    tiff = mark + struct.pack(order + "HI", 42, 8) + ifd
    arr = decoded(process(_with_app1(jpeg, b"Exif\0\0" + tiff), settings))
    assert arr.shape[:2] == (32, 48)
    assert_colour(arr, 0, 0, RED)
    assert_colour(arr, 0, 2, GREEN)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, reading the stored copy back
def test_broken_exif_keeps_the_image_as_stored(settings):
    jpeg = encode(Image.fromarray(display_image()), "JPEG", quality=95)
    data = _with_app1(jpeg, b"Exif\0\0MM\0*\0\0\xff\xff")  # IFD offset past the end
    enc = process(data, settings)
    assert enc.passthrough and enc.jpeg == data  # orientation unreadable = upright, as Pillow reads it
    arr = decoded(enc)
    assert arr.shape[:2] == (32, 48)
    assert_colour(arr, 0, 0, RED)


def test_mpo_is_stored_as_its_first_picture():
    """Multi-picture JPEGs (some cameras): the first picture is stored, never the extra ones."""
    first, second = Image.fromarray(blocks([[RED, BLUE]])), Image.fromarray(blocks([[GREEN, WHITE]]))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    enc = process(buf.getvalue(), ImageSettings(short_side=16))
    assert not enc.passthrough  # 32x16, short side 16: a plain JPEG would pass through
    arr = decoded(enc)
    assert_colour(arr, 0, 0, RED)
    assert_colour(arr, 0, 1, BLUE)


@pytest.mark.parametrize(
    "w,h,short_side,upscale,expected",
    [
        (500, 375, 256, True, (341, 256)),  # 500 * 256 / 375 = 341.3
        (375, 500, 256, True, (256, 341)),
        (100, 80, 256, True, (320, 256)),  # up, as im2rec --resize
        (100, 80, 256, False, (100, 80)),  # --no-upscale: kept
        (1600, 1200, 256, False, (341, 256)),  # down either way
        (256, 300, 256, True, (256, 300)),  # already there
        (300, 300, 0, True, (300, 300)),  # 0 keeps every size
        (7, 1000, 16, True, (16, 2286)),  # 1000 * 16 / 7 = 2285.7
    ],
)
def test_target_size(w, h, short_side, upscale, expected):
    assert target_size(w, h, short_side, upscale) == expected


def test_progressive_jpeg_is_reencoded_as_baseline(settings):
    arr_in = blocks([[RED, GREEN], [BLUE, WHITE]])
    data = encode(Image.fromarray(arr_in), "JPEG", quality=95, progressive=True)
    assert sof_marker(data) == 0xFFC2
    enc = process(data, settings)
    assert not enc.passthrough
    arr = decoded(enc)
    for (r, c), want in {(0, 0): RED, (0, 1): GREEN, (1, 0): BLUE, (1, 1): WHITE}.items():
        assert_colour(arr, r, c, want)


@pytest.mark.parametrize(
    "fmt,size,short_side",
    [("JPEG", (300, 200), 64), ("JPEG", (170, 250), 64), ("PNG", (250, 170), 64), ("JPEG", (512, 512), 256)],
)
def test_large_image_short_side_scaled_down(fmt, size, short_side):
    """Short side exactly ``short_side``, long side rounded to keep the aspect ratio."""
    w, h = size
    arr_in = smooth_rgb(h, w)
    arr_in[: h // 2, : w // 2] = RED
    enc = process(encode(Image.fromarray(arr_in), fmt), ImageSettings(short_side=short_side))
    arr = decoded(enc)
    assert not enc.passthrough
    assert min(enc.width, enc.height) == short_side
    long_side = round(max(w, h) * short_side / min(w, h))
    assert (enc.width, enc.height) == ((long_side, short_side) if w >= h else (short_side, long_side))
    quarter = arr[: enc.height // 2 - 4, : enc.width // 2 - 4].reshape(-1, 3).mean(0)
    assert np.all(np.abs(quarter - RED) <= TOL)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("size", [(40, 30), (30, 40)])
def test_small_image_is_scaled_up_to_the_short_side(fmt, size):
    """As im2rec --resize: the short side becomes exactly N, also for smaller images."""
    w, h = size
    arr_in = smooth_rgb(h, w)
    arr_in[: h // 2] = BLUE
    enc = process(encode(Image.fromarray(arr_in), fmt), ImageSettings(short_side=64))
    arr = decoded(enc)
    assert not enc.passthrough
    assert (enc.width, enc.height) == ((85, 64) if w > h else (64, 85))  # 40 * 64 / 30 = 85.3
    assert np.all(np.abs(arr[: enc.height // 2 - 6].reshape(-1, 3).mean(0) - BLUE) <= TOL)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_small_image_is_kept_without_upscale(fmt):
    data = encode(Image.fromarray(smooth_rgb(30, 40)), fmt)
    enc = process(data, ImageSettings(short_side=64, passthrough=False, upscale=False))
    decoded(enc)
    assert (enc.width, enc.height) == (40, 30)


def test_clean_small_jpeg_passes_through_without_upscale():
    data = encode(Image.fromarray(smooth_rgb(30, 40)), "JPEG", quality=85)
    assert process(data, ImageSettings(short_side=64, upscale=False)).jpeg == data
    assert not process(data, ImageSettings(short_side=64)).passthrough  # upscaled instead


def test_short_side_zero_keeps_size():
    enc = process(encode(Image.fromarray(smooth_rgb(300, 400)), "PNG"), ImageSettings(short_side=0))
    decoded(enc)
    assert (enc.width, enc.height) == (400, 300)


def test_clean_small_jpeg_passes_through_byte_identical():
    data = encode(Image.fromarray(smooth_rgb(48, 64)), "JPEG", quality=85)
    enc = process(data, ImageSettings(short_side=48))
    assert enc.passthrough and enc.jpeg == data
    assert (enc.width, enc.height) == (64, 48)
    decoded(enc)


def test_clean_jpeg_is_reencoded_when_passthrough_disabled():
    data = encode(Image.fromarray(smooth_rgb(48, 64)), "JPEG", quality=85)
    enc = process(data, ImageSettings(short_side=48, passthrough=False))
    assert not enc.passthrough and enc.jpeg != data
    ref = np.asarray(Image.open(io.BytesIO(data))).astype(int)
    assert np.abs(decoded(enc).astype(int) - ref).mean() < 3


def test_jpeg_resized_to_its_draft_size_is_not_passed_through():
    """512x512 -> 256: the decoder's 1/2 draft is exactly the target, yet the stored bytes must
    be the 256x256 image, not the 512x512 input."""
    data = encode(Image.fromarray(smooth_rgb(512, 512)), "JPEG", quality=85)
    enc = process(data, ImageSettings(short_side=256))
    assert not enc.passthrough and (enc.width, enc.height) == (256, 256)
    decoded(enc)


@pytest.mark.parametrize(
    "mode,pixels,expected",
    [
        ("RGB", smooth_rgb(24, 40), smooth_rgb(24, 40)),
        ("L", smooth_rgb(24, 40)[..., 1], np.repeat(smooth_rgb(24, 40)[..., 1:2], 3, -1)),
        ("I;16", np.full((24, 40), 32768, np.uint16), np.full((24, 40, 3), 128, np.uint8)),
        ("RGBA", blocks([[(9, 99, 199, 255), (1, 2, 3, 0)]]), blocks([[(9, 99, 199), WHITE]])),
    ],
)
def test_stats_are_exact_for_the_encoded_pixels(settings, mode, pixels, expected, tmp_path):
    """The chunk's sums/sq_sums are integer-exact over the converted pixels (before JPEG encoding)."""
    im = Image.fromarray(pixels)
    assert im.mode == mode
    path = tmp_path / "in.png"
    path.write_bytes(encode(im, "PNG"))
    batch = process_batch([Source("c/in.png", 0, str(path))], settings)
    flat = expected.reshape(-1, 3).astype(np.int64)
    assert (batch.stats.images, batch.stats.pixels) == (1, len(flat))
    assert batch.stats.sums == [int(v) for v in flat.sum(0)]
    assert batch.stats.sq_sums == [int(v) for v in (flat * flat).sum(0)]
    assert (batch.results[0].width, batch.results[0].height) == (expected.shape[1], expected.shape[0])


def test_stats_match_the_stored_images(tmp_path):
    """Over a chunk of pass-throughs the statistics are exactly those of the stored bytes; with
    re-encoded images they are those of the pixels before JPEG, so within JPEG error of the
    decoded output. The worst case is tiny saturated block images, where 4:2:0 chroma blurs
    edges: means within 1.5 grey levels, RMS within 6."""
    mean_size = 32
    inputs = {  # name: (bytes, passed through)
        "a.jpg": (encode(Image.fromarray(smooth_rgb(32, 48)), "JPEG", quality=90), True),
        "b.jpg": (encode(Image.fromarray(smooth_rgb(40, 32)), "JPEG", quality=80), True),
        "c.png": (encode(Image.fromarray(blocks([[RED, WHITE, GREEN], [BLUE, WHITE, RED]])), "PNG"), False),
        "d.jpg": (encode(Image.fromarray(smooth_rgb(64, 90)), "JPEG", quality=85, progressive=True), False),
    }
    sources = []
    for name, (data, _) in inputs.items():
        (tmp_path / name).write_bytes(data)
        sources.append(Source(f"c/{name}", 0, str(tmp_path / name)))
    for names in (["a.jpg", "b.jpg"], list(inputs)):
        batch = process_batch([s for s in sources if s.name[2:] in names], ImageSettings(short_side=mean_size))
        assert [r.passthrough for r in batch.results] == [inputs[n][1] for n in names]
        boxes = []
        for enc in batch.results:
            arr = decoded(enc)
            box = centre_box(arr.shape[1], arr.shape[0], mean_size)
            boxes.append(arr[box.y : box.y + box.height, box.x : box.x + box.width].reshape(-1, 3).astype(np.int64))
        flat = np.concatenate(boxes)
        n, sums, sq_sums = len(flat), flat.sum(0), (flat * flat).sum(0)
        stats = batch.stats
        assert (stats.images, stats.pixels) == (len(names), n)
        if all(inputs[name][1] for name in names):
            assert stats.sums == [int(v) for v in sums] and stats.sq_sums == [int(v) for v in sq_sums]
        else:
            assert stats.sums != [int(v) for v in sums]  # re-encoded: the pixels before JPEG
            assert np.abs(np.array(stats.sums) / n - sums / n).max() <= 1.5, (stats.sums, sums)
            assert np.abs(np.sqrt(np.array(stats.sq_sums) / n) - np.sqrt(sq_sums / n)).max() <= 6


# ----------------------------------------------------------------------------- skipped inputs








@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_with_reason(settings, name):
    data, override, words = BAD_INPUTS[name]
    with pytest.raises(BadImage) as info:
        process(data, override or settings)
    reason = str(info.value).lower()
    for word in words:
        assert word in reason, f"{name}: reason {reason!r} lacks {word!r}"


def test_zero_byte_file_reason_from_worker_entry(tmp_path, settings):
    """The worker returns the reason as a string (it never raises for a bad file)."""
    path = tmp_path / "zero.JPEG"
    path.write_bytes(b"")
    assert read_source(Source("c/zero.JPEG", 0, str(path))) == b""
    assert process_source(Source("c/zero.JPEG", 0, str(path)), settings) == "empty file"


def test_unreadable_file_reason(tmp_path, settings):
    missing = Source("c/gone.JPEG", 0, str(tmp_path / "gone.JPEG"))
    reason = process_source(missing, settings)
    assert isinstance(reason, str) and reason.startswith("cannot read input")


def test_corrupt_entropy_data_never_crashes(settings):
    """Scrambled scan bytes: skipped, or stored as a clean JPEG of the declared size."""
    data = bytearray(noisy_jpeg())
    for i in range(len(data) // 2, len(data) // 2 + 32):
        data[i] = (data[i] * 7 + 13) % 256
    try:
        enc = process(bytes(data), settings)
    except BadImage as exc:
        assert "corrupt" in str(exc)
    else:
        assert (enc.width, enc.height) == (128, 128)
        decoded(enc)


@pytest.mark.xfail(strict=True, reason="libjpeg only warns on corrupt entropy data and Pillow drops the warning")
def test_corrupt_entropy_data_is_detected(settings):
    data = bytearray(noisy_jpeg())
    for i in range(len(data) // 2, len(data) // 2 + 32):
        data[i] = (data[i] * 7 + 13) % 256
    with pytest.raises(BadImage):
        process(bytes(data), settings)


# ----------------------------------------------------------------------------- end to end

GOOD_FILES = {
    "train/cat/clean.JPEG": lambda: encode(Image.fromarray(smooth_rgb(48, 64)), "JPEG", quality=85),
    "train/cat/cmyk.JPEG": lambda: encode(Image.fromarray(smooth_rgb(40, 40)).convert("CMYK"), "JPEG"),
    "train/cat/grey.JPEG": lambda: encode(Image.fromarray(smooth_rgb(40, 50)).convert("L"), "JPEG"),
    "train/cat/png_named.JPEG": lambda: encode(Image.fromarray(smooth_rgb(40, 50)), "PNG"),
    "train/cat/large.JPEG": lambda: encode(Image.fromarray(smooth_rgb(200, 300)), "JPEG"),
    "train/dog/exif6.JPEG": lambda: with_exif_orientation(np.ascontiguousarray(np.rot90(display_image(), 1)), 6),
    "train/dog/rgba.png": lambda: encode(Image.fromarray(blocks([[(1, 2, 3, 0), (9, 9, 9, 255)]]), "RGBA"), "PNG"),
    "train/dog/progressive.JPEG": lambda: encode(Image.fromarray(smooth_rgb(40, 60)), "JPEG", progressive=True),
    "train/dog/grey16.png": lambda: encode(Image.fromarray(np.full((40, 40), 40000, np.uint16)), "PNG"),
    "val/cat/v_small.JPEG": lambda: encode(Image.fromarray(smooth_rgb(40, 32)), "JPEG"),  # passes through
    "val/dog/v_palette.png": lambda: encode(Image.fromarray(smooth_rgb(40, 40)).convert("P"), "PNG"),
}
BAD_FILES = {
    "train/cat/empty.JPEG": (lambda: b"", "empty"),
    "train/cat/notes.JPEG": (lambda: b"not a picture\n", "not an image"),
    "train/cat/truncated.JPEG": (lambda: cut(noisy_jpeg(), 0.5), "truncated"),
    "train/dog/random.JPEG": (lambda: BAD_INPUTS["random"][0], "not an image"),
    "train/dog/bomb.png": (lambda: bomb_png(30000, 30000), "decompression bomb"),
    "train/dog/corrupt.png": (_corrupt_png, "corrupt"),
    "val/cat/v_truncated.png": (_truncated_png, "truncated"),
    "val/dog/v_empty.JPEG": (lambda: b"", "empty"),
}
SHORT_SIDE = 32


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("bad_inputs") / "raw"
    for rel, make in {**GOOD_FILES, **{k: v[0] for k, v in BAD_FILES.items()}}.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(make())
    return raw


def convert(raw: Path, dst: Path, workers: int) -> dict:
    run_convert(
        ConvertConfig(
            src=raw, dst=dst, workers=workers, shard_size=4, progress=False, formats=("lmdb", "recordio"),
            image=ImageSettings(short_side=SHORT_SIDE),
        )
    )
    return load_dataset(dst).manifest


def read_lmdb(root: Path, split: str) -> dict[str, tuple[int, object]]:
    """name -> (record id, Datum) over all of a split's LMDB shards; a name stored twice fails."""
    ds = load_dataset(root)
    out: dict[str, tuple[int, object]] = {}
    for path in ds.lmdb_paths(split):
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
        with env.begin() as txn:
            for key, value in txn.cursor():
                m = re.fullmatch(r"(\d{8})_(.+)", key.decode())
                assert m, f"bad key {key!r}"
                assert m.group(2) not in out, f"{m.group(2)} stored twice"
                out[m.group(2)] = (int(m.group(1)), decode_datum(value))
        env.close()
    return out


@pytest.fixture(scope="module")
def converted(bad_tree) -> Path:
    dst = bad_tree.parent / "out1"
    convert(bad_tree, dst, workers=1)
    return dst


def test_convert_skips_bad_files_with_reasons(converted):
    manifest = load_dataset(converted).manifest
    skipped = {f"{s['split']}/{s['name']}": s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(BAD_FILES)
    for rel, (_, word) in BAD_FILES.items():
        assert word in skipped[rel], f"{rel}: {skipped[rel]!r}"


def expected_size(path: Path) -> tuple[int, int]:
    """Upright size with the short side scaled (up or down) to exactly SHORT_SIDE (computed independently)."""
    with Image.open(path) as im:
        (w, h), orientation = im.size, im.getexif().get(0x0112)
    if orientation in (6, 8):
        w, h = h, w
    return (round(w * SHORT_SIDE / h), SHORT_SIDE) if w >= h else (SHORT_SIDE, round(h * SHORT_SIDE / w))


def test_convert_stores_every_good_file_once_as_clean_jpeg(bad_tree, converted):
    manifest = load_dataset(converted).manifest
    labels = {c["id"]: c["index"] for c in manifest["classes"]}
    assert labels == {"cat": 0, "dog": 1}
    for split in ("train", "val"):
        stored = read_lmdb(converted, split)
        want = {rel.split("/", 1)[1] for rel in GOOD_FILES if rel.startswith(split + "/")}
        assert set(stored) == want
        for name, (_, datum) in stored.items():
            assert datum.encoded and datum.channels == 3 and datum.label == labels[name.split("/")[0]]
            im = Image.open(io.BytesIO(datum.data))
            im.load()
            assert im.mode == "RGB" and sof_marker(datum.data) == 0xFFC0
            assert im.size == (datum.width, datum.height) == expected_size(bad_tree / split / name)
        # RecordIO holds the same images under the same ids.
        recs, _ = load_dataset(converted).recordio_paths(split)
        by_id = {unpack_payload(p)[0].id: unpack_payload(p)[1] for rec in recs for _, p in iter_records(rec)}
        assert by_id == {rid: datum.data for rid, datum in stored.values()}
    # The one small clean baseline JPEG is stored byte-identical; everything else re-encoded.
    small = read_lmdb(converted, "val")["cat/v_small.JPEG"][1]
    assert small.data == (bad_tree / "val/cat/v_small.JPEG").read_bytes()
    assert (manifest["splits"]["train"]["passthrough"], manifest["splits"]["val"]["passthrough"]) == (0, 1)


def test_convert_counts_add_up(converted):
    manifest = load_dataset(converted).manifest
    total_records = 0
    for split, entry in manifest["splits"].items():
        n_files = sum(1 for rel in {**GOOD_FILES, **BAD_FILES} if rel.startswith(split + "/"))
        assert entry["records"] == len(read_lmdb(converted, split))
        assert entry["records"] + entry["skipped"] == entry["inputs"]
        assert sum(entry["class_counts"]) == entry["records"]
        total_records += entry["records"]
        assert entry["inputs"] <= n_files
    assert total_records + len(manifest["skipped"]) == len(GOOD_FILES) + len(BAD_FILES)


def test_convert_with_process_pool_matches_single_worker(bad_tree, converted):
    """workers=2 (spawned pool) stores the same records and skips the same files."""
    dst = bad_tree.parent / "out2"
    manifest = convert(bad_tree, dst, workers=2)
    assert manifest["skipped"] == load_dataset(converted).manifest["skipped"]
    for split in ("train", "val"):
        pooled = read_lmdb(dst, split)
        single = read_lmdb(converted, split)
        assert pooled == single
