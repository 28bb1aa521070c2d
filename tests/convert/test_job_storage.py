"""Storage faults: an LMDB map that fills, a disk that fills (ENOSPC on a small tmpfs where this
machine lets the suite mount one; EFBIG from a file size limit, RLIMIT_FSIZE, everywhere), and
checkpoint writes that fail or are killed midway.

The outcome asked of each: one line saying which path, why and what to do, exit status 1; what
was finished before stays valid and nothing half-written is visible; after the space is freed,
the same command finishes the job with the bytes of a run that never failed.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import alexnet_pipe.formats.lmdb as lmdb_format
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.convert.plan import plan_shards
from alexnet_pipe.fsutil import OutputError, os_error
from alexnet_pipe.inputs.scan import scan
from alexnet_pipe.model import checkpoint
from tests.helpers.images import make_tree
from tests.helpers.trees import TEMP, tree_bytes

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
FLAGS = ["--format", "both", "--shard-size", "4", "--workers", "2", "--no-progress", "--short-side", "0"]


def noise_jpeg(path: Path, seed: int, size=(400, 300)) -> None:
    """~250 KB at quality 95: noise does not compress."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=95)


def convert_cmd(raw: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(out), *FLAGS]


def run(cmd: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    """``cmd`` in a child process, with a file size limit of ``limit`` bytes (writes past it fail
    with EFBIG; SIGXFSZ is ignored, as Python itself does)."""

    def apply() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=apply)


def error_line(res: subprocess.CompletedProcess) -> str:
    """Exit 1 and exactly one ``Error:`` line, no traceback; returns that line."""
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def assert_intact(out: Path, clean: dict[str, bytes]) -> None:
    """After the failure: the shards finished before it are there and final, and nothing else is
    visible (no staging area, no temporary file, no manifest)."""
    left = tree_bytes(out)
    assert not any(rel.startswith(".staging") or TEMP.fullmatch(Path(rel).name) for rel in left), sorted(left)
    assert "manifest.json" not in left
    for rel, data in left.items():
        assert data == clean.get(rel), f"{rel} is not the file of a run that never failed"


@pytest.fixture(scope="module")
def raw_with_a_large_last_shard(tmp_path_factory) -> Path:
    """24 small images in 6 shards of 4; the images of the last shard (in the stored order) are
    replaced by large ones, so a file size limit between the two stops the conversion there."""
    raw = tmp_path_factory.mktemp("storage") / "raw"
    make_tree(raw, {"train": 8}, sizes=((64, 48), (48, 64)))
    found = scan(raw)
    last = plan_shards("train", found.splits["train"], 4, seed=0)[-1]
    for k, src in enumerate(last.sources):
        noise_jpeg(Path(src.path), seed=k)
    return raw


@pytest.fixture(scope="module")
def clean(raw_with_a_large_last_shard, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("clean") / "out"
    res = run(convert_cmd(raw_with_a_large_last_shard, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return tree_bytes(out)


# ----------------------------------------------------------------------------- LMDB map full


def test_a_full_lmdb_map_grows_by_itself_to_the_same_bytes(tmp_path, monkeypatch):
    """A scratch map smaller than one record (16 KiB; records of ~250 KB), and a shard of many
    large records: the map grows, lmdb.MapFullError never reaches the caller, and the output is
    byte for byte that of the default map, also when the growth must replay committed
    transactions (few records per transaction)."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 4}, sizes=((64, 48),))
    for k in range(6):
        noise_jpeg(raw / "train" / "ant" / f"large_{k}.jpg", seed=k)

    def convert(out: Path) -> dict[str, bytes]:
        run_convert(ConvertConfig(src=raw, dst=out, workers=1, shard_size=18, progress=False,
                                  formats=("lmdb", "recordio"), image=ImageSettings(short_side=0)))
        return tree_bytes(out)

    reference = convert(tmp_path / "default")
    monkeypatch.setattr(lmdb_format, "SCRATCH_MAP_SIZE", 1 << 14)
    # Stored as they are (clean baseline JPEGs): each record alone outgrows the first map.
    assert min((raw / "train" / "ant" / f"large_{k}.jpg").stat().st_size for k in range(6)) > 1 << 17
    assert convert(tmp_path / "small_map") == reference
    monkeypatch.setattr(lmdb_format, "LMDB_COMMIT_EVERY", 3)
    monkeypatch.setattr(lmdb_format, "COMMIT_BYTES", 300_000)
    reference_small_txns = convert(tmp_path / "small_txns_default_map")
    monkeypatch.setattr(lmdb_format, "SCRATCH_MAP_SIZE", 1 << 12)
    assert convert(tmp_path / "small_txns_small_map") == reference_small_txns


# ----------------------------------------------------------------------------- disk full, file size limit


def test_file_size_limit_midway_then_a_rerun_finishes_identically(raw_with_a_large_last_shard, clean, tmp_path):
    """EFBIG while writing the last shard (~580 KB, over a limit of 300 KB): one line, the
    five shards before it intact, nothing half-written visible; a rerun without the limit
    finishes with the bytes of a run that never failed."""
    out = tmp_path / "out"
    cmd = convert_cmd(raw_with_a_large_last_shard, out)
    line = error_line(run(cmd, limit=300_000))
    assert line.startswith(f"Error: could not write {out}/")
    assert "file size limit (ulimit -f" in line and "rerun the same command" in line and "shards are kept" in line
    assert_intact(out, clean)
    assert sum(rel.startswith(".parts/") and rel.endswith(".json") for rel in tree_bytes(out)) == 5
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming: 5 shards already complete" in res.stderr
    assert tree_bytes(out) == clean


@pytest.mark.faults
def test_file_size_limit_while_finishing_then_a_rerun_finishes_identically(tmp_path):
    """All shards fit the limit, the mean image (768 KiB of float32) does not: the failure comes
    while the manifest is being made. One line naming the file; every shard kept."""
    raw = tmp_path / "raw"
    make_tree(raw, {"train": 4}, sizes=((64, 48),))
    out, reference = tmp_path / "out", tmp_path / "reference"
    assert run(convert_cmd(raw, reference)).returncode == 0
    clean = tree_bytes(reference)
    cmd = convert_cmd(raw, out)
    line = error_line(run(cmd, limit=500_000))
    assert f"could not write {out / 'mean_image.npy'}: file too large for the file size limit" in line
    assert_intact(out, clean)
    assert sum(rel.startswith(".parts/") and rel.endswith(".json") for rel in tree_bytes(out)) == 3
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree_bytes(out) == clean


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path``: a real ENOSPC. Needs root (or CAP_SYS_ADMIN)."""
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip()}); the RLIMIT_FSIZE cases cover the "
                    "same paths with EFBIG")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.mark.faults
def test_disk_full_midway_then_a_rerun_after_freeing_space_finishes_identically(raw_with_a_large_last_shard, clean,
                                                                               tmp_path):
    with small_disk(tmp_path / "disk", "800k") as disk:
        out = disk / "out"
        cmd = convert_cmd(raw_with_a_large_last_shard, out)
        line = error_line(run(cmd))
        assert line.startswith(f"Error: could not write {out}") and "no space left on the device" in line
        assert "free some space" in line and "rerun the same command" in line
        assert_intact(out, clean)
        done = sum(rel.startswith(".parts/") and rel.endswith(".json") for rel in tree_bytes(out))
        assert 1 <= done < 6
        remount(disk, "64m")  # space freed
        res = run(cmd)
        assert res.returncode == 0, res.stderr[-3000:]
        assert tree_bytes(out) == clean


# ----------------------------------------------------------------------------- checkpoints


def payload(n: int, value: float) -> dict:
    return {"kind": "checkpoint", "model": {"w": torch.full((n,), value)}, "model_config": {}, "data": {}}


@contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE in this process for the block (writes past ``limit`` fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_the_compacting_lmdb_copy_past_the_file_size_limit_fails_with_its_errno(tmp_path):
    """The shard's compacted copy is written into a descriptor of the converter's own: a write it
    cannot make surfaces as LMDB's error with the errno, which the converter words as one line."""
    src = tmp_path / "scratch"
    src.mkdir()
    with lmdb.open(str(src), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i in range(100):
            txn.put(b"%06d" % i, bytes([i]) * 3000)
    with file_size_limit(100_000), pytest.raises(lmdb.Error) as info:
        lmdb_format.compact_lmdb(src, tmp_path / "copy")
    assert os_error(info.value, src).errno == errno.EFBIG
    lmdb_format.compact_lmdb(src, tmp_path / "again")  # without the limit: the whole copy
    with lmdb.open(str(tmp_path / "again"), readonly=True, lock=False) as env:
        assert env.stat()["entries"] == 100


def test_a_checkpoint_write_failing_midway_keeps_the_previous_one(tmp_path, caplog):
    path = tmp_path / "run.ckpt"
    checkpoint.save(path, payload(1000, 1.0), keep=3)
    checkpoint.save(path, payload(1000, 2.0), keep=3)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with file_size_limit(1 << 20), pytest.raises(OutputError) as info:
        checkpoint.save(path, payload(1 << 20, 3.0), keep=3)  # 4 MiB of tensor data
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"could not write {path}: file too large")
    assert "an earlier file of that name is unchanged" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left
    with caplog.at_level(logging.WARNING):
        body, used = checkpoint.load_newest_good(path, check=False)
    assert used == path and torch.equal(body["model"]["w"], torch.full((1000,), 2.0)) and not caplog.records


SAVE_BIG = ("import sys, torch; from pathlib import Path; from alexnet_pipe.model import checkpoint; "
            "checkpoint.save(Path(sys.argv[1]), {'kind': 'checkpoint', 'model': {'w': torch.ones(60_000_000)}, "
            "'model_config': {}, 'data': {}}, keep=3)")


@pytest.mark.faults
def test_a_checkpoint_write_killed_midway_keeps_the_previous_one(tmp_path):
    """SIGKILL while a 240 MB checkpoint is being written: the previous one is still the
    checkpoint, the partial data sits in a hidden temporary file, and the next save removes it."""
    path = tmp_path / "run.ckpt"
    checkpoint.save(path, payload(1000, 1.0), keep=3)
    previous = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", SAVE_BIG, str(path)], env=ENV)
    temp = tmp_path / f".run.ckpt.tmp-{proc.pid}"
    deadline = time.monotonic() + TIMEOUT
    while not temp.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the save ended before it could be killed"
    proc.kill()
    proc.wait()
    assert temp.exists() and path.read_bytes() == previous  # killed midway, before the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([temp.name, "run.ckpt"])
    body, used = checkpoint.load_newest_good(path, check=False)
    assert used == path and torch.equal(body["model"]["w"], torch.full((1000,), 1.0))
    checkpoint.save(path, payload(1000, 2.0), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt", "run.ckpt.1"]  # the dead writer's file is gone


@pytest.mark.faults
def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_one(tmp_path):
    with small_disk(tmp_path / "disk", "2m") as disk:
        path = disk / "run.ckpt"
        checkpoint.save(path, payload(1000, 1.0), keep=2)
        before = {p.name: p.read_bytes() for p in disk.iterdir()}
        with pytest.raises(OutputError, match=rf"^could not write {path}: no space left on the device"):
            checkpoint.save(path, payload(1 << 20, 2.0), keep=2)
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == before
        assert torch.equal(checkpoint.load_newest_good(path, check=False)[0]["model"]["w"], torch.full((1000,), 1.0))


# ----------------------------------------------------------------------------- training's final save


@pytest.mark.faults
def test_training_whose_final_weights_do_not_fit_says_so_and_keeps_its_checkpoint(tmp_path):
    """The weights (86 MB) go to a full 16 MB disk, the checkpoint elsewhere: one line naming
    both, exit 1; the checkpoint loads, and the command the line gives writes the weights."""
    from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree

    make_image_tree(SynthConfig(tmp_path / "raw", 6, 1, (96, 72), ("circle", "square", "hstripes", "vstripes"), seed=5))
    run_convert(ConvertConfig(src=tmp_path / "raw", dst=tmp_path / "data", formats=("lmdb",), shard_size=10, workers=1,
                              progress=False, image=ImageSettings(short_side=72)))
    train = [sys.executable, "-m", "alexnet_pipe", "train", "-w", str(tmp_path / "data"), "-b", "cpu", "--crop", "67",
             "-z", "4", "--no_progress_bar", "--data-threads", "1", "--lr", "0.001", "--lr-scale", "none", "-e", "1",
             "--eval_freq", "0"]
    ckpt = tmp_path / "w.ckpt"
    with small_disk(tmp_path / "disk", "16m") as disk:
        res = run([*train, "-s", str(disk / "w.pt"), "--checkpoint", str(ckpt), "--serialize", "1"])
        line = error_line(res)
        assert line.startswith(f"Error: could not write {disk / 'w.pt'}: no space left on the device")
        assert line.endswith(f"; free some space, then rerun with --model-file {ckpt} to continue from the last "
                             "checkpoint (intact)")
        assert list(disk.iterdir()) == []  # the partial weights were removed
    body = checkpoint.load(ckpt)
    assert body["kind"] == "checkpoint" and body["epoch"] == 1
    res = run([*train, "--model-file", str(ckpt), "-s", str(tmp_path / "w.pt")])
    assert res.returncode == 0, res.stderr[-3000:]
    weights = checkpoint.load(tmp_path / "w.pt")["model"]
    assert weights.keys() == body["model"].keys()
    assert all(torch.equal(weights[k], body["model"][k]) for k in weights)
