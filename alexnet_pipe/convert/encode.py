"""Shard plans -> encoded images: the chunks convert hands its worker processes, and what it does
when an image kills one (supervisor.py runs them).

A chunk that was in flight when a worker died is rerun in a process of its own; if that dies too,
every image of it in a process of its own, so that only an image that kills its process is skipped,
with the reason ("the image decoder crashed its process (killed by signal SIGSEGV)").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.convert.plan import ShardPlan
from alexnet_pipe.convert.supervisor import describe_death, ordered_results, run_alone, worker_context
from alexnet_pipe.dataset.mean import PixelStats
from alexnet_pipe.imaging.budget import DecodeBudget, install
from alexnet_pipe.imaging.encode import Encoded
from alexnet_pipe.imaging.process import BatchResult, process_batch
from alexnet_pipe.inputs.table import Source

log = logging.getLogger(__name__)

CHUNK = 32  # images per worker task: amortises IPC, small enough to keep memory flat

Chunk = tuple[ShardPlan, tuple[int, ...], tuple[Source, ...]]  # (plan, stored positions, sources)


def chunks(plans: list[ShardPlan]) -> Iterator[Chunk]:
    """(plan, stored positions, sources) per worker task. A shard's inputs are read in file and
    byte-offset order (forward-only I/O over folders and the 138 GB train tar, instead of the
    shuffled order's random reads); the shard writer stores them back in the shuffled order."""
    for plan in plans:
        sources = list(plan.sources)  # made once per shard from the table's columns
        order = sorted(range(len(sources)), key=lambda k: (sources[k].path, sources[k].offset))
        for start in range(0, len(order), CHUNK):
            positions = tuple(order[start : start + CHUNK])
            yield plan, positions, tuple(sources[k] for k in positions)


def _context():
    return worker_context("alexnet_pipe.imaging.process")


def retry_alone(sources: tuple[Source, ...], settings: ImageSettings) -> BatchResult:
    """A chunk that was in flight when a worker process died (a decoder's native crash, or the
    kernel's OOM killer): rerun in a process of its own; if that dies too, every image in a
    process of its own, so that only an image that kills its process is skipped, with the reason."""
    ctx = _context()
    whole, _ = run_alone(ctx, process_batch, list(sources), settings)
    if whole is not None:
        return whole
    results: list[Encoded | str] = []
    size = settings.mean_size
    mean_sum, mean_count = np.zeros((size, size, 3), np.uint64), np.zeros((size, size), np.uint64)
    stats = PixelStats()
    for src in sources:
        one, exitcode = run_alone(ctx, process_batch, [src], settings)
        if one is not None:
            results.append(one.results[0])
            if one.mean_sum is not None:
                mean_sum += one.mean_sum
                mean_count += one.mean_count
                stats.merge(one.stats)
            continue
        reason = f"the image decoder crashed its process ({describe_death(exitcode)})"
        log.warning("%s: %s; skipped", src.name, reason)
        results.append(reason)
    if not any(isinstance(r, Encoded) for r in results):
        return BatchResult(results, None, None)
    return BatchResult(results, mean_sum, mean_count, stats)


def encoded_chunks(tasks: Iterable[Chunk], settings: ImageSettings, workers: int,
                   decode_memory: int) -> Iterator[tuple[Chunk, BatchResult]]:
    """``process_batch`` over the chunks ``tasks``, in ``workers`` processes: (chunk, its results) in
    chunk order, memory bounded: the workers' decodes share a budget of ``decode_memory`` bytes of
    estimated peak memory (imaging/budget.py). One worker runs in this process (there a native crash
    ends the run), as does a rerun chunk (``retry_alone``): one decode at a time, no budget needed."""
    ctx = _context() if workers > 1 else None
    return ordered_results(tasks, process_batch, lambda task: (list(task[2]), settings), workers, ctx,
                           lambda task: retry_alone(task[2], settings),
                           setup=lambda: (install, (DecodeBudget(decode_memory, ctx),)))
