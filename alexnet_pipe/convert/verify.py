"""The `verify` job: read every record back through our own readers and check it.

Every shard is checked in a child process. A corrupt LMDB can kill the process that reads it
(LMDB maps the file: a page past a truncated end is SIGBUS, a wild page number SIGSEGV), and no
Python code can catch that; here it kills one checker, which the parent sees, reports against the
shard it was reading, and replaces. A checker that stops making progress (a loop in corrupt data)
is killed and reported the same way (supervisor.py runs the checkers). Whatever a checker raises
becomes a problem of its shard. The checks of the dataset as a whole are in verify_dataset.py.
The parent itself only parses JSON and index text, with parsers that report rather than crash.

Where convert recorded a CRC-32 per record (checksum.py), a shard whose checksum differs gets one
problem per record whose bytes differ, naming its key; without them (datasets converted before),
only the shard is named. ``repair.py`` runs the same checkers to find the shards to rewrite.
"""

from __future__ import annotations

import io
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from alexnet_pipe.config import VerifyConfig
from alexnet_pipe.convert.supervisor import (
    Ticker,  # a checker's progress (the readers take a tick)
    describe_death,
    run_queued,
    worker_context,
)
from alexnet_pipe.convert.verify_dataset import (
    Problem,
    verify_counts,
    verify_fields,
    verify_mean,
    verify_mean_image,
    verify_sizes,
)
from alexnet_pipe.dataset.checksum import RecordDigest, decode_record_sums
from alexnet_pipe.dataset.layout import (
    INPUTS_FILE,
    SHORT_SIDE_COUNTS_BELOW,
    record_sums_path,
)
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.schema import ShardEntry
from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.formats import get_format
from alexnet_pipe.formats.base import Scanned
from alexnet_pipe.text import plural

MAX_PROBLEMS_PER_SHARD = 50
EXTRA_RECORDS = 1000  # read at most this many records past the manifest's count (a loop in corrupt data ends)
STALL_SECONDS = 120.0  # a checker silent this long is stuck in corrupt data: killed and reported


@dataclass
class VerifyResult:
    records: int = 0
    shards: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong (e.g. an older format)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Task:
    """One shard in one format, as a checker gets it."""

    root: Path
    split: str
    fmt: str  # the format's name (formats.get_format)
    entry: ShardEntry  # the shard's entry (in the manifest, or as its completion record has it)
    num_classes: int
    decode: bool
    version: int
    sums: str | None = None  # the shard's per-record CRC file (relative to root), when there is one
    want_crcs: bool = False  # return the CRCs of the records read (repair writes them)

    @property
    def where(self) -> str:
        return get_format(self.fmt).data_path(self.entry.files(self.fmt))

    def files(self) -> list[str]:
        return get_format(self.fmt).files(self.entry.files(self.fmt))


@dataclass
class _Outcome:
    records: int
    problems: list[Problem]
    labels: list[int] | None = None  # records per class, from the labels read (None: the checker died)
    sides: dict[int, int] | None = None  # records per stored short side below SHORT_SIDE_COUNTS_BELOW
    min_side: int | None = None  # the smallest stored short side
    crcs: array | None = None  # the records' CRC-32s, as read (``_Task.want_crcs``)
    unnamed: bool = False  # the shard's checksum differs and it has no per-record sums to name the records


def _add_side(out: _Outcome, width: int, height: int) -> None:
    side = min(width, height)
    if side < SHORT_SIDE_COUNTS_BELOW:
        out.sides[side] = out.sides.get(side, 0) + 1
    out.min_side = side if out.min_side is None else min(out.min_side, side)


def _check_image(jpeg: bytes, width: int | None, height: int | None) -> str | None:
    """None when ``jpeg`` is an RGB JPEG (of ``width`` x ``height``, when given) that decodes.

    The size in the header is checked before decoding, and any warning while decoding (e.g. a
    header claiming a decompression bomb) is a problem of the record, not a line on stderr."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            im = Image.open(io.BytesIO(jpeg), formats=["JPEG"])
            if width is not None and im.size != (width, height):
                return f"image is {im.size[0]}x{im.size[1]} but the record says {width}x{height}"
            im.load()
    except Exception as exc:  # any decoder failure is exactly what verify reports
        return f"image does not decode as a JPEG ({type(exc).__name__}: {exc})"
    if im.format != "JPEG" or im.mode != "RGB":
        return f"expected an RGB JPEG, found {im.format} {im.mode}"
    return None


def _verify_shard(task: _Task, tick: Ticker) -> _Outcome:
    """Every record of one shard in one format, walked by the format's scanner (``Format.scanner``)."""
    out = _Outcome(0, [], [0] * task.num_classes, {})
    digest = RecordDigest()
    sums = _load_sums(task, out)
    named: list[Problem] = []
    scan = get_format(task.fmt).scanner(task.root, task.entry.files(task.fmt), task.version, _repair(task))
    found, readable = scan.open()
    out.problems += [Problem(where, None, message) for where, message in found]
    if not readable:
        return out
    limit = task.entry.records + EXTRA_RECORDS
    records = scan.records()
    try:
        for raw in records:
            out.records += 1
            tick(out.records)
            if out.records > limit:
                out.problems.append(Problem(task.where, None, f"holds more than {limit - 1} records (stopped "
                                                              f"reading); the manifest says {task.entry.records}"))
                break
            record = scan.parse(raw)
            digest.update(record.key, record.value)
            _check_crc(task, sums, digest, out.records - 1, record.name, named)
            msg = _check_record(record, task, out)
            if msg:
                out.problems.append(Problem(task.where, record.name, msg))
    except (OSError, AlexnetPipeError) as exc:
        out.problems.append(Problem(task.where, None, f"unreadable after {plural(out.records, 'record')} ({exc}); "
                                                      f"{_repair(task)}"))
    finally:
        records.close()
    out.problems += [Problem(where, None, message) for where, message in scan.end(out.records)]
    _finish(task, out, digest, task.entry.files(task.fmt).checksum, sums, named)
    return out


def _check_record(record: Scanned, task: _Task, out: _Outcome) -> str | None:
    """Count the record's label and image size; what is wrong with it, or None (see ``Scanned``)."""
    if record.label is not None and 0 <= record.label < task.num_classes:
        out.labels[record.label] += 1
    if record.size is not None:
        _add_side(out, *record.size)
    if record.problem:
        return record.problem
    if record.label is not None and not 0 <= record.label < task.num_classes:
        return f"label {record.label} outside 0..{task.num_classes - 1}"
    if record.late_problem:
        return record.late_problem
    if task.decode:
        return _check_image(record.jpeg, *(record.size if record.size_stated else (None, None)))
    return None


def _load_sums(task: _Task, out: _Outcome):
    """The shard's per-record CRCs, or None (none recorded, or a damaged file: a problem of its own)."""
    if task.sums is None:
        return None
    try:
        with open(task.root / task.sums, "rb") as f:  # a regular file (``_sums_file``)
            data = f.read(4 * task.entry.records + 17)  # one byte more than it should hold
        return decode_record_sums(data, task.entry.records, task.sums)
    except (OSError, AlexnetPipeError) as exc:
        out.problems.append(Problem(task.sums, None, f"cannot be used ({exc}); run alexnet-pipe verify {task.root} "
                                                     "--repair to rewrite it"))
        return None


def _check_crc(task: _Task, sums, digest: RecordDigest, n: int, key: str, named: list[Problem]) -> None:
    """Name record ``n`` (just read into ``digest``) when its CRC differs from the recorded one."""
    if sums is not None and n < len(sums) and digest.crcs[-1] != sums[n]:
        named.append(Problem(task.where, key, "the record's bytes differ from the checksum convert recorded for it "
                                              f"(damaged on disk); run alexnet-pipe verify {task.root} --repair"))


def _finish(task: _Task, out: _Outcome, digest: RecordDigest, expected: str, sums, named: list[Problem]) -> None:
    """The shard-level checks: record count and checksum, with the damaged records named.

    The shard's sha256 is the authority: records whose CRC differs while it matches mean the CRC
    file is wrong, not the records. Without per-record sums, a checksum that differs names no record.
    """
    count, entry = out.records, task.entry
    if count != entry.records:
        out.problems.append(Problem(task.where, None,
                                    f"holds {plural(count, 'record')}, the manifest says {entry.records}"))
    intact = "sha256:" + digest.hexdigest() == expected
    if intact and named:
        out.problems.append(Problem(task.sums, None, f"does not match the records of {task.where} (whose checksum "
                                                     f"does): the CRC file is damaged; run alexnet-pipe verify "
                                                     f"{task.root} --repair to rewrite it"))
    elif not intact:
        out.problems.extend(named)
        if not named:
            out.problems.append(Problem(task.where, None,
                                        "checksum differs from the manifest (records changed or lost)"))
            out.unnamed = sums is None
    if task.want_crcs:
        out.crcs = digest.crcs


def _repair(task: _Task) -> str:
    """How to rewrite one shard: convert redoes a finished shard whose files are gone, and
    ``--repair`` any damaged one."""
    files = " and ".join(str(task.root / f) for f in task.files())
    return (f"to repair it, run alexnet-pipe verify {task.root} --repair (or delete {files} and rerun the "
            f"alexnet-pipe convert command that made {task.root})")


def _verify_task(task: _Task, tick: Ticker) -> _Outcome:
    try:
        out = _verify_shard(task, tick)
    except Exception as exc:  # anything a damaged shard makes our readers raise is that shard's problem
        out = _Outcome(0, [Problem(task.where, None, f"the checker failed ({type(exc).__name__}: {exc}); "
                                                     f"{_repair(task)}")], None)
    out.problems = out.problems[:MAX_PROBLEMS_PER_SHARD]
    return out


# ---------------------------------------------------------------- checker processes


def check_shards(tasks: list[_Task], workers: int, progress: bool, desc: str,
                 stall_seconds: float = STALL_SECONDS, progress_bar: bool = True) -> list[_Outcome]:
    """Each task's outcome, in task order, with progress over the records (``progress.Progress``). Every task runs in
    a checker process (supervisor.run_queued, see the module docstring): a checker that dies or
    stalls on a shard makes that shard's outcome a problem, and the other shards are still checked.
    Checkers are forked from a server that imported this module once (cheap to replace after a
    death), never from this process (which may hold threads, e.g. torch's in tests)."""
    from alexnet_pipe.progress import Progress

    def lost(number: int, records: int, exitcode: int | None) -> _Outcome:
        task = tasks[number]
        what = (f"the checker made no progress for {stall_seconds:.0f} s (a loop in corrupt data?) and was stopped"
                if exitcode is None else f"the checker died ({describe_death(exitcode)}) while reading it")
        return _Outcome(records, [Problem(task.where, None, f"{what}: the shard is corrupt; {_repair(task)}")], None)

    bar = Progress(sum(t.entry.records for t in tasks), desc, "rec", enabled=progress, bar=progress_bar)
    try:
        return run_queued(tasks, _verify_task, worker_context("alexnet_pipe.convert.verify"), workers,
                          units=lambda task: task.entry.records, stall_seconds=stall_seconds,
                          on_progress=lambda n: bar.update(max(0, n)), on_lost=lost,
                          cannot_start="verify cannot start its checker processes")
    finally:
        bar.close()


def run_verify(cfg: VerifyConfig, stall_seconds: float = STALL_SECONDS) -> VerifyResult:
    """Check every record of every shard against the manifest; collect problems, never stop early.

    Raises:
        DatasetError: the manifest is missing or damaged (``load_dataset``): nothing to check against.
    """
    ds = load_dataset(cfg.root)
    result = VerifyResult()
    if (hint := ds.upgrade_hint()) is not None:
        result.notes.append(hint)
    result.problems += verify_fields(ds)
    if ds.meta.mean:
        result.problems += verify_mean(ds)
    result.problems += verify_mean_image(ds)
    tasks = []
    for split in ds.splits():
        for entry in ds.shard_entries(split):
            tasks += [_Task(cfg.root, split, fmt, entry, ds.num_classes, cfg.decode, ds.version,
                            _sums_file(cfg.root, entry, fmt))
                      for fmt in ds.formats]
        if ds.shard_entries(split):  # the files a format keeps per split (RecordIO's combined index)
            for fmt in ds.formats:
                result.problems += [Problem(where, None, message) for where, message
                                    in get_format(fmt).check_split(cfg.root, ds.split_entry(split))]
    outcomes = check_shards(tasks, cfg.workers, cfg.progress, "verify", stall_seconds, cfg.progress_bar)
    for outcome in outcomes:
        result.records += outcome.records
        result.shards += 1
        result.problems += outcome.problems
    result.problems += verify_counts(ds, tasks, outcomes)
    result.problems += verify_sizes(ds)  # last: a replaced shard's own problems say more
    if any(outcome.unnamed for outcome in outcomes):
        how = (f"alexnet-pipe verify {cfg.root} --repair" if (cfg.root / INPUTS_FILE).is_file() else
               f"the alexnet-pipe convert command that made {cfg.root}, rerun with --repair,")
        result.notes.append(f"{cfg.root} has no per-record checksums (converted by an older alexnet-pipe), "
                            "so a damaged "
                            f"shard's records are not named; {how} adds them (and rewrites the damaged shards)")
    return result


def _sums_file(root: Path, entry: ShardEntry, fmt: str) -> str | None:
    """The shard's per-record CRC file, if convert wrote one (datasets converted before it did have none)."""
    rel = record_sums_path(entry.name, fmt)
    return rel if rel is not None and (root / rel).is_file() else None
