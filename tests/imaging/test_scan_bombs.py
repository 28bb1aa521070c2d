"""Decode time bombs (issue 23, defect 3; docs/RELIABILITY.md): libjpeg decodes every scan a JPEG holds, so one
scan repeated thousands of times makes a small file take minutes. Such a JPEG is refused before any pixel is
decoded, by convert (skipped with its reason) and predict (that file's error); every real layout keeps its scans.
"""

from __future__ import annotations

import io
import json
import re
import struct
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
import torch
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.cli import main
from alexnet_pipe.config import ImageSettings
from alexnet_pipe.imaging import decode
from alexnet_pipe.imaging.process import process
from alexnet_pipe.imaging.reasons import BadImage
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from tests.helpers.images import make_tree, smooth_image

SETTINGS = ImageSettings(short_side=32)
# Where a scan's entropy-coded data ends in an encoder's output: the first marker that is not a restart (the
# bombs are cut with this, independently of decode.py's walk).
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def gradient(side: int, mode: str = "L", **save) -> bytes:
    """A progressive JPEG of a smooth gradient (by Pillow): later scans of a few bytes each."""
    ramp = (np.add.outer(np.arange(side), np.arange(side)) * 255 // (2 * side)).astype(np.uint8)
    im = Image.fromarray(ramp if mode == "L" else np.stack([ramp, ramp[::-1], ramp.T], -1)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, progressive=True, **save)
    return buf.getvalue()


def scans_of(data: bytes) -> list[bytes]:
    """Each scan of an encoder's JPEG (no stray bytes): its SOS segment and its entropy-coded data."""
    out, pos = [], 2
    while data[pos + 1] != 0xD9:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:
            end = _SCAN_END.search(data, pos + 2 + length).start()
            out.append(data[pos:end])
            pos = end
        else:
            pos += 2 + length
    return out


def bomb(data: bytes, copies: int, before: bytes = b"") -> bytes:
    """``data`` with its smallest later scan repeated ``copies`` times before EOI, each after ``before``."""
    scan = min(scans_of(data)[1:], key=len)
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + (before + scan) * copies + data[eoi:]


def decodes(data: bytes) -> bool:
    """libjpeg (OpenCV's decoder) gives pixels: a bomb is a valid image, not a broken file."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


def with_segments(data: bytes, *segments: tuple[int, bytes]) -> bytes:
    """``data`` with (marker, body) segments inserted after SOI."""
    return data[:2] + b"".join(bytes((0xFF, m)) + struct.pack(">H", len(b) + 2) + b for m, b in segments) + data[2:]


def exif_with_thumbnail(thumb: bytes) -> bytes:
    """An APP1 EXIF body as cameras write it: IFD0 (orientation 1), IFD1 holding a whole JPEG thumbnail."""
    ifd0 = struct.pack("<HHHII", 1, 0x0112, 3, 1, 1) + struct.pack("<I", 26)  # IFD1 at 8 + 18
    at = 26 + 2 + 2 * 12 + 4
    ifd1 = struct.pack("<HHHII", 2, 0x0201, 4, 1, at) + struct.pack("<HHII", 0x0202, 4, 1, len(thumb))
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd0 + ifd1 + struct.pack("<I", 0) + thumb


def _cv(bgr: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90, *params])
    assert ok
    return buf.tobytes()


def _valid() -> dict[str, tuple[bytes, int]]:
    """Real layouts: (file, the scans libjpeg decodes)."""
    bgr = smooth_image(3, 160, 120)
    thumb = _cv(smooth_image(4, 40, 30))  # baseline: 1 SOS of its own
    progressive = gradient(96, "RGB")
    exif = with_segments(progressive, (0xE1, exif_with_thumbnail(thumb)))
    assert thumb in exif and decode.jpeg_header(exif).orientation == 1  # the EXIF block is read as one
    return {
        "Pillow progressive grey": (gradient(64), 6),
        "Pillow progressive colour": (progressive, 10),
        "OpenCV progressive": (_cv(bgr, cv2.IMWRITE_JPEG_PROGRESSIVE, 1), 10),
        "OpenCV progressive with restart markers": (
            _cv(bgr, cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 1), 10),
        "baseline with restart markers": (_cv(bgr, cv2.IMWRITE_JPEG_RST_INTERVAL, 1), 1),
        "EXIF thumbnail with its own SOS": (exif, 10),
        # More FF DA pairs than the limit, all inside segments (a thumbnail in each of 150 APP segments)
        "150 thumbnails in APP segments": (with_segments(progressive, *[(0xEC, thumb)] * 150), 10),
        "COM segment of FF DA pairs": (with_segments(progressive, (0xFE, b"\xff\xda" * 1000)), 10),
    }


VALID = _valid()


@pytest.mark.parametrize("name", sorted(VALID))
def test_real_jpegs_keep_their_scans_and_convert(name):
    data, scans = VALID[name]
    if "restart" in name:
        assert re.search(rb"\xff[\xd0-\xd7]", data)  # the restart markers are there
    assert decode.jpeg_scans(data) == scans
    head = decode.jpeg_header(data)
    assert head.fast and decode.jpeg_scans(data, head.scan) == scans  # the header's walk, on from the first scan
    process(data, SETTINGS)  # converted, not refused


BOMBS = {  # name: (file, scans)
    "grey": (bomb(gradient(64), 300), 306),
    "colour": (bomb(gradient(64, "RGB"), 250), 260),
    "stray bytes before each scan (libjpeg skips them)": (bomb(gradient(64), 300, b"junk"), 306),
    "fill bytes before each scan": (bomb(gradient(64), 300, b"\xff\xff\xff"), 306),
    "empty segments between the scans": (bomb(gradient(64), 300, b"\xff\xfe\x00\x02\xff\xdd\x00\x04\x00\x00"), 306),
    "CMYK (Pillow's decoder)": (bomb(gradient(64, "CMYK"), 300), 318),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_repeated_scans_are_refused_before_decoding(name):
    data, scans = BOMBS[name]
    assert decodes(data)
    head = decode.jpeg_header(data)
    assert head is not None and head.fast == ("CMYK" not in name)
    with pytest.raises(BadImage, match=rf"^decompression time bomb: the JPEG has {scans} scans, over the limit of "
                                       rf"100 \(each scan is another decoding pass"):
        process(data, SETTINGS)


def test_the_limit_is_more_than_a_hundred_scans():
    base = gradient(64)
    at_limit = bomb(base, decode.MAX_SCANS - 6)
    assert decode.jpeg_scans(at_limit) == decode.MAX_SCANS
    process(at_limit, SETTINGS)
    with pytest.raises(BadImage, match="has 101 scans"):
        process(bomb(base, decode.MAX_SCANS - 5), SETTINGS)


def test_the_walks_are_bounded():
    """Tens of thousands of markers, or a megabyte of bytes that Pillow's header parse reads one at a time:
    one line each, in well under a second (before: converted, in seconds for a 64 MiB file)."""
    base = gradient(64)
    eoi, sos = base.rindex(b"\xff\xd9"), base.index(b"\xff\xda")
    cases = {  # the file: the reason
        base[:eoi] + b"\xff\xfe\x00\x02" * 70_000 + base[eoi:]: "not a usable JPEG: more than 65536 markers before",
        with_segments(base, *[(0xFE, b"")] * 70_000): "not a usable JPEG: more than 65536 markers before",
        bomb(base, 70_000): r"decompression time bomb: the JPEG has more than 6\d{4} scans, over the limit",
        base[:sos] + b"\xff" * (1 << 20) + base[sos:]: "not a usable JPEG: more than 65536 stray bytes",
        base[:sos] + b"junk" * (1 << 18) + base[sos:]: "not a usable JPEG: more than 65536 stray bytes",
        base[:sos] + b"\xff\x00" * (1 << 19): "not a usable JPEG: more than 65536 stray bytes",  # and no scan at all
    }
    for data, reason in cases.items():
        start = time.perf_counter()
        with pytest.raises(BadImage, match="^" + reason):
            process(data, SETTINGS)
        assert time.perf_counter() - start < 0.5, reason


def test_a_baseline_jpeg_is_not_walked_because_libjpeg_reads_one_scan():
    """The premise of skipping the walk for a sequential frame whose first scan holds every component:
    libjpeg refuses a second scan there (its has_multiple_scans), so repeats cost nothing."""
    data = _cv(smooth_image(5, 64, 48))
    scan = scans_of(data)[0]
    eoi = data.rindex(b"\xff\xd9")
    repeated = data[:eoi] + scan * 300 + data[eoi:]
    with pytest.raises(ValueError, match="more than one scan"):
        simplejpeg.decode_jpeg(repeated, "BGR", strict=False)
    process(repeated, SETTINGS)  # OpenCV decodes the first scan and stops: no time bomb


def _convert(raw: Path, out: Path) -> dict:
    res = CliRunner().invoke(main, ["convert", str(raw), str(out), "--no-progress", "--workers", "1",
                                    "--short-side", "32"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    return json.loads((out / "manifest.json").read_text())


def test_convert_skips_the_bomb_with_its_reason_and_converts_the_rest(tmp_path):
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 2, "val": 1})
    (raw / "train" / "ant" / "bomb.jpg").write_bytes(BOMBS["grey"][0])
    manifest = _convert(raw, tmp_path / "out")
    (skip,) = manifest["skipped"]
    assert skip["name"].endswith("ant/bomb.jpg")
    assert skip["reason"].startswith("decompression time bomb: the JPEG has 306 scans, over the limit of 100")
    assert manifest["splits"]["train"]["records"] == 6 and manifest["splits"]["val"]["records"] == 3


@pytest.mark.usefixtures("torch_threads")
def test_predict_reports_the_bomb_as_that_files_error(tmp_path):
    cfg = AlexNetConfig(num_classes=3, crop=67, arch="neon")
    model = build_model(cfg, generator=torch.Generator().manual_seed(0), init="kaiming")
    data = {"classes": ["a", "b", "c"], "class_names": ["", "", ""], "mean_rgb": [0.0, 0.0, 0.0], "std_rgb": None,
            "crop": 67, "short_side": 80, "channel_order": "RGB", "value_range": [0, 255]}
    weights = tmp_path / "w.pt"
    checkpoint.save(weights, {"kind": "weights", "model": model.state_dict(), "model_config": cfg.to_dict(),
                              "data": data})
    good = tmp_path / "good.jpg"
    good.write_bytes(_cv(smooth_image(6, 120, 90)))
    bad = tmp_path / "bomb.jpg"
    bad.write_bytes(BOMBS["colour"][0])
    res = CliRunner().invoke(main, ["predict", "-b", "cpu", "--json", "--model-file", str(weights), str(bad),
                                    str(good)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    answers = json.loads(res.stdout)
    assert answers[0]["error"].startswith("decompression time bomb: the JPEG has 260 scans")
    assert "top5" not in answers[0]
    assert len(answers[1]["top5"]) == 3


@pytest.mark.faults
def test_the_reported_bomb_is_refused_in_well_under_a_second():
    """The issue's bomb: 9000 x 9000 grey, progressive, a scan repeated 1,000 times (~8 s to decode before)."""
    data = bomb(gradient(9000), 1000)
    assert len(data) < 1 << 20
    start = time.perf_counter()
    with pytest.raises(BadImage, match="the JPEG has 1006 scans"):
        process(data, ImageSettings())
    assert time.perf_counter() - start < 0.25


@pytest.mark.faults
@pytest.mark.parametrize("filler", [b"\xff\x00", b"\xff\xff", b"\xff\xd0", b"\xffjunk"], ids=repr)
def test_the_walk_takes_linear_time_over_64_mib(filler):
    """The bytes that cost the walk most (every one a candidate marker), 64 MiB of them in a scan."""
    base = gradient(64)
    eoi = base.rindex(b"\xff\xd9")
    data = base[:eoi] + filler * ((64 << 20) // len(filler)) + base[eoi:]
    start = time.perf_counter()
    try:
        scans = decode.jpeg_scans(data)
    except BadImage as exc:  # b"\xffjunk": every pair a marker libjpeg would stop at
        assert "more than 65536 markers" in str(exc)
    else:
        assert scans == 6
    assert time.perf_counter() - start < 2.0
