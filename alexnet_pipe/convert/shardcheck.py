"""The --repair check: find which finished shards of a conversion are damaged.

``check_finished`` re-checks every finished shard against the checksum its completion record
holds, in verify's checker processes (so a shard that kills its reader is found too), and gives
intact shards of a dataset converted before per-record checksums their checksums; ``plan_repair``
turns the damaged ones into the shards convert's --repair rewrites. repair.py finds the recorded
inputs for ``verify --repair``. Kept apart from both so that convert and repair do not import each
other (convert imports this module only under --repair: it brings verify's readers).
"""

from __future__ import annotations

import dataclasses
from array import array
from pathlib import Path

from alexnet_pipe.config import FORMATS, ConvertConfig
from alexnet_pipe.convert.plan import ShardPlan
from alexnet_pipe.convert.verify import Problem, _Task, check_shards
from alexnet_pipe.dataset import parts as completion
from alexnet_pipe.dataset.checksum import encode_record_sums
from alexnet_pipe.dataset.layout import LMDB_DATA_FILE, part_path, record_sums_path
from alexnet_pipe.dataset.manifest_checks import OUTSIDE_HINT, leads_outside
from alexnet_pipe.dataset.mean import MeanImageSum
from alexnet_pipe.dataset.parts import Part
from alexnet_pipe.dataset.schema import ShardEntry
from alexnet_pipe.errors import AlexnetPipeError, DatasetError
from alexnet_pipe.fsutil import atomic_write_bytes, atomic_write_json
from alexnet_pipe.inputs.table import ScanResult
from alexnet_pipe.text import shown


def _reason(problem: Problem) -> str:
    """A problem as the reason for a rewrite, without verify's advice on how to repair it."""
    text = str(problem)
    for advice in ("; to repair it,", "; run alexnet-pipe verify"):
        text = text.split(advice)[0]
    return text


def _refuse_links_out(dst: Path, name: str, files: list[str]) -> None:
    """Refuse, before anything of the shard is read, a file of it that a symlink leads out of ``dst``:
    verify refuses the same link, so repair must not first read (and pass) the copy outside."""
    for rel in files:
        why = leads_outside(dst, rel, LMDB_DATA_FILE if (dst / rel).is_dir() else None)
        if why is not None:
            raise DatasetError(shown(f"{dst}: {rel} (of shard {name}) {why}; refusing to read it; {OUTSIDE_HINT}"))


def _mean_sums_problem(dst: Path, part: Part) -> str | None:
    """Why a train shard's mean-image sums (``.parts/<shard>.mean.npz``) cannot be used, or None."""
    rel = part.mean_sums
    if not rel:
        return None
    if not isinstance(rel, str):
        return f"its completion record names {rel!r} as its mean-image sums"
    try:
        MeanImageSum.from_bytes((dst / rel).read_bytes(), rel)
    except (OSError, AlexnetPipeError) as exc:
        return f"{rel}: {exc}"
    return None


def check_finished(cfg: ConvertConfig, plans: list[ShardPlan], num_classes: int) -> tuple[dict[str, str], int]:
    """Check the finished shards ``plans`` of ``cfg.dst`` against their completion records.

    Every record is read (nothing decoded) and the shard's checksum, record count, framing and
    index compared. Intact shards without valid per-record checksums get them written.

    Returns:
        ({shard name: what is wrong} for the damaged shards, how many shards got checksums).
    """
    dst, damaged, tasks, parts = cfg.dst, {}, [], {}
    for plan in plans:
        _refuse_links_out(dst, plan.name, [part_path(plan.name)])
        part = parts[plan.name] = completion.read(dst, plan)
        if not part.records:  # every input skipped: no files to check
            continue
        _refuse_links_out(dst, plan.name, part.files() + [record_sums_path(plan.name, fmt) for fmt in cfg.formats])
        if (why := _mean_sums_problem(dst, part)) is not None:
            damaged[plan.name] = why
            continue
        entry = ShardEntry(name=part.name, records=part.records, first_id=part.first_id, lmdb=part.lmdb,
                           recordio=part.recordio)
        for fmt in cfg.formats:
            rel = record_sums_path(plan.name, fmt)
            # version 1: a map size is no damage (that is `upgrade`'s business)
            tasks.append(_Task(dst, plan.split, fmt, entry, num_classes, False, 1,
                               rel if (dst / rel).is_file() else None, want_crcs=True))
    outcomes = check_shards(tasks, cfg.workers, cfg.progress, "check", progress_bar=cfg.progress_bar)
    new_sums: dict[str, dict[str, array]] = {}
    for task, out in zip(tasks, outcomes):
        name = task.entry.name
        wrong = [p for p in out.problems if p.where != task.sums]
        if wrong:
            damaged.setdefault(name, _reason(wrong[0]))
        elif task.sums is None or out.problems or "record_sums" not in parts[name].key_order:  # as read
            new_sums.setdefault(name, {})[task.fmt] = out.crcs
    added = 0
    for name, by_fmt in new_sums.items():
        if name in damaged:  # rewritten whole, with its checksums
            continue
        part = parts[name]
        sums = {}
        for fmt in (f for f in FORMATS if f in cfg.formats):
            rel = sums[fmt] = record_sums_path(name, fmt)
            if fmt in by_fmt:
                atomic_write_bytes(dst / rel, encode_record_sums(by_fmt[fmt]))
        # written last, where a clean run has it: out of the key order as read
        part = dataclasses.replace(part, record_sums=sums,
                                   key_order=tuple(k for k in part.key_order if k != "record_sums"))
        atomic_write_json(dst / part_path(name), part.to_json())
        added += 1
    return damaged, added


def plan_repair(cfg: ConvertConfig, found: ScanResult, all_plans: list[ShardPlan], done: set[str],
                pending: list[ShardPlan], expect: dict[str, Part], repaired: list[tuple[str, str]]
                ) -> tuple[list[ShardPlan], int]:
    """--repair: check every finished shard against its recorded checksum; the damaged ones join
    ``pending`` (and leave ``done``), each expected to come out as its completion record says.
    Returns the new pending list and how many intact shards got per-record checksums."""
    for plan in pending:  # not finished: a file of it is gone, or it was never written
        old = completion.read(cfg.dst, plan)
        if old is None:
            repaired.append((plan.name, "written from the raw inputs (the conversion had not finished it)"))
            continue
        expect[plan.name] = old
        gone = [f for f in old.files() if not (cfg.dst / f).exists()]
        repaired.append((plan.name, f"rewritten from the raw inputs ({', '.join(gone) or 'a file'} missing)"))
    finished = [plan for plan in all_plans if plan.name in done]
    damaged, sums_added = check_finished(cfg, finished, len(found.classes))
    for plan in finished:
        if plan.name in damaged:
            done.discard(plan.name)
            expect[plan.name] = completion.read(cfg.dst, plan)
            repaired.append((plan.name, f"rewritten from the raw inputs ({damaged[plan.name]})"))
            pending.append(plan)
    order = {plan.name: k for k, plan in enumerate(all_plans)}
    repaired.sort(key=lambda item: order[item[0]])
    return sorted(pending, key=lambda plan: order[plan.name]), sums_added
