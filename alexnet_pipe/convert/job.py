"""The `convert` job: raw images -> shuffled, validated LMDB/RecordIO shards + manifest + mean.

``run_convert`` reads top to bottom: find the inputs and plan the shards, claim OUT
(output.py), encode the missing shards' images in worker processes (encode.py), accumulate
and commit each shard (accumulate.py), then write the manifest and means (finalize.py).

Crash safety: every shard is written in ``OUT/.staging`` and renamed into place when complete;
a small completion record in ``OUT/.parts`` then marks it done. The manifest is written last.
A rerun of the same command skips completed shards, redoes the rest, and produces the same
bytes as an uninterrupted run (nothing time- or order-dependent is stored).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from alexnet_pipe.config import SKIPPED_SHOWN, ConvertConfig
from alexnet_pipe.convert.accumulate import ShardState, commit_shard
from alexnet_pipe.convert.encode import chunks, encoded_chunks
from alexnet_pipe.convert.finalize import finalize, finalized_files, id_width, read_or_none
from alexnet_pipe.convert.output import (
    check_output,
    clear_shard,
    locked,
    output_identity,
    prepare_output,
    record_inputs,
    run_lock,
)
from alexnet_pipe.convert.plan import ShardPlan, plan_shards
from alexnet_pipe.dataset import parts
from alexnet_pipe.dataset.layout import LOCK_FILE, PARTS_DIR, RECORDIO_DIR, SCAN_CACHE, STAGING_DIR, STATE_FILE
from alexnet_pipe.errors import SettingsMismatchError
from alexnet_pipe.fsutil import output_error, remove, remove_temps
from alexnet_pipe.inputs.entries import refuse_special
from alexnet_pipe.inputs.scan import scan
from alexnet_pipe.inputs.table import ScanResult
from alexnet_pipe.progress import Progress
from alexnet_pipe.text import plural

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    root: Path
    records: dict[str, int]
    skipped: int
    converted_now: int  # images processed by this run (0 when everything was already done)
    seconds: float
    remaining_shards: int = 0  # > 0 only after a --part run while other parts are unfinished
    repaired: tuple[tuple[str, str], ...] = ()  # --repair: (shard or file, what was done and why) per rewrite
    sums_added: int = 0  # --repair: intact shards that got their per-record checksums
    skipped_shown: tuple[tuple[str, str], ...] = ()  # (where, why) of the first skipped inputs (SKIPPED_SHOWN)

    @property
    def images_per_second(self) -> float:
        return self.converted_now / self.seconds if self.seconds > 0 else 0.0


def find_inputs(cfg: ConvertConfig, cache_dir: Path | None) -> ScanResult:
    """The inputs of ``cfg``: list files (--list) or a scanned layout, then --val-ratio's split."""
    for path, what in ((cfg.synsets, "--synsets"), (cfg.val_labels, "--val-labels")):
        if path is not None:  # API callers too (the CLI checked already): a FIFO would block the scan forever
            refuse_special(path, what)
    if cfg.train_list is not None:
        from alexnet_pipe.inputs.listfile import scan_lists

        found = scan_lists(cfg.src, cfg.train_list, cfg.val_list, cfg.synsets)
    else:
        found = scan(cfg.src, cfg.val_labels, cfg.synsets, cache_dir=cache_dir, out=cfg.dst)
    if cfg.val_ratio is not None:
        from alexnet_pipe.inputs.holdout import carve_val

        found = carve_val(found, cfg.val_ratio, cfg.seed)
    return found


def run_convert(cfg: ConvertConfig) -> ConvertResult:
    """Convert ``cfg.src`` into ``cfg.dst``; resume an interrupted run of the same command.

    Returns:
        Counts per split and the throughput of this run.
    Raises:
        LayoutError: the input is not an ImageNet-style layout.
        SettingsMismatchError: OUT holds a different conversion (use --force).
    """
    started = time.perf_counter()
    check_output(cfg.dst, cfg.force, cfg.src)
    if cfg.repair and not (cfg.dst / STATE_FILE).is_file():
        raise SettingsMismatchError(f"{cfg.dst} holds no conversion to repair (no {STATE_FILE}); run the convert "
                                    "command without --repair")
    # The archives' member lists are cached in OUT: resumes and --part runs skip the 1.28M headers.
    found = find_inputs(cfg, cache_dir=cfg.dst / SCAN_CACHE)
    plans = {split: plan_shards(split, sources, cfg.shard_size, cfg.seed) for split, sources in found.splits.items()}
    identity = output_identity(cfg, found)
    cfg.dst.mkdir(parents=True, exist_ok=True)  # after the scan: a bad input leaves no OUT behind
    with run_lock(cfg.dst, shared=cfg.part is not None):
        try:
            return _write(cfg, found, plans, identity, started)
        except (OSError, lmdb.Error) as exc:  # a full disk, a file size limit: one line, shards kept
            error = output_error(exc, cfg.dst, "free some space (or raise the limit), then rerun the same command: "
                                               "the finished shards are kept and the conversion goes on from them")
            if error is None:
                raise
            if cfg.part is None:  # free the unfinished shard's space (--part neighbours may be writing theirs)
                remove(cfg.dst / STAGING_DIR)
            raise error from exc


def _write(cfg: ConvertConfig, found: ScanResult, plans: dict[str, list[ShardPlan]], identity: dict,
           started: float) -> ConvertResult:
    """The conversion proper, under the run lock: prepare OUT, write the missing shards, finalize."""
    prepare_output(cfg.dst, identity, cfg.force, cfg.repair)
    if cfg.part is None:  # alone in OUT: what a run killed amid an atomic write left is garbage
        for folder in (cfg.dst, cfg.dst / PARTS_DIR, cfg.dst / RECORDIO_DIR, cfg.dst / SCAN_CACHE):
            remove_temps(folder)
    record_inputs(cfg)

    done: set[str] = set()  # names of complete shards (their records stay on disk until the end)
    pending: list[ShardPlan] = []
    all_plans = [plan for split_plans in plans.values() for plan in split_plans]
    # --part I/N: this process writes every N-th shard; the others may be in progress elsewhere
    # (another machine, a shared file system), so they are neither cleared nor waited for.
    mine = [plan for k, plan in enumerate(all_plans) if cfg.part is None or k % cfg.part[1] == cfg.part[0]]
    mine_names = {plan.name for plan in mine}
    for plan in all_plans:
        if parts.load(cfg.dst, plan) is not None:
            done.add(plan.name)
        elif plan.name in mine_names:
            if not cfg.repair:  # --repair replaces files only with identical ones (accumulate._check_same)
                clear_shard(cfg.dst, plan)
            pending.append(plan)
    expect: dict[str, parts.Part] = {}  # --repair: the completion record each rewritten shard must match
    repaired: list[tuple[str, str]] = []
    sums_added = 0
    if cfg.repair:
        from alexnet_pipe.convert.shardcheck import plan_repair  # brings verify's readers: only here

        pending, sums_added = plan_repair(cfg, found, all_plans, done, pending, expect, repaired)
    total = sum(len(p.sources) for p in mine)
    todo = sum(len(p.sources) for p in pending)
    if done and not cfg.repair:  # --repair reports each shard it rewrites
        log.info("resuming: %s already complete, %d to write (--repair re-checks the complete ones)",
                 plural(len(done), "shard"), len(pending))

    width = id_width(found)
    bar = Progress(total, "convert", "img", enabled=cfg.progress, bar=cfg.progress_bar, initial=total - todo,
                   smoothing=0.05)
    current: ShardState | None = None
    n_skipped = 0
    try:
        for (plan, positions, sources), batch in encoded_chunks(chunks(pending), cfg.image, cfg.workers,
                                                                         cfg.decode_memory_mb << 20):
            if current is None or current.plan is not plan:
                current = ShardState(cfg.dst, plan, cfg.formats, width, cfg.image)
            current.add(positions, sources, batch)
            n_skipped += sum(isinstance(r, str) for r in batch.results)
            bar.update(len(sources))
            bar.set_postfix(skipped=n_skipped, refresh=False)
            if current.done == len(plan.sources):
                commit_shard(cfg.dst, plan, current.writer, current.part(), current.mean, expect.get(plan.name))
                done.add(plan.name)
                current = None
    finally:
        bar.close()
    with locked(cfg.dst / LOCK_FILE):
        # Under the lock, and with the completion records read again: --part runs finishing at
        # the same time each see the other's shards: the last to take the lock writes the manifest (one
        # that ends just after the first may write it again, identically: every byte follows from OUT).
        done.update(plan.name for plan in all_plans if plan.name not in done and parts.load(cfg.dst, plan))
        remaining = len(all_plans) - len(done)
        if remaining:  # only with --part: the other parts finish the job
            return ConvertResult(cfg.dst, {}, 0, todo, time.perf_counter() - started, remaining)
        before = finalized_files(cfg.dst, plans) if cfg.repair else {}
        manifest = finalize(cfg, found, plans)
        for rel, old in before.items():  # --repair: name what finalizing rewrote (damaged or missing)
            if old != read_or_none(cfg.dst / rel):
                repaired.append((rel, "rewritten from the shards' completion records"
                                 + (" (it was missing)" if old is None else "")))
    return ConvertResult(
        cfg.dst,
        {s: e.records for s, e in manifest.splits.items()},
        manifest.skipped_total(),
        todo,
        time.perf_counter() - started,
        repaired=tuple(repaired),
        sums_added=sums_added,
        skipped_shown=tuple(manifest.skipped_shown()[:SKIPPED_SHOWN]),
    )
