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

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from tests.helpers.images import make_tree
from tests.helpers.mutation import mutant, mutation_targets, snapshot_in_child

REPO = Path(__file__).resolve().parents[2]
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






# ---------------------------------------------------------------- mutations










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




def run_mutant(pristine: Path, work: Path, seed: int, kind: str, expected: str) -> Outcome:
    root = work / f"m{seed}"
    with mutant(pristine, root, mutation_targets(pristine), kind, random.Random(seed)) as (target, what, changed):
        if not changed:
            return Outcome(seed, kind, str(target), what, "unchanged")
        cmd = [sys.executable, "-m", "alexnet_pipe", "verify", str(root), "--no-progress", "--workers", "1"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
        except subprocess.TimeoutExpired:
            return Outcome(seed, kind, str(target), what, "hang", f"no answer in {TIMEOUT} s")
        out = res.stdout + res.stderr
        lines = res.stderr.splitlines()
        deaths = tuple(re.search(r"killed by signal (SIG[A-Z]+)", line).group(1) for line in lines
                       if "killed by signal SIG" in line)
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
