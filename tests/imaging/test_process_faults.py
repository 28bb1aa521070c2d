"""Hostile images, crafted one by one: the decoder allowlist, per-input isolation, EXIF, colour,
the input size cap and worker crashes (issue 7, sections 2, 3, 6 and 7; docs/RELIABILITY.md).

The seeded mutation fuzz is in test_process_fuzz.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import EpsImagePlugin, Image, ImageCms, ImageOps

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.imaging import process as imaging
from alexnet_pipe.imaging import read as reading
from alexnet_pipe.imaging.decode import ALLOWED_FORMATS, jpeg_header
from alexnet_pipe.imaging.encode import Encoded
from alexnet_pipe.imaging.process import process, process_batch, process_source
from alexnet_pipe.imaging.read import read_source
from alexnet_pipe.imaging.reasons import BadImage
from alexnet_pipe.inputs.table import Source
from tests.helpers import icc
from tests.helpers.image_builders import (
    GREEN,
    RED,
    STORED_ROTATION,
    WHITE,
    assert_colour,
    blocks,
    decoded,
    display_image,
    encode,
    smooth_rgb,
)

ALLOWED_WORDS = "allowed: JPEG, PNG, GIF, BMP, TIFF, WebP"
# Writing the IM samples below (Pillow deprecates that format; reading it is what is refused).
pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")


@pytest.fixture
def settings() -> ImageSettings:
    return ImageSettings(upscale=False)


def _source(tmp_path: Path, name: str, data: bytes) -> Source:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Source(f"c/{name}", 0, str(path))


# ----------------------------------------------------------------------------- the decoder allowlist


def _pillow_writes(fmt: str) -> bytes:
    Image.init()
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow cannot write {fmt}")
    im = Image.fromarray(smooth_rgb(16, 16))
    return encode(im.convert("L") if fmt in ("SPIDER",) else im, fmt)


def _dds_unimplemented() -> bytes:
    """A DDS header with a pixel format Pillow does not implement: NotImplementedError at open
    (not an OSError), which used to abort the whole conversion."""
    header = struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + b"\0" * 44
    pixel_format = struct.pack("<2I", 32, 4) + b"XXXX" + b"\0" * 20
    return b"DDS " + header + pixel_format + b"\0" * 20 + b"\0" * 64


def _eps() -> bytes:
    """An EPS file: Pillow's EPS plugin renders it with Ghostscript where one is installed."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
            b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def _psd() -> bytes:
    return b"8BPS" + struct.pack(">H", 1) + b"\0" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3) + b"\0" * 64


# name: (bytes, the format the reason names; None: no signature of its own, so "not an image" or
# whichever format's signature its first bytes happen to match, e.g. TGA's header starts like CUR's)
NOT_ALLOWED = {
    "dds_unimplemented": (_dds_unimplemented, "DDS"),
    "dds": (lambda: _pillow_writes("DDS"), "DDS"),
    "eps": (_eps, "EPS"),
    "eps_binary": (lambda: b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 30, len(_eps()), 0, 0, 0, 0) + b"\xff\xff"
                   + _eps(), "EPS"),
    "psd": (_psd, "PSD"),
    "ico": (lambda: _pillow_writes("ICO"), "ICO"),
    "icns": (lambda: _pillow_writes("ICNS"), "ICNS"),
    "pcx": (lambda: _pillow_writes("PCX"), "PCX"),
    "qoi": (lambda: _pillow_writes("QOI"), "QOI"),
    "jpeg2000": (lambda: _pillow_writes("JPEG2000"), "JPEG2000"),
    "avif": (lambda: _pillow_writes("AVIF"), "AVIF"),
    "sgi": (lambda: _pillow_writes("SGI"), "SGI"),
    "ppm": (lambda: _pillow_writes("PPM"), "PPM"),
    "pdf": (lambda: _pillow_writes("PDF"), None),
    "im": (lambda: _pillow_writes("IM"), None),
    "spider": (lambda: _pillow_writes("SPIDER"), None),
    "tga": (lambda: _pillow_writes("TGA"), None),
}


@pytest.fixture
def no_foreign_parser(monkeypatch):
    """Every decoder outside the allowlist is replaced by one that records being called, and
    Ghostscript by a recorder that claims to be installed: nothing may reach either."""
    Image.init()
    calls: list[str] = []
    for fmt in Image.ID:
        if fmt in ALLOWED_FORMATS:
            continue
        factory, accept = Image.OPEN[fmt]

        def opened(fp, filename=None, *args, _fmt=fmt, **kw):
            calls.append(_fmt)
            raise AssertionError(f"the {_fmt} decoder was called")

        monkeypatch.setitem(Image.OPEN, fmt, (opened, accept))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **kw: calls.append("Ghostscript"))
    return calls


@pytest.mark.parametrize("name", sorted(NOT_ALLOWED))
@pytest.mark.parametrize("file_name", ["x.JPEG", "x.jpg"])
def test_other_formats_are_refused_before_any_parser(tmp_path, settings, no_foreign_parser, name, file_name):
    """Named like a JPEG, each is skipped with the reason, and no parser of its format runs
    (EPS: no Ghostscript)."""
    make, shown = NOT_ALLOWED[name]
    data = make()
    reason = process_source(_source(tmp_path, file_name, data), settings)
    assert isinstance(reason, str), f"{name} was stored"
    if shown is None:
        assert reason.startswith(("not an image (", "not an allowed image format (")), reason
        assert reason.endswith(ALLOWED_WORDS), reason
    else:
        assert reason == f"not an allowed image format (looks like {shown}); {ALLOWED_WORDS}"
    assert no_foreign_parser == []


def test_dds_used_to_raise_not_implemented():
    """What the unrestricted Image.open did with the DDS header above (why the allowlist exists)."""
    with pytest.raises(NotImplementedError):
        Image.open(io.BytesIO(_dds_unimplemented()))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_allowed_formats_are_stored(settings, no_foreign_parser, fmt):
    arr = blocks([[RED, GREEN]])
    enc = process(encode(Image.fromarray(arr), fmt, **({"lossless": True} if fmt == "WEBP" else {})), settings)
    out = decoded(enc)
    assert_colour(out, 0, 0, RED, tol=12)  # GIF: a 256-colour palette
    assert_colour(out, 0, 1, GREEN, tol=12)
    assert no_foreign_parser == []


def test_broken_allowed_header_says_which_format():
    png = bytearray(encode(Image.fromarray(smooth_rgb(8, 8)), "PNG"))
    png[16:20] = b"\0\0\0\0"  # IHDR width 0 (the CRC now fails too)
    with pytest.raises(BadImage, match=r"^unreadable PNG header \("):
        process(bytes(png), ImageSettings())


def test_the_jpeg_decoders_only_ever_get_jpeg_signatures(monkeypatch, settings):
    """cv2.imdecode sniffs the format itself (BMP, PNG, TIFF, JPEG 2000, OpenEXR, HDR, PFM, ...):
    only data that starts with a JPEG signature may reach it, nor TurboJPEG's decoder."""
    seen: list[bytes] = []
    real_cv, real_turbo = cv2.imdecode, simplejpeg.decode_jpeg

    def spy_cv(buf, flags):
        seen.append(bytes(buf[:3]))
        return real_cv(buf, flags)

    def spy_turbo(data, *args, **kwargs):
        seen.append(bytes(data[:3]))
        return real_turbo(data, *args, **kwargs)

    monkeypatch.setattr(cv2, "imdecode", spy_cv)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy_turbo)
    arr = smooth_rgb(24, 32)
    inputs = [make() for name, (make, _) in NOT_ALLOWED.items() if name != "avif"] + [
        encode(Image.fromarray(arr), fmt) for fmt in ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")
    ] + [
        b"\xff\xd8\xff" + encode(Image.fromarray(arr), "PNG"),  # a JPEG signature, then something else
        b"#?RADIANCE\n" + b"\0" * 64,  # formats OpenCV itself would read
        b"\x76\x2f\x31\x01" + b"\0" * 64,
        b"PF\n16 16\n-1\n" + b"\0" * 3072,
    ]
    for data in inputs:
        try:
            process(data, settings)
        except BadImage:
            pass
    assert seen and set(seen) == {b"\xff\xd8\xff"}


# ----------------------------------------------------------------------------- EXIF


def _malformed_exif(orientation: int, order: str = ">") -> bytes:
    """An EXIF block with the orientation and an ImageWidth entry stored as text, not a number:
    Pillow reads the orientation, but ImageOps.exif_transpose raises struct.error ("required
    argument is not an integer") when it writes the block back (found by mutating EXIF blocks)."""
    entries = [(0x0100, 2, 4, b"EOS\0"), (0x0112, 3, 1, struct.pack(order + "HH", orientation, 0))]
    ifd = struct.pack(order + "H", len(entries)) + b"".join(
        struct.pack(order + "HHI", tag, kind, count) + value for tag, kind, count, value in entries
    ) + struct.pack(order + "I", 0)
    return b"Exif\0\0" + (b"MM" if order == ">" else b"II") + struct.pack(order + "HI", 42, 8) + ifd


def _rotated(fmt: str, orientation: int) -> bytes:
    shown = display_image()
    stored = np.ascontiguousarray(np.rot90(shown, STORED_ROTATION[orientation]))
    im = Image.fromarray(stored)
    exif = _malformed_exif(orientation)
    if fmt == "CMYK":
        return encode(im.convert("CMYK"), "JPEG", quality=95, exif=exif)
    if fmt == "PNG":
        return encode(im, "PNG", exif=exif[6:])
    if fmt == "WEBP":
        return encode(im, "WEBP", lossless=True, exif=exif)
    return encode(im, "JPEG", quality=95, exif=exif)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["JPEG", "CMYK", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_malformed_exif_with_rotation_is_stored_upright(settings, fmt, orientation):
    """The orientation is read and applied by our own table; the rest of the block is ignored.
    JPEG: OpenCV's path; CMYK JPEG, PNG (eXIf chunk), WebP: Pillow's path."""
    data = _rotated(fmt, orientation)
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.getexif().get(0x0112) == orientation
    with pytest.raises(struct.error):  # what convert called before, and died of
        ImageOps.exif_transpose(im)
    enc = process(data, settings)
    arr = decoded(enc)
    assert (enc.width, enc.height) == (48, 32)
    assert_colour(arr, 0, 0, RED)
    assert_colour(arr, 0, 2, GREEN)
    assert_colour(arr, 1, 1, WHITE)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_on_the_pillow_path_matches_exif_transpose(settings, orientation):
    stored = np.kron(display_image(), np.ones((2, 2, 1), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes()[6:])
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    arr = decoded(process(data, settings)).astype(int)
    assert arr.shape == want.shape
    assert np.abs(arr - want).mean() < 3


# ----------------------------------------------------------------------------- isolation


def test_any_exception_becomes_the_skip_reason(tmp_path, monkeypatch, settings):
    """An error no decoder was expected to raise skips that input only, with its type and message
    on one line; the chunk goes on."""
    real = imaging._process

    def flaky(data, *args, **kw):
        if data.startswith(b"\xff\xd8") and b"BOOM" in data:
            raise RuntimeError("decoder\nexploded")
        return real(data, *args, **kw)

    monkeypatch.setattr(imaging, "_process", flaky)
    good = encode(Image.fromarray(smooth_rgb(24, 32)), "JPEG")
    sources = [_source(tmp_path, f"{i}.jpg", good + (b"BOOM" if i == 1 else b"")) for i in range(3)]
    batch = process_batch(sources, settings)
    assert batch.results[1] == "cannot convert this image (RuntimeError: decoder exploded)"
    assert isinstance(batch.results[0], Encoded) and isinstance(batch.results[2], Encoded)
    assert int(batch.mean_count.max()) == 2


def test_unreadable_input_reason_is_one_line(tmp_path, settings):
    folder = tmp_path / "dir.JPEG"
    folder.mkdir()
    reason = process_source(Source("c/dir.JPEG", 0, str(folder)), settings)
    assert reason.startswith("cannot read input (") and "\n" not in reason


# ----------------------------------------------------------------------------- input size cap


def test_file_over_the_cap_is_refused_before_it_is_read(tmp_path):
    """A 100 GiB sparse file: read whole, it would take minutes and all memory."""
    path = tmp_path / "huge.JPEG"
    with open(path, "wb") as f:
        f.truncate(100 << 30)
    reason = process_source(Source("c/huge.JPEG", 0, str(path)), ImageSettings())
    assert reason == "file too large (107374182400 bytes, over the limit of 64 MiB set by --max-file-mb)"


def test_endless_device_is_cut_at_the_cap(tmp_path):
    """A link to /dev/zero reports size 0 and never ends: at most the cap + 1 byte is read."""
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    link = tmp_path / "zero.JPEG"
    link.symlink_to("/dev/zero")
    with pytest.raises(BadImage, match=r"^file too large \(0 bytes"):
        read_source(Source("c/zero.JPEG", 0, str(link)), max_mb=1)


@pytest.mark.parametrize("size,refused", [(3000, False), (1 << 20, False), ((1 << 20) + 1, True)])
def test_a_file_that_grew_after_its_size_was_read_is_read_whole_or_refused(tmp_path, monkeypatch, size, refused):
    """A regular file is read for its size and one byte more; getting that byte means it grew:
    reading goes on, and the cap still holds."""
    path = tmp_path / "growing.JPEG"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    real = os.fstat

    def stale(fd):  # the size as it was before the file grew
        info = real(fd)
        return os.stat_result((*info[:6], 100, *info[7:])) if stat.S_ISREG(info.st_mode) else info

    monkeypatch.setattr(reading.os, "fstat", stale)
    src = Source("c/growing.JPEG", 0, str(path))
    if refused:
        with pytest.raises(BadImage, match=r"^file too large \("):
            read_source(src, max_mb=1)
    else:
        assert read_source(src, max_mb=1) == path.read_bytes()


def test_archive_member_over_the_cap(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"\0" * 1024)
    with pytest.raises(BadImage, match="3145728 bytes, over the limit of 2 MiB"):
        read_source(Source("c/x.JPEG", 0, str(archive), 512, 3 << 20), max_mb=2)
    assert read_source(Source("c/x.JPEG", 0, str(archive), 512, 100), max_mb=2) == b"\0" * 100


def test_size_cap_is_an_option_of_convert(tmp_path):
    raw = tmp_path / "raw"
    (raw / "cat").mkdir(parents=True)
    (raw / "cat" / "small.jpg").write_bytes(encode(Image.fromarray(smooth_rgb(40, 40)), "JPEG"))
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), np.uint8))
    (raw / "cat" / "big.png").write_bytes(encode(big, "PNG"))  # ~1.9 MB
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(out), "--workers", "1",
                          "--no-progress", "--max-file-mb", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    manifest = load_dataset(out).manifest
    assert manifest["settings"]["max_file_mb"] == 1
    [skipped] = manifest["skipped"]
    assert skipped["name"] == "cat/big.png" and "over the limit of 1 MiB set by --max-file-mb" in skipped["reason"]
    assert manifest["splits"]["train"]["records"] == 1


# ----------------------------------------------------------------------------- colour


def _colour_blocks() -> np.ndarray:
    return blocks([[(200, 30, 30), (30, 160, 40), (40, 60, 200)], [(90, 150, 200), (220, 200, 60), (128, 128, 128)]])


def _with_profile(arr: np.ndarray, fmt: str, profile: bytes, **kw) -> bytes:
    im = Image.fromarray(arr)
    if fmt == "PROGRESSIVE":
        return encode(im, "JPEG", quality=95, progressive=True, icc_profile=profile, **kw)
    if fmt == "JPEG":
        return encode(im, "JPEG", quality=95, icc_profile=profile, **kw)
    if fmt == "WEBP":
        return encode(im, "WEBP", lossless=True, icc_profile=profile, **kw)
    return encode(im, fmt, icc_profile=profile, **kw)


def _block_means(arr: np.ndarray, rows: int = 2, cols: int = 3) -> np.ndarray:
    from tests.helpers.image_builders import block_colour

    return np.array([[block_colour(arr, r, c) for c in range(cols)] for r in range(rows)])


@pytest.mark.parametrize("fmt", ["JPEG", "PROGRESSIVE", "PNG", "WEBP", "TIFF"])
def test_adobe_rgb_is_converted_to_srgb(settings, fmt):
    """The stored pixels are LittleCMS's sRGB conversion of the source (within JPEG error), far
    from the unconverted values (which look desaturated when read as sRGB)."""
    src = _colour_blocks()
    data = _with_profile(src, fmt, icc.adobe_rgb())
    source = Image.open(io.BytesIO(data)).convert("RGB")
    want = np.asarray(ImageCms.profileToProfile(source, ImageCms.ImageCmsProfile(io.BytesIO(icc.adobe_rgb())),
                                                ImageCms.createProfile("sRGB")))
    enc = process(data, settings)
    assert not enc.passthrough
    got = _block_means(decoded(enc))
    assert np.abs(got - _block_means(want)).max() <= 6
    assert np.abs(got - _block_means(np.asarray(source))).max() >= 25  # red 200 -> ~233, blue 40 -> ~21, ...


def test_adobe_rgb_jpeg_is_never_passed_through():
    """A clean baseline JPEG at the target size passes through byte for byte, but not with an
    Adobe RGB profile (DALI would read its pixels as sRGB); with an sRGB profile it still may."""
    arr = smooth_rgb(48, 64)
    settings = ImageSettings(short_side=48)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = process(encode(Image.fromarray(arr), "JPEG", quality=90), settings)
    tagged_srgb = _with_profile(arr, "JPEG", srgb)
    adobe = process(_with_profile(arr, "JPEG", icc.adobe_rgb()), settings)
    assert plain.passthrough
    assert process(tagged_srgb, settings).passthrough and process(tagged_srgb, settings).jpeg == tagged_srgb
    assert not adobe.passthrough and b"ICC_PROFILE" not in adobe.jpeg


def test_profile_split_over_several_jpeg_segments():
    """A profile over 64 KiB is stored in several APP2 segments, joined in sequence order."""
    profile = icc.adobe_rgb(padding=150_000)
    data = _with_profile(_colour_blocks(), "JPEG", profile)
    assert data.count(b"ICC_PROFILE\0") == 3
    assert jpeg_header(data).icc == profile == Image.open(io.BytesIO(data)).info["icc_profile"]
    enc = process(data, ImageSettings(upscale=False))
    want = process(_with_profile(_colour_blocks(), "JPEG", icc.adobe_rgb()), ImageSettings(upscale=False))
    assert np.abs(decoded(enc).astype(int) - decoded(want).astype(int)).max() <= 2


def _ink(c: int, m: int, y: int, k: int) -> tuple[float, float, float]:
    """Lab of an ink corner of a made-up press: warm paper, cyan-ish cyan, rich (not pure) black."""
    return max(96 - 27 * c - 20 * m - 10 * y - 70 * k, 5), -30 * c + 60 * m - 5 * y, -40 * c - 5 * m + 70 * y + 4


def test_cmyk_profile_is_applied(settings):
    """A CMYK JPEG (Adobe, inverted samples) with a CMYK profile: converted through the profile,
    not by Pillow's naive 255 - ink formula."""
    cmyk = blocks([[(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0)], [(0, 0, 255, 0), (0, 0, 0, 255), (128, 64, 0, 30)]])
    profile = icc.cmyk_profile(_ink)
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95, icc_profile=profile)
    source = Image.open(io.BytesIO(data))
    want = np.asarray(ImageCms.profileToProfile(source, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                                ImageCms.createProfile("sRGB"), outputMode="RGB"))
    got = _block_means(decoded(process(data, settings)))
    assert np.abs(got - _block_means(want)).max() <= 6
    assert np.abs(got - _block_means(np.asarray(source.convert("RGB")))).max() >= 40


def test_grey_profile_is_applied(settings):
    """A linear-light greyscale JPEG: 128 is sRGB ~188 (brighter), 0 and 255 stay."""
    grey = blocks([[(0,), (128,), (255,)]])[..., 0]
    data = encode(Image.fromarray(grey, "L"), "JPEG", quality=95, icc_profile=icc.linear_grey())
    arr = decoded(process(data, settings))
    assert_colour(arr, 0, 0, (0, 0, 0), tol=3)
    assert_colour(arr, 0, 1, (188, 188, 188), tol=4)
    assert_colour(arr, 0, 2, (255, 255, 255), tol=3)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "grey_profile_on_rgb"])
def test_unusable_profile_keeps_the_image_as_srgb(tmp_path, caplog, kind):
    """Decision: an ICC profile that cannot be used does not cost the image. It is stored,
    re-encoded (so the broken profile is not carried into the dataset), its pixels read as
    sRGB as every viewer reads an untagged image, and the log says so, naming the input."""
    profile = {"garbage": b"\0\1\2\3" * 40, "truncated": icc.adobe_rgb()[:200],
               "grey_profile_on_rgb": icc.linear_grey()}[kind]
    arr = smooth_rgb(48, 64)
    data = _with_profile(arr, "JPEG", profile)
    with caplog.at_level(logging.WARNING, logger="alexnet_pipe.imaging.process"):
        enc = process_source(_source(tmp_path, "odd.jpg", data), ImageSettings(short_side=48))
    assert isinstance(enc, Encoded) and not enc.passthrough and b"ICC_PROFILE" not in enc.jpeg
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(decoded(enc).astype(int) - ref).mean() < 3
    [record] = [r for r in caplog.records if r.name == "alexnet_pipe.imaging.process"]
    assert record.getMessage().startswith("c/odd.jpg: ") and "colours read as sRGB" in record.getMessage()


def _tiff_with_text_profile() -> bytes:
    """A TIFF whose ICC profile tag (34675) says ASCII instead of UNDEFINED: Pillow hands the
    profile over as a str (found by the fuzz, seed 114)."""
    data = bytearray(encode(Image.fromarray(smooth_rgb(24, 32)), "TIFF", icc_profile=icc.adobe_rgb()))
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    for i in range(struct.unpack_from(order + "H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from(order + "H", data, entry)[0] == 34675:
            struct.pack_into(order + "H", data, entry + 2, 2)
    return bytes(data)


def test_profile_of_the_wrong_type_keeps_the_image(tmp_path, caplog):
    data = _tiff_with_text_profile()
    assert isinstance(Image.open(io.BytesIO(data)).info["icc_profile"], str)
    with caplog.at_level(logging.WARNING, logger="alexnet_pipe.imaging.process"):
        enc = process_source(_source(tmp_path, "t.tif", data), ImageSettings(upscale=False))
    assert isinstance(enc, Encoded)
    assert np.abs(decoded(enc).astype(int) - smooth_rgb(24, 32).astype(int)).mean() < 3
    assert "unreadable ICC profile (a str, not bytes)" in caplog.text


# ----------------------------------------------------------------------------- a worker that dies


CRASHER = textwrap.dedent("""
    # Test hook (tests/imaging/test_process_faults.py): a worker that decodes an input holding the marker
    # dies of SIGSEGV, as a native decoder crash would kill it.
    import os, resource, signal
    if os.environ.get("ALEXNET_PIPE_TEST_CRASH_MARKER"):
        import alexnet_pipe.imaging.process as imaging
        marker, real = os.environ["ALEXNET_PIPE_TEST_CRASH_MARKER"].encode(), imaging._process

        def _process(data, *args, **kw):
            if marker in data:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                os.kill(os.getpid(), signal.SIGSEGV)
            return real(data, *args, **kw)

        imaging._process = _process
""")


def test_worker_killed_by_one_image_skips_only_that_image(tmp_path):
    """A decoder that crashes natively kills its worker and breaks the pool: the chunks in flight
    are rerun on their own, the killer image alone, and only it is skipped, with the signal."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHER)
    raw = tmp_path / "raw"
    names = []
    for cls in ("ant", "bee"):
        for i in range(24):
            data = encode(Image.fromarray(smooth_rgb(40 + i, 48)), "JPEG")
            if (cls, i) == ("bee", 7):
                data += b"KILL-THE-WORKER"  # after the end-of-image marker: a valid JPEG otherwise
            (raw / cls).mkdir(parents=True, exist_ok=True)
            (raw / cls / f"{i}.jpg").write_bytes(data)
            names.append(f"{cls}/{i}.jpg")
    env = {**os.environ, "ALEXNET_PIPE_TEST_CRASH_MARKER": "KILL-THE-WORKER",
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(out), "--workers", "2",
                          "--no-progress", "--short-side", "32", "--shard-size", "8"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "a worker process died" in res.stderr
    manifest = load_dataset(out).manifest
    assert manifest["skipped"] == [{"split": "train", "name": "bee/7.jpg",
                                    "reason": "the image decoder crashed its process (killed by signal SIGSEGV)"}]
    assert manifest["splits"]["train"]["records"] == len(names) - 1
    assert manifest["splits"]["train"]["class_counts"] == [24, 23]
    # The same images and mean as a run where that image is simply absent (nothing else lost).
    (raw / "bee" / "7.jpg").unlink()
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(clean), "--workers", "2",
                    "--no-progress", "--short-side", "32", "--shard-size", "8"], check=True, capture_output=True)
    assert json.loads((out / "mean.json").read_text()) == json.loads((clean / "mean.json").read_text())
    assert np.array_equal(np.load(out / "mean_image.npy"), np.load(clean / "mean_image.npy"))
