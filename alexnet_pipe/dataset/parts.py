"""A shard's completion record (``.parts/<shard>.json``): read it, list its files, tell whether the
shard is complete. convert writes these records; convert, its --repair check, dryrun and upgrade
read them.
"""

from __future__ import annotations

import json
from pathlib import Path

from alexnet_pipe.dataset.layout import part_path
from alexnet_pipe.formats.shards import ShardPlan


def read_part(dst: Path, plan: ShardPlan) -> dict | None:
    """A shard's completion record as written, or None (not there, or damaged: the shard is redone)."""
    path = dst / part_path(plan.name)
    if not path.is_file():
        return None
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(part, dict) and part.get("name") == plan.name and type(part.get("records")) is int
          and all(isinstance(part.get(fmt, {}), dict) for fmt in ("lmdb", "recordio")))
    return part if ok else None


def part_files(part: dict) -> list[str]:
    """The files a completion record lists (relative to OUT)."""
    files = [part.get("lmdb", {}).get("path"), part.get("recordio", {}).get("rec"), part.get("recordio", {}).get("idx"),
             part.get("mean_sums")]
    return [f for f in files if isinstance(f, str)]


def load_part(dst: Path, plan: ShardPlan) -> dict | None:
    """The completion record of a shard, if the shard was fully written."""
    part = read_part(dst, plan)
    if part is None:
        return None
    if all((dst / f).exists() for f in part_files(part)):
        return part
    return None  # a file vanished since: redo the shard
