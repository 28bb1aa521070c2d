"""`update-mean`: old full-image means (neon cache, Caffe BlobProto, .npy) -> mean.json."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings, UpdateMeanConfig
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.dataset.mean import ChannelMean, load_dataset_mean, missing_std_fix, read_mean_file, write_mean
from alexnet_pipe.dataset.update_mean import MAX_MEAN_FILE_BYTES, run_update_mean
from alexnet_pipe.errors import AlexnetPipeError, DatasetError, FormatError, OldMeanFormatError, UnsafePickleError
from alexnet_pipe.formats import protobuf as pb
from alexnet_pipe.formats.blobproto import decode_blobproto, encode_blobproto
from tests.helpers.images import make_tree
from tests.helpers.pickle_samples import attack_pickles, full_mean_image, neon_cache, py2_pickle

# ---------------------------------------------------------------- helpers

def py3_pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def pickle_globals(data: bytes) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def blob_with_shape_field(arr: np.ndarray, data_encoding: str) -> bytes:
    """A BlobProto written by hand: BlobShape (packed dims) and data packed, unpacked or as doubles."""
    dims = b"".join(pb.encode_varint(d) for d in arr.shape)
    flat = arr.ravel()
    if data_encoding == "packed":
        data = pb.bytes_field(5, flat.astype("<f4").tobytes())
    elif data_encoding == "unpacked":
        data = b"".join(pb.key(5, pb.FIXED32) + struct.pack("<f", v) for v in flat)
    else:
        data = pb.bytes_field(8, flat.astype("<f8").tobytes())
    return pb.bytes_field(7, pb.bytes_field(1, dims)) + data


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A real converted dataset: 3 classes x (6 train + 2 val) images, its own mean.json (with std)
    and mean.binaryproto."""
    base = tmp_path_factory.mktemp("converted")
    make_tree(base / "raw", {"train": 6, "val": 2})
    run_convert(ConvertConfig(src=base / "raw", dst=base / "data", image=ImageSettings(short_side=64),
                              workers=1, progress=False))
    return base / "data"


def dataset_copy(converted: Path, dst: Path) -> Path:
    shutil.copytree(converted, dst, symlinks=True)
    return dst


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str):
    """update-mean through click's runner: (exit code, stdout, stderr lines)."""
    res = CliRunner().invoke(main, ["update-mean", *args])
    return res.exit_code, res.stdout, res.stderr.splitlines()


# ---------------------------------------------------------------- neon dataset_cache.pkl

@pytest.mark.parametrize("dump", [py2_pickle, py3_pickle], ids=["python2", "python3-protocol2"])
def test_neon_cache_upgraded_in_place(tmp_path, dump):
    cache_path = tmp_path / "dataset_cache.pkl"
    original = dump(neon_cache())
    cache_path.write_bytes(original)

    result = run_update_mean(UpdateMeanConfig(cache_path))

    upgraded = pickle.loads(cache_path.read_bytes(), encoding="latin1")
    np.testing.assert_array_equal(upgraded["global_mean"], [[30.0], [20.0], [10.0]])  # BGR
    assert upgraded["global_mean"].shape == (3, 1) and upgraded["global_mean"].dtype == np.float32
    assert {k: upgraded[k] for k in ("img_size", "nclass", "label_names", "train_start", "batch_prefix")} == {
        "img_size": 4, "nclass": 2, "label_names": ["cat", "dog"], "train_start": 0, "batch_prefix": "macrobatch_"}
    # numpy 1.x / Python 2 neon cannot import numpy._core: the rewrite must use the old names.
    assert not any(g.startswith("numpy._core") for g in pickle_globals(cache_path.read_bytes()))
    backup = tmp_path / "dataset_cache.pkl.bak"
    assert backup.read_bytes() == original
    mean = read_mean_file(tmp_path / "mean.json")
    assert mean.channel_order == "RGB" and mean.std is None
    assert mean.mean == pytest.approx((10.0, 20.0, 30.0))
    assert "dataset_cache.pkl" in mean.source and "4x4" in mean.source
    assert result.written == [cache_path, tmp_path / "mean.json"]
    assert result.backups == [backup] and not result.already_current


def test_second_run_is_already_current(tmp_path):
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(py2_pickle(neon_cache()))
    run_update_mean(UpdateMeanConfig(cache_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    again = run_update_mean(UpdateMeanConfig(cache_path))

    assert again.already_current and again.written == [] and again.backups == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert "already current" in again.summary()
    assert again.mean.mean == pytest.approx((10.0, 20.0, 30.0))


def test_current_cache_is_not_rewritten_but_gets_mean_json(tmp_path):
    cache_path = tmp_path / "dataset_cache.pkl"
    data = py2_pickle({"img_size": 4, "global_mean": np.array([[104.0], [117.0], [123.0]], np.float32)})
    cache_path.write_bytes(data)

    result = run_update_mean(UpdateMeanConfig(cache_path))

    assert cache_path.read_bytes() == data and result.backups == []
    assert result.written == [tmp_path / "mean.json"]
    assert read_mean_file(tmp_path / "mean.json").mean == pytest.approx((123.0, 117.0, 104.0))


class Evil:
    """A pickle payload: unpickling it calls ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, make_args", [
    (os.system, lambda s: (f"touch {s}",)),
    (builtins.eval, lambda s: (f"open({str(s)!r}, 'w')",)),
    (subprocess.Popen, lambda s: (["touch", str(s)],)),
], ids=["os.system", "eval", "Popen"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, func, make_args):
    sentinel = tmp_path / "SENTINEL"
    cache_path = tmp_path / "dataset_cache.pkl"
    data = pickle.dumps({"img_size": 4, "global_mean": Evil(func, make_args(sentinel))}, protocol=2)
    cache_path.write_bytes(data)
    # The name as the pickle spells it: protocol 2 writes posix.system, __builtin__.eval, commands.Popen.
    (named,) = {g.replace(" ", ".") for g in pickle_globals(data)}
    assert named.endswith(func.__name__)

    with pytest.raises(UnsafePickleError, match=named.replace(".", r"\.")):
        run_update_mean(UpdateMeanConfig(cache_path))

    assert not sentinel.exists()
    assert cache_path.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["dataset_cache.pkl"]


def test_object_array_in_pickle_is_refused(tmp_path):
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(py3_pickle({"img_size": 1, "global_mean": np.array([[1], ["x"], [3]], dtype=object)}))
    with pytest.raises(UnsafePickleError, match="dtype object"):
        run_update_mean(UpdateMeanConfig(cache_path))
    assert not (tmp_path / "mean.json").exists()


@pytest.mark.parametrize("cache, message", [
    ({"img_size": 4}, "no 'global_mean'"),
    ({"img_size": 4, "global_mean": np.zeros((4 * 4 * 3 - 1, 1), np.float32)}, r"\(4\*4\*3, 1\)"),
    ({"img_size": 2, "global_mean": np.full((12, 1), np.nan, np.float32)}, "non-finite"),
    ([1, 2, 3], "no 'global_mean'"),
], ids=["no-global-mean", "wrong-shape", "nan", "not-a-dict"])
def test_bad_neon_cache_raises_format_error(tmp_path, cache, message):
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(py3_pickle(cache))
    with pytest.raises(FormatError, match=message):
        run_update_mean(UpdateMeanConfig(cache_path))


def test_garbage_pickle_raises_format_error(tmp_path):
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(py3_pickle(neon_cache())[:50])
    with pytest.raises(FormatError, match="dataset_cache.pkl"):
        run_update_mean(UpdateMeanConfig(cache_path))


# ---------------------------------------------------------------- hostile pickles, through the CLI

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real command line, in a process of its own (a crash would show as a signal)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "alexnet_pipe", "update-mean", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_upgrades_a_python2_cache(tmp_path):
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(py2_pickle(neon_cache()))
    proc = run_cli(str(cache_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "R=10.000  G=20.000  B=30.000" in proc.stdout
    assert read_mean_file(tmp_path / "mean.json").mean == pytest.approx((10.0, 20.0, 30.0))


# Those that read or wrote process memory on the old unpickler run in a process of their own;
# those that would run code or import a module, through click's runner (faster).
MEMORY_ATTACKS = ("negative-offset-view", "bytearray8-write", "8GiB-reconstruct", "out-of-bounds-strides")


@pytest.mark.parametrize("name", list(attack_pickles("SENTINEL")))
def test_cli_refuses_crafted_attack(tmp_path, name):
    """Each attack of issue 7 (they read or wrote process memory, or ran code, on the old unpickler)."""
    sentinel = tmp_path / "SENTINEL"
    data, fragment = attack_pickles(str(sentinel))[name]
    pickletools.dis(data, out=io.StringIO())  # well-formed: the refusal is not a parse error
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(data)

    if name in MEMORY_ATTACKS:
        proc = run_cli(str(cache_path), cwd=tmp_path)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        res = CliRunner().invoke(main, ["update-mean", str(cache_path)])
        rc, stdout, stderr = res.exit_code, res.stdout, res.stderr

    assert rc == 1, (rc, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {cache_path}: ") and fragment in lines[0], stderr
    assert stdout == "" and "Traceback" not in stderr
    assert not sentinel.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset_cache.pkl"] and cache_path.read_bytes() == data


def test_big_endian_cache_is_upgraded(tmp_path):
    cache = neon_cache()
    cache["global_mean"] = cache["global_mean"].astype(">f4")  # written on a big-endian machine
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(py2_pickle(cache))
    run_update_mean(UpdateMeanConfig(cache_path))
    upgraded = pickle.loads(cache_path.read_bytes(), encoding="latin1")
    np.testing.assert_array_equal(upgraded["global_mean"], [[30.0], [20.0], [10.0]])


def test_oversized_mean_file_is_refused_unread(tmp_path):
    src = tmp_path / "mean.npy"
    with open(src, "wb") as f:
        f.truncate(MAX_MEAN_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(FormatError, match=r"mean.npy is 268,435,457 bytes, more than the 268,435,456 allowed"):
        run_update_mean(UpdateMeanConfig(src))


# ---------------------------------------------------------------- Caffe mean.binaryproto

def test_blobproto_round_trip():
    arr = np.random.default_rng(0).uniform(0, 255, (3, 5, 4)).astype(np.float32)
    buf = encode_blobproto(arr)
    # compute_image_mean's layout: num=1, channels, height, width, then packed data.
    legacy_dims = b"".join(pb.varint_field(n, d) for n, d in zip((1, 2, 3, 4), (1, 3, 5, 4)))
    assert buf.startswith(legacy_dims)
    out = decode_blobproto(buf)
    assert out.shape == (1, 3, 5, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], arr)
    assert encode_blobproto(out) == buf


@pytest.mark.parametrize("data_encoding", ["packed", "unpacked", "double"])
def test_blobproto_with_shape_field(data_encoding):
    arr = full_mean_image((104.0, 117.0, 123.0), size=2)
    out = decode_blobproto(blob_with_shape_field(arr, data_encoding))
    assert out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out, arr)


def test_binaryproto_gives_rgb_mean_json(tmp_path):
    bgr = full_mean_image((104.0, 117.0, 123.0), size=6)
    src = tmp_path / "mean.binaryproto"
    src.write_bytes(encode_blobproto(bgr))

    result = run_update_mean(UpdateMeanConfig(src))

    mean = read_mean_file(tmp_path / "mean.json")
    assert mean.mean == pytest.approx((123.0, 117.0, 104.0)) and mean.std is None
    assert mean.source == "upgraded from mean.binaryproto (6x6 full-image mean)"
    assert result.written == [tmp_path / "mean.json"] and result.backups == []
    assert "R=123.000" in result.summary() and str(src) in result.summary()


def test_binaryproto_with_shape_field_through_the_job(tmp_path):
    src = tmp_path / "imagenet_mean.binaryproto"  # Caffe's examples use this name
    src.write_bytes(blob_with_shape_field(full_mean_image((1.0, 2.0, 3.0))[None], "packed"))
    run_update_mean(UpdateMeanConfig(src))
    assert read_mean_file(tmp_path / "mean.json").mean == pytest.approx((3.0, 2.0, 1.0))


def test_into_writes_elsewhere(tmp_path, converted):
    src = tmp_path / "old" / "mean.binaryproto"
    src.parent.mkdir()
    src.write_bytes(encode_blobproto(full_mean_image((104.0, 117.0, 123.0))))
    out = dataset_copy(converted, tmp_path / "new")
    (out / "mean.json").unlink()  # a dataset without a mean of its own (e.g. a val-only conversion)

    result = run_update_mean(UpdateMeanConfig(src, into=out))

    assert result.written == [out / "mean.json"]
    assert read_mean_file(out / "mean.json").mean == pytest.approx((123.0, 117.0, 104.0))
    assert sorted(p.name for p in src.parent.iterdir()) == ["mean.binaryproto"]


def test_truncated_binaryproto_raises_format_error(tmp_path):
    buf = encode_blobproto(full_mean_image((104.0, 117.0, 123.0), size=2))
    for cut in range(len(buf)):  # every prefix is either malformed or too short for its shape
        with pytest.raises(FormatError):
            decode_blobproto(buf[:cut])
    src = tmp_path / "mean.binaryproto"
    src.write_bytes(buf[:-3])
    with pytest.raises(FormatError, match="mean.binaryproto"):
        run_update_mean(UpdateMeanConfig(src))
    assert not (tmp_path / "mean.json").exists()


def test_binaryproto_with_wrong_channel_count(tmp_path):
    src = tmp_path / "mean.binaryproto"
    src.write_bytes(encode_blobproto(np.ones((1, 4, 4), np.float32)))
    with pytest.raises(FormatError, match=r"expected a BGR mean image"):
        run_update_mean(UpdateMeanConfig(src))


def test_binaryproto_with_more_than_four_dims_is_refused():
    arr = np.ones((1, 1, 3, 2, 2), np.float32)
    with pytest.raises(FormatError, match="more than 4 dimensions"):
        decode_blobproto(blob_with_shape_field(arr, "packed"))
    # Repeated shape messages merge: 3 + 2 dims are 5 as well.
    buf = (pb.bytes_field(7, pb.bytes_field(1, bytes([1, 1, 3]))) + pb.bytes_field(7, pb.bytes_field(1, bytes([2, 2])))
           + pb.bytes_field(5, arr.tobytes()))
    with pytest.raises(FormatError, match="more than 4 dimensions"):
        decode_blobproto(buf)


def test_binaryproto_shape_larger_than_data_allocates_nothing():
    dims = b"".join(pb.encode_varint(d) for d in (1 << 40, 3, 256, 256))
    buf = pb.bytes_field(7, pb.bytes_field(1, dims)) + pb.bytes_field(5, b"\0" * 16)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="needs 216172782113783808 values but the data holds 4"):
            decode_blobproto(buf)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_binaryproto_decodes_into_one_numpy_buffer():
    """A 4 MB mean: about 4 MB of memory (it took ~10x as Python floats), same values."""
    arr = np.random.default_rng(0).uniform(0, 255, (3, 577, 577)).astype(np.float32)
    buf = encode_blobproto(arr)
    tracemalloc.start()
    try:
        out = decode_blobproto(buf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out[0], arr)
    assert out.flags.writeable and peak < 1.5 * arr.nbytes, f"peak {peak:,} for {arr.nbytes:,} bytes of data"


# ---------------------------------------------------------------- mean.npy

@pytest.mark.parametrize("layout, channel_order, expected", [
    ("HWC", None, (10.0, 20.0, 30.0)),
    ("CHW", None, (10.0, 20.0, 30.0)),
    ("HWC", "bgr", (30.0, 20.0, 10.0)),
    ("CHW", "bgr", (30.0, 20.0, 10.0)),
    ("C", None, (10.0, 20.0, 30.0)),
])
def test_npy_layouts_and_channel_order(tmp_path, layout, channel_order, expected):
    chw = full_mean_image((10.0, 20.0, 30.0), size=6)
    arr = {"HWC": chw.transpose(1, 2, 0), "CHW": chw, "C": np.array([10.0, 20.0, 30.0])}[layout]
    src = tmp_path / "mean.npy"
    np.save(src, arr)

    result = run_update_mean(UpdateMeanConfig(src, channel_order=channel_order))

    assert read_mean_file(tmp_path / "mean.json").mean == pytest.approx(expected)
    assert result.mean.mean == pytest.approx(expected)


def test_npy_with_wrong_shape(tmp_path):
    src = tmp_path / "mean.npy"
    np.save(src, np.ones((8, 8), np.float32))
    with pytest.raises(FormatError, match=r"\(8, 8\).*H x W x 3"):
        run_update_mean(UpdateMeanConfig(src))


def test_npy_with_pickled_objects_is_refused(tmp_path):
    src = tmp_path / "mean.npy"
    np.save(src, np.array([1, "x", 3], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="mean.npy"):
        run_update_mean(UpdateMeanConfig(src))


def npy_bytes(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    """An .npy file written by hand (numpy pads the header to 64 bytes; readers need not care)."""
    text = header.encode("latin1") + b"\n"
    length = struct.pack("<H" if version[0] == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text + data


@pytest.mark.parametrize("content, message", [
    (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 3)}"),
     r"declares shape \(100000000000, 3\) of float32 \(1,200,000,000,000 bytes\) but the file holds 0"),
    (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 3)}", b"\0" * 47), "holds 47 bytes"),
    (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 3)}", b"\0" * 49), "holds 49 bytes"),
    (npy_bytes("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,)}", b"\0" * 12), "structured"),
    (npy_bytes("{'descr': '|O', 'fortran_order': False, 'shape': (3,)}", b"\0" * 24), r"dtype '\|O'.*object"),
    (npy_bytes("{'descr': '<c8', 'fortran_order': False, 'shape': (3,)}", b"\0" * 24),
     "dtype '<c8'; expected bool, int, uint or float"),
    (npy_bytes("{'descr': '(2,)<f4', 'fortran_order': False, 'shape': (3,)}", b"\0" * 24), r"dtype '\(2,\)<f4'"),
    (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 3)}", b"\0" * 12), "at most 4 axes"),
    (npy_bytes("{'descr': '<f4', 'fortran_order': 0, 'shape': (3,)}", b"\0" * 12), "malformed shape"),
    (npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-3,)}"), "malformed shape"),
    (npy_bytes("{'descr': '<f4', 'shape': (3,)}", b"\0" * 12), "numpy's dict"),
    (npy_bytes("[" * 4000 + "]" * 4000), "not a readable dict"),
    (npy_bytes("__import__('os').system('true')"), "not a readable dict"),
    (npy_bytes("{" + " " * 20000 + "}"), "too long"),
    (npy_bytes("{}", version=(9, 0)), "version 9.0"),
    (b"\x93NUMPY\x01", "not an .npy file"),
    (b"PK\x03\x04" + b"\0" * 30, "not an .npy file"),
], ids=["2TiB-shape", "short-data", "extra-data", "structured", "object", "complex", "subarray", "five-dims",
        "fortran-not-bool", "negative-dim", "missing-key", "deep-nesting", "code", "huge-header", "version",
        "truncated-magic", "npz"])
def test_hostile_npy_is_refused_before_allocating(tmp_path, content, message):
    src = tmp_path / "mean.npy"
    src.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=message) as caught:
            run_update_mean(UpdateMeanConfig(src))
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    assert str(src) in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "mean.json").exists()


@pytest.mark.parametrize("version, header", [
    ((1, 0), "{'descr': '>f8', 'fortran_order': True, 'shape': (3L, 2L, 2L), }"),  # Python 2, big-endian
    ((2, 0), "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 3), }"),
    ((3, 0), "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 3), }"),
])
def test_npy_header_forms(tmp_path, version, header):
    chw = full_mean_image((10.0, 20.0, 30.0), size=2).astype(np.float64)
    if "'<f4'" in header:
        data = chw.transpose(1, 2, 0).astype("<f4").tobytes()
    else:
        data = chw.astype(">f8").tobytes(order="F")
    src = tmp_path / "mean.npy"
    src.write_bytes(npy_bytes(header, data, version))
    run_update_mean(UpdateMeanConfig(src))
    assert read_mean_file(tmp_path / "mean.json").mean == pytest.approx((10.0, 20.0, 30.0))


# ---------------------------------------------------------------- dataset directories

def test_dataset_dir_with_binaryproto(tmp_path):
    (tmp_path / "mean.binaryproto").write_bytes(encode_blobproto(full_mean_image((104.0, 117.0, 123.0))))
    with pytest.raises(OldMeanFormatError, match="alexnet-pipe update-mean"):
        load_dataset_mean(tmp_path)

    result = run_update_mean(UpdateMeanConfig(tmp_path))

    assert result.written == [tmp_path / "mean.json"]
    assert load_dataset_mean(tmp_path).mean == pytest.approx((123.0, 117.0, 104.0))
    again = run_update_mean(UpdateMeanConfig(tmp_path))
    assert again.already_current and again.written == []


def test_dataset_dir_prefers_neon_cache(tmp_path):
    (tmp_path / "dataset_cache.pkl").write_bytes(py2_pickle(neon_cache()))
    np.save(tmp_path / "mean.npy", np.full((2, 2, 3), 200.0))
    run_update_mean(UpdateMeanConfig(tmp_path))
    assert load_dataset_mean(tmp_path).mean == pytest.approx((10.0, 20.0, 30.0))


def test_dataset_dir_replaces_unusable_mean_json_with_backup(tmp_path):
    stale = json.dumps({"format": "something-else"}).encode()
    (tmp_path / "mean.json").write_bytes(stale)
    np.save(tmp_path / "mean.npy", np.full((2, 2, 3), 50.0))

    result = run_update_mean(UpdateMeanConfig(tmp_path))

    assert result.backups == [tmp_path / "mean.json.bak"]
    assert (tmp_path / "mean.json.bak").read_bytes() == stale
    assert load_dataset_mean(tmp_path).mean == pytest.approx((50.0, 50.0, 50.0))


def test_dataset_dir_without_any_mean(tmp_path):
    with pytest.raises(DatasetError, match="dataset_cache.pkl, mean.binaryproto, mean.npy"):
        run_update_mean(UpdateMeanConfig(tmp_path))


def test_channel_order_is_refused_for_caffe_means(tmp_path):
    src = tmp_path / "mean.binaryproto"
    src.write_bytes(encode_blobproto(full_mean_image((1.0, 2.0, 3.0))))
    with pytest.raises(AlexnetPipeError, match="--channel-order applies to .npy"):
        run_update_mean(UpdateMeanConfig(src, channel_order="rgb"))


# ---------------------------------------------------------------- a current mean is never replaced with less

def test_dataset_own_binaryproto_keeps_its_mean_json(tmp_path, converted):
    """Issue 21.3: update-mean DATASET/mean.binaryproto wrote std null, images 0 over convert's mean.json."""
    data = dataset_copy(converted, tmp_path / "data")
    before = files_of(data)
    own = read_mean_file(data / "mean.json")
    assert own.std is not None and own.images == 18

    rc, out, err = cli(str(data / "mean.binaryproto"))

    assert rc == 0 and err == [], err
    assert "already current" in out and "kept" in out and "std" in out
    assert files_of(data) == before  # no downgrade, no .bak
    info = CliRunner().invoke(main, ["info", str(data)])
    assert info.exit_code == 0 and "std unknown" not in info.stdout


@pytest.mark.parametrize("how", ["into", "beside"])
def test_other_mean_is_refused_over_a_richer_mean_json(tmp_path, converted, how):
    data = dataset_copy(converted, tmp_path / "data")
    other = full_mean_image((104.0, 117.0, 123.0))
    if how == "into":
        src = tmp_path / "imagenet_mean.binaryproto"
        src.write_bytes(encode_blobproto(other))
        args = [str(src), "--into", str(data)]
    else:  # the dataset's own mean.binaryproto replaced by another one
        src = data / "mean.binaryproto"
        src.write_bytes(encode_blobproto(other))
        args = [str(src)]
    before = files_of(data)

    rc, out, err = cli(*args)

    assert rc == 1 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"Error: {data / 'mean.json'} already holds") and "std" in err[0], err
    assert "nothing changed" in err[0] and f"mv {data / 'mean.json'}" in err[0], err
    assert files_of(data) == before


def test_neon_cache_is_left_alone_when_its_mean_json_would_lose(tmp_path):
    """The refusal comes before anything is written: the cache is not rewritten either."""
    richer = ChannelMean((50.0, 60.0, 70.0), (40.0, 41.0, 42.0), "RGB", 100, 6400, "convert")
    write_mean(tmp_path / "mean.json", richer)
    cache_path = tmp_path / "dataset_cache.pkl"
    cache_path.write_bytes(py2_pickle(neon_cache()))
    before = files_of(tmp_path)

    with pytest.raises(AlexnetPipeError, match="already holds a per-channel mean with its std"):
        run_update_mean(UpdateMeanConfig(cache_path))

    assert files_of(tmp_path) == before


def test_rerun_with_other_channel_order_replaces_an_equal_mean(tmp_path):
    """A mean.json update-mean wrote itself (no std) is no richer: the corrected rerun replaces it."""
    src = tmp_path / "mean.npy"
    np.save(src, full_mean_image((104.0, 117.0, 123.0)))  # Caffe's 3 x H x W BGR
    run_update_mean(UpdateMeanConfig(src))
    assert read_mean_file(tmp_path / "mean.json").mean == pytest.approx((104.0, 117.0, 123.0))

    result = run_update_mean(UpdateMeanConfig(src, channel_order="bgr"))

    assert result.written == [tmp_path / "mean.json"] and result.backups == [tmp_path / "mean.json.bak"]
    assert read_mean_file(tmp_path / "mean.json").mean == pytest.approx((123.0, 117.0, 104.0))


def test_newer_mean_format_is_not_replaced(tmp_path):
    newer = json.dumps({"format": "alexnet-pipe-mean", "version": 2, "mean": [1, 2, 3], "more": "things"})
    (tmp_path / "mean.json").write_text(newer)
    np.save(tmp_path / "mean.npy", np.full((2, 2, 3), 50.0))

    rc, out, err = cli(str(tmp_path))

    assert rc == 1 and len(err) == 1 and "version 2" in err[0] and "newer alexnet-pipe" in err[0], err
    assert (tmp_path / "mean.json").read_text() == newer and not (tmp_path / "mean.json.bak").exists()
    # Readers say the same: not "an old format; run update-mean", which would be refused.
    with pytest.raises(DatasetError, match="version 2, newer than this alexnet-pipe reads") as caught:
        load_dataset_mean(tmp_path)
    assert "update-mean" not in str(caught.value)


# ---------------------------------------------------------------- --into

@pytest.mark.parametrize("kind", ["missing", "empty-dir", "file"])
def test_into_must_be_a_converted_dataset(tmp_path, kind):
    src = tmp_path / "old" / "mean.binaryproto"
    src.parent.mkdir()
    src.write_bytes(encode_blobproto(full_mean_image((104.0, 117.0, 123.0))))
    into = tmp_path / "new" / "deeper"
    if kind == "empty-dir":
        into.mkdir(parents=True)
    elif kind == "file":
        into.parent.mkdir()
        into.write_text("x")
    before = files_of(tmp_path)

    rc, out, err = cli(str(src), "--into", str(into))

    assert rc == 1 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"Error: --into {into} ") and "alexnet-pipe convert" in err[0], err
    assert "leave out --into" in err[0], err
    assert files_of(tmp_path) == before
    assert (tmp_path / "new").exists() == (kind != "missing")  # nothing created


def test_into_with_a_current_mean_json_is_refused(tmp_path, converted):
    data = dataset_copy(converted, tmp_path / "data")
    src = tmp_path / "mine" / "mean.json"
    src.parent.mkdir()
    write_mean(src, ChannelMean((1.0, 2.0, 3.0)))
    before = files_of(data)

    rc, out, err = cli(str(src), "--into", str(data))

    assert rc == 1 and len(err) == 1 and "already a current mean.json" in err[0], err
    assert files_of(data) == before


# ---------------------------------------------------------------- what --normalize-std needs

def test_missing_std_names_the_backup_that_has_it(tmp_path):
    """A dataset downgraded by an older update-mean: the fix names the backup holding the std."""
    write_mean(tmp_path / "mean.json.bak", ChannelMean((50.0, 60.0, 70.0), (40.0, 41.0, 42.0), "RGB", 9, 90, "x"))
    write_mean(tmp_path / "mean.json", ChannelMean((50.0, 60.0, 70.0)))
    assert missing_std_fix(tmp_path) == (f"its backup {tmp_path / 'mean.json.bak'} has one: "
                                         f"mv {tmp_path / 'mean.json.bak'} {tmp_path / 'mean.json'}")
    (tmp_path / "mean.json.bak").unlink()
    fix = missing_std_fix(tmp_path)
    assert "rerun the alexnet-pipe convert command" in fix and "drop --normalize-std" in fix
