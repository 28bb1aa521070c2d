"""The decode memory budget (imaging/budget.py): shared by threads or by processes, and an estimate
that bounds what a decode really costs, for every allowed format and mode."""

from __future__ import annotations

import multiprocessing
import threading
import time

from alexnet_pipe.imaging.budget import DecodeBudget


def test_work_over_the_budget_waits_for_the_rest_and_a_huge_one_runs_alone():
    budget = DecodeBudget(10)
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first():
        with budget.hold(6):
            order.append("first in")
            first_in.set()
            release_first.wait(5)
            order.append("first out")

    def second(cost: int, name: str):
        with budget.hold(cost):
            order.append(f"{name} in")

    t1 = threading.Thread(target=first)
    t1.start()
    first_in.wait(5)
    t2 = threading.Thread(target=second, args=(6, "second"))  # 6 + 6 > 10: waits
    t3 = threading.Thread(target=second, args=(4, "small"))  # 6 + 4 fits: runs at once
    t2.start()
    t3.start()
    t3.join(5)
    time.sleep(0.2)
    assert order == ["first in", "small in"]
    release_first.set()
    for t in (t1, t2):
        t.join(5)
    assert order == ["first in", "small in", "first out", "second in"]
    with budget.hold(10**12):  # above the whole budget: clamped, runs alone
        assert budget.used == budget.total
    assert budget.used == 0


def _hold(budget: DecodeBudget, cost: int, entered, leave) -> None:
    with budget.hold(cost):
        entered.set()
        leave.wait(10)


def test_a_budget_made_with_a_context_is_shared_by_its_processes():
    ctx = multiprocessing.get_context("forkserver")
    budget = DecodeBudget(10, ctx)
    events = [(ctx.Event(), ctx.Event()) for _ in range(3)]
    procs = [ctx.Process(target=_hold, args=(budget, cost, *ev)) for cost, ev in zip((6, 6, 4), events)]
    procs[0].start()
    assert events[0][0].wait(20)
    procs[1].start()  # 6 + 6 > 10: waits for the first
    procs[2].start()  # 6 + 4 fits
    assert events[2][0].wait(20)
    assert not events[1][0].wait(0.5)
    assert budget.used == 10  # this process sees what the others hold
    events[0][1].set()
    assert events[1][0].wait(20)
    for _, leave in events:
        leave.set()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    assert budget.used == 0


def _files() -> dict[str, bytes]:
    """One 2400x1800 file of each allowed format and mode the decoders treat differently."""
    import io

    import cv2
    import numpy as np
    from PIL import Image

    arr = np.full((1800, 2400, 3), 90, np.uint8)
    arr[::7] = 200
    arr[:, ::5, 1] = 30
    rgb = Image.fromarray(arr)
    grey16 = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    writers = {
        "lossless WebP": lambda b: rgb.save(b, "WEBP", lossless=True),
        "lossy WebP": lambda b: rgb.save(b, "WEBP", quality=80),
        "RGBA WebP": lambda b: rgb.convert("RGBA").save(b, "WEBP", lossless=True),
        "RGB PNG": lambda b: rgb.save(b, "PNG"),
        "RGBA PNG": lambda b: rgb.convert("RGBA").save(b, "PNG"),
        "LA PNG": lambda b: rgb.convert("LA").save(b, "PNG"),
        "palette PNG with transparency": lambda b: rgb.convert("P").save(b, "PNG", transparency=3),
        "bilevel PNG": lambda b: rgb.convert("1").save(b, "PNG"),
        "16-bit grey PNG": lambda b: grey16.save(b, "PNG"),
        "48-bit PNG": lambda b: b.write(cv2.imencode(".png", arr.astype(np.uint16) * 257)[1].tobytes()),
        "GIF": lambda b: rgb.convert("P").save(b, "GIF"),
        "BMP": lambda b: rgb.save(b, "BMP"),
        "deflate TIFF": lambda b: rgb.save(b, "TIFF", compression="tiff_deflate"),
        "CMYK TIFF": lambda b: rgb.convert("CMYK").save(b, "TIFF"),
        "16-bit grey TIFF": lambda b: grey16.save(b, "TIFF"),
        "32-bit int TIFF": lambda b: Image.fromarray(arr[..., 0].astype(np.int32)).save(b, "TIFF"),
        "float TIFF": lambda b: Image.fromarray(arr[..., 0].astype(np.float32)).save(b, "TIFF"),
        "baseline JPEG": lambda b: rgb.save(b, "JPEG", quality=90),
        "progressive JPEG": lambda b: rgb.save(b, "JPEG", quality=90, progressive=True),
        "progressive grey JPEG": lambda b: rgb.convert("L").save(b, "JPEG", quality=90, progressive=True),
        "CMYK JPEG": lambda b: rgb.convert("CMYK").save(b, "JPEG", quality=90),
        "progressive CMYK JPEG": lambda b: rgb.convert("CMYK").save(b, "JPEG", quality=90, progressive=True),
    }
    files = {}
    for name, write in writers.items():
        buf = io.BytesIO()
        write(buf)
        files[name] = buf.getvalue()
    return files


class _Recorded(DecodeBudget):
    def __init__(self):
        super().__init__(1 << 50)
        self.held: list[int] = []

    def hold(self, cost):
        self.held.append(cost)
        return super().hold(cost)


def _peak_rise(data: bytes, short_side: int) -> tuple[int, list[int]]:
    """In a fresh process: (the rise of its peak resident memory over one ``process`` call, the costs held)."""
    from alexnet_pipe.config import ImageSettings
    from alexnet_pipe.imaging import budget
    from alexnet_pipe.imaging.process import process

    def hwm() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    recorded = _Recorded()
    budget.install(recorded)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = hwm()
    process(data, ImageSettings(short_side=short_side))
    return hwm() - base, recorded.held


def test_the_estimate_bounds_the_memory_each_kind_of_decode_takes():
    """Each decode in a process of its own (freed memory stays with the allocator, so a second decode
    in the same process would show no rise), started from a server that imported the code."""
    from concurrent.futures import ProcessPoolExecutor

    from alexnet_pipe.convert.supervisor import worker_context

    files = _files()
    cases = [(name, short_side) for short_side in (256, 0) for name in files]  # scaled where the codec can; full
    with ProcessPoolExecutor(2, mp_context=worker_context("alexnet_pipe.imaging.process"),
                             max_tasks_per_child=1) as pool:
        measured = list(pool.map(_peak_rise, [files[n] for n, _ in cases], [s for _, s in cases]))
    rows = [(name, side, rise, held) for (name, side), (rise, held) in zip(cases, measured)]
    print("\n".join(f"{n:30s} {s:4d} rise {r / 1e6:7.1f} MB  held {h[0] / 1e6:7.1f} MB" for n, s, r, h in rows))
    assert all(len(held) == 1 for *_, held in rows), rows  # one decode, one hold
    over = [row for row in rows if row[2] > row[3][0]]
    assert not over, over
    # and not so loose that ordinary large images wait for nothing: within 5x where the decode is dear
    loose = [row for row in rows if row[2] > 30e6 and row[3][0] > 5 * row[2]]
    assert not loose, loose
