"""convert's worker processes share one decode memory budget (imaging/budget.py, convert/encode.py):
images just under the pixel limit are not decoded in every worker at once, and a worker that dies
holding part of the budget does not stall the pool that replaces it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from alexnet_pipe.convert.supervisor import ordered_results, worker_context
from alexnet_pipe.imaging.budget import DecodeBudget, holding, install


def _timed_hold(cost: int) -> tuple[float, float]:
    with holding(cost):
        start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        time.sleep(0.3)
        return start, time.monotonic()


def _overlaps(spans: list[tuple[float, float]]) -> int:
    spans = sorted(spans)
    return sum(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


@pytest.mark.parametrize("total, serial", [(100, True), (1000, False)])
def test_the_pool_workers_hold_one_budget(total, serial):
    ctx = worker_context("alexnet_pipe.imaging.budget")
    spans = [result for _, result in ordered_results(
        range(6), _timed_hold, lambda task: (60,), 3, ctx, rerun=lambda task: None,
        setup=lambda: (install, (DecodeBudget(total, ctx),)))]
    # 60 + 60 > 100: one decode at a time across the three workers; with room for all, they overlap
    assert (_overlaps(spans) == 0) is serial, spans


def _dies_holding(task: int) -> str:
    with holding(100):  # the whole budget
        if task == 0:
            os._exit(3)  # dies holding it: a decoder's native crash, the OOM killer
        time.sleep(0.05)
    return "done"


def test_a_worker_that_dies_holding_the_budget_does_not_stall_the_next_pool():
    ctx = worker_context("alexnet_pipe.imaging.budget")
    results: list = []

    def consume():
        # more tasks than the first pool's window (2 workers x 4): a second pool must run some
        results.extend(ordered_results(range(20), _dies_holding, lambda task: (task,), 2, ctx,
                                       rerun=lambda task: "rerun alone",
                                       setup=lambda: (install, (DecodeBudget(100, ctx),))))

    runner = threading.Thread(target=consume, daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the new pool waited for budget a dead worker held"
    assert [task for task, _ in results] == list(range(20))
    assert sum(outcome == "done" for _, outcome in results) >= 12  # the rest ran in the new pool
    assert results[0] == (0, "rerun alone")
    assert all(outcome in ("done", "rerun alone") for _, outcome in results)


@pytest.mark.faults
def test_four_images_at_the_pixel_limit_are_not_decoded_in_every_worker_at_once(tmp_path):
    """The issue's case for convert: 9400x9400 lossless WebPs of a few KB (each ~1.55 GB to decode),
    two workers, one image a shard so that both get one; the peak of the whole process tree."""
    from tests.helpers.memory import TreePeak

    raw = tmp_path / "raw"
    first = raw / "train" / "a" / "0.webp"
    first.parent.mkdir(parents=True)
    Image.new("RGB", (9400, 9400), (120, 30, 200)).save(first, lossless=True)
    for name in ("a/1", "b/0", "b/1"):
        (raw / "train" / f"{name}.webp").parent.mkdir(parents=True, exist_ok=True)
        (raw / "train" / f"{name}.webp").write_bytes(first.read_bytes())
    peaks, seconds = {}, {}
    for mode, mb in (("without", 1 << 20), ("within", None)):  # the budget raised out of reach: the baseline
        extra = [] if mb is None else ["--decode-memory-mb", str(mb)]
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(tmp_path / mode),
                                 "--workers", "2", "--shard-size", "1", "--no-progress", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = TreePeak(proc.pid)
        out, err = proc.communicate(timeout=900)
        peaks[mode], seconds[mode] = sampler.stop(), time.monotonic() - start
        assert proc.returncode == 0, err[-2000:]
        assert (tmp_path / mode / "manifest.json").is_file()
    print(f"peak RSS of the process tree (GB): {peaks['without'] / 1e9:.2f} without the budget, "
          f"{peaks['within'] / 1e9:.2f} within it; {seconds['without']:.1f} s vs {seconds['within']:.1f} s")
    # without: two such decodes at once; within: one (each ~1.55 GB)
    assert peaks["within"] < peaks["without"] - 1e9, peaks
