"""`convert` killed with SIGKILL, then the same command run again: the output is byte for byte
that of a run never interrupted (records in LMDB and RecordIO, completion records, manifest,
mean files: the whole directory), every time. And while killed, nothing half-written is visible:
every file outside the staging area and the temporary files of atomic writes is already final.

Through the real command line, 2 workers, 270 small images in 17 shards, both formats. The whole
process group (the converter, its fork server and workers) is killed, as a preempted machine or
`kill -9` of the job would. `make test` kills once, at the start of finalization; `make faults`
adds 10 kills at seeded random moments and 6 aimed at each step of finalization, and runs two
conversions into one directory at once (`tests/convert/test_convert.py` has the fast case of that).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.images import make_tree
from tests.helpers.trees import TEMP, tree_bytes

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
FLAGS = ["--format", "both", "--shard-size", "16", "--workers", "2", "--no-progress", "--short-side", "48"]
PER_SPLIT = {"train": 80, "val": 10}  # per class, 3 classes: 240 + 30 images
SHARDS = 15 + 2
SIZES = ((64, 48), (48, 64), (96, 72), (160, 120))
TIMEOUT = 300


def command(raw: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(out), *FLAGS]




@dataclass
class Clean:
    raw: Path
    tree: dict[str, bytes]
    seconds: float


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Clean:
    root = tmp_path_factory.mktemp("kills")
    make_tree(root / "raw", PER_SPLIT, sizes=SIZES)
    started = time.monotonic()
    res = subprocess.run(command(root / "raw", root / "clean"), env=ENV, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    tree = tree_bytes(root / "clean")
    assert sum(k.startswith(".parts/") and k.endswith(".json") for k in tree) == SHARDS
    return Clean(root / "raw", tree, time.monotonic() - started)


def completion_records(out: Path) -> int:
    try:
        return sum(1 for n in os.listdir(out / ".parts") if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return 0


@dataclass
class Killed:
    running: bool  # the process was still running when killed
    records: int  # completion records (finished shards) at the kill
    manifest: bool  # manifest.json existed after the kill


def kill_when(cmd: list[str], out: Path, ready: Callable[[float], bool]) -> Killed:
    """Start ``cmd`` in a process group of its own; SIGKILL the group as soon as ``ready(seconds
    since start)`` holds (polled without sleeping, for aim)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    started = time.monotonic()
    try:
        while proc.poll() is None and not ready(time.monotonic() - started):
            assert time.monotonic() - started < TIMEOUT, "the conversion never reached the moment to kill it"
        running = proc.poll() is None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: converter, fork server, workers
        except ProcessLookupError:
            pass
        proc.wait()
    return Killed(running, completion_records(out), (out / "manifest.json").exists())


def assert_nothing_half_written(out: Path, clean: Clean) -> None:
    """Every file visible after the kill is final: equal to the uninterrupted run's. Only the
    staging area and the temporary files of atomic writes may hold partial data."""
    for rel, data in tree_bytes(out).items():
        if rel.startswith(".staging/") or TEMP.fullmatch(Path(rel).name):
            continue
        assert rel in clean.tree, f"{rel}: a file the uninterrupted run does not have"
        assert data == clean.tree[rel], f"{rel} differs from the uninterrupted run's while killed"


def kill_and_rerun(clean: Clean, out: Path, ready: Callable[[float], bool]) -> Killed:
    cmd = command(clean.raw, out)
    killed = kill_when(cmd, out, ready)
    if out.exists():
        assert_nothing_half_written(out, clean)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    again = tree_bytes(out)
    assert again.keys() == clean.tree.keys()
    for rel in clean.tree:
        assert again[rel] == clean.tree[rel], f"{rel} differs from the uninterrupted run's after the rerun"
    return killed


def test_killed_as_finalization_starts(clean, tmp_path):
    """The kill lands once every shard is complete, while the manifest is being made."""
    out = tmp_path / "out"
    killed = kill_and_rerun(clean, out, lambda _: completion_records(out) == SHARDS)
    assert killed.running and killed.records == SHARDS and not killed.manifest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_in_one_line_and_the_same_command_resumes(clean, tmp_path, sig):
    out = tmp_path / "out"
    cmd = command(clean.raw, out)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while completion_records(out) < 1:  # under way
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before a shard"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGSTOP)  # held mid-run: the signal cannot land after the end
        assert completion_records(out) < SHARDS
        # Ctrl-C reaches the terminal's whole group (converter, fork server, workers); `kill PID` the converter.
        (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
        os.killpg(proc.pid, signal.SIGCONT)
        err = proc.communicate(timeout=TIMEOUT)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-3000:]
    [line] = [line for line in err.splitlines() if not line.startswith("INFO ")]
    assert line.startswith(f"stopped by {sig.name}") and line.endswith("rerun the same command to resume")
    assert_nothing_half_written(out, clean)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree_bytes(out) == clean.tree  # as if never stopped


def moment(seed: int) -> tuple[int, float]:
    """(k, delay): kill ``delay`` seconds after k completion records exist; k = 0: ``delay`` is a
    fraction of the uninterrupted run's time, after the start (start-up, the scan, the first shard:
    a fixed delay of up to 2 s outlasted the whole run on an idle machine). k < SHARDS - 3 and a delay
    under 30 ms leave shards and finalization to come: a shard of these tiny images takes about
    as long, so later or longer aims could land after the manifest (seen under load)."""
    rng = random.Random(seed)
    k = max(0, rng.randrange(-4, SHARDS - 3))
    return k, rng.uniform(0.1, 0.8) if k == 0 else rng.uniform(0, 0.03)


MOMENTS = [(seed, *moment(seed)) for seed in range(10)]


@pytest.mark.faults
@pytest.mark.parametrize("seed,after,delay", MOMENTS, ids=[f"seed{s}" for s, _, _ in MOMENTS])
def test_killed_at_a_random_moment(clean, tmp_path, seed, after, delay):
    out = tmp_path / "out"
    reached: list[float] = []
    if not after:
        delay *= clean.seconds  # a fraction of the whole run

    def ready(now: float) -> bool:
        if not reached and completion_records(out) >= after:
            reached.append(now)
        return bool(reached) and now >= reached[0] + delay

    killed = kill_and_rerun(clean, out, ready)
    print(f"seed {seed}: killed {delay * 1000:.0f} ms after {f'{after} shards' if after else 'the start'}; {killed}")
    assert killed.running and not killed.manifest


def _exists(out: Path, rel: str) -> Callable[[float], bool]:
    return lambda _: (out / rel).exists()


def _temp_of(out: Path, name: str) -> Callable[[float], bool]:
    def ready(_: float) -> bool:
        return out.is_dir() and any(TEMP.fullmatch(n) and n.startswith(f".{name}.") for n in os.listdir(out))
    return ready


# Finalization writes, in order: the combined RecordIO indexes, mean.json, the mean image (.npy,
# .binaryproto), the manifest (through a temporary file), then removes the staging area.
FINALIZE = ["recordio/train.idx", "recordio/val.idx", "mean.json", "mean_image.npy", "mean.binaryproto",
            ".manifest.json.tmp"]


@pytest.mark.faults
@pytest.mark.parametrize("target", FINALIZE)
def test_killed_during_finalization(clean, tmp_path, target):
    out = tmp_path / "out"
    ready = _temp_of(out, "manifest.json") if target.endswith(".tmp") else _exists(out, target)
    killed = kill_and_rerun(clean, out, ready)
    print(f"killed when {target} appeared: {killed}")
    assert killed.records == SHARDS


@pytest.mark.faults
def test_a_second_convert_into_the_same_output_is_refused_while_the_first_runs(clean, tmp_path):
    """Two real `convert` processes into one OUT: the second stops with one line, writes nothing,
    and the first finishes as if alone. The first is stopped (SIGSTOP) while it holds the run
    lock, so the second always meets it, however fast the conversion is."""
    out = tmp_path / "out"
    cmd = command(clean.raw, out)
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / ".convert.json").exists():  # written under the run lock
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended early"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
            assert first.poll() is None, "the first run ended before the second was refused"
        finally:
            os.kill(first.pid, signal.SIGCONT)
    finally:
        stdout, stderr = first.communicate(timeout=TIMEOUT)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    [line] = second.stderr.strip().splitlines()
    assert line.startswith("Error: another alexnet-pipe convert is writing") and "wait for it" in line
    assert first.returncode == 0, stderr[-3000:]
    assert tree_bytes(out) == clean.tree
