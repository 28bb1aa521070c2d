"""Seeded mutation fuzz of the image path (issue 7, section 3; docs/RELIABILITY.md).

Valid JPEG, PNG and WebP files (baseline, progressive, grey, CMYK, alpha, palette, 16-bit,
with EXIF orientation, with an Adobe RGB profile, lossy and lossless) are mutated
with a seeded generator: bit flips, truncation, byte runs (overwritten, inserted, deleted),
header field edits (JPEG SOF and segment lengths, PNG IHDR and chunk lengths with the CRC
fixed, WebP RIFF, VP8, VP8L and VP8X sizes) and corrupt EXIF blocks holding an orientation tag.
The mutants go into one class folder and the real ``convert`` runs on them through the CLI with
two worker processes. It must finish (exit 0, no traceback), and every input must be either
stored or listed in the manifest's ``skipped`` with a reason; ``verify`` must then pass.

``make test`` runs 60 mutants (20 per type); ``make faults`` runs 1,600: 400 each of JPEG, PNG and
WebP, and 200 TIFF, 100 GIF and 100 BMP (generic mutations and header edits of the other allowed
formats: TIFF brings libtiff and its codecs).
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from alexnet_pipe.dataset.manifest import load_dataset
from tests.helpers import icc

SEED = 7
MUTATIONS = ("bit_flips", "truncation", "byte_run", "header_edit", "exif")
EXTENSIONS = {"jpeg": "JPEG", "png": "png", "webp": "webp", "tiff": "tif", "gif": "gif", "bmp": "bmp"}


# ----------------------------------------------------------------------------- valid seeds


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), (x * y) % 256], -1).astype(np.int16)
    return np.clip(arr + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "FuzzCam"
    exif[0x0112] = orientation
    return exif.tobytes()


def seed_files() -> dict[str, list[bytes]]:
    rgb = Image.fromarray(_photo(48, 64, 0))
    rgba = Image.fromarray(np.dstack([_photo(40, 40, 1), np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1))]), "RGBA")
    adobe = icc.adobe_rgb()
    return {
        "jpeg": [
            _save(rgb, "JPEG", quality=90),
            _save(rgb, "JPEG", quality=75, progressive=True),
            _save(rgb.convert("L"), "JPEG", quality=90),
            _save(rgb.convert("CMYK"), "JPEG", quality=90),
            _save(rgb, "JPEG", quality=90, exif=_exif(6)),
            _save(rgb, "JPEG", quality=90, icc_profile=adobe),
            _save(rgb, "JPEG", quality=95, subsampling=0),
        ],
        "png": [
            _save(rgb, "PNG"),
            _save(rgba, "PNG"),
            _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
            _save(Image.fromarray(_photo(32, 32, 2)[..., 0].astype(np.uint16) * 257), "PNG"),
            _save(rgb.convert("LA"), "PNG", optimize=True),
            _save(rgb, "PNG", icc_profile=adobe),
            _save(rgb, "PNG", exif=_exif(8)[6:]),
        ],
        "webp": [
            _save(rgb, "WEBP", quality=80),
            _save(rgb, "WEBP", lossless=True),
            _save(rgba, "WEBP", quality=80),
            _save(rgb, "WEBP", quality=80, exif=_exif(3), icc_profile=adobe),
        ],
        # The other allowed formats, in the full suite only (TIFF: libtiff and its codecs).
        "tiff": [
            _save(rgb, "TIFF"),
            _save(rgb, "TIFF", compression="tiff_lzw"),
            _save(rgb, "TIFF", compression="tiff_adobe_deflate", tiffinfo={274: 6}),
            _save(rgb, "TIFF", compression="jpeg"),
            _save(rgb, "TIFF", compression="packbits", icc_profile=adobe),
            _save(rgb.convert("CMYK"), "TIFF"),
            _save(Image.fromarray(_photo(32, 32, 3)[..., 1].astype(np.uint16) * 257), "TIFF"),
        ],
        "gif": [
            _save(rgb.convert("P"), "GIF"),
            _save(rgb.convert("P"), "GIF", transparency=0),
            _save(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.rotate(90).convert("P")], duration=100),
        ],
        "bmp": [_save(rgb, "BMP"), _save(rgb.convert("P"), "BMP"), _save(rgb.convert("L"), "BMP")],
    }


FAST = {"jpeg": 20, "png": 20, "webp": 20}  # make test
FULL = {"jpeg": 400, "png": 400, "webp": 400, "tiff": 200, "gif": 100, "bmp": 100}  # make faults


# ----------------------------------------------------------------------------- mutations


def _interesting(rng: np.random.Generator, old: int, bits: int) -> int:
    top = (1 << bits) - 1
    choices = [0, 1, 2, top, top >> 1, (top >> 1) + 1, old + 1, old - 1, old ^ (1 << int(rng.integers(bits))),
               int(rng.integers(0, top + 1))]
    return int(choices[int(rng.integers(len(choices)))]) & top


def _jpeg_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of header fields: segment lengths, SOF/SOS/DQT/DHT/DRI parameters."""
    fields, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        fields.append((pos + 2, 2))
        body = pos + 4
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            fields += [(body, 1), (body + 1, 2), (body + 3, 2), (body + 5, 1)]
            fields += [(body + 6 + i, 1) for i in range(max(0, length - 8))]  # component ids, sampling, tables
        elif marker in (0xDB, 0xC4, 0xDD, 0xDA):
            fields += [(body + i, 1) for i in range(min(6, max(0, length - 2)))]
        if marker == 0xDA:
            break
        pos += 2 + length
    return fields


def _png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, length, type) of every chunk."""
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((pos, length, data[pos + 4 : pos + 8]))
        pos += 12 + length
    return chunks


def _fix_png_crc(data: bytearray, offset: int, length: int) -> None:
    end = offset + 8 + length
    if end + 4 <= len(data):
        data[end : end + 4] = struct.pack(">I", zlib.crc32(data[offset + 4 : end]))


def _webp_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, byte order) of RIFF/chunk sizes and the VP8, VP8L and VP8X size fields."""
    fields = [(4, 4, "<")]
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        fields.append((pos + 4, 4, "<"))
        body = pos + 8
        if kind == b"VP8 ":
            fields += [(body + 6, 2, "<"), (body + 8, 2, "<"), (body, 3, "<")]
        elif kind == b"VP8L":
            fields += [(body + 1, 4, "<"), (body, 1, "<")]
        elif kind == b"VP8X":
            fields += [(body, 1, "<"), (body + 4, 3, "<"), (body + 7, 3, "<")]
        pos = body + size + (size & 1)
    return fields


def _tiff_fields(data: bytes) -> list[tuple[int, int, str]]:
    """The IFD offset and every IFD0 entry's type, count and value/offset fields."""
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    fields = [(4, 4, order)]
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        fields += [(entry + 2, 2, order), (entry + 4, 4, order), (entry + 8, 4, order), (entry + 8, 2, order)]
    return fields


def _gif_fields(data: bytes) -> list[tuple[int, int, str]]:
    """Screen size and flags; the first image descriptor's position, size, flags and LZW code size."""
    fields = [(6, 2, "<"), (8, 2, "<"), (10, 1, "<")]
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    image = data.find(b",", start)
    if image > 0:
        fields += [(image + 1, 2, "<"), (image + 3, 2, "<"), (image + 5, 2, "<"), (image + 7, 2, "<"),
                   (image + 9, 1, "<")]
        table = 3 << ((data[image + 9] & 7) + 1) if data[image + 9] & 0x80 else 0
        fields.append((image + 10 + table, 1, "<"))
    return fields


BMP_FIELDS = [(2, 4, "<"), (10, 4, "<"), (14, 4, "<"), (18, 4, "<"), (22, 4, "<"), (26, 2, "<"), (28, 2, "<"),
              (30, 4, "<"), (34, 4, "<"), (46, 4, "<")]


def header_edit(kind: str, data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    if kind in ("tiff", "gif", "bmp"):
        fields = {"tiff": _tiff_fields, "gif": _gif_fields, "bmp": lambda d: BMP_FIELDS}[kind](data)
        offset, size, order = fields[int(rng.integers(len(fields)))]
    elif kind == "jpeg":
        offset, size = _jpeg_fields(data)[int(rng.integers(len(_jpeg_fields(data))))]
        order = ">"
    elif kind == "png":
        chunks = _png_chunks(data)
        offset, length, ctype = chunks[0] if rng.random() < 0.6 else chunks[int(rng.integers(len(chunks)))]
        if ctype == b"IHDR" and rng.random() < 0.85:
            field = [(8, 4), (12, 4), (16, 1), (17, 1), (18, 1), (19, 1), (20, 1)][int(rng.integers(7))]
            start, size = offset + field[0], field[1]
        else:
            start, size = offset, 4  # a chunk's length field
        old = int.from_bytes(out[start : start + size], "big")
        out[start : start + size] = _interesting(rng, old, 8 * size).to_bytes(size, "big")
        if rng.random() < 0.9:  # mostly with a valid CRC, so the edit reaches the decoder
            _fix_png_crc(out, offset, int.from_bytes(out[offset : offset + 4], "big") if start != offset else length)
        return bytes(out)
    else:
        fields = _webp_fields(data)
        offset, size, order = fields[int(rng.integers(len(fields)))]
    if offset + size > len(out):
        return bytes(out[: len(out) // 2])
    byteorder = "big" if order == ">" else "little"
    old = int.from_bytes(out[offset : offset + size], byteorder)
    out[offset : offset + size] = _interesting(rng, old, 8 * size).to_bytes(size, byteorder)
    return bytes(out)


def corrupt_exif(rng: np.random.Generator) -> bytes:
    """A TIFF-structured EXIF payload (after "Exif\\0\\0") with an orientation tag, then broken."""
    order = "<" if rng.random() < 0.5 else ">"
    orientation = [1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 255, 65535][int(rng.integers(12))]
    kind = [3, 3, 3, 4, 1, 2, 5, 7, 9, 0, 13, 99][int(rng.integers(12))]
    count = [1, 1, 1, 0, 2, 0x7FFFFFFF, 4][int(rng.integers(7))]
    entries = [
        (0x0100, 2, 4, b"EOS\0"),  # a numeric tag stored as text
        (0x0112, kind, count, struct.pack(order + "HH", orientation, 0)),
        (0x011A, 5, 1, struct.pack(order + "I", int(rng.integers(0, 400)))),  # offset maybe past the end
        (0x8769, 4, 1, struct.pack(order + "I", int(rng.integers(0, 120)))),  # Exif IFD pointer: maybe a loop
    ]
    rng.shuffle(entries)
    n = len(entries) if rng.random() < 0.7 else int(rng.integers(0, 0x10000))
    ifd = struct.pack(order + "H", n) + b"".join(struct.pack(order + "HHI", t, k, c) + v for t, k, c, v in entries)
    ifd += struct.pack(order + "I", [0, 8, 0xFFFFFFF0][int(rng.integers(3))])
    tiff = bytearray((b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8) + ifd + b"\0" * 16)
    damage = int(rng.integers(4))
    if damage == 0:
        tiff[4:8] = struct.pack(order + "I", int(rng.integers(0, 1 << 32)))  # IFD offset anywhere
    elif damage == 1:
        tiff = tiff[: int(rng.integers(2, len(tiff)))]  # cut short
    elif damage == 2:
        for _ in range(int(rng.integers(1, 6))):
            tiff[int(rng.integers(len(tiff)))] ^= 1 << int(rng.integers(8))
    elif damage == 3 and rng.random() < 0.5:
        tiff[0:2] = b"XX"  # no byte order
    return bytes(tiff)


def with_exif(kind: str, data: bytes, payload: bytes) -> bytes:
    if kind == "jpeg":
        segment = b"Exif\0\0" + payload
        return data[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[2:]
    if kind == "png":
        ihdr_end = 8 + 12 + 13
        chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
        return data[:ihdr_end] + chunk + data[ihdr_end:]
    im = Image.open(io.BytesIO(data))
    return _save(im, "WEBP", lossless=bool(im.info.get("lossless")), quality=80, exif=payload)


def mutate(kind: str, data: bytes, mutation: str, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    if mutation == "bit_flips":
        for _ in range(int(rng.integers(1, 17))):
            out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
    elif mutation == "truncation":
        out = out[: int(rng.integers(1, len(out)))]
    elif mutation == "byte_run":
        start, length = int(rng.integers(len(out))), int(rng.integers(1, 65))
        fill = [bytes([0]) * length, b"\xff" * length, bytes([int(rng.integers(256))]) * length,
                rng.integers(0, 256, length, dtype=np.uint8).tobytes()][int(rng.integers(4))]
        op = int(rng.integers(3))
        if op == 0:
            out[start : start + length] = fill
        elif op == 1:
            out[start:start] = fill
        else:
            del out[start : start + length]
    elif mutation == "header_edit":
        out = bytearray(header_edit(kind, data, rng))
    elif kind in ("jpeg", "png", "webp"):
        out = bytearray(with_exif(kind, data, corrupt_exif(rng)))
    else:  # no EXIF block of its own: more header edits
        out = bytearray(header_edit(kind, data, rng))
    return bytes(out)


def write_mutants(raw: Path, counts: dict[str, int], seed: int = SEED) -> dict[str, str]:
    """raw/fuzz/<kind>_<n>_<mutation>.<ext> and raw/seeds/<the valid files>; {name: mutation}."""
    rng = np.random.default_rng(seed)
    written = {}
    seeds = seed_files()
    for kind, per_kind in counts.items():
        files = seeds[kind]
        for i, data in enumerate(files):
            path = raw / "seeds" / f"{kind}_{i}.{EXTENSIONS[kind]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written[f"seeds/{path.name}"] = "none"
        for n in range(per_kind):
            mutation = MUTATIONS[n % len(MUTATIONS)]
            data = mutate(kind, files[int(rng.integers(len(files)))], mutation, rng)
            name = f"{kind}_{n:04d}_{mutation}.{EXTENSIONS[kind]}"
            path = raw / "fuzz" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written[f"fuzz/{name}"] = mutation
    return written


# ----------------------------------------------------------------------------- the run


def _stored_names(root: Path) -> list[str]:
    names = []
    for path in load_dataset(root).lmdb_paths("train"):
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
        with env.begin() as txn:
            names += [re.fullmatch(r"\d{8}_(.+)", k.decode()).group(1) for k, _ in txn.cursor()]
        env.close()
    return names


def run_fuzz(tmp_path: Path, counts: dict[str, int]) -> dict:
    raw, out = tmp_path / "raw", tmp_path / "out"
    written = write_mutants(raw, counts)
    cmd = [sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(out), "--workers", "2", "--no-progress",
           "--short-side", "32", "--shard-size", "64", "--format", "both"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "a worker process died" not in output, output[-3000:]  # a native decoder crash

    manifest = load_dataset(out).manifest
    stored = _stored_names(out)
    skipped = {s["name"]: s["reason"] for s in manifest["skipped"]}
    assert len(stored) == len(set(stored)), "an input stored twice"
    assert not set(stored) & set(skipped), "an input both stored and skipped"
    assert set(stored) | set(skipped) == set(written), "an input neither stored nor listed (data lost)"
    assert all(name.startswith("fuzz/") for name in skipped), "a valid seed file was skipped"
    for name, reason in skipped.items():
        assert reason.strip() and "\n" not in reason, (name, reason)
        assert "crashed its process" not in reason, (name, reason)
    entry = manifest["splits"]["train"]
    assert entry["records"] + entry["skipped"] == entry["inputs"] == len(written)

    check = subprocess.run([sys.executable, "-m", "alexnet_pipe", "verify", str(out), "--workers", "2",
                            "--no-progress"], capture_output=True, text=True, timeout=1200)
    assert check.returncode == 0, (check.stdout + check.stderr)[-3000:]
    assert "Traceback" not in check.stdout + check.stderr

    outcome = Counter()
    for name, mutation in written.items():
        reason = skipped.get(name)
        outcome[(mutation, "stored" if reason is None else reason.split(" (")[0].split(";")[0])] += 1
    mutants = sum(1 for m in written.values() if m != "none")
    unexpected = sum(1 for r in skipped.values() if r.startswith("cannot convert this image"))
    summary = {"mutants": mutants, "stored": len(stored) - (len(written) - mutants), "skipped": len(skipped),
               "unexpected_exceptions": unexpected, "crashes": 0, "lost": 0}
    by_kind = Counter((name.split("/")[1].split("_")[0], name in skipped)
                      for name in written if name.startswith("fuzz/"))
    print(f"\nimage fuzz: {summary}")
    for kind in counts:
        print(f"  {kind:5s} {by_kind[(kind, False)] + by_kind[(kind, True)]:5d} mutants, "
              f"{by_kind[(kind, False)]} stored, "
              f"{by_kind[(kind, True)]} skipped")
    for (mutation, what), n in sorted(outcome.items()):
        print(f"  {mutation:12s} {n:4d}  {what}")
    return summary


def test_mutants_are_deterministic():
    a, b = seed_files(), seed_files()
    assert a == b
    rng1, rng2 = np.random.default_rng(1), np.random.default_rng(1)
    for kind, files in a.items():
        assert all(Image.open(io.BytesIO(f)).format for f in files)
        for mutation in MUTATIONS:
            assert mutate(kind, files[0], mutation, rng1) == mutate(kind, files[0], mutation, rng2)


def test_image_fuzz_fast(tmp_path):
    """60 mutants (20 each of JPEG, PNG and WebP): the subset in `make test`."""
    summary = run_fuzz(tmp_path, FAST)
    assert summary["mutants"] == 60


@pytest.mark.faults
def test_image_fuzz_full(tmp_path):
    """1,600 mutants: 400 each of JPEG, PNG and WebP, 200 TIFF, 100 GIF, 100 BMP (`make faults`)."""
    summary = run_fuzz(tmp_path, FULL)
    assert summary["mutants"] == sum(FULL.values())
