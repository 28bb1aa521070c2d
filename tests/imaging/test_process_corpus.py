"""The bad-input corpus: every kind of odd entry a collection can hold, made by the suite and
converted together, through the real command line with a timeout (a FIFO that blocked the reader
would fail the run, not hang it). Each entry is stored correctly or listed in the manifest with
its reason, and the run finishes. `make test` runs it with 2 workers; `make faults` adds a run
with 1 worker and no pass-through."""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from alexnet_pipe.config import VerifyConfig
from alexnet_pipe.convert.verify import run_verify
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.formats.recordio import iter_records, unpack_payload
from alexnet_pipe.imaging.read import read_source
from alexnet_pipe.imaging.reasons import BadImage
from alexnet_pipe.inputs.table import Source
from tests.helpers.image_builders import BAD_INPUTS, bomb_png, encode
from tests.helpers.images import smooth_image

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SHORT_SIDE = 48  # the sources are 64x48: stored at their own size, clean JPEGs passed through
TIMEOUT = 180
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# The 12 kinds the unit tests of test_process.py cover with the default settings.
EARLIER = ["empty", "text", "random", "truncated_jpeg", "truncated_jpeg_near_end", "jpeg_without_end_marker",
           "truncated_pass_through_candidate", "truncated_progressive_jpeg", "truncated_png", "corrupt_png",
           "bomb_30000", "bomb_10000"]
FIRST_WORDS = {"empty": "empty", "text": "not an image", "random": "not an image", "corrupt_png": "corrupt",
               "bomb_30000": "decompression bomb", "bomb_10000": "decompression bomb"}


def source(seed: int) -> np.ndarray:
    return smooth_image(seed, 64, 48)


def jpeg(seed: int) -> bytes:
    return encode(Image.fromarray(source(seed)), "JPEG", quality=95)


def huge_jpeg_header() -> bytes:
    """A real 64x48 baseline JPEG whose frame header claims 65000 x 65000 pixels."""
    data = bytearray(jpeg(40))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    return bytes(data)


@dataclass(frozen=True)
class Kind:
    """One kind of entry: ``make(class folder)`` creates it and returns {name in the manifest:
    expectation}; an expectation is a seed (stored, with that source's pixels) or the words its
    skip reason must hold."""

    name: str
    make: Callable[[Path], dict[str, int | list[str]]]


def _file(name: str, data: bytes, expect) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        (folder / name).write_bytes(data)
        return {name: expect}
    return make


def _fifo(folder: Path) -> dict:
    os.mkfifo(folder / "fifo.JPEG")
    return {"fifo.JPEG": ["FIFO", "not a regular file"]}


def _socket(folder: Path) -> dict:
    path = folder / "socket.JPEG"
    try:
        os.mknod(path, stat.S_IFSOCK | 0o644)  # no bind(): no path-length limit
    except OSError:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.path.relpath(path))
    return {"socket.JPEG": ["socket", "not a regular file"]}


def _link(name: str, target: str, words: list[str]) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        (folder / name).symlink_to(target)
        return {name: words}
    return make


def _dir_named_like_an_image(folder: Path) -> dict:
    (folder / "x.JPEG").mkdir()
    (folder / "y.JPEG").mkdir()
    (folder / "y.JPEG" / "inside.JPEG").write_bytes(jpeg(41))
    return {"x.JPEG/": ["empty folder"], "y.JPEG/inside.JPEG": 41}


def _folder_link(folder: Path) -> dict:
    (folder / "elsewhere").symlink_to(folder.parent.parent)
    return {"elsewhere/": ["symbolic link to a folder", "not followed"]}


def _system_folder(folder: Path) -> dict:
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._a.JPEG").write_bytes(b"\0\5\26\7")
    return {"__MACOSX/": ["macOS", "not read"]}


def _unreadable(folder: Path) -> dict:
    """chmod 000. Root reads any file whatever its mode (CAP_DAC_OVERRIDE): there it is stored,
    as it should be; for anyone else it is listed with the permission error."""
    path = folder / "no_permission.JPEG"
    path.write_bytes(jpeg(42))
    path.chmod(0)
    return {"no_permission.JPEG": 42 if IS_ROOT else ["cannot read input", "Permission denied"]}


def _read_error(folder: Path) -> dict:
    """A file whose read fails, for any user: /proc/self/mem of the reader (offset 0 is never mapped)."""
    (folder / "io_error.JPEG").symlink_to("/proc/self/mem")
    return {"io_error.JPEG": ["cannot read input", "Input/output error"]}


def _names(folder: Path) -> dict:
    names = {"with spaces in it.JPEG": 43, "naïve 图像 ü.JPEG": 44, "new\nline\ttab.JPEG": 45}
    for name, seed in names.items():
        (folder / name).write_bytes(jpeg(seed))
    with open(os.fsencode(folder) + b"/bytes \xff\xfe latin-1 \xe9.JPEG", "wb") as f:  # not UTF-8
        f.write(jpeg(46))
    return {**names, os.fsdecode(b"bytes \xff\xfe latin-1 \xe9.JPEG"): 46}


def _other_format(fmt: str, seed: int, **kw) -> Callable[[Path], dict]:
    return _file(f"{fmt.lower()}_inside.JPEG", encode(Image.fromarray(source(seed)), fmt, **kw), seed)


KINDS = [
    *(Kind(name, _file(f"{name}.JPEG", BAD_INPUTS[name][0], [FIRST_WORDS.get(name, "truncated")])) for name in EARLIER),
    Kind("FIFO named .JPEG", _fifo),
    Kind("socket named .JPEG", _socket),
    Kind("link to /dev/zero (a device that never ends)", _link("zero.JPEG", "/dev/zero", ["device file"])),
    Kind("link to /dev/null (a device)", _link("null.JPEG", "/dev/null", ["device file"])),
    Kind("folders named x.JPEG (empty) and y.JPEG (holding an image)", _dir_named_like_an_image),
    Kind("symbolic link loop", _link("loop.JPEG", "loop.JPEG", ["symbolic link loop"])),
    Kind("broken symbolic link", _link("broken.JPEG", "no such file", ["broken symbolic link"])),
    Kind("link to a folder", _folder_link),
    Kind("system folder inside a class", _system_folder),
    Kind("unreadable file (chmod 000)", _unreadable),
    Kind("a file whose read fails (EIO)", _read_error),
    Kind("names with spaces, unicode, a newline and non-UTF-8 bytes", _names),
    Kind("WebP content named .JPEG", _other_format("WEBP", 47, lossless=True)),
    Kind("BMP content named .JPEG", _other_format("BMP", 48)),
    Kind("TIFF content named .JPEG", _other_format("TIFF", 49)),
    Kind("GIF content named .JPEG", _file("gif_inside.JPEG", encode(Image.fromarray(source(50)), "GIF"), 50)),
    Kind("trailing garbage after the JPEG end marker", _file("trailing.JPEG", jpeg(51) + b"PK\3\4garbage" * 200, 51)),
    Kind("JPEG header claiming 65000 x 65000", _file("huge_header.JPEG", huge_jpeg_header(), ["decompression bomb"])),
    Kind("PNG header claiming 30000 x 30000 under a .JPEG name",
         _file("png_bomb.JPEG", bomb_png(30000, 30000), ["decompression bomb"])),
]
# Beside the class folders: an empty class folder (no class), and good images so every split has some.
EMPTY_CLASS = "empty_class/"


@dataclass
class Corpus:
    raw: Path
    expected: dict[str, int | list[str]]  # "split/name" -> seed (stored) or reason words (skipped)


def build(raw: Path) -> Corpus:
    cat = raw / "train" / "cat"
    cat.mkdir(parents=True)
    expected: dict[str, int | list[str]] = {}
    for kind in KINDS:
        made = kind.make(cat)
        assert made, kind.name
        expected.update({f"train/cat/{name}": want for name, want in made.items()})
    for split, cls, seed in (("train", "cat", 1), ("train", "dog", 2), ("train", "dog", 3), ("val", "cat", 4),
                             ("val", "dog", 5)):
        (raw / split / cls).mkdir(parents=True, exist_ok=True)
        (raw / split / cls / f"good_{seed}.JPEG").write_bytes(jpeg(seed))
        expected[f"{split}/{cls}/good_{seed}.JPEG"] = seed
    (raw / "train" / EMPTY_CLASS).mkdir()
    expected[f"train/{EMPTY_CLASS}"] = ["empty folder", "not a class"]
    return Corpus(raw, expected)




@dataclass
class Run:
    corpus: Corpus
    out: Path
    result: subprocess.CompletedProcess
    seconds: float


RUNS = {
    "2 workers": ["--workers", "2"],
    "1 worker, no pass-through": ["--workers", "1", "--no-passthrough"],
}


@pytest.fixture(scope="module", params=[
    "2 workers", pytest.param("1 worker, no pass-through", marks=pytest.mark.faults)])
def run(request, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("corpus")
    corpus = build(root / "raw")
    out = root / "out"
    cmd = [sys.executable, "-m", "alexnet_pipe", "convert", str(corpus.raw), str(out), "--format", "both",
           "--short-side", str(SHORT_SIDE), "--shard-size", "8", "--no-progress", *RUNS[request.param]]
    started = time.monotonic()
    try:  # a reader blocked on the FIFO would hang here: the timeout fails the test instead
        result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        (corpus.raw / "train" / "cat" / "no_permission.JPEG").chmod(0o644)  # so tmp_path can be cleaned
    return Run(corpus, out, result, time.monotonic() - started)


def stored_records(out: Path, split: str) -> dict[str, bytes]:
    """name -> stored JPEG over the split's LMDB shards; RecordIO must hold the same under the same ids."""
    ds = load_dataset(out)
    by_name, by_id = {}, {}
    for path in ds.lmdb_paths(split):
        with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
            for key, value in txn.cursor():
                rid, name = key.split(b"_", 1)
                datum = decode_datum(value)
                assert name.decode("utf-8", "surrogateescape") not in by_name, name
                by_name[name.decode("utf-8", "surrogateescape")] = datum.data
                by_id[int(rid)] = datum.data
    recs, _ = ds.recordio_paths(split)
    assert {unpack_payload(p)[0].id: unpack_payload(p)[1] for rec in recs for _, p in iter_records(rec)} == by_id
    return by_name


def test_the_run_finishes_with_one_summary_and_no_traceback(run):
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert "Traceback" not in run.result.stderr
    assert run.result.stdout.startswith(f"wrote {run.out}")
    assert len(KINDS) - len(EARLIER) + 1 >= 16  # at least 16 kinds beside the 12 earlier ones (+1: the empty class)


def test_every_entry_is_stored_correctly_or_listed_with_its_reason(run):
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    manifest = load_dataset(run.out).manifest
    skipped = {f"{s['split']}/{s['name']}": s["reason"] for s in manifest["skipped"]}
    want_skipped = {k: v for k, v in run.corpus.expected.items() if isinstance(v, list)}
    assert set(skipped) == set(want_skipped)  # nothing else skipped, nothing missing
    for key, words in want_skipped.items():
        for word in words:
            assert word in skipped[key], f"{key!r}: {skipped[key]!r} lacks {word!r}"
        assert "\n" not in skipped[key]
    want_stored = {k: v for k, v in run.corpus.expected.items() if isinstance(v, int)}
    stored = {f"{split}/{name}": data
              for split in ("train", "val") for name, data in stored_records(run.out, split).items()}
    assert set(stored) == set(want_stored)
    for key, seed in want_stored.items():
        with Image.open(io.BytesIO(stored[key])) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 48), key
            pixels = np.asarray(im, np.float64)
        error = np.abs(pixels - source(seed)).mean()
        assert error < 4, f"{key}: mean error {error:.1f} from its source"  # JPEG error only
        assert stored[key].endswith(b"\xff\xd9"), key  # no byte after the end marker is stored
    assert b"garbage" not in stored["train/cat/trailing.JPEG"]


def test_counts_add_up(run):
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    manifest = load_dataset(run.out).manifest
    for entry in manifest["splits"].values():
        assert entry["records"] + entry["skipped"] == entry["inputs"]
    records = sum(e["records"] for e in manifest["splits"].values())
    assert records + len(manifest["skipped"]) == len(run.corpus.expected)
    assert [c["id"] for c in manifest["classes"]] == ["cat", "dog"]


def test_the_dataset_verifies(run):
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    result = run_verify(VerifyConfig(run.out, workers=1, progress=False))
    assert result.ok, [str(p) for p in result.problems]


def test_a_fifo_named_in_a_list_file_is_refused_without_blocking(tmp_path):
    """--list names files directly, without a folder scan: the list's check names it."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.JPEG").write_bytes(jpeg(1))
    os.mkfifo(raw / "pipe.JPEG")
    (tmp_path / "train.txt").write_text("good.JPEG 0\npipe.JPEG 0\n")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(out), "--list",
                          str(tmp_path / "train.txt"), "--workers", "2", "--no-progress"],
                         env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = load_dataset(out).manifest
    [entry] = manifest["skipped"]
    assert entry["name"] == "pipe.JPEG" and "FIFO" in entry["reason"]
    assert manifest["splits"]["train"]["records"] == 1


def test_the_reader_never_waits_on_a_fifo(tmp_path):
    """A FIFO that takes a file's place after the scan: the reader refuses it at once (SIGALRM
    fails the test if open() waits for a writer)."""
    path = tmp_path / "swapped.JPEG"
    os.mkfifo(path)

    def late(signum, frame):
        raise TimeoutError("read_source blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, late)
    signal.alarm(10)
    try:
        with pytest.raises(BadImage, match="FIFO"):
            read_source(Source("cat/swapped.JPEG", 0, str(path)), max_mb=64)
        with pytest.raises(BadImage, match="FIFO"):
            read_source(Source("cat/swapped.JPEG", 0, str(path)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
