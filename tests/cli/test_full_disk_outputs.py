"""A full disk (ENOSPC from ``/dev/full``) or a file size limit (EFBIG, RLIMIT_FSIZE) under the
outputs that are not a conversion's: `test --per-class`, `update-mean --into`, standard output
(`predict --json > file`, `--version`) and `upgrade` of a version-1 dataset.

The outcome asked of each: one ``Error:`` line that names the path, says why and what to do, exit
status 1, no traceback; nothing half-written in view (no temporary file or folder); the same
command, once there is space, finishes the job.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from alexnet_pipe.cli import main
from alexnet_pipe.config import VerifyConfig
from alexnet_pipe.convert.verify import run_verify
from alexnet_pipe.dataset.manifest import DATASET_VERSION, load_dataset
from alexnet_pipe.dataset.mean import ChannelMean
from alexnet_pipe.formats.lmdb import reserves_too_much
from tests.convert.test_job_storage import file_size_limit, noise_jpeg
from tests.convert.test_upgrade import _records, make_version_1
from tests.helpers.datasets import shapes_dataset, train_one_epoch
from tests.helpers.images import smooth_image, write_jpeg

pytestmark = pytest.mark.usefixtures("torch_threads")  # two threads, restored after

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
TEST = ["test", "-b", "cpu", "--no-progress", "--data-threads", "1"]


def one_error(res: Result) -> str:
    """Exit 1 and exactly one ``Error:`` line, no traceback (none printed, none caught by the runner)."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert "internal error" not in res.output, res.output  # (rerun with -v for the traceback)
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("fulldisk"))


@pytest.fixture(scope="module")
def weights(data, tmp_path_factory) -> Path:
    return train_one_epoch(data, tmp_path_factory.mktemp("fulldisk_w") / "w.pt")


# ----------------------------------------------------------------------------- test --per-class


def test_per_class_files_on_a_full_disk_after_the_evaluation(data, weights, tmp_path):
    """The evaluation is not lost: its figures are printed, then one line for the file that could
    not be written. Nothing half-written stays; the rerun writes both files."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    args = [*TEST, "-w", str(data), "--model-file", str(weights), "--per-class"]
    with file_size_limit(100):  # the JSON (~1 KB) does not fit
        res = CliRunner().invoke(main, [*args, str(a / "pc.json")])
    line = one_error(res)
    assert f"could not write {a / 'pc.json'}: file too large for the file size limit" in line, line
    assert "free some space" in line and "rerun" in line, line
    assert "Accuracy:" in res.stdout  # the figures, before the error
    assert list(a.iterdir()) == []  # neither file, no temporary one

    res = CliRunner().invoke(main, [*args, str(a / "pc.json")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in a.iterdir()) == ["pc.json", "pc.png"]
    size = (a / "pc.json").stat().st_size
    with file_size_limit(size + 16):  # the JSON fits, the drawing (tens of KB) does not
        res = CliRunner().invoke(main, [*args, str(b / "pc.json")])
    line = one_error(res)
    assert f"could not write {b / 'pc.png'}: file too large for the file size limit" in line, line
    assert "Accuracy:" in res.stdout
    assert sorted(p.name for p in b.iterdir()) == ["pc.json"]  # whole: written before, atomically
    assert json.loads((b / "pc.json").read_text()) == json.loads((a / "pc.json").read_text())


# ----------------------------------------------------------------------------- update-mean --into


def test_update_mean_into_a_dataset_on_a_full_disk(data, tmp_path):
    into = tmp_path / "data"
    shutil.copytree(data, into)
    (into / "mean.json").unlink()  # a dataset without a current mean: update-mean writes one
    src = tmp_path / "mean.npy"
    np.save(src, np.array([120.0, 110.0, 100.0], np.float32))
    args = ["update-mean", str(src), "--into", str(into)]
    before = sorted(p.name for p in into.iterdir())
    with file_size_limit(64):
        res = CliRunner().invoke(main, args)
    line = one_error(res)
    assert f"could not write {into / 'mean.json'}: file too large" in line and "rerun" in line, line
    assert sorted(p.name for p in into.iterdir()) == before  # no mean.json, no temporary file
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads((into / "mean.json").read_text())["mean"] == pytest.approx([120.0, 110.0, 100.0])


def test_update_mean_keeps_no_backup_of_a_file_it_could_not_replace(tmp_path):
    """The backup is written, the new mean.json is not: the old one is unchanged, and its copy
    (which would become mean.json.bak1 at the rerun) is removed."""
    src = tmp_path / "mean.npy"
    np.save(src, np.array([120.0, 110.0, 100.0], np.float32))
    old = json.dumps(ChannelMean((1.0, 2.0, 3.0), None, "RGB", 0, 0, "").to_json(), separators=(",", ":")).encode()
    (tmp_path / "mean.json").write_bytes(old)
    with file_size_limit(len(old) + 8):  # the backup fits, the new mean.json (indented, longer) does not
        res = CliRunner().invoke(main, ["update-mean", str(src)])
    line = one_error(res)
    assert f"could not write {tmp_path / 'mean.json'}: file too large" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.json", "mean.npy"]
    assert (tmp_path / "mean.json").read_bytes() == old
    res = CliRunner().invoke(main, ["update-mean", str(src)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.json", "mean.json.bak", "mean.npy"]
    assert (tmp_path / "mean.json.bak").read_bytes() == old


# ----------------------------------------------------------------------------- standard output

# Python's stdout: buffered, or written straight through (PYTHONUNBUFFERED, python -u), where CPython
# used to drop what a short write did not take, silently.
STDOUT_MODES = pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])


def _cli(*args: str, stdout, unbuffered: bool, limit: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a child process writing its standard output to ``stdout``, with a file size limit
    of ``limit`` bytes (writes past it fail with EFBIG; SIGXFSZ ignored, as Python itself does)."""

    def apply() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"} | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    return subprocess.run([sys.executable, "-m", "alexnet_pipe", *args], env=env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=apply)


def stdout_error(res: subprocess.CompletedProcess) -> str:
    """Exit 1 and one ``Error:`` line on stderr; no traceback, none at exit either ("Exception ignored")."""
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def test_predict_json_to_a_full_disk(weights, tmp_path):
    """`predict --json > /dev/full`: ENOSPC on standard output."""
    image = write_jpeg(tmp_path / "x.jpg", smooth_image(0, 96, 72))
    with open("/dev/full", "w") as full:
        res = _cli("predict", "-b", "cpu", "--json", "--model-file", str(weights), str(image), stdout=full,
                   unbuffered=False)
    line = stdout_error(res)
    assert "could not write /dev/full: no space left on the device" in line and "standard output" in line, line
    assert "free some space" in line and "rerun" in line, line


@STDOUT_MODES
def test_json_cut_short_by_a_file_size_limit(data, tmp_path, unbuffered):
    """`info --json > out.json` past a file size limit: a short write takes 100 of the ~2.4 KB, the
    next write fails with EFBIG (unbuffered, the rest was dropped with exit 0); the rerun is whole."""
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        line = stdout_error(_cli("info", str(data), "--json", stdout=f, unbuffered=unbuffered, limit=100))
    assert f"could not write {out}: file too large for the file size limit" in line, line
    with open(out, "w") as f:
        res = _cli("info", str(data), "--json", stdout=f, unbuffered=unbuffered)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["root"] == str(data)


@STDOUT_MODES
def test_help_and_version_to_a_full_disk(unbuffered):
    """Output written while the command line is read (--version, help), before any command runs."""
    for args in (["--version"], ["--help"], ["info", "--help"]):
        with open("/dev/full", "w") as full:
            line = stdout_error(_cli(*args, stdout=full, unbuffered=unbuffered))
        assert "could not write /dev/full: no space left on the device" in line, (args, line)


def test_a_closed_pipe_ends_quietly():
    """``| head``: the reader left on purpose; exit 1 as click does, no message, no traceback."""
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as closed:
        res = _cli("--help", stdout=closed, unbuffered=False)
    assert res.returncode == 1 and res.stderr == "", res.stderr


# ----------------------------------------------------------------------------- upgrade


def test_upgrade_on_a_full_disk_midway(raw_tree, tmp_path):
    """A file size limit that the first shards' compacted copies fit and a later one does not:
    one line; no `.NAME.upgrade` folder left; the dataset reads as before (version 1, every
    record); the rerun finishes the upgrade."""
    for k, image in enumerate(sorted((raw_tree / "val").rglob("*.jpg"))):
        noise_jpeg(image, seed=k, size=(96, 64))  # a val shard's compacted copy: ~60 KB, a train one's 20 KB
    data = make_version_1(raw_tree, tmp_path / "v1")
    ds = load_dataset(data)
    paths = ds.lmdb_paths("train") + ds.lmdb_paths("val")
    before = {p.name: _records(p) for p in paths}
    with file_size_limit(40_000):
        res = CliRunner().invoke(main, ["upgrade", str(data)])
    line = one_error(res)
    val = ds.lmdb_paths("val")[0]
    assert f"could not write {val}: file too large for the file size limit" in line and "rerun" in line, line
    assert [reserves_too_much(p) for p in paths] == [False] * 4 + [True] * 2  # stopped at the first val shard
    assert not list(data.rglob("*.upgrade")), list(data.rglob("*.upgrade"))  # nor its part-copy
    ds = load_dataset(data)
    assert ds.version == 1
    assert {p.name: _records(p) for p in paths} == before
    assert run_verify(VerifyConfig(data, workers=1, progress=False)).ok
    res = CliRunner().invoke(main, ["upgrade", str(data)])
    assert res.exit_code == 0, res.output
    ds = load_dataset(data)
    assert ds.version == DATASET_VERSION and all(not reserves_too_much(p) for p in paths)
    assert {p.name: _records(p) for p in paths} == before
    assert run_verify(VerifyConfig(data, workers=1, progress=False)).ok
