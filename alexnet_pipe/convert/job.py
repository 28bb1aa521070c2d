"""The `convert` job: raw images -> shuffled, validated LMDB/RecordIO shards + manifest + mean.

Crash safety: every shard is written in ``OUT/.staging`` and renamed into place when complete;
a small completion record in ``OUT/.parts`` then marks it done. The manifest is written last.
A rerun of the same command skips completed shards, redoes the rest, and produces the same
bytes as an uninterrupted run (nothing time- or order-dependent is stored).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
from tqdm import tqdm

from alexnet_pipe import __version__
from alexnet_pipe.apps.info import plural
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.workers import worker_context
from alexnet_pipe.dataset.checksum import encode_record_sums
from alexnet_pipe.dataset.layout import (
    INPUTS_FILE,
    LMDB_DIR,
    LOCK_FILE,
    MANAGED,
    MANIFEST_FILE,
    MEAN_FILE,
    MEAN_IMAGE_BINARYPROTO,
    MEAN_IMAGE_NPY,
    PARTS_DIR,
    RECORDIO_DIR,
    RUN_LOCK,
    SCAN_CACHE,
    SHORT_SIDE_COUNTS_BELOW,
    STAGING_DIR,
    STATE_FILE,
    mean_sums_path,
    part_path,
    record_sums_path,
    shard_paths,
    split_index_path,
)
from alexnet_pipe.dataset.manifest import DATASET_FORMAT, DATASET_VERSION
from alexnet_pipe.dataset.mean import MeanImageSum, PixelStats, write_mean, write_mean_image
from alexnet_pipe.dataset.parts import load_part, part_files, read_part
from alexnet_pipe.errors import BusyError, SettingsMismatchError
from alexnet_pipe.formats.recordio import read_index
from alexnet_pipe.formats.shards import ShardPlan, ShardWriter, plan_shards
from alexnet_pipe.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, output_error, remove, remove_temps
from alexnet_pipe.imaging.process import BatchResult, Encoded, batch_to_pipe, process_batch
from alexnet_pipe.inputs.scan import ScanResult, scan
from alexnet_pipe.inputs.table import Source

log = logging.getLogger(__name__)

CHUNK = 32  # images per worker task: amortises IPC, small enough to keep memory flat


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

    @property
    def images_per_second(self) -> float:
        return self.converted_now / self.seconds if self.seconds > 0 else 0.0


def _plan_digest(found: ScanResult) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(found.classes).encode())
    for split, sources in sorted(found.splits.items()):
        for name, label in zip(sources.names(), sources.labels.tolist()):
            h.update(f"{split}\0{name}\0{label}\n".encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


def output_identity(cfg: ConvertConfig, found: ScanResult) -> dict:
    """What OUT's state file records: a rerun resumes only a conversion with this same identity."""
    return {"tool": "alexnet-pipe convert", "settings": cfg.settings(), "plan": _plan_digest(found)}


def describe_mismatch(old: dict, new: dict) -> str:
    def shown(settings: dict, key: str) -> str:  # a setting left out of the record is its default
        return repr(settings[key]) if key in settings else "the default"

    old_settings = old.get("settings", {})
    diffs = [
        f"{k}: {shown(old_settings, k)} -> {shown(new['settings'], k)}"
        for k in sorted(set(old_settings) | set(new["settings"]))
        if old_settings.get(k) != new["settings"].get(k)
    ]
    if old.get("plan") != new["plan"]:
        diffs.append("the input files or their labels changed")
    return "; ".join(diffs) or "a different alexnet-pipe output version"


def check_output(dst: Path, force: bool) -> None:
    """Before any work: OUT must be new, empty, or written by alexnet-pipe convert."""
    if dst.exists() and not dst.is_dir():
        raise SettingsMismatchError(f"{dst} exists and is not a directory")
    # Ours even before the state file exists: the scan cache, and the state file being written by
    # a concurrent --part run into the same new directory.
    ours = (SCAN_CACHE, f".{STATE_FILE}.tmp-", RUN_LOCK)
    foreign = dst.is_dir() and not (dst / STATE_FILE).exists() and any(
        not e.name.startswith(ours) for e in dst.iterdir()
    )
    if foreign and not force:
        raise SettingsMismatchError(
            f"{dst} is not empty and was not written by alexnet-pipe convert; choose an empty or new "
            "directory, or pass --force to write into it anyway"
        )


def _prepare_output(dst: Path, identity: dict, force: bool, repair: bool = False) -> None:
    """Create OUT or check it belongs to this exact conversion (refuse otherwise)."""
    state = dst / STATE_FILE
    if state.exists():
        old = json.loads(state.read_text(encoding="utf-8"))
        if repair and old != identity:
            raise SettingsMismatchError(
                f"the inputs or settings are not those {dst} was converted from ({describe_mismatch(old, identity)}); "
                "--repair rewrites shards only from the very same inputs, so nothing was changed: restore the "
                "inputs, or reconvert into a new directory")
        if old == identity:
            for name in (PARTS_DIR, LMDB_DIR, RECORDIO_DIR):  # a user may have deleted one
                (dst / name).mkdir(exist_ok=True)
            return
        if not force:
            raise SettingsMismatchError(
                f"{dst} holds a conversion made with other settings or input ({describe_mismatch(old, identity)}); "
                "rerun with the same settings to resume it, choose another output directory, "
                "or pass --force to discard it and start over"
            )
        log.warning("--force: discarding the earlier conversion in %s", dst)
        for name in MANAGED:
            remove(dst / name)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, identity)  # first: a concurrent --part run then sees OUT as ours
    for name in (PARTS_DIR, LMDB_DIR, RECORDIO_DIR):
        (dst / name).mkdir(exist_ok=True)


def _clear_shard(dst: Path, plan: ShardPlan) -> None:
    """Remove what a crashed earlier attempt may have left of an unfinished shard."""
    for rel in shard_paths(plan.name).values():
        remove(dst / rel)
    remove(dst / STAGING_DIR / plan.name)


def _chunks(plans: list[ShardPlan]) -> Iterator[tuple[ShardPlan, tuple[int, ...], tuple[Source, ...]]]:
    """(plan, stored positions, sources) per worker task. A shard's inputs are read in file and
    byte-offset order (forward-only I/O over folders and the 138 GB train tar, instead of the
    shuffled order's random reads); the shard writer stores them back in the shuffled order."""
    for plan in plans:
        sources = list(plan.sources)  # made once per shard from the table's columns
        order = sorted(range(len(sources)), key=lambda k: (sources[k].path, sources[k].offset))
        for start in range(0, len(order), CHUNK):
            positions = tuple(order[start : start + CHUNK])
            yield plan, positions, tuple(sources[k] for k in positions)


def _worker_context():
    return worker_context("alexnet_pipe.imaging.process")


def _run_alone(sources: list[Source], settings: ImageSettings) -> BatchResult | int:
    """process_batch in a new process of its own: the result, or the exit code of a process that
    died first (-N: killed by signal N)."""
    ctx = _worker_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=batch_to_pipe, args=(send, sources, settings), daemon=True)
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the process died before it sent anything
        result = None
    finally:
        receive.close()
        proc.join()
    return proc.exitcode if result is None else result


def _death(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _retry_alone(sources: tuple[Source, ...], settings: ImageSettings) -> BatchResult:
    """A chunk that was in flight when a worker process died (a decoder's native crash, or the
    kernel's OOM killer): rerun in a process of its own; if that dies too, every image in a
    process of its own, so that only an image that kills its process is skipped, with the reason."""
    whole = _run_alone(list(sources), settings)
    if isinstance(whole, BatchResult):
        return whole
    results: list[Encoded | str] = []
    size = settings.mean_size
    mean_sum, mean_count = np.zeros((size, size, 3), np.uint64), np.zeros((size, size), np.uint64)
    stats = PixelStats()
    for src in sources:
        one = _run_alone([src], settings)
        if isinstance(one, BatchResult):
            results.append(one.results[0])
            if one.mean_sum is not None:
                mean_sum += one.mean_sum
                mean_count += one.mean_count
                stats.merge(one.stats)
            continue
        reason = f"the image decoder crashed its process ({_death(one)})"
        log.warning("%s: %s; skipped", src.name, reason)
        results.append(reason)
    if not any(isinstance(r, Encoded) for r in results):
        return BatchResult(results, None, None)
    return BatchResult(results, mean_sum, mean_count, stats)


def _ordered_results(tasks: Iterable, settings, workers: int) -> Iterator[tuple[tuple, BatchResult]]:
    """Run process_batch over tasks; yield (task, results) in task order, memory bounded.

    A worker process that dies breaks the whole pool: every chunk still in flight is then rerun
    on its own (``_retry_alone``), and a new pool takes the rest. One worker (``workers == 1``)
    runs in this process: there a native crash ends the run.
    """
    if workers == 1:
        for task in tasks:
            yield task, process_batch(list(task[2]), settings)
        return
    ctx = _worker_context()
    pool = ProcessPoolExecutor(workers, mp_context=ctx)
    window: deque = deque()
    tasks = iter(tasks)
    try:
        while True:
            while len(window) < workers * 4 and (task := next(tasks, None)) is not None:
                window.append((task, pool.submit(process_batch, list(task[2]), settings)))
            if not window:
                return
            head, fut = window.popleft()
            try:
                batch = fut.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                # A chunk that finished before the pool broke keeps its result; the others are rerun.
                redo = [(task, done.done() and not done.cancelled() and done.exception() is None, done)
                        for task, done in [(head, fut), *window]]
                window.clear()
                log.warning("a worker process died: rerunning the %d chunks that were in flight, each in a "
                            "process of its own", sum(not ok for _, ok, _ in redo))
                for task, ok, done in redo:
                    yield task, (done.result() if ok else _retry_alone(task[2], settings))
                pool = ProcessPoolExecutor(workers, mp_context=ctx)
                continue
            yield head, batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _commit_shard(dst: Path, plan: ShardPlan, writer: ShardWriter, part: dict, mean: MeanImageSum,
                  expect: dict | None = None) -> None:
    """Close, rename into place, then record completion (the order is what makes it safe).

    A train shard's exact mean-image sums go to ``.parts/<shard>.mean.npz`` before the completion
    record, so a resumed or ``--part`` run merges the very sums an uninterrupted run would; so do
    the records' CRC-32s (``.parts/<shard>.<format>.crc``, see checksum.py).
    A shard whose every input was skipped gets no files, only its completion record.
    ``expect``: the completion record the shard had (--repair); a shard that would come out
    otherwise is not put in place (its raw inputs changed).
    """
    entries = writer.close()
    if expect is not None:
        _check_same(dst, plan, {**part, **(entries if part["records"] else {})}, expect)
    if part["records"] and plan.split == "train":  # the mean image is the train split's
        rel = mean_sums_path(plan.name)
        atomic_write_bytes(dst / rel, mean.to_bytes())
        part["mean_sums"] = rel
    sums = {}
    if part["records"]:
        for fmt, crcs in writer.record_sums.items():
            sums[fmt] = record_sums_path(plan.name, fmt)
            atomic_write_bytes(dst / sums[fmt], encode_record_sums(crcs))
    if part["records"]:
        for rel in shard_paths(plan.name).values():
            staged = dst / STAGING_DIR / plan.name / rel
            if staged.exists():
                remove(dst / rel)
                os.replace(staged, dst / rel)
        for sub in (LMDB_DIR, RECORDIO_DIR):
            fsync_dir(dst / sub)
        part.update(entries)
        part["record_sums"] = sums
    remove(dst / STAGING_DIR / plan.name)
    atomic_write_json(dst / part_path(plan.name), part)


def _check_same(dst: Path, plan: ShardPlan, new: dict, old: dict) -> None:
    """Refuse to put a rewritten shard in place unless its records are those it had (--repair)."""
    skip = ("mean_sums", "record_sums")  # files beside the shard, written from the same data
    new = json.loads(json.dumps(new))  # as it would be stored
    differ = sorted(k for k in set(new) | set(old) if k not in skip and new.get(k) != old.get(k))
    if differ:
        remove(dst / STAGING_DIR / plan.name)
        raise SettingsMismatchError(
            f"{plan.name} was not rewritten: its raw inputs changed since {dst} was converted (the shard would "
            f"differ in {', '.join(differ)} from its completion record {part_path(plan.name)}, unless that "
            "record was edited), so it was left as it is; restore the inputs, or reconvert into a new directory")


def inputs_record(cfg: ConvertConfig) -> dict:
    """Where this conversion reads its inputs (absolute paths): what `verify --repair` rewrites from."""
    def where(path: Path | None) -> str | None:
        return None if path is None else os.path.abspath(path)

    return {"src": where(cfg.src), "train_list": where(cfg.train_list), "val_list": where(cfg.val_list),
            "val_labels": where(cfg.val_labels), "synsets": where(cfg.synsets)}


def _record_inputs(cfg: ConvertConfig) -> None:
    """Keep OUT's record of its inputs current (a run from a moved RAW updates it)."""
    record, path = inputs_record(cfg), cfg.dst / INPUTS_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")) == record:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, record)


class _ShardState:
    """Accumulates one shard while its chunks come back from the workers."""

    def __init__(self, dst: Path, plan: ShardPlan, formats: tuple[str, ...], id_width: int, settings: ImageSettings):
        self.plan = plan
        staging = dst / STAGING_DIR / plan.name
        remove(staging)
        staging.mkdir(parents=True)
        self.writer = ShardWriter(staging, plan, formats, id_width)
        self.stats = PixelStats()
        self.mean = MeanImageSum(settings.mean_size)
        self.short_sides: Counter = Counter()  # stored short side -> images, below SHORT_SIDE_COUNTS_BELOW
        self.min_short_side: int | None = None
        self.labels: Counter = Counter()
        self.skipped: list[dict] = []
        self.passthrough = 0
        self.done = 0

    def add(self, positions: tuple[int, ...], sources: tuple[Source, ...], batch: BatchResult) -> None:
        if batch.stats is not None:
            self.mean.add(batch.mean_sum, batch.mean_count)
            self.stats.merge(batch.stats)
        for position, src, res in zip(positions, sources, batch.results):
            if isinstance(res, Encoded):
                self.writer.add(self.plan.first_id + position, src, res)
                short = min(res.width, res.height)
                if short < SHORT_SIDE_COUNTS_BELOW:
                    self.short_sides[short] += 1
                self.min_short_side = short if self.min_short_side is None else min(self.min_short_side, short)
                self.labels[src.label] += 1
                self.passthrough += res.passthrough
            else:
                self.skipped.append({"split": self.plan.split, "name": src.name, "reason": res})
        self.done += len(sources)

    def part(self) -> dict:
        return {
            "name": self.plan.name,
            "split": self.plan.split,
            "index": self.plan.index,
            "first_id": self.plan.first_id,
            "planned": len(self.plan.sources),
            "records": self.stats.images,
            "passthrough": self.passthrough,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "stats": self.stats.to_json(),
            "short_side_counts": {str(k): v for k, v in sorted(self.short_sides.items())},
            "min_short_side": self.min_short_side,
            "skipped": self.skipped,
        }


def _write_combined_index(dst: Path, split: str, parts: list[dict]) -> str:
    """One .idx over all of a split's .rec files: DALI takes exactly one index, with offsets
    global over the files concatenated in the order they are passed."""
    lines, base = [], 0
    for part in parts:
        rec = part["recordio"]
        for key, offset in read_index(dst / rec["idx"]):
            lines.append(f"{key}\t{base + offset}\n")
        base += rec["bytes"]
    rel = split_index_path(split)
    atomic_write_bytes(dst / rel, "".join(lines).encode("ascii"))
    return rel


def _resize_policy(image: ImageSettings) -> dict:
    """The manifest's ``resize`` entry: the size rule in numbers and in words."""
    n = image.short_side
    if n == 0:
        rule = "sizes kept"
    elif image.upscale:
        rule = f"scaled up or down so the short side is exactly {n}, aspect ratio kept, as im2rec --resize {n}"
    else:
        rule = f"scaled down so the short side is {n}; images whose short side is below {n} keep their size"
    policy = {"short_side": n, "upscale": image.upscale, "rule": rule}
    if image.resize_filter != ImageSettings.resize_filter:  # only then: a default manifest stays as it was
        policy["filter"] = image.resize_filter
    return policy


def _finalize(cfg: ConvertConfig, found: ScanResult, plans: dict[str, list[ShardPlan]]) -> dict:
    """Merge the shards' records into the manifest, mean.json and the mean image.

    Manifest fields about sizes, for readers that check crops:

    - ``resize``: ``{"short_side": N, "upscale": bool, "rule": "<the rule in words>"}``, and
      ``"filter"`` when not the default antialias (config.RESIZE_FILTERS).
    - ``splits[split]["short_side_counts"]``: ``{"<side>": images}`` for every stored short
      side below 512 pixels (a compact histogram: with upscaling on, only ``{"N": all}`` when
      N < 512); ``splits[split]["min_short_side"]``: the smallest stored short side (None when
      the split stored nothing). A training crop C needs padding for images with a short side
      below C: ``sum(n for side, n in counts.items() if int(side) < C)`` of them.
    - ``mean_image``: ``{"npy": ..., "binaryproto": ..., "size": S, "images": n}`` (None
      without training images); ``mean``: ``mean.json``, over the same pixels.
    """
    dst = cfg.dst
    splits, skipped = {}, [{"split": s.split, "name": s.name, "reason": s.reason} for s in found.skipped]
    train_stats = PixelStats()
    train_mean = MeanImageSum(cfg.image.mean_size)
    for split, split_plans in plans.items():
        # One completion record at a time: memory stays flat however many shards there are.
        labels, short_sides = Counter(), Counter()
        records = passthrough = n_skipped = 0
        mins, shards = [], []
        for plan in split_plans:
            p = load_part(dst, plan)
            if p is None:  # checked under the lock just before: a shard vanished meanwhile
                raise SettingsMismatchError(
                    f"shard {plan.name} of {dst} disappeared while finishing; rerun the command")
            labels.update({int(k): v for k, v in p["labels"].items()})
            short_sides.update({int(k): v for k, v in p["short_side_counts"].items()})
            skipped.extend(p["skipped"])
            records, passthrough, n_skipped = (records + p["records"], passthrough + p["passthrough"],
                                               n_skipped + len(p["skipped"]))
            if p["min_short_side"] is not None:
                mins.append(p["min_short_side"])
            if split == "train":
                train_stats.merge(PixelStats.from_json(p["stats"]))
                if p.get("mean_sums"):
                    sums = MeanImageSum.from_bytes((dst / p["mean_sums"]).read_bytes(), p["mean_sums"])
                    train_mean.add(sums.sum, sums.count)
            if p["records"] > 0:  # an all-bad shard has no files
                shards.append({k: p[k] for k in ("name", "records", "first_id", "lmdb", "recordio") if k in p})
        entry = {
            "records": records,
            "inputs": len(found.splits[split]),
            "skipped": n_skipped,
            "passthrough": passthrough,
            "class_counts": [labels.get(i, 0) for i in range(len(found.classes))],
            "short_side_counts": {str(k): v for k, v in sorted(short_sides.items())},
            "min_short_side": min(mins) if mins else None,
            "layout": found.layout[split],
            "shards": shards,
        }
        if "recordio" in cfg.formats and shards:
            entry["recordio_index"] = _write_combined_index(dst, split, shards)
        splits[split] = entry
    mean_image = None
    if train_stats.pixels:
        size = cfg.image.mean_size
        source = f"train split: centre {size}x{size} of every image ({_resize_policy(cfg.image)['rule']})"
        write_mean(dst / MEAN_FILE, train_stats.to_mean(source))
        mean_image = write_mean_image(dst, train_mean, train_stats.images)
    manifest = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "created_by": f"alexnet-pipe {__version__}",
        "settings": cfg.settings(),
        "resize": _resize_policy(cfg.image),
        "classes": [
            {"index": i, "id": c, "name": found.class_names.get(c, "")} for i, c in enumerate(found.classes)
        ],
        "splits": splits,
        "mean": MEAN_FILE if train_stats.pixels else None,
        "mean_image": mean_image,
        "record_id_width": _id_width(found),
        "skipped": skipped,
    }
    atomic_write_json(dst / MANIFEST_FILE, manifest)
    remove(dst / STAGING_DIR)
    return manifest


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (POSIX record lock: also honoured over NFS)."""
    with open(path, "a+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _id_width(found: ScanResult) -> int:
    return max(8, len(str(max(len(s) for s in found.splits.values()))))


def find_inputs(cfg: ConvertConfig, cache_dir: Path | None) -> ScanResult:
    """The inputs of ``cfg``: list files (--list) or a scanned layout, then --val-ratio's split."""
    if cfg.train_list is not None:
        from alexnet_pipe.inputs.listfile import scan_lists

        found = scan_lists(cfg.src, cfg.train_list, cfg.val_list, cfg.synsets)
    else:
        found = scan(cfg.src, cfg.val_labels, cfg.synsets, cache_dir=cache_dir)
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
    check_output(cfg.dst, cfg.force)
    if cfg.repair and not (cfg.dst / STATE_FILE).is_file():
        raise SettingsMismatchError(f"{cfg.dst} holds no conversion to repair (no {STATE_FILE}); run the convert "
                                    "command without --repair")
    # The archives' member lists are cached in OUT: resumes and --part runs skip the 1.28M headers.
    found = find_inputs(cfg, cache_dir=cfg.dst / SCAN_CACHE)
    plans = {split: plan_shards(split, sources, cfg.shard_size, cfg.seed) for split, sources in found.splits.items()}
    identity = output_identity(cfg, found)
    cfg.dst.mkdir(parents=True, exist_ok=True)  # after the scan: a bad input leaves no OUT behind
    with _run_lock(cfg.dst, shared=cfg.part is not None):
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


@contextmanager
def _run_lock(dst: Path, shared: bool) -> Iterator[None]:
    """Refuse a second convert into OUT while one runs (--part runs share OUT by design).
    A POSIX record lock: released by the kernel when the process dies, honoured over NFS."""
    with open(dst / RUN_LOCK, "a+b") as f:
        try:
            fcntl.lockf(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            raise BusyError(f"another alexnet-pipe convert is writing {dst}; wait for it to finish, or stop it "
                               "(a rerun resumes where it stopped)") from None
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _write(cfg: ConvertConfig, found: ScanResult, plans: dict[str, list[ShardPlan]], identity: dict,
           started: float) -> ConvertResult:
    """The conversion proper, under the run lock: prepare OUT, write the missing shards, finalize."""
    _prepare_output(cfg.dst, identity, cfg.force, cfg.repair)
    if cfg.part is None:  # alone in OUT: what a run killed amid an atomic write left is garbage
        for folder in (cfg.dst, cfg.dst / PARTS_DIR, cfg.dst / RECORDIO_DIR, cfg.dst / SCAN_CACHE):
            remove_temps(folder)
    _record_inputs(cfg)

    done: set[str] = set()  # names of complete shards (their records stay on disk until the end)
    pending: list[ShardPlan] = []
    all_plans = [plan for split_plans in plans.values() for plan in split_plans]
    # --part I/N: this process writes every N-th shard; the others may be in progress elsewhere
    # (another machine, a shared file system), so they are neither cleared nor waited for.
    mine = [plan for k, plan in enumerate(all_plans) if cfg.part is None or k % cfg.part[1] == cfg.part[0]]
    mine_names = {plan.name for plan in mine}
    for plan in all_plans:
        if load_part(cfg.dst, plan) is not None:
            done.add(plan.name)
        elif plan.name in mine_names:
            if not cfg.repair:  # --repair replaces files only with identical ones (_check_same)
                _clear_shard(cfg.dst, plan)
            pending.append(plan)
    expect: dict[str, dict] = {}  # --repair: the completion record each rewritten shard must match
    repaired: list[tuple[str, str]] = []
    sums_added = 0
    if cfg.repair:
        pending, sums_added = _plan_repair(cfg, found, all_plans, done, pending, expect, repaired)
    total = sum(len(p.sources) for p in mine)
    todo = sum(len(p.sources) for p in pending)
    if done and not cfg.repair:  # --repair reports each shard it rewrites
        log.info("resuming: %s already complete, %d to write (--repair re-checks the complete ones)",
                 plural(len(done), "shard"), len(pending))

    id_width = _id_width(found)
    bar = tqdm(total=total, initial=total - todo, unit="img", desc="convert", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.05)
    current: _ShardState | None = None
    n_skipped = 0
    try:
        for (plan, positions, sources), batch in _ordered_results(_chunks(pending), cfg.image, cfg.workers):
            if current is None or current.plan is not plan:
                current = _ShardState(cfg.dst, plan, cfg.formats, id_width, cfg.image)
            current.add(positions, sources, batch)
            n_skipped += sum(isinstance(r, str) for r in batch.results)
            bar.update(len(sources))
            bar.set_postfix(skipped=n_skipped, refresh=False)
            if current.done == len(plan.sources):
                _commit_shard(cfg.dst, plan, current.writer, current.part(), current.mean, expect.get(plan.name))
                done.add(plan.name)
                current = None
    finally:
        bar.close()
    with _locked(cfg.dst / LOCK_FILE):
        # Under the lock, and with the completion records read again: --part runs finishing at
        # the same time each see the other's shards: the last to take the lock writes the manifest (one
        # that ends just after the first may write it again, identically: every byte follows from OUT).
        done.update(plan.name for plan in all_plans if plan.name not in done and load_part(cfg.dst, plan))
        remaining = len(all_plans) - len(done)
        if remaining:  # only with --part: the other parts finish the job
            return ConvertResult(cfg.dst, {}, 0, todo, time.perf_counter() - started, remaining)
        before = _finalized_files(cfg.dst, plans) if cfg.repair else {}
        manifest = _finalize(cfg, found, plans)
        for rel, old in before.items():  # --repair: name what finalizing rewrote (damaged or missing)
            if old != _read_or_none(cfg.dst / rel):
                repaired.append((rel, "rewritten from the shards' completion records"
                                 + (" (it was missing)" if old is None else "")))
    return ConvertResult(
        cfg.dst,
        {s: e["records"] for s, e in manifest["splits"].items()},
        len(manifest["skipped"]),
        todo,
        time.perf_counter() - started,
        repaired=tuple(repaired),
        sums_added=sums_added,
    )


def _finalized_files(dst: Path, plans: dict[str, list[ShardPlan]]) -> dict[str, bytes | None]:
    """The files ``_finalize`` writes, as they are now (None: missing)."""
    rels = [MANIFEST_FILE, MEAN_FILE, MEAN_IMAGE_NPY, MEAN_IMAGE_BINARYPROTO]
    rels += [split_index_path(split) for split in plans]
    return {rel: _read_or_none(dst / rel) for rel in rels}


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None


def _plan_repair(cfg: ConvertConfig, found: ScanResult, all_plans: list[ShardPlan], done: set[str],
                 pending: list[ShardPlan], expect: dict[str, dict], repaired: list[tuple[str, str]]
                 ) -> tuple[list[ShardPlan], int]:
    """--repair: check every finished shard against its recorded checksum; the damaged ones join
    ``pending`` (and leave ``done``), each expected to come out as its completion record says.
    Returns the new pending list and how many intact shards got per-record checksums."""
    from alexnet_pipe.convert.shardcheck import check_finished

    for plan in pending:  # not finished: a file of it is gone, or it was never written
        old = read_part(cfg.dst, plan)
        if old is None:
            repaired.append((plan.name, "written from the raw inputs (the conversion had not finished it)"))
            continue
        expect[plan.name] = old
        gone = [f for f in part_files(old) if not (cfg.dst / f).exists()]
        repaired.append((plan.name, f"rewritten from the raw inputs ({', '.join(gone) or 'a file'} missing)"))
    finished = [plan for plan in all_plans if plan.name in done]
    damaged, sums_added = check_finished(cfg, finished, len(found.classes))
    for plan in finished:
        if plan.name in damaged:
            done.discard(plan.name)
            expect[plan.name] = read_part(cfg.dst, plan)
            repaired.append((plan.name, f"rewritten from the raw inputs ({damaged[plan.name]})"))
            pending.append(plan)
    order = {plan.name: k for k, plan in enumerate(all_plans)}
    repaired.sort(key=lambda item: order[item[0]])
    return sorted(pending, key=lambda plan: order[plan.name]), sums_added
