"""Worker processes that may die: where they come from, how a death is noticed and worded, and
what is redone after one. Used by convert (image decoding) and verify (shard reading).

Both run native code on untrusted bytes (image decoders; LMDB maps a corrupt file, so a page past
a truncated end is SIGBUS), which can kill the process running it (SIGSEGV, SIGBUS, the kernel's
OOM killer) where no Python code can catch it. So that work runs in worker processes supervised
from here, and a death costs only the task that caused it; ``describe_death`` words every death.

- ``ordered_results`` (convert): a process pool whose results come back in task order, memory
  bounded. A worker that dies breaks the pool: each task then in flight is redone by the caller's
  ``rerun`` (convert's: in a process of its own, ``run_alone``), and a new pool takes the rest.
- ``run_queued`` (verify, and --repair's check): long-lived workers, each given a queue of tasks
  over a pipe, which it answers in order, sending progress ticks. A worker that dies, or sends
  nothing for ``stall_seconds``, is blamed on the task it was on (the first it had not answered);
  the caller's ``on_lost`` turns that task into an outcome, and its other tasks go back in the queue.

Two loops because the callers differ: convert streams megabytes of encoded images per task and
relies on the pool's result thread to keep the workers busy while it writes shards; verify must
know which task a dead or stuck worker was on, and how far it got.

Workers start from a forkserver that imported their code once: they import only light modules
(no torch: ~2.5 s per process), and the children of the server share those pages. Unlike a plain
fork, a child never inherits this process's threads or locks (it may have imported torch). Spawn
where forkserver does not exist (Windows).
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import multiprocessing.forkserver
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import Any

from alexnet_pipe.errors import AlexnetPipeError

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5  # how often a queued worker reports progress
# Tasks handed to a queued worker ahead, so that it never waits for the parent between small tasks:
# at least 2, and up to 16 while they hold at most 256 units of work (big tasks stay free for idle workers).
QUEUE_MIN, QUEUE_MAX, QUEUE_UNITS = 2, 16, 256


def worker_context(preload: str):
    """The multiprocessing context whose processes start from a server that imported ``preload``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([preload])
    return ctx


def start_early(preload: str) -> None:
    """Start the forkserver now, so that its imports (~0.3 s for the image code) run on another
    core while this process is still importing and scanning, not after."""
    if worker_context(preload).get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def describe_death(exitcode: int | None) -> str:
    """How a worker process ended, from its exit code (-N: killed by signal N), e.g.
    "killed by signal SIGSEGV" or "exit code 1"."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def ignore_sigint() -> None:
    """A worker's first act: Ctrl-C reaches the terminal's whole process group, and the parent alone
    acts on it (it ends its workers and says how to resume); a worker would print a trace of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------- one task, one process


def _send_result(conn, fn: Callable, args: tuple) -> None:
    ignore_sigint()
    try:
        conn.send(fn(*args))
    finally:
        conn.close()


def run_alone(ctx, fn: Callable, *args) -> tuple[Any, int | None]:
    """``fn(*args)`` in a new process of its own: (the result, None), or (None, the exit code of a
    process that died before it sent one)."""
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_result, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    try:
        return receive.recv(), None
    except EOFError:  # the process died before it sent anything
        pass
    finally:
        receive.close()
        proc.join()
    return None, proc.exitcode


# ---------------------------------------------------------------- convert: an ordered pool


def _start_pooled(setup: Callable | None, setup_args: tuple) -> None:
    ignore_sigint()
    if setup is not None:
        setup(*setup_args)


def ordered_results(tasks: Iterable, fn: Callable, args: Callable[[Any], tuple], workers: int, ctx,
                    rerun: Callable[[Any], Any],
                    setup: Callable[[], tuple[Callable, tuple]] | None = None) -> Iterator[tuple[Any, Any]]:
    """``(task, fn(*args(task)))`` for every task, in task order, at most ``workers * 4`` in flight.

    A worker process that dies breaks the whole pool: every task still in flight is then redone
    by ``rerun(task)``, and a new pool takes the rest. One worker (``workers == 1``) runs in this
    process: there a native crash ends the run.

    ``setup()``: (function, args) that each worker process of a new pool runs first; called once
    per pool, so that what a dead pool's workers shared (convert's memory budget, which one of them
    may have died holding) is made anew.
    """
    if workers == 1:
        for task in tasks:
            yield task, fn(*args(task))
        return

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_pooled,
                                   initargs=setup() if setup is not None else (None, ()))

    pool = new_pool()
    window: deque = deque()
    tasks = iter(tasks)
    try:
        while True:
            while len(window) < workers * 4 and (task := next(tasks, None)) is not None:
                window.append((task, pool.submit(fn, *args(task))))
            if not window:
                return
            head, fut = window.popleft()
            try:
                result = fut.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                # A task that finished before the pool broke keeps its result; the others are rerun.
                redo = [(task, done.done() and not done.cancelled() and done.exception() is None, done)
                        for task, done in [(head, fut), *window]]
                window.clear()
                log.warning("a worker process died: rerunning the %d chunks that were in flight, each in a "
                            "process of its own", sum(not ok for _, ok, _ in redo))
                for task, ok, done in redo:
                    yield task, (done.result() if ok else rerun(task))
                pool = new_pool()
                continue
            yield head, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- verify: queued workers with ticks


class Ticker:
    """A queued worker's progress: ``tick(count)`` sends the count to the parent every TICK_SECONDS
    (``Ticker()`` sends nothing: a task run in this process)."""

    def __init__(self, send=None):
        self.send, self.last = send, time.monotonic()

    def __call__(self, count: int) -> None:
        if self.send is not None and time.monotonic() - self.last >= TICK_SECONDS:
            self.last = time.monotonic()
            self.send(("tick", count))


def _serve(conn, fn: Callable) -> None:
    """A queued worker: take (number, task) from ``conn`` until None; answer ticks and one
    ("done", number, ``fn(task, tick)``) each."""
    ignore_sigint()
    faulthandler.disable()  # a death by signal is reported by the parent, not dumped here
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ValueError, OSError):
        pass
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        number, task = msg
        conn.send(("done", number, fn(task, Ticker(conn.send))))


class _Worker:
    """One queued worker process and the tasks it was given, which it works through in order."""

    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, fn), daemon=True)
        self.proc.start()
        child.close()
        self.tasks: deque[int] = deque()  # given, not yet answered; the first is the one being worked on
        self.queued = 0  # units of work in those tasks
        self.progress = 0  # units done of the first task
        self.heard = time.monotonic()

    def give(self, number: int, task, units: int) -> None:
        if not self.tasks:
            self.progress, self.heard = 0, time.monotonic()
        self.conn.send((number, task))
        self.tasks.append(number)
        self.queued += units

    def end(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=2)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_queued(tasks: list, fn: Callable, ctx, workers: int, *, units: Callable[[Any], int], stall_seconds: float,
               on_progress: Callable[[int], None], on_lost: Callable[[int, int, int | None], Any],
               cannot_start: str) -> list:
    """Every task's outcome ``fn(task, tick)``, in task order, each run in a queued worker process.

    A worker answers its tasks in the order given, so when one dies, the first task it had not
    answered killed it; the others go back in the queue.

    Args:
        units: a task's units of work (what ``tick`` counts), for progress and queue lengths.
        on_progress: called with the units done since the last call.
        on_lost: ``on_lost(number, units done, exit code)``: the outcome of a task whose worker
            died (the exit code) or sent nothing for ``stall_seconds`` (None; the worker is killed).
        cannot_start: the error's text when three workers die with no task (it adds the death).
    """
    outcomes: list = [None] * len(tasks)
    pending = deque(range(len(tasks)))
    running: list[_Worker] = []
    failed_starts = 0
    try:
        while pending or any(w.tasks for w in running):
            while pending and len(running) < min(workers, len(tasks)):
                running.append(_Worker(ctx, fn))
            for w in running:
                while pending and w.proc.exitcode is None and (len(w.tasks) < QUEUE_MIN or (
                        len(w.tasks) < QUEUE_MAX and w.queued + units(tasks[pending[0]]) <= QUEUE_UNITS)):
                    try:
                        w.give(pending[0], tasks[pending[0]], units(tasks[pending[0]]))
                    except OSError:  # it died: found below
                        break
                    pending.popleft()
            ready = set(wait([w.conn for w in running] + [w.proc.sentinel for w in running], timeout=1.0))
            now = time.monotonic()
            for w in list(running):
                died = False
                if w.conn in ready:
                    try:
                        while w.conn.poll():
                            msg = w.conn.recv()
                            if msg[0] == "tick":
                                on_progress(msg[1] - w.progress)
                                w.progress, w.heard = msg[1], now
                            else:
                                _, number, outcome = msg
                                assert number == w.tasks[0], "a worker answered out of order"
                                w.tasks.popleft()
                                w.queued -= units(tasks[number])
                                outcomes[number] = outcome
                                on_progress(units(tasks[number]) - w.progress)
                                w.progress, w.heard = 0, now
                    except (EOFError, OSError):
                        died = True
                if not died and w.proc.sentinel in ready and not w.conn.poll():
                    died = True
                stalled = bool(w.tasks) and now - w.heard > stall_seconds
                if not died and not stalled:
                    continue
                if not died:
                    w.proc.kill()
                w.proc.join()
                if w.tasks:
                    number = w.tasks.popleft()
                    pending.extendleft(reversed(w.tasks))  # given but never started
                    outcomes[number] = on_lost(number, w.progress, w.proc.exitcode if died else None)
                    on_progress(units(tasks[number]) - w.progress)
                else:
                    failed_starts += 1
                    if failed_starts >= 3:
                        raise AlexnetPipeError(f"{cannot_start} ({describe_death(w.proc.exitcode)})")
                w.conn.close()
                running.remove(w)
    finally:
        for w in running:
            w.end()
    return outcomes
