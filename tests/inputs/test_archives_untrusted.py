"""Untrusted tar archives: member names with `..` or absolute paths, symbolic and hard links,
members that declare a huge size, decompression bombs (an image header claiming billions of
pixels, a gzip bomb in place of the tar).

The converter never extracts: it lists headers and reads each member's bytes into memory from
its offset in the archive. That is proved here by taking stock of every file under the test's
directory (the converter's working directory included) and of the absolute paths the members
name, before and after `convert`: nothing appears or changes anywhere but in OUT.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path

import lmdb
import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.formats.datum import decode_datum
from tests.helpers.image_builders import bomb_png
from tests.helpers.tar_builders import add_bytes, add_link, build_train_tar, inner_tar, jpeg_bytes, set_size, wnids

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TRAIN_TAR = "ILSVRC2012_img_train.tar"
TIMEOUT = 180


def stock(root: Path, skip: Path | None = None) -> dict[str, tuple[int, str]]:
    """Every entry below ``root`` (links not followed) -> (mode, sha256 of a file's bytes or a
    link's target), ``skip`` excluded."""
    out = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d != skip]
        for name in dirs + files:
            path = here / name
            st = path.lstat()
            if path.is_symlink():
                what = os.readlink(path)
            elif path.is_file():
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = ""
            out[str(path.relative_to(root))] = (st.st_mode, what)
    return out


def convert(raw: Path, out: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(out), "--format", "both", "--workers", "2",
           "--no-progress", "--short-side", "12", *extra]
    return subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    [line] = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    return line


def huge_jpeg_header() -> bytes:
    data = bytearray(jpeg_bytes(77))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    return bytes(data)


def test_hostile_members_are_never_written_anywhere(tmp_path):
    absolute = Path(tempfile.gettempdir()) / f"alexnet-pipe-untrusted-{uuid.uuid4().hex}"
    classes = wnids(3)
    member = {  # class 0's hostile members that are plain files: read as images of the class
        "../../../escaped.JPEG": jpeg_bytes(100),
        f"{absolute}/absolute.JPEG": jpeg_bytes(101),
        "deep/../../../../dotdot.JPEG": jpeg_bytes(102),
    }

    def hostile_inner(cls: str, tar: tarfile.TarFile) -> None:
        if cls == classes[0]:
            for name, data in member.items():
                add_bytes(tar, name, data)
            add_link(tar, "passwd.JPEG", "/etc/passwd")
            add_link(tar, "up.JPEG", "../../../../../../etc/hostname")
            add_link(tar, "hard.JPEG", "../../outside.JPEG", hard=True)
            add_link(tar, "abs_hard.JPEG", str(absolute / "x.JPEG"), hard=True)
        if cls == classes[1]:
            add_bytes(tar, "bomb_png.JPEG", bomb_png(30000, 30000))
            add_bytes(tar, "bomb_jpeg.JPEG", huge_jpeg_header())
            add_bytes(tar, "gzipped.JPEG", gzip.compress(bytes(50 << 20)))  # 50 MiB of zeros in 50 KB

    def hostile_outer(tar: tarfile.TarFile) -> None:
        add_bytes(tar, "../n09999990.tar", inner_tar({"up_0.JPEG": jpeg_bytes(103)})[0])
        add_bytes(tar, f"{absolute}/n09999991.tar", inner_tar({"abs_0.JPEG": jpeg_bytes(104)})[0])
        add_link(tar, "n09999992.tar", "/etc/passwd")
        add_link(tar, "n09999993.tar", "../../n09999990.tar", hard=True)

    raw = tmp_path / "raw"
    built = build_train_tar(raw / TRAIN_TAR, n_classes=3, per_class=2, inner_extra=hostile_inner,
                            outer_extra=hostile_outer)
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    before, around = stock(tmp_path), sorted(os.listdir(tmp_path.parent))
    assert not absolute.exists()

    res = convert(raw, out, cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert stock(tmp_path, skip=out) == before  # nothing new or changed outside OUT, cwd included
    assert sorted(os.listdir(tmp_path.parent)) == around and not absolute.exists()
    assert not any(p.is_symlink() for p in out.rglob("*"))  # no link was made in OUT either

    manifest = load_dataset(out).manifest
    assert [c["id"] for c in manifest["classes"]] == sorted(classes + ["n09999990", "n09999991"])
    skipped = {s["name"]: s["reason"] for s in manifest["skipped"]}
    c0, c1 = classes[0], classes[1]
    assert set(skipped) == {f"{c0}/passwd.JPEG", f"{c0}/up.JPEG", f"{c0}/hard.JPEG", f"{c0}/abs_hard.JPEG",
                            "n09999992.tar", "n09999993.tar", f"{c1}/bomb_png.JPEG", f"{c1}/bomb_jpeg.JPEG",
                            f"{c1}/gzipped.JPEG"}
    for name in (f"{c0}/passwd.JPEG", f"{c0}/up.JPEG", "n09999992.tar"):
        assert skipped[name].startswith("symbolic link to") and "not followed" in skipped[name]
    for name in (f"{c0}/hard.JPEG", f"{c0}/abs_hard.JPEG", "n09999993.tar"):
        assert skipped[name].startswith("hard link to") and "not followed" in skipped[name]
    assert "decompression bomb" in skipped[f"{c1}/bomb_png.JPEG"]
    assert "decompression bomb" in skipped[f"{c1}/bomb_jpeg.JPEG"]
    assert "not an image" in skipped[f"{c1}/gzipped.JPEG"]

    # The hostile plain members are images of their class, under their file name, with exactly
    # their bytes (clean small JPEGs are stored as they are): read from the archive, in memory.
    stored = {}
    for path in load_dataset(out).lmdb_paths("train"):
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            for key, value in txn.cursor():
                datum = decode_datum(value)
                stored[key.decode().split("_", 1)[1]] = datum.data
                assert b"root:" not in datum.data  # /etc/passwd was never read
    expected = {f"{cls}/{name}": data for cls, files in built.files.items() for name, data in files.items()}
    expected |= {f"{c0}/{name.rpartition('/')[2]}": data for name, data in member.items()}
    expected |= {"n09999990/up_0.JPEG": jpeg_bytes(103), "n09999991/abs_0.JPEG": jpeg_bytes(104)}
    assert stored == expected


def _class_tar_with_a_huge_member(declared: bytes) -> bytes:
    """A per-class tar whose last member's header declares ``declared`` as its size (the data
    is not there: the archive ends after the header)."""
    data, headers = inner_tar({"n00001000_0.JPEG": jpeg_bytes(1), "n00001000_1.JPEG": jpeg_bytes(2)})
    last = headers["n00001000_1.JPEG"]
    header = set_size(data[last : last + 512], declared)
    return data[:last] + header + bytes(1024)


@pytest.mark.parametrize("declared", [
    pytest.param(b"77777777777\0", id="8 GiB octal"),
    pytest.param(b"\x80" + bytes(3) + (1 << 40).to_bytes(8, "big"), id="1 TiB base-256", marks=pytest.mark.faults)])
def test_a_member_declaring_a_huge_size_is_refused(tmp_path, declared):
    """The archive cannot hold it: the walk to the end-of-archive marker fails, one line naming
    the byte, before anything is read or allocated."""
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        add_bytes(outer, "n00001000.tar", _class_tar_with_a_huge_member(declared))
    res = CliRunner().invoke(main, ["convert", str(raw), str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("Error: "), res.output
    assert "incomplete or corrupt archive at byte" in res.output and "n00001000.tar" in res.output
    assert not (tmp_path / "out").exists()


def test_a_member_over_the_size_cap_is_skipped_unread(tmp_path):
    """A real 3 MiB member with --max-file-mb 1: listed with the reason, its bytes never read."""
    raw = tmp_path / "raw"
    big = os.urandom(3 << 20)

    def extra(cls: str, tar: tarfile.TarFile) -> None:
        if cls == "n00001000":
            add_bytes(tar, "big.JPEG", big)

    build_train_tar(raw / TRAIN_TAR, n_classes=2, per_class=2, inner_extra=extra)
    res = CliRunner().invoke(main, ["convert", str(raw), str(tmp_path / "out"), "--workers", "1", "--no-progress",
                                    "--max-file-mb", "1"])
    assert res.exit_code == 0, res.output
    [entry] = load_dataset(tmp_path / "out").manifest["skipped"]
    assert entry["name"] == "n00001000/big.JPEG"
    assert entry["reason"] == f"file too large ({3 << 20} bytes, over the limit of 1 MiB set by --max-file-mb)"


def gzip_bomb(unpacked: int) -> bytes:
    """A gzip stream of ``unpacked`` zero bytes (about 1/1000 of that), as concatenated members."""
    chunk = 64 << 20
    one = gzip.compress(bytes(chunk), compresslevel=9, mtime=0)
    return one * (unpacked // chunk)


def test_a_gzip_bomb_in_place_of_the_tar_is_refused_unread(tmp_path):
    """4 GiB of zeros gzipped (~4 MB) named ILSVRC2012_img_train.tar: refused from its first
    bytes; the converter's peak memory stays far below what unpacking would take."""
    raw = tmp_path / "raw"
    raw.mkdir()
    bomb = gzip_bomb(4 << 30)
    assert len(bomb) < 8 << 20 and zlib.decompressobj(31).decompress(bomb[:1 << 16], 1 << 20)  # real gzip
    (raw / TRAIN_TAR).write_bytes(bomb)
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "alexnet_pipe", "convert", str(raw),
           str(tmp_path / "out"), "--no-progress"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    line = one_error_line(res)
    assert "incomplete or corrupt archive at byte 0 (gzip-compressed data, not an uncompressed tar)" in line
    peak_kib = int(res.stdout.strip())
    assert peak_kib < 1 << 20, f"peak memory {peak_kib} KiB"  # under 1 GiB; unpacking would need 4 GiB
