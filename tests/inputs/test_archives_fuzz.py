"""Seeded mutation fuzz of the archive scan (issue 7, section 4): single-bit flips and truncations
at random offsets of a small ILSVRC2012_img_train.tar (outer and per-class tars) and of a flat
ILSVRC2012_img_val.tar, through scan() and through the `convert` command.

Every mutant must either give the full class set, with every member stored (or listed as
skipped with a reason) under its own label, or fail with the one-line "incomplete or corrupt
archive at byte N" message. Never a traceback, never fewer classes, never a shifted label.
`make faults` runs the full suite (and prints the tally); `make test` runs a small subset.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.scan import scan
from alexnet_pipe.inputs.tarwalk import CorruptArchiveError
from tests.helpers.images import CLASSES, make_tree
from tests.helpers.tar_builders import build_train_tar, build_val_tar, jpeg_bytes

CORRUPT = re.compile(r"^Error: \S+ILSVRC2012_img_(train|val)\.tar: incomplete or corrupt archive at byte (\d+) \(.*\); "
                     r"re-download it .*md5.*\n$")
SEED = 20260611


@dataclass
class Target:
    """A pristine archive, its expected listing, and the byte ranges worth aiming at."""

    raw: Path
    archive: Path
    pristine: bytes
    expected: dict  # member name -> (label class, offset, size)
    classes: list[str]
    headers: list[tuple[int, int]]  # (start, end) of every header block, outer and inner
    ends: list[tuple[int, int]]  # (start, end) of every end-of-archive marker and the padding after it


def _tar_structure(data: bytes, base: int = 0, length: int | None = None,
                   inner: bool = True) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The header blocks, and the end-of-archive markers with the padding after them, of a tar
    (and of its member .tar files)."""
    headers, ends = [], []
    length = len(data) if length is None else length
    with tarfile.open(fileobj=io.BytesIO(data[base:base + length])) as tar:
        for m in tar:
            headers.append((base + m.offset, base + m.offset_data))
            if inner and m.name.endswith(".tar"):
                h, e = _tar_structure(data, base + m.offset_data, m.size, inner=False)
                headers += h
                ends += e
        ends.append((base + tar.offset, base + length))
    return headers, ends


def train_target(root: Path) -> Target:
    built = build_train_tar(root / "raw" / "ILSVRC2012_img_train.tar", n_classes=4, per_class=3, size=(160, 120))
    found = scan(built.path.parent)
    expected = {s.name: (s.name.split("/")[0], s.offset, s.size) for s in found.splits["train"]}
    assert len(expected) == 12 and found.skipped == []
    data = built.path.read_bytes()
    return Target(built.path.parent, built.path, data, expected, built.classes, *_tar_structure(data))


def val_target(root: Path) -> Target:
    raw = root / "raw"
    make_tree(raw, {"train": 1}, sizes=((16, 12),))
    files, rows = {}, ["ImageId,PredictionString"]
    for k in range(1, 13):
        stem = f"ILSVRC2012_val_{k:08d}"
        files[f"{stem}.JPEG"] = jpeg_bytes(100 + k)
        rows.append(f"{stem},{CLASSES[k % 3]} 0 0 1 1")
    (raw / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    build_val_tar(raw / "ILSVRC2012_img_val.tar", files)
    found = scan(raw)
    expected = {s.name: (CLASSES[int(s.name[15:23]) % 3], s.offset, s.size) for s in found.splits["val"]}
    assert len(expected) == 12
    data = (raw / "ILSVRC2012_img_val.tar").read_bytes()
    return Target(raw, raw / "ILSVRC2012_img_val.tar", data, expected, list(CLASSES),
                  *_tar_structure(data, inner=False))


def mutate(target: Target, rng: random.Random, uniform: float) -> tuple[str, bytes]:
    """One mutant: a single-bit flip (70%) or a truncation (30%), at an offset drawn uniformly
    over the file (share ``uniform``), else in a header (2/3 of the rest) or in an
    end-of-archive marker or the padding after it (1/3)."""
    data = target.pristine
    aim = rng.random()
    if aim < uniform:
        at = rng.randrange(len(data))
    else:
        start, end = rng.choice(target.headers if aim < uniform + (1 - uniform) * 2 / 3 else target.ends)
        at = rng.randrange(start, end)
    if rng.random() < 0.7:
        bit = rng.randrange(8)
        out = bytearray(data)
        out[at] ^= 1 << bit
        return f"flip byte {at} bit {bit}", bytes(out)
    if rng.random() < 0.5:
        at -= at % 512
    return f"truncate at {at}", data[:at]


def check_scan(target: Target, split: str) -> str:
    """Scan the mutant in target.raw; return the outcome, or fail the test."""
    try:
        found = scan(target.raw)
    except CorruptArchiveError as exc:
        message = str(exc)
        assert "\n" not in message and target.archive.name in message, message
        assert int(re.search(r"at byte (\d+) ", message).group(1)) <= len(target.pristine)
        return "refused: corrupt archive"
    except LayoutError as exc:  # any other refusal must still not be a silent loss
        raise AssertionError(f"unexpected refusal: {exc}") from None
    assert found.classes == target.classes, "a different class set"
    listed = {s.name: s for s in found.splits[split]}
    skipped = {s.name for s in found.skipped if s.split == split}
    assert set(listed) | skipped >= set(target.expected), "a member neither listed nor skipped"
    assert set(listed) <= set(target.expected), \
        f"members that were not in the archive: {set(listed) - set(target.expected)}"
    for name, src in listed.items():
        cls, offset, size = target.expected[name]
        assert found.classes[src.label] == cls, f"{name} relabelled"
        assert (src.offset, src.size) == (offset, size), f"{name} read from other bytes"
    return "full listing" if not skipped else "full listing, some skipped"


def check_cli(target: Target, out: Path) -> str:
    res = CliRunner().invoke(main, ["convert", str(target.raw), str(out), "--workers", "1", "--no-progress"])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    if res.exit_code == 1:
        assert CORRUPT.match(res.output), res.output
        return "refused: corrupt archive"
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["id"] for c in manifest["classes"]] == target.classes
    split = manifest["splits"]["train"]
    skipped = [s for s in manifest["skipped"] if s["split"] == "train"]
    assert all(s["name"] in target.expected and s["reason"] for s in skipped)
    per_class = Counter(target.expected[s["name"]][0] for s in skipped)
    assert split["records"] + len(skipped) == len(target.expected)
    assert split["class_counts"] == [3 - per_class[c] for c in target.classes], "a class lost or relabelled records"
    return "converted in full" if not skipped else "converted, images listed as skipped"


def run_fuzz(tmp_path: Path, make_target, n_scan: int, n_cli: int, seed: int, split: str = "train") -> Counter:
    target = make_target(tmp_path / "pristine")
    rng = random.Random(seed)
    tally: Counter = Counter()
    for k in range(n_scan + n_cli):
        # Through convert, mostly uniform offsets: most land in image data, and must be stored or skipped.
        what, mutant = mutate(target, rng, uniform=0.4 if k < n_scan else 0.8)
        target.archive.write_bytes(mutant)
        try:
            if k < n_scan:
                outcome = "scan " + check_scan(target, split)
            else:
                outcome = "convert " + check_cli(target, tmp_path / f"out{k}")
        except AssertionError as exc:
            raise AssertionError(f"mutant {k} ({what}, seed {seed}): {exc}") from None
        tally[outcome] += 1
    target.archive.write_bytes(target.pristine)
    return tally


def _report(name: str, tally: Counter) -> None:
    print(f"\n{name}: {sum(tally.values())} mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))


def test_archive_fuzz_subset(tmp_path):
    """The fast subset in `make test`: 40 train-tar mutants through scan(), 4 through convert."""
    tally = run_fuzz(tmp_path, train_target, n_scan=40, n_cli=4, seed=SEED)
    assert sum(tally.values()) == 44 and any(k.endswith("corrupt archive") for k in tally)


@pytest.mark.faults
def test_archive_fuzz_train_tar(tmp_path):
    tally = run_fuzz(tmp_path, train_target, n_scan=600, n_cli=150, seed=SEED + 1)
    _report("train tar", tally)
    assert sum(tally.values()) == 750


@pytest.mark.faults
def test_archive_fuzz_val_tar(tmp_path):
    tally = run_fuzz(tmp_path, val_target, n_scan=300, n_cli=0, seed=SEED + 2, split="val")
    _report("val tar", tally)
    assert sum(tally.values()) == 300
