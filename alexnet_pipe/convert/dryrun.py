"""``convert --dry-run``: what a conversion would do, with nothing written.

The inputs are found exactly as the run finds them. It prints the layout detected per split,
the classes, the images per split and per class, the shard plan, the inputs that would be
skipped (with why), and what the run would make of OUT (create it, resume it, or refuse it).
Images that cannot be decoded are found only by converting: no image is opened here. The
archives' scan cache lives in OUT, so a dry run lists an archive without it (minutes for the
138 GB train tar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alexnet_pipe.config import ConvertConfig
from alexnet_pipe.convert.job import find_inputs
from alexnet_pipe.convert.output import (
    check_output,
    comparable_identity,
    damaged_state,
    describe_mismatch,
    output_identity,
    read_identity,
)
from alexnet_pipe.convert.plan import ShardPlan
from alexnet_pipe.dataset import parts
from alexnet_pipe.dataset.layout import STATE_FILE
from alexnet_pipe.errors import SettingsMismatchError
from alexnet_pipe.inputs.table import ScanResult
from alexnet_pipe.text import plural


@dataclass(frozen=True)
class ConvertPlan:
    """What ``run_convert(cfg)`` would do."""

    found: ScanResult
    shard_size: int
    output: str  # what the run would do with OUT, in words
    stops: bool = False  # the run would stop at OUT (the dry run then exits 1, as the run would)


def shard_plan(n: int, size: int) -> str:
    """The shards of a split of ``n`` records, e.g. "3 shards: 2 of 5 records, the last of 3"."""
    k = math.ceil(n / size)
    if k <= 1:
        return f"1 shard of {plural(n, 'record')}" if n else "no shard"
    last = n - (k - 1) * size
    if last == size:
        return f"{k} shards of {plural(size, 'record')}"
    return f"{k} shards: {k - 1} of {plural(size, 'record')}, the last of {last}"


def _output(cfg: ConvertConfig, found: ScanResult, plans: dict[str, int]) -> tuple[str, bool]:
    """What the run would do with OUT, in words, and whether it would stop there."""
    dst = cfg.dst
    if not dst.exists():
        return f"{dst} would be created", False
    try:
        check_output(dst, cfg.force, cfg.src)
    except SettingsMismatchError as exc:
        return f"the run would stop: {exc}", True
    state = dst / STATE_FILE
    if not state.is_file():
        return f"{dst} exists; the conversion would be written into it", False
    try:
        old = read_identity(state)
    except (OSError, ValueError) as exc:
        fix = "--force: it would be discarded" if cfg.force else "the run would stop (--force discards it)"
        return f"{damaged_state(state, exc)}; {fix}", not cfg.force
    identity = comparable_identity(old, output_identity(cfg, found))  # codec versions: only when recorded
    if old != identity:
        fix = "--force: it would be discarded" if cfg.force else "the run would stop (--force discards it)"
        return (f"{dst} holds a conversion with other settings or input ({describe_mismatch(old, identity)}); {fix}",
                not cfg.force)
    shards = [ShardPlan(split, k, 0, ()) for split, n in plans.items() for k in range(n)]
    done = sum(parts.load(dst, shard) is not None for shard in shards)
    return f"{dst} holds this conversion, {done} of {plural(len(shards), 'shard')} complete: the run resumes it", False


def plan_convert(cfg: ConvertConfig) -> ConvertPlan:
    """Scan the input as ``run_convert(cfg)`` would, and write nothing.

    Raises:
        LayoutError: what the run would raise for the same input.
    """
    found = find_inputs(cfg, cache_dir=None)
    shards = {split: math.ceil(len(table) / cfg.shard_size) for split, table in found.splits.items()}
    return ConvertPlan(found, cfg.shard_size, *_output(cfg, found, shards))


def format_plan(plan: ConvertPlan, max_classes: int = 10, max_skipped: int = 20) -> str:
    """The dry run's report, one fact a line."""
    found = plan.found
    lines = ["dry run: nothing is written"]
    for k, (split, how) in enumerate(found.layout.items()):
        lines.append(f"{'layout' if k == 0 else '':<9} {split}: {how}")
    names = [c + (f" ({found.class_names[c]})" if found.class_names.get(c) else "") for c in found.classes]
    more = f", ... {len(names) - max_classes} more" if len(names) > max_classes else ""
    lines.append(f"classes   {len(names)}: {', '.join(names[:max_classes])}{more}")
    for split, table in found.splits.items():
        counts = np.bincount(table.labels, minlength=len(found.classes))
        used = counts[counts > 0]
        per_class = f"{used.min()}" if used.min() == used.max() else f"{used.min()} to {used.max()}"
        none = int(np.sum(counts == 0))
        lacking = f" ({plural(none, 'class', 'classes')} without any)" if none else ""
        lines.append(f"{split:<9} {plural(len(table), 'image')}, {per_class} a class{lacking} -> "
                     f"{shard_plan(len(table), plan.shard_size)}")
    if found.skipped:
        lines.append(f"skipped   {plural(sum(s.count for s in found.skipped), 'input')}:")
        for s in found.skipped[:max_skipped]:
            lines.append(f"          {s.split} {s.name}: {s.reason}")
        if len(found.skipped) > max_skipped:
            lines.append(f"          ... {sum(s.count for s in found.skipped[max_skipped:])} more")
    else:
        lines.append("skipped   none found (images that cannot be decoded are found only by converting)")
    lines.append(f"output    {plan.output}")
    return "\n".join(lines)
