"""The `verify` job: read every record back through our own readers and check it.

Every shard is checked in a child process. A corrupt LMDB can kill the process that reads it
(LMDB maps the file: a page past a truncated end is SIGBUS, a wild page number SIGSEGV), and no
Python code can catch that; here it kills one checker, which the parent sees, reports against the
shard it was reading, and replaces. A checker that stops making progress (a loop in corrupt data)
is killed and reported the same way. Whatever a checker raises becomes a problem of its shard.
The parent itself only parses JSON and index text, with parsers that report rather than crash.

Where convert recorded a CRC-32 per record (checksum.py), a shard whose checksum differs gets one
problem per record whose bytes differ, naming its key; without them (datasets converted before),
only the shard is named. ``repair.py`` runs the same checkers to find the shards to rewrite.
"""

from __future__ import annotations

import faulthandler
import io
import json
import resource
import signal
import time
import warnings
from array import array
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

from alexnet_pipe.config import VerifyConfig
from alexnet_pipe.convert.workers import worker_context
from alexnet_pipe.dataset.checksum import RecordDigest, decode_record_sums
from alexnet_pipe.dataset.layout import (
    INPUTS_FILE,
    MANIFEST_FILE,
    MEAN_FILE,
    PARTS_DIR,
    SHORT_SIDE_COUNTS_BELOW,
    record_sums_path,
)
from alexnet_pipe.dataset.manifest import Dataset, load_dataset, unknown_fields
from alexnet_pipe.dataset.mean import ChannelMean, PixelStats, load_dataset_mean
from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.formats.datum import decode_datum
from alexnet_pipe.formats.recordio import iter_records, read_index, unpack_payload
from alexnet_pipe.formats.shards import reserves_too_much

MAX_PROBLEMS_PER_SHARD = 50
EXTRA_RECORDS = 1000  # read at most this many records past the manifest's count (a loop in corrupt data ends)
STALL_SECONDS = 120.0  # a checker silent this long is stuck in corrupt data: killed and reported
TICK_SECONDS = 0.5  # how often a checker reports progress


@dataclass(frozen=True)
class Problem:
    where: str  # e.g. "lmdb/train-00003"
    key: str | None
    message: str

    def __str__(self) -> str:
        """One line: control characters (from damaged keys or messages) are escaped."""
        text = f"{self.where}" + (f" key {self.key}" if self.key else "") + f": {self.message}"
        return text.translate(_ESCAPE)


_ESCAPE = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


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
    fmt: str  # "lmdb" or "recordio"
    entry: dict  # the shard's manifest entry
    num_classes: int
    decode: bool
    version: int
    sums: str | None = None  # the shard's per-record CRC file (relative to root), when there is one
    want_crcs: bool = False  # return the CRCs of the records read (repair writes them)

    @property
    def where(self) -> str:
        return self.entry["lmdb"]["path"] if self.fmt == "lmdb" else self.entry["recordio"]["rec"]

    def files(self) -> list[str]:
        if self.fmt == "lmdb":
            return [self.entry["lmdb"]["path"]]
        return [self.entry["recordio"]["rec"], self.entry["recordio"]["idx"]]


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


class _Ticker:
    """Counts records; a checker's ``tick`` sends the count to the parent every TICK_SECONDS."""

    def __init__(self, send=None):
        self.send, self.last = send, time.monotonic()

    def __call__(self, count: int) -> None:
        if self.send is not None and time.monotonic() - self.last >= TICK_SECONDS:
            self.last = time.monotonic()
            self.send(("tick", count))


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


def _verify_lmdb(task: _Task, tick: _Ticker) -> _Outcome:
    root, entry, where = task.root, task.entry, task.where
    out = _Outcome(0, [], [0] * task.num_classes, {})
    digest = RecordDigest()
    sums = _load_sums(task, out)
    named: list[Problem] = []
    limit = entry["records"] + EXTRA_RECORDS
    try:
        if task.version >= 2 and reserves_too_much(root / where):
            out.problems.append(Problem(where, None, "stores a map size far beyond its data (DALI's Caffe reader "
                                        "reserves that much address space per shard); "
                                        f"run alexnet-pipe upgrade {root}"))
        env = lmdb.open(str(root / where), readonly=True, lock=False, subdir=True)
    except (OSError, lmdb.Error) as exc:
        out.problems.append(Problem(where, None, f"cannot open LMDB ({exc}); {_repair(task)}"))
        return out
    try:
        with env, env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                out.records += 1
                tick(out.records)
                if out.records > limit:
                    out.problems.append(Problem(where, None, f"holds more than {limit - 1} records (stopped reading); "
                                                             f"the manifest says {entry['records']}"))
                    break
                digest.update(key, value)
                _check_crc(task, sums, digest, out.records - 1, key.decode(errors="replace"), named)
                msg = _check_datum(value, task, out)
                if msg:
                    out.problems.append(Problem(where, key.decode(errors="replace"), msg))
    except lmdb.Error as exc:
        out.problems.append(Problem(where, None, f"unreadable after {out.records} records ({exc}); {_repair(task)}"))
    _finish(task, out, digest, entry["lmdb"]["checksum"], sums, named)
    return out


def _check_datum(value: bytes, task: _Task, out: _Outcome) -> str | None:
    try:
        datum = decode_datum(value)
    except AlexnetPipeError as exc:
        return f"not a Datum ({exc})"
    if 0 <= datum.label < task.num_classes:
        out.labels[datum.label] += 1
    _add_side(out, datum.width, datum.height)
    if not datum.encoded:
        return "Datum is not encoded (expected encoded=true JPEG bytes)"
    if not 0 <= datum.label < task.num_classes:
        return f"label {datum.label} outside 0..{task.num_classes - 1}"
    if datum.channels != 3:
        return f"Datum says {datum.channels} channels, expected 3"
    if task.decode:
        return _check_image(datum.data, datum.width, datum.height)
    return None


def _jpeg_size(jpeg: bytes) -> tuple[int, int] | None:
    """Width and height from a JPEG's header (nothing decoded), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(jpeg), formats=["JPEG"]).size
    except Exception:  # reported by the decode check, or by the checksum under --quick
        return None


def _verify_recordio(task: _Task, tick: _Ticker) -> _Outcome:
    root, entry = task.root, task.entry
    rec = entry["recordio"]
    where = rec["rec"]
    out = _Outcome(0, [], [0] * task.num_classes, {})
    problems = out.problems
    digest = RecordDigest()
    sums = _load_sums(task, out)
    named: list[Problem] = []
    try:
        size = (root / where).stat().st_size
    except OSError as exc:
        problems.append(Problem(where, None, f"cannot read it ({exc}); {_repair(task)}"))
        return out
    if "bytes" in rec and size != rec["bytes"]:
        problems.append(Problem(where, None, f"is {size} bytes, the manifest says {rec['bytes']} (cut short or "
                                             f"appended to); {_repair(task)}"))
    try:
        index = read_index(root / rec["idx"], size)
    except (OSError, AlexnetPipeError) as exc:
        problems.append(Problem(rec["idx"], None, f"cannot read index ({exc}); {_repair(task)}"))
        index = None
    limit = entry["records"] + EXTRA_RECORDS
    try:
        for n, (offset, payload) in enumerate(iter_records(root / where)):
            out.records += 1
            tick(out.records)
            if out.records > limit:
                problems.append(Problem(where, None, f"holds more than {limit - 1} records (stopped reading); "
                                                     f"the manifest says {entry['records']}"))
                break
            header, jpeg = unpack_payload(payload)
            key = str(header.id)
            digest.update(key.encode(), payload)
            _check_crc(task, sums, digest, n, key, named)
            if header.flag == 0 and float(header.label).is_integer() and 0 <= int(header.label) < task.num_classes:
                out.labels[int(header.label)] += 1
            if (dims := _jpeg_size(jpeg)) is not None:
                _add_side(out, *dims)
            msg = None
            if index is not None and (n >= len(index) or index[n] != (header.id, offset)):
                msg = f"index entry {index[n] if n < len(index) else None} does not match record at offset {offset}"
            elif header.flag != 0 or not float(header.label).is_integer():
                msg = f"expected one integer label in the header, got flag {header.flag} label {header.label}"
            elif not 0 <= int(header.label) < task.num_classes:
                msg = f"label {int(header.label)} outside 0..{task.num_classes - 1}"
            elif task.decode:
                msg = _check_image(jpeg, None, None)
            if msg:
                problems.append(Problem(where, key, msg))
    except (OSError, AlexnetPipeError) as exc:
        problems.append(Problem(where, None, f"unreadable after {out.records} records ({exc}); {_repair(task)}"))
    if index is not None and len(index) != out.records:
        problems.append(Problem(rec["idx"], None, f"index has {len(index)} entries for {out.records} records"))
    _finish(task, out, digest, rec["checksum"], sums, named)
    return out


def _load_sums(task: _Task, out: _Outcome):
    """The shard's per-record CRCs, or None (none recorded, or a damaged file: a problem of its own)."""
    if task.sums is None:
        return None
    try:
        with open(task.root / task.sums, "rb") as f:  # a regular file (``_sums_file``)
            data = f.read(4 * task.entry["records"] + 17)  # one byte more than it should hold
        return decode_record_sums(data, task.entry["records"], task.sums)
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
    if count != entry["records"]:
        out.problems.append(Problem(task.where, None, f"holds {count} records, the manifest says {entry['records']}"))
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


def _verify_task(task: _Task, tick: _Ticker) -> _Outcome:
    fn = _verify_lmdb if task.fmt == "lmdb" else _verify_recordio
    try:
        out = fn(task, tick)
    except Exception as exc:  # anything a damaged shard makes our readers raise is that shard's problem
        out = _Outcome(0, [Problem(task.where, None, f"the checker failed ({type(exc).__name__}: {exc}); "
                                                     f"{_repair(task)}")], None)
    out.problems = out.problems[:MAX_PROBLEMS_PER_SHARD]
    return out


# ---------------------------------------------------------------- checker processes


def _checker_main(conn) -> None:
    """A checker process: take tasks from ``conn`` until None, answer ticks and one outcome each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends its checkers
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
        conn.send(("done", number, _verify_task(task, _Ticker(conn.send))))


def _context():
    """Checkers forked from a server that imported this module once (cheap to replace after a
    death), never from this process (which may hold threads, e.g. torch's in tests)."""
    return worker_context("alexnet_pipe.convert.verify")


class _Checker:
    """One checker process and the tasks it was given, which it works through in order."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_checker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.tasks: deque[int] = deque()  # given, not yet answered; the first is the one being read
        self.queued = 0  # records in those tasks
        self.progress = 0  # records read of the first task
        self.heard = time.monotonic()

    def give(self, number: int, task: _Task) -> None:
        if not self.tasks:
            self.progress, self.heard = 0, time.monotonic()
        self.conn.send((number, task))
        self.tasks.append(number)
        self.queued += task.entry["records"]

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


def _death(proc) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the checker died with {name}{extra} while reading it"
    return f"the checker exited with status {code} while reading it"


# Tasks handed to a checker ahead, so that it never waits for the parent between small shards:
# at least 2, and up to 16 while they hold at most 256 records (big shards stay free for idle checkers).
QUEUE_MIN, QUEUE_MAX, QUEUE_RECORDS = 2, 16, 256


def check_shards(tasks: list[_Task], workers: int, progress: bool, desc: str,
                 stall_seconds: float = STALL_SECONDS) -> list[_Outcome]:
    """Each task's outcome from the checker processes, with a progress bar over the records."""
    from tqdm import tqdm

    bar = tqdm(total=sum(t.entry["records"] for t in tasks), unit="rec", desc=desc, disable=not progress,
               dynamic_ncols=True)
    try:
        return _run_checkers(tasks, workers, stall_seconds, lambda n: bar.update(max(0, n)))
    finally:
        bar.close()


def _run_checkers(tasks: list[_Task], workers: int, stall_seconds: float, on_progress) -> list[_Outcome]:
    """Every task's outcome, in task order; each task runs in a checker process (see the module
    docstring). A checker answers its tasks in the order given, so when one dies, the first task
    it had not answered killed it; the others go back in the queue. ``on_progress(records)`` is
    called as records are read."""
    outcomes: list[_Outcome | None] = [None] * len(tasks)
    pending = deque(range(len(tasks)))
    ctx = _context()
    checkers: list[_Checker] = []
    failed_starts = 0
    try:
        while pending or any(c.tasks for c in checkers):
            while pending and len(checkers) < min(workers, len(tasks)):
                checkers.append(_Checker(ctx))
            for c in checkers:
                while pending and c.proc.exitcode is None and (len(c.tasks) < QUEUE_MIN or (
                        len(c.tasks) < QUEUE_MAX and c.queued + tasks[pending[0]].entry["records"] <= QUEUE_RECORDS)):
                    try:
                        c.give(pending[0], tasks[pending[0]])
                    except OSError:  # it died: found below
                        break
                    pending.popleft()
            ready = set(wait([c.conn for c in checkers] + [c.proc.sentinel for c in checkers], timeout=1.0))
            now = time.monotonic()
            for c in list(checkers):
                died = False
                if c.conn in ready:
                    try:
                        while c.conn.poll():
                            msg = c.conn.recv()
                            if msg[0] == "tick":
                                on_progress(msg[1] - c.progress)
                                c.progress, c.heard = msg[1], now
                            else:
                                _, number, outcome = msg
                                assert number == c.tasks[0], "a checker answered out of order"
                                c.tasks.popleft()
                                c.queued -= tasks[number].entry["records"]
                                outcomes[number] = outcome
                                on_progress(tasks[number].entry["records"] - c.progress)
                                c.progress, c.heard = 0, now
                    except (EOFError, OSError):
                        died = True
                if not died and c.proc.sentinel in ready and not c.conn.poll():
                    died = True
                stalled = bool(c.tasks) and now - c.heard > stall_seconds
                if not died and not stalled:
                    continue
                if not died:
                    c.proc.kill()
                c.proc.join()
                if c.tasks:
                    number = c.tasks.popleft()
                    pending.extendleft(reversed(c.tasks))  # given but never started
                    task = tasks[number]
                    what = (f"the checker made no progress for {stall_seconds:.0f} s (a loop in corrupt data?) and "
                            "was stopped" if not died else _death(c.proc))
                    outcomes[number] = _Outcome(c.progress, [Problem(task.where, None, (
                        f"{what}: the shard is corrupt; {_repair(task)}"))], None)
                    on_progress(task.entry["records"] - c.progress)
                else:
                    failed_starts += 1
                    if failed_starts >= 3:
                        raise AlexnetPipeError(f"verify cannot start its checker processes ({_death(c.proc)})")
                c.conn.close()
                checkers.remove(c)
    finally:
        for c in checkers:
            c.end()
    return outcomes  # type: ignore[return-value]


# ---------------------------------------------------------------- dataset-level checks


def _verify_combined_index(root: Path, split: dict) -> list[Problem]:
    expected, base = [], 0
    try:
        for entry in split["shards"]:
            rec = entry["recordio"]
            size = (root / rec["rec"]).stat().st_size
            expected += [(k, base + off) for k, off in read_index(root / rec["idx"], size)]
            base += size
    except (OSError, AlexnetPipeError) as exc:
        return [Problem(split["recordio_index"], None, f"cannot rebuild the combined index ({exc})")]
    try:
        actual = read_index(root / split["recordio_index"], base)
    except (OSError, AlexnetPipeError) as exc:
        return [Problem(split["recordio_index"], None, f"cannot read combined index ({exc})")]
    if actual != expected:
        return [Problem(split["recordio_index"], None, "combined index does not match the shards' indices")]
    return []


def _train_part_stats(ds: Dataset) -> PixelStats | None:
    """The train split's exact pixel sums from convert's completion records, or None when they
    are not there or do not describe exactly this dataset's train shards."""
    parts = ds.root / PARTS_DIR
    if "train" not in ds.splits() or not parts.is_dir():
        return None
    stats, names = PixelStats(), set()
    try:
        for path in sorted(parts.glob("train-*.json")):
            if not path.is_file():
                return None
            part = json.loads(path.read_text(encoding="utf-8"))
            if part["split"] != "train":
                continue
            stats.merge(PixelStats.from_json(part["stats"]))
            if part["records"]:
                names.add((part["name"], part["records"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if names != {(s["name"], s["records"]) for s in ds.shards("train")}:
        return None
    return stats


def _verify_mean(ds: Dataset) -> list[Problem]:
    """mean.json is valid, and (when convert computed it) agrees with the data it was computed from."""
    try:
        mean: ChannelMean = load_dataset_mean(ds.root)
    except AlexnetPipeError as exc:
        return [Problem(MEAN_FILE, None, str(exc))]
    if not mean.images:  # an upgraded old mean (update-mean): nothing here to check it against
        return []
    problems = []
    train = ds.split("train")["records"] if "train" in ds.splits() else 0
    if mean.images != train:
        problems.append(Problem(MEAN_FILE, None, f"says it averages {mean.images} images, the train split holds "
                                                 f"{train} records"))
    stats = _train_part_stats(ds)
    if stats is not None and stats.pixels:
        expected = stats.to_mean(mean.source)
        # The same integer sums give the same floats, and JSON keeps floats exactly: compare exactly.
        if (mean.channel_order, mean.mean, mean.std, mean.pixels) != (expected.channel_order, expected.mean,
                                                                       expected.std, expected.pixels):
            problems.append(Problem(MEAN_FILE, None, (
                f"mean {list(mean.mean)} (std {mean.std and list(mean.std)}, {mean.pixels} pixels) is not what the "
                f"pixel sums convert recorded in {PARTS_DIR}/ give: {list(expected.mean)} (std {list(expected.std)}, "
                f"{expected.pixels} pixels); the file was edited or damaged: rerun the alexnet-pipe convert command "
                f"that made {ds.root} to rewrite it")))
    return problems


def _split_totals(tasks: list[_Task], outcomes: list[_Outcome], split: str, fmt: str) -> list[_Outcome] | None:
    """The outcomes of one split's shards in one format, or None when a checker died on one."""
    outs = [out for task, out in zip(tasks, outcomes) if task.split == split and task.fmt == fmt]
    return None if any(out.labels is None for out in outs) else outs


def _verify_counts(ds: Dataset, tasks: list[_Task], outcomes: list[_Outcome]) -> list[Problem]:
    """The manifest's per-class counts and stored short sides against what the shards hold, per format."""
    problems = []
    for split in ds.splits():
        entry = ds.split(split)
        for fmt in ds.formats:
            outs = _split_totals(tasks, outcomes, split, fmt)
            if outs is None:
                continue
            found = [sum(col) for col in zip(*(out.labels for out in outs))] if outs else [0] * ds.num_classes
            stated = entry["class_counts"]
            if found != stated:
                diff = [f"class {i}: {a} stated, {b} read" for i, (a, b) in enumerate(zip(stated, found)) if a != b]
                problems.append(Problem(f"manifest {split}", None, (
                    f"class_counts do not match the labels read from the {fmt} shards ("
                    + "; ".join(diff[:5]) + ("; ..." if len(diff) > 5 else "") + ")")))
            sides: dict[str, int] = {}
            for out in outs:
                for side, n in out.sides.items():
                    sides[str(side)] = sides.get(str(side), 0) + n
            if ("short_side_counts" in entry
                    and entry["short_side_counts"] != dict(sorted(sides.items(), key=lambda kv: int(kv[0])))):
                problems.append(Problem(f"manifest {split}", None, (
                    f"short_side_counts {entry['short_side_counts']} do not match the images in the {fmt} shards "
                    f"({dict(sorted(sides.items(), key=lambda kv: int(kv[0])))})")[:500]))
            smallest = min((out.min_side for out in outs if out.min_side is not None), default=None)
            if "min_short_side" in entry and entry["min_short_side"] != smallest:
                problems.append(Problem(f"manifest {split}", None, f"min_short_side is {entry['min_short_side']}, the "
                                                                   f"smallest image in the {fmt} shards is {smallest}"))
    return problems


def _verify_mean_image(ds: Dataset) -> list[Problem]:
    """The mean image files the manifest lists are there, the .npy with the shape it should have."""
    entry = ds.manifest.get("mean_image")
    if not entry:
        return []
    problems = []
    size = entry.get("size")
    for key in ("npy", "binaryproto"):
        path = ds.root / entry[key]
        if not path.is_file():
            problems.append(Problem(entry[key], None, f"is missing (the manifest lists it as the mean image); rerun "
                                                      f"the alexnet-pipe convert command that made {ds.root}"))
    npy = ds.root / entry["npy"]
    if size is not None and npy.is_file():
        try:
            with open(npy, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format version {version}")
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)  # the header only
                data_at = f.tell()
            want = (size, size, 3)
            if shape != want or dtype != np.float32 or fortran or npy.stat().st_size != data_at + 4 * 3 * size * size:
                problems.append(Problem(entry["npy"], None, f"holds {dtype} {shape} in {npy.stat().st_size} bytes; "
                                                            f"expected float32 {want}"))
        except (OSError, ValueError, SyntaxError, TypeError) as exc:
            problems.append(Problem(entry["npy"], None, f"is not a readable .npy ({exc})"))
    return problems


def _verify_fields(ds: Dataset) -> list[Problem]:
    unknown = unknown_fields(ds.manifest)
    return [Problem(MANIFEST_FILE, None,
                    f"has fields this alexnet-pipe never writes ({', '.join(map(repr, unknown[:5]))}"
                    f"{', ...' if len(unknown) > 5 else ''}): the manifest was edited or damaged; "
                    f"rerun the alexnet-pipe convert command that made {ds.root} to rewrite it")
            ] if unknown else []


def run_verify(cfg: VerifyConfig, stall_seconds: float = STALL_SECONDS) -> VerifyResult:
    """Check every record of every shard against the manifest; collect problems, never stop early.

    Raises:
        DatasetError: the manifest is missing or damaged (``load_dataset``): nothing to check against.
    """
    ds = load_dataset(cfg.root)
    result = VerifyResult()
    if (hint := ds.upgrade_hint()) is not None:
        result.notes.append(hint)
    result.problems += _verify_fields(ds)
    if ds.manifest.get("mean"):
        result.problems += _verify_mean(ds)
    result.problems += _verify_mean_image(ds)
    tasks = []
    for split in ds.splits():
        for entry in ds.shards(split):
            tasks += [_Task(cfg.root, split, fmt, entry, ds.num_classes, cfg.decode, ds.version,
                            _sums_file(cfg.root, entry, fmt))
                      for fmt in ds.formats]
        if "recordio" in ds.formats and ds.shards(split):
            result.problems += _verify_combined_index(cfg.root, ds.split(split))
    outcomes = check_shards(tasks, cfg.workers, cfg.progress, "verify", stall_seconds)
    for outcome in outcomes:
        result.records += outcome.records
        result.shards += 1
        result.problems += outcome.problems
    result.problems += _verify_counts(ds, tasks, outcomes)
    if any(outcome.unnamed for outcome in outcomes):
        how = (f"alexnet-pipe verify {cfg.root} --repair" if (cfg.root / INPUTS_FILE).is_file() else
               f"the alexnet-pipe convert command that made {cfg.root}, rerun with --repair,")
        result.notes.append(f"{cfg.root} has no per-record checksums (converted by an older alexnet-pipe), "
                            "so a damaged "
                            f"shard's records are not named; {how} adds them (and rewrites the damaged shards)")
    return result


def _sums_file(root: Path, entry: dict, fmt: str) -> str | None:
    """The shard's per-record CRC file, if convert wrote one (datasets converted before it did have none)."""
    rel = record_sums_path(entry["name"], fmt)
    return rel if rel is not None and (root / rel).is_file() else None
