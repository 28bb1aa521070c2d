"""The `verify` job: read every record back through our own readers and check it."""

from __future__ import annotations

import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
from PIL import Image

from .checksum import RecordDigest
from .config import VerifyConfig
from .datum import decode_datum
from .errors import AlexnetPipeError
from .manifest import load_dataset
from .mean import load_dataset_mean
from .recordio import iter_records, read_index, unpack_payload
from .shards import reserves_too_much

MAX_PROBLEMS_PER_SHARD = 50


@dataclass(frozen=True)
class Problem:
    where: str  # e.g. "lmdb/train-00003"
    key: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}" + (f" key {self.key}" if self.key else "") + f": {self.message}"


@dataclass
class VerifyResult:
    records: int = 0
    shards: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong (e.g. an older format)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_image(jpeg: bytes, width: int | None, height: int | None) -> str | None:
    try:
        im = Image.open(io.BytesIO(jpeg))
        im.load()
    except Exception as exc:  # any decoder failure is exactly what verify reports
        return f"image does not decode ({exc})"
    if im.format != "JPEG" or im.mode != "RGB":
        return f"expected an RGB JPEG, found {im.format} {im.mode}"
    if width is not None and im.size != (width, height):
        return f"image is {im.size[0]}x{im.size[1]} but the record says {width}x{height}"
    return None


def _verify_lmdb(root: Path, entry: dict, num_classes: int, decode: bool, version: int) -> tuple[int, list[Problem]]:
    where = entry["lmdb"]["path"]
    problems: list[Problem] = []
    digest = RecordDigest()
    count = 0
    try:
        if version >= 2 and reserves_too_much(root / where):
            problems.append(Problem(where, None, "stores a map size far beyond its data (DALI's Caffe reader reserves "
                                                 f"that much address space per shard); run alexnet-pipe upgrade {root}"))
        env = lmdb.open(str(root / where), readonly=True, lock=False, subdir=True)
    except (OSError, lmdb.Error) as exc:
        return 0, [Problem(where, None, f"cannot open LMDB ({exc})")]
    with env, env.begin(buffers=False) as txn:
        for key, value in txn.cursor():
            count += 1
            digest.update(key, value)
            name = key.decode(errors="replace")
            try:
                datum = decode_datum(value)
            except AlexnetPipeError as exc:
                problems.append(Problem(where, name, f"not a Datum ({exc})"))
                continue
            msg = None
            if not datum.encoded:
                msg = "Datum is not encoded (expected encoded=true JPEG bytes)"
            elif not 0 <= datum.label < num_classes:
                msg = f"label {datum.label} outside 0..{num_classes - 1}"
            elif datum.channels != 3:
                msg = f"Datum says {datum.channels} channels, expected 3"
            elif decode:
                msg = _check_image(datum.data, datum.width, datum.height)
            if msg:
                problems.append(Problem(where, name, msg))
    problems.extend(_check_totals(where, entry, count, digest.hexdigest(), entry["lmdb"]["checksum"]))
    return count, problems


def _verify_recordio(root: Path, entry: dict, num_classes: int, decode: bool, version: int) -> tuple[int, list[Problem]]:
    rec = entry["recordio"]
    where = rec["rec"]
    problems: list[Problem] = []
    digest = RecordDigest()
    try:
        index = read_index(root / rec["idx"])
    except (OSError, AlexnetPipeError) as exc:
        return 0, [Problem(rec["idx"], None, f"cannot read index ({exc})")]
    count = 0
    try:
        for n, (offset, payload) in enumerate(iter_records(root / where)):
            count += 1
            header, jpeg = unpack_payload(payload)
            key = str(header.id)
            digest.update(key.encode(), payload)
            msg = None
            if n >= len(index) or index[n] != (header.id, offset):
                msg = f"index entry {index[n] if n < len(index) else None} does not match record at offset {offset}"
            elif header.flag != 0 or not float(header.label).is_integer():
                msg = f"expected one integer label in the header, got flag {header.flag} label {header.label}"
            elif not 0 <= int(header.label) < num_classes:
                msg = f"label {int(header.label)} outside 0..{num_classes - 1}"
            elif decode:
                msg = _check_image(jpeg, None, None)
            if msg:
                problems.append(Problem(where, key, msg))
    except (OSError, AlexnetPipeError) as exc:
        problems.append(Problem(where, None, f"unreadable after {count} records ({exc})"))
    if len(index) != count:
        problems.append(Problem(rec["idx"], None, f"index has {len(index)} entries for {count} records"))
    problems.extend(_check_totals(where, entry, count, digest.hexdigest(), rec["checksum"]))
    return count, problems


def _check_totals(where: str, entry: dict, count: int, checksum: str, expected: str) -> list[Problem]:
    out = []
    if count != entry["records"]:
        out.append(Problem(where, None, f"holds {count} records, the manifest says {entry['records']}"))
    if "sha256:" + checksum != expected:
        out.append(Problem(where, None, "checksum differs from the manifest (records changed or lost)"))
    return out


def _verify_task(args) -> tuple[int, list[Problem]]:
    root, entry, fmt, num_classes, decode, version = args
    fn = _verify_lmdb if fmt == "lmdb" else _verify_recordio
    count, problems = fn(root, entry, num_classes, decode, version)
    return count, problems[:MAX_PROBLEMS_PER_SHARD]


def _verify_combined_index(root: Path, split: dict) -> list[Problem]:
    expected, base = [], 0
    try:
        for entry in split["shards"]:
            rec = entry["recordio"]
            expected += [(k, base + off) for k, off in read_index(root / rec["idx"])]
            base += (root / rec["rec"]).stat().st_size
    except (OSError, AlexnetPipeError) as exc:
        return [Problem(split["recordio_index"], None, f"cannot rebuild the combined index ({exc})")]
    try:
        actual = read_index(root / split["recordio_index"])
    except (OSError, AlexnetPipeError) as exc:
        return [Problem(split["recordio_index"], None, f"cannot read combined index ({exc})")]
    if actual != expected:
        return [Problem(split["recordio_index"], None, "combined index does not match the shards' indices")]
    return []


def run_verify(cfg: VerifyConfig) -> VerifyResult:
    """Check every record of every shard against the manifest; collect problems, never stop early."""
    from tqdm import tqdm

    ds = load_dataset(cfg.root)
    result = VerifyResult()
    if (hint := ds.upgrade_hint()) is not None:
        result.notes.append(hint)
    if ds.manifest.get("mean"):
        try:
            load_dataset_mean(cfg.root)
        except AlexnetPipeError as exc:
            result.problems.append(Problem("mean.json", None, str(exc)))
    tasks = []
    for split in ds.splits():
        for entry in ds.shards(split):
            tasks += [(cfg.root, entry, fmt, ds.num_classes, cfg.decode, ds.version) for fmt in ds.formats]
        if "recordio" in ds.formats and ds.shards(split):
            result.problems += _verify_combined_index(cfg.root, ds.split(split))
    total = sum(t[1]["records"] for t in tasks)
    bar = tqdm(total=total, unit="rec", desc="verify", disable=not cfg.progress, dynamic_ncols=True)
    if cfg.workers == 1:
        outcomes = map(_verify_task, tasks)
        pool = None
    else:
        pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))
        outcomes = pool.map(_verify_task, tasks)
    try:
        for task, (count, problems) in zip(tasks, outcomes):
            result.records += count
            result.shards += 1
            result.problems += problems
            bar.update(task[1]["records"])
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for split in ds.splits():
        expected = ds.split(split)["records"]
        found = sum(e["records"] for e in ds.shards(split))
        if expected != found:
            result.problems.append(Problem(f"manifest {split}", None, f"split says {expected} records, shards sum to {found}"))
    return result
