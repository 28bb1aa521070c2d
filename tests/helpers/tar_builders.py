"""Tiny ILSVRC-style archives built byte by byte in tmp_path, for the archive fault tests.

``TrainTar`` records where every header of the outer tar and of each per-class tar lies in the
archive file, so a test can flip a bit in exactly the header it means.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tests.helpers.images import smooth_image

MTIME = 1_300_000_000  # an integer: no pax header for a float mtime (GNU format, as ILSVRC's tars)


def jpeg_bytes(seed: int, size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(seed, *size)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def file_info(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, MTIME, mode, "ilsvrc", "ilsvrc"
    return info


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Add a regular file; return the offset of its header in the tar."""
    at = tar.offset
    tar.addfile(file_info(name, len(data)), io.BytesIO(data))
    return at


def add_link(tar: tarfile.TarFile, name: str, target: str, hard: bool = False) -> None:
    info = file_info(name, 0)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    tar.addfile(info)


def _checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def gnu_sparse_member(name: str, chunks: list[tuple[int, bytes]], real_size: int) -> bytes:
    """The bytes of an old-style GNU sparse member (typeflag 'S'): a header whose sparse map
    (up to 4 entries) says where each stored chunk goes in a file of ``real_size`` bytes, then
    the chunks back to back. Python's tarfile reads these but cannot write them."""
    stored = b"".join(data for _, data in chunks)
    header = bytearray(file_info(name, len(stored)).tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    for k, (offset, data) in enumerate(chunks[:4]):
        pos = 386 + 24 * k
        header[pos:pos + 12] = b"%011o\0" % offset
        header[pos + 12:pos + 24] = b"%011o\0" % len(data)
    header[482] = 0  # no extended sparse headers
    header[483:495] = b"%011o\0" % real_size
    _checksum(header)
    return bytes(header) + stored + bytes(-len(stored) % 512)


def set_size(header: bytes, size_field: bytes) -> bytes:
    """A header with its 12-byte size field replaced (checksum recomputed)."""
    out = bytearray(header)
    out[124:136] = size_field
    _checksum(out)
    return bytes(out)


def inner_tar(files: dict[str, bytes], extra=None, fmt=tarfile.GNU_FORMAT) -> tuple[bytes, dict[str, int]]:
    """A per-class tar of ``files``; ``extra(tar)`` may add members. Returns its bytes and the
    offset of each file's header within it."""
    buf = io.BytesIO()
    headers = {}
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files.items():
            headers[name] = add_bytes(tar, name, data)
        if extra is not None:
            extra(tar)
    return buf.getvalue(), headers


@dataclass
class TrainTar:
    """Where things are in a built ILSVRC2012_img_train.tar."""

    path: Path
    files: dict[str, dict[str, bytes]]  # class -> file name -> bytes
    class_header: dict[str, int] = field(default_factory=dict)  # class -> offset of its outer header
    file_header: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> file -> header offset
    data_start: dict[str, int] = field(default_factory=dict)  # class -> offset of its inner tar
    inner_size: dict[str, int] = field(default_factory=dict)
    end: int = 0  # offset of the outer end-of-archive marker

    @property
    def classes(self) -> list[str]:
        return sorted(self.files)

    def names(self) -> set[str]:
        return {f"{c}/{n}" for c, files in self.files.items() for n in files}


def wnids(n: int) -> list[str]:
    return [f"n{1000 + k:08d}" for k in range(n)]


def build_train_tar(path: Path, n_classes: int = 10, per_class: int = 3, inner_extra=None, outer_extra=None,
                    fmt=tarfile.GNU_FORMAT, size=(16, 12)) -> TrainTar:
    """ILSVRC2012_img_train.tar in miniature: a tar of ``<wnid>.tar`` per class, each holding
    ``<wnid>_<k>.JPEG`` files. ``inner_extra(cls, tar)`` / ``outer_extra(tar)`` may add members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    built = TrainTar(path, {})
    seed = 0
    with tarfile.open(path, "w", format=fmt) as outer:
        for cls in wnids(n_classes):
            files = {}
            for k in range(per_class):
                files[f"{cls}_{k}.JPEG"] = jpeg_bytes(seed, size)
                seed += 1
            data, headers = inner_tar(files, (lambda t, c=cls: inner_extra(c, t)) if inner_extra else None, fmt)
            built.files[cls] = files
            built.class_header[cls] = outer.offset
            built.data_start[cls] = outer.offset + 512
            built.inner_size[cls] = len(data)
            built.file_header[cls] = {name: built.data_start[cls] + at for name, at in headers.items()}
            add_bytes(outer, f"{cls}.tar", data)
        if outer_extra is not None:
            outer_extra(outer)
        built.end = outer.offset
    return built


def build_val_tar(path: Path, files: dict[str, bytes], extra=None, fmt=tarfile.GNU_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in files.items():
            add_bytes(tar, name, data)
        if extra is not None:
            extra(tar)


def flip_bit(path: Path, byte: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
