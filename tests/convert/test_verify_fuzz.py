"""Seeded mutation fuzz of a converted dataset, every mutant through `alexnet-pipe verify` in its own
process (issue 7, section 6).

Each mutant is one file of a tiny converted dataset (an LMDB ``data.mdb``, a ``.rec``, a shard or
combined ``.idx``, ``manifest.json``, ``mean.json``) with a few bytes flipped, overwritten,
inserted, deleted or cut off, or (text files) a number or token replaced. Verify must:

- never crash: no traceback, no death by signal, no hang (a timeout), nothing on stderr but
  ``PROBLEM``/``NOTE``/``Error:`` lines;
- either report the dataset as failing (exit 1), or pass it (exit 0) only when the mutation hit
  bytes no reader uses (LMDB free space, record padding, JSON layout or fields nothing reads, such
  as a class's display name or mean.json's ``source`` text): then everything a reader gets (every
  record, index entry, the mean values, the manifest's reader-facing fields) must equal the
  original's.

The full run (``make faults``) takes 540 mutants (some leave the file unchanged and are not counted);
``make test`` runs a few of each kind. Set ``ALEXNET_PIPE_FUZZ_REPORT=path.json`` to keep the counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from tests.helpers.images import make_tree

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096
TIMEOUT = 120  # seconds per verify run: far beyond the ~1 s one takes
# Mutants per target kind in the full run (520 in all) and in make test's subset.
FULL = {"data.mdb": 220, ".rec": 100, ".idx": 60, "combined .idx": 40, "manifest.json": 60, "mean.json": 60}
QUICK = {kind: 2 for kind in FULL}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """2 splits, 3 classes, LMDB + RecordIO; images from 30x40 (values inside leaf pages) to
    160x120 (values on overflow pages), sizes kept."""
    base = tmp_path_factory.mktemp("fuzz")
    make_tree(base / "raw", {"train": 4, "val": 2}, sizes=((40, 30), (160, 120), (30, 40)))
    out = base / "data"
    run_convert(ConvertConfig(src=base / "raw", dst=out, formats=("lmdb", "recordio"),
                              image=ImageSettings(short_side=0), shard_size=4, workers=1, progress=False))
    return out


# ---------------------------------------------------------------- what a reader gets


def snapshot(root: str) -> str:
    """A digest of everything readers take from a dataset: records, indices, mean, manifest fields.

    Run in a child process: a mutated LMDB may kill the process that reads it."""
    import lmdb

    from alexnet_pipe.dataset.manifest import load_dataset
    from alexnet_pipe.dataset.mean import load_dataset_mean
    from alexnet_pipe.formats.recordio import iter_records, read_index

    ds = load_dataset(Path(root))
    h = hashlib.sha256()
    m = ds.manifest
    facing = {"formats": ds.formats, "classes": [c["id"] for c in ds.classes], "version": ds.version,
              "id_width": m.get("record_id_width"), "mean": m.get("mean"), "mean_image": m.get("mean_image"),
              "splits": {name: {k: split.get(k) for k in ("records", "class_counts", "shards", "recordio_index",
                                                           "short_side_counts", "min_short_side")}
                         for name, split in m["splits"].items()},
              "short_side": m["settings"].get("short_side"), "upscale": m["settings"].get("upscale")}
    h.update(json.dumps(facing, sort_keys=True).encode())
    mean = load_dataset_mean(ds.root)
    h.update(repr((mean.mean, mean.std, mean.channel_order, mean.images, mean.pixels)).encode())  # not its text
    for split in ds.splits():
        for path in ds.lmdb_paths(split) if "lmdb" in ds.formats else []:
            with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
                for key, value in txn.cursor():
                    h.update(b"%d:%s%d:%s" % (len(key), key, len(value), value))
        if "recordio" in ds.formats:
            recs, combined = ds.recordio_paths(split)
            h.update(repr(read_index(combined)).encode())
            for shard, rec in zip(ds.shards(split), recs):
                h.update(repr(read_index(ds.root / shard["recordio"]["idx"])).encode())
                for offset, payload in iter_records(rec):
                    h.update(b"%d:%d:%s" % (offset, len(payload), payload))
    return h.hexdigest()


def snapshot_in_child(root: Path) -> str | None:
    res = subprocess.run([sys.executable, "-c", "import sys; from tests.convert.test_verify_fuzz import snapshot; "
                          "print(snapshot(sys.argv[1]))", str(root)], capture_output=True, text=True,
                         timeout=TIMEOUT, cwd=REPO)
    return res.stdout.strip() if res.returncode == 0 else None


# ---------------------------------------------------------------- mutations


def _targets(root: Path) -> dict[str, list[Path]]:
    rel = lambda paths: sorted(p.relative_to(root) for p in paths)  # noqa: E731
    return {
        "data.mdb": rel(root.glob("lmdb/*/data.mdb")),
        ".rec": rel(root.glob("recordio/*.rec")),
        ".idx": rel(root.glob("recordio/*-*.idx")),
        "combined .idx": rel(p for p in root.glob("recordio/*.idx") if "-" not in p.name),
        "manifest.json": [Path("manifest.json")],
        "mean.json": [Path("mean.json")],
    }


TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"true", b"false", b"null", b'"x"', b"-1", b"1e999", b"0", b"[]", b"{}",
          b"3.5", b"\xff", b"/etc/passwd", b"../../x", b"99999999999999999999"]


def _position(rng: random.Random, data: bytes, kind: str) -> int:
    """Anywhere; in data.mdb often where LMDB keeps its structure (meta pages, page headers)."""
    if kind == "data.mdb" and rng.random() < 0.5:
        if rng.random() < 0.4:
            return rng.randrange(min(len(data), 2 * PAGE))  # the two meta pages
        page = rng.randrange(max(1, len(data) // PAGE))
        return min(len(data) - 1, page * PAGE + rng.randrange(64))  # a page header and its first nodes
    return rng.randrange(max(1, len(data)))


def mutate(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation of ``data``; returns the new bytes and what was done."""
    text = kind in (".idx", "combined .idx", "manifest.json", "mean.json")
    ops = ["flip", "flip", "set", "zero", "ff", "truncate", "insert", "delete", "duplicate"]
    if text:
        ops += ["digit", "digit", "token", "token", "swap-lines"]
    op = rng.choice(ops)
    pos = _position(rng, data, kind)
    buf = bytearray(data)
    if op == "flip":
        bits = rng.randint(1, 4)
        for _ in range(bits):
            p = min(len(buf) - 1, pos + rng.randrange(8))
            buf[p] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip {bits} bits near byte {pos}"
    if op in ("set", "zero", "ff"):
        n = rng.randint(1, 8)
        fill = bytes(rng.randrange(256) for _ in range(n)) if op == "set" else (b"\0" if op == "zero" else b"\xff") * n
        buf[pos : pos + n] = fill[: len(buf) - pos]
        return bytes(buf), f"{op} {n} bytes at {pos}"
    if op == "truncate":
        return bytes(buf[:pos]), f"truncate to {pos} bytes"
    if op == "insert":
        n = rng.randint(1, 16)
        return bytes(buf[:pos] + bytes(rng.randrange(256) for _ in range(n)) + buf[pos:]), f"insert {n} bytes at {pos}"
    if op == "delete":
        n = rng.randint(1, 16)
        return bytes(buf[:pos] + buf[pos + n :]), f"delete {n} bytes at {pos}"
    if op == "duplicate":
        n = rng.randint(1, 64)
        src = rng.randrange(max(1, len(buf)))
        return bytes(buf[:pos] + buf[src : src + n] + buf[pos:]), f"copy {n} bytes from {src} to {pos}"
    if op == "digit":
        digits = [m.start() for m in re.finditer(rb"[0-9]", data)]
        if not digits:
            return mutate(data, kind, rng)
        p = rng.choice(digits)
        new = rng.choice([d for d in b"0123456789" if d != buf[p]])
        buf[p] = new
        return bytes(buf), f"digit at {p} -> {chr(new)}"
    if op == "token":
        spans = [m.span() for m in re.finditer(rb'-?[0-9][0-9.eE+-]*|true|false|null|"[^"\n]*"', data)]
        if not spans:
            return mutate(data, kind, rng)
        a, b = rng.choice(spans)
        token = rng.choice(TOKENS)
        return bytes(buf[:a] + token + buf[b:]), f"token at {a} {bytes(data[a:b])[:30]!r} -> {token!r}"
    lines = data.split(b"\n")
    if len(lines) < 3:
        return mutate(data, kind, rng)
    i, j = rng.sample(range(len(lines) - 1), 2)
    lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines), f"swap lines {i + 1} and {j + 1}"


# ---------------------------------------------------------------- one mutant


@dataclass
class Outcome:
    seed: int
    kind: str
    target: str
    what: str
    verdict: str  # "detected", "benign", "unchanged", or a failure: "crash", "hang", "silent"
    detail: str = ""
    signal_deaths: tuple[str, ...] = ()  # checker deaths by signal that verify reported (not failures)


@contextmanager
def mutant(pristine: Path, root: Path, targets: dict[str, list[Path]], kind: str,
           rng: random.Random) -> Iterator[tuple[Path, str, bool]]:
    """A copy of ``pristine`` at ``root`` with one file of ``targets[kind]`` (chosen by ``rng``)
    mutated: yields (that file, what was done, whether its bytes changed); removed afterwards."""
    target = rng.choice(targets[kind])
    shutil.copytree(pristine, root)
    try:
        original = (root / target).read_bytes()
        data, what = mutate(original, kind, rng)
        if data != original:
            (root / target).write_bytes(data)
        yield target, what, data != original
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_mutant(pristine: Path, work: Path, seed: int, kind: str, expected: str) -> Outcome:
    root = work / f"m{seed}"
    with mutant(pristine, root, _targets(pristine), kind, random.Random(seed)) as (target, what, changed):
        if not changed:
            return Outcome(seed, kind, str(target), what, "unchanged")
        cmd = [sys.executable, "-m", "alexnet_pipe", "verify", str(root), "--no-progress", "--workers", "1"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
        except subprocess.TimeoutExpired:
            return Outcome(seed, kind, str(target), what, "hang", f"no answer in {TIMEOUT} s")
        out = res.stdout + res.stderr
        lines = res.stderr.splitlines()
        deaths = tuple(re.search(r"died with (SIG[A-Z]+)", line).group(1) for line in lines if "died with SIG" in line)
        if res.returncode not in (0, 1) or "Traceback" in out:
            return Outcome(seed, kind, str(target), what, "crash", f"rc {res.returncode}: {out[-2000:]}")
        if any(not line.startswith(("PROBLEM ", "NOTE ", "Error: ")) for line in lines):
            return Outcome(seed, kind, str(target), what, "crash", f"stray output: {res.stderr[-2000:]}")
        if res.returncode == 1:
            if not any(line.startswith(("PROBLEM ", "Error: ")) for line in lines):
                return Outcome(seed, kind, str(target), what, "crash", f"exit 1 without a reason: {out[-2000:]}")
            return Outcome(seed, kind, str(target), what, "detected", lines[0][:300], deaths)
        got = snapshot_in_child(root)
        if got != expected:
            return Outcome(seed, kind, str(target), what, "silent", f"verify passed but readers get other data ({got})")
        return Outcome(seed, kind, str(target), what, "benign")


def run_fuzz(pristine: Path, work: Path, plan: dict[str, int], first_seed: int) -> list[Outcome]:
    expected = snapshot_in_child(pristine)
    assert expected is not None
    jobs, seed = [], first_seed
    for kind, n in plan.items():
        for _ in range(n):
            jobs.append((seed, kind))
            seed += 1
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda job: run_mutant(pristine, work, job[0], job[1], expected), jobs))


def summarize(outcomes: list[Outcome]) -> dict:
    by_kind: dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[o.verdict] += 1
    verdicts = Counter(o.verdict for o in outcomes)
    report = {
        "mutants": len(outcomes) - verdicts["unchanged"],
        "detected": verdicts["detected"],
        "benign": verdicts["benign"],
        "crashes": verdicts["crash"] + verdicts["hang"],
        "silent": verdicts["silent"],
        "checker_signal_deaths_reported": dict(Counter(sig for o in outcomes for sig in o.signal_deaths)),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "benign_cases": [f"{o.target}: {o.what}" for o in outcomes if o.verdict == "benign"],
        "failures": [o.__dict__ for o in outcomes if o.verdict in ("crash", "hang", "silent")],
    }
    if path := os.environ.get("ALEXNET_PIPE_FUZZ_REPORT"):
        Path(path).write_text(json.dumps(report, indent=1))
    print("\nverify fuzz:", json.dumps({k: v for k, v in report.items() if k != "benign_cases"}, indent=1))
    return report


def _check(report: dict, at_least: int) -> None:
    assert report["mutants"] >= at_least
    assert report["crashes"] == 0 and report["silent"] == 0, json.dumps(report["failures"], indent=1)[:6000]


def test_verify_fuzz_quick(pristine, tmp_path):
    """A few mutants of each kind (the fast subset of the fault suite)."""
    _check(summarize(run_fuzz(pristine, tmp_path, QUICK, first_seed=900_000)), sum(QUICK.values()) - 2)


@pytest.mark.faults
def test_verify_fuzz_full(pristine, tmp_path):
    """540 seeded mutants: verify never crashes and never passes a dataset whose data changed."""
    _check(summarize(run_fuzz(pristine, tmp_path, FULL, first_seed=1)), 500)
