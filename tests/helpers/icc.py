"""Minimal ICC v2 profiles written byte by byte (Pillow's ImageCms can only create sRGB, Lab and XYZ).

A matrix/TRC display profile is a 128-byte header, a tag table and a few tags: the white point,
the D50-adapted XYZ colorants of the three primaries and one tone curve per channel
(ICC.1:2001-04, sections 6 and 6.5). LittleCMS builds its transforms from exactly these.
"""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)
# Adobe RGB (1998): the primaries adapted to D50 (Bradford), as in Adobe's AdobeRGB1998.icc,
# and its gamma 563/256 = 2.19921875.
ADOBE_RGB_COLORANTS = ((0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457))
ADOBE_RGB_GAMMA = 563 / 256


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def xyz_tag(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def curve_tag(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def desc_tag(text: str) -> bytes:
    t = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(t)) + t + struct.pack(">IIHB", 0, 0, 0, 0) + b"\0" * 67


def text_tag(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


def profile(space: bytes, tags: list[tuple[bytes, bytes]], device_class: bytes = b"mntr") -> bytes:
    """An ICC v2.1 profile of ``space`` ("RGB ", "GRAY") with ``tags`` [(signature, data)]."""
    table_end = 128 + 4 + 12 * len(tags)
    entries, body = [], b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)  # every tag starts on a 4-byte boundary
        entries.append(struct.pack(">4sII", sig, table_end + len(body), len(data)))
        body += data
    header = (
        struct.pack(">I", table_end + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + device_class + space + b"XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"APPL" + b"\0" * 20
        + struct.pack(">I", 0) + _s15(D50[0]) + _s15(D50[1]) + _s15(D50[2]) + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + body


def adobe_rgb(padding: int = 0) -> bytes:
    """Adobe RGB (1998). ``padding``: bytes of extra text tag, to make a profile that a JPEG
    must split over several APP2 segments (64 KiB each)."""
    r, g, b = ADOBE_RGB_COLORANTS
    tags = [(b"desc", desc_tag("Adobe RGB (1998), test copy")), (b"cprt", text_tag("none")), (b"wtpt", xyz_tag(*D50)),
            (b"rXYZ", xyz_tag(*r)), (b"gXYZ", xyz_tag(*g)), (b"bXYZ", xyz_tag(*b)),
            (b"rTRC", curve_tag(ADOBE_RGB_GAMMA)), (b"gTRC", curve_tag(ADOBE_RGB_GAMMA)),
            (b"bTRC", curve_tag(ADOBE_RGB_GAMMA))]
    if padding:
        tags.append((b"targ", text_tag("x" * padding)))
    return profile(b"RGB ", tags)


def linear_grey() -> bytes:
    """A greyscale profile with a linear tone curve (gamma 1.0): mid grey 128 is sRGB ~188."""
    return profile(b"GRAY", [(b"desc", desc_tag("linear grey, test")), (b"cprt", text_tag("none")),
                             (b"wtpt", xyz_tag(*D50)), (b"kTRC", curve_tag(1.0))])


def lut16_tag(inputs: int, grid: list[tuple[int, int, int]]) -> bytes:
    """lut16Type with a 2-point grid per input (``grid``: 2**inputs PCS values, first input slowest),
    identity input and output curves."""
    head = b"mft2\0\0\0\0" + bytes([inputs, 3, 2, 0])
    head += b"".join(_s15(1.0 if r == c else 0.0) for r in range(3) for c in range(3))
    head += struct.pack(">HH", 2, 2)
    curves_in = struct.pack(">HH", 0, 0xFFFF) * inputs
    table = b"".join(struct.pack(">3H", *v) for v in grid)
    return head + curves_in + table + struct.pack(">HH", 0, 0xFFFF) * 3


def cmyk_profile(lab_of_corner) -> bytes:
    """A CMYK printer profile (PCS Lab) whose A2B0 interpolates the Lab colours of the 16 ink
    corners: ``lab_of_corner(c, m, y, k)`` (each 0 or 1) -> (L 0..100, a, b)."""
    grid = []
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    L, a, b = lab_of_corner(c, m, y, k)
                    grid.append((round(L / 100 * 0xFF00), round((a + 128) * 256), round((b + 128) * 256)))
    tags = [(b"desc", desc_tag("CMYK, test")), (b"cprt", text_tag("none")), (b"wtpt", xyz_tag(*D50)),
            (b"A2B0", lut16_tag(4, grid))]
    data = bytearray(profile(b"CMYK", tags, device_class=b"prtr"))
    data[20:24] = b"Lab "  # the PCS
    return bytes(data)
