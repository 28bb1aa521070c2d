"""Repair: find the damaged shards of a conversion and rewrite them from its raw inputs.

``alexnet-pipe convert RAW OUT --repair`` and ``alexnet-pipe verify OUT --repair`` (which reads
RAW from ``OUT/.convert-inputs.json``) re-check every finished shard against the checksum its
completion record holds (``check_finished``), in verify's checker processes, so a shard that kills
its reader is found too. The damaged shards are rewritten by convert's own path (staging, then
an atomic rename), each only if it comes out exactly as its completion record says; then the
manifest, mean and combined indices are written again. The result is byte-identical to a clean
run. Intact shards of a dataset converted before per-record checksums get them here.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import fields
from pathlib import Path

from .checksum import PARTS_DIR, encode_record_sums, record_sums_path
from .config import FORMATS, ConvertConfig, ImageSettings, VerifyConfig
from .convert import INPUTS_FILE, STATE_FILE, ConvertResult, read_part, run_convert
from .errors import AlexnetPipeError, DatasetError
from .fsutil import atomic_write_bytes, atomic_write_json
from .mean import MeanImageSum
from .shards import ShardPlan
from .verify import Problem, _Task, check_shards


def _reason(problem: Problem) -> str:
    """A problem as the reason for a rewrite, without verify's advice on how to repair it."""
    text = str(problem)
    for advice in ("; to repair it,", "; run alexnet-pipe verify"):
        text = text.split(advice)[0]
    return text


def _mean_sums_problem(dst: Path, part: dict) -> str | None:
    """Why a train shard's mean-image sums (``.parts/<shard>.mean.npz``) cannot be used, or None."""
    rel = part.get("mean_sums")
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
        part = parts[plan.name] = read_part(dst, plan)
        if not part["records"]:  # every input skipped: no files to check
            continue
        if (why := _mean_sums_problem(dst, part)) is not None:
            damaged[plan.name] = why
            continue
        entry = {k: part[k] for k in ("name", "records", "first_id", "lmdb", "recordio") if k in part}
        for fmt in cfg.formats:
            rel = record_sums_path(plan.name, fmt)
            # version 1: a map size is no damage (that is `upgrade`'s business)
            tasks.append(_Task(dst, plan.split, fmt, entry, num_classes, False, 1,
                               rel if (dst / rel).is_file() else None, want_crcs=True))
    outcomes = check_shards(tasks, cfg.workers, cfg.progress, "check")
    new_sums: dict[str, dict[str, array]] = {}
    for task, out in zip(tasks, outcomes):
        name = task.entry["name"]
        wrong = [p for p in out.problems if p.where != task.sums]
        if wrong:
            damaged.setdefault(name, _reason(wrong[0]))
        elif task.sums is None or out.problems or "record_sums" not in parts[name]:
            new_sums.setdefault(name, {})[task.fmt] = out.crcs
    added = 0
    for name, by_fmt in new_sums.items():
        if name in damaged:  # rewritten whole, with its checksums
            continue
        part = parts[name]
        part.pop("record_sums", None)  # re-added last, where a clean run has it
        part["record_sums"] = {}
        for fmt in (f for f in FORMATS if f in cfg.formats):
            rel = part["record_sums"][fmt] = record_sums_path(name, fmt)
            if fmt in by_fmt:
                atomic_write_bytes(dst / rel, encode_record_sums(by_fmt[fmt]))
        atomic_write_json(dst / PARTS_DIR / f"{name}.json", part)
        added += 1
    return damaged, added


def recorded_convert_config(cfg: VerifyConfig) -> ConvertConfig:
    """The --repair convert config of the conversion in ``cfg.root``, from its state and inputs records.

    Raises:
        DatasetError: the records are missing or damaged, or the raw inputs are gone (nothing changed).
    """
    root = cfg.root
    state_path, inputs_path = root / STATE_FILE, root / INPUTS_FILE
    if not state_path.is_file():
        raise DatasetError(f"{root} holds no record of its conversion ({STATE_FILE}): it was not written by "
                           "alexnet-pipe convert, or was copied without its hidden files; reconvert it")
    if not inputs_path.is_file():
        raise DatasetError(f"{root} does not record where its raw inputs are (converted by an older alexnet-pipe); "
                           f"rerun the alexnet-pipe convert command that made it with --repair added")
    try:
        settings = json.loads(state_path.read_text(encoding="utf-8"))["settings"]
        inputs = json.loads(inputs_path.read_text(encoding="utf-8"))
        paths = {k: None if inputs[k] is None else Path(inputs[k])
                 for k in ("src", "train_list", "val_list", "val_labels", "synsets")}
        image = ImageSettings(**{f.name: settings[f.name] for f in fields(ImageSettings) if f.name in settings})
        formats, shard_size, seed = tuple(settings["formats"]), settings["shard_size"], settings["seed"]
        val_ratio = settings.get("val_ratio")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise DatasetError(f"{root}'s records of its conversion ({STATE_FILE}, {INPUTS_FILE}) are damaged ({exc}); "
                           f"rerun the alexnet-pipe convert command that made it with --repair added") from exc
    src = paths["src"]
    if src is None or not src.is_dir():
        raise DatasetError(f"the raw inputs of {root} were in {src}, which is gone; nothing was changed: restore "
                           f"them there, or run alexnet-pipe convert RAW {root} --repair with the same options "
                           "and their new place")
    for key in ("train_list", "val_list", "val_labels", "synsets"):
        if paths[key] is not None and not paths[key].is_file():
            raise DatasetError(f"{root} was converted with {paths[key]}, which is gone; nothing was changed: "
                               "restore it, or run the alexnet-pipe convert command with --repair added")
    return ConvertConfig(src=src, dst=root, formats=formats, image=image, shard_size=shard_size,
                         workers=cfg.workers, seed=seed, progress=cfg.progress, val_labels=paths["val_labels"],
                         synsets=paths["synsets"], train_list=paths["train_list"], val_list=paths["val_list"],
                         val_ratio=val_ratio, repair=True)


def run_repair(cfg: VerifyConfig) -> ConvertResult:
    """``verify --repair``: rewrite the damaged shards of ``cfg.root`` from its recorded raw inputs.

    Raises:
        DatasetError: see ``recorded_convert_config``.
        SettingsMismatchError: the raw inputs changed since the conversion (nothing changed).
    """
    return run_convert(recorded_convert_config(cfg))
