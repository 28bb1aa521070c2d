#!/usr/bin/env python3
"""Same bytes before and after: run one fixed job with two versions of alexnet-pipe and compare.

    python tools/same_bytes.py --before REV [--after WORKTREE_OR_REV] [--work DIR] [--keep] [--quick]

A change that must not change behaviour (a restructuring, issue 20) is checked by running the
same commands on the same input with the code of ``--before`` (a git revision, checked out into
a temporary ``git worktree``; or a directory) and of ``--after`` (default: this checkout's
working tree, uncommitted changes included), and comparing everything they leave behind:

- every output file, byte for byte, and the set of files, folders and permission bits (like
  ``diff -r``, a little stricter), except the few exempted below;
- the metrics rows of ``train -o`` and the row of ``test -o``, value by value, without the
  timing fields;
- each command's exit code and its stdout and stderr, line by line, after the normalisation
  below.

It prints each difference and a verdict, and exits 0 only when everything matches (1 when
something differs, 2 when the tool itself could not run).

The fixed input (``build_input``) is drawn here with numpy, Pillow and scipy only (never with
alexnet-pipe), so both versions read the very same files: 3 classes in class folders (clean
JPEGs of several sizes, a pass-through candidate, a PNG named .JPEG, a CMYK and a greyscale
JPEG, a real PNG), skipped inputs (a truncated JPEG, an empty file, an HTML page named .JPEG, a
loose file beside the class folders, a ``__MACOSX`` folder), and a flat ``val/`` labelled by the
devkit's ground truth in devkit (unsorted) id order, read from ``ILSVRC2012_devkit_t12.tar.gz``
in place (meta.mat inside), with a truncated validation image. The commands (``steps``):
``convert --format both`` (and its rerun, and ``--dry-run``), a ``--part 0/2`` + ``--part 1/2``
pair into one folder, ``verify`` of a copy with one byte flipped inside a record of an LMDB and of
a RecordIO shard, then ``verify --repair`` on it, the same damage repaired by ``convert
--repair``, ``verify``, ``info`` and ``info --json``, ``update-mean`` on the dataset's
mean.binaryproto (``--into``) and on a generated BGR ``.npy``, a seeded two-epoch CPU training
run and ``test`` on its weights. ``--quick`` (the test suite's run, ~30 s on 2 cores) keeps
convert, the --part pair, the damaged copy's ``verify --repair``, ``info --json``, the
binaryproto ``update-mean``, one epoch of training and ``test``. Also reported, outside the
verdict: whether each version's --part pair and repairs equal its single run (README's promise).

Both versions run their commands in the same place (WORK/run, renamed to WORK/before or
WORK/after when that version is done), so every path a command prints or stores is the same for
both and no path inside a file needs to be exempted. Each command runs as
``cd CODE && PYTHONPATH=CODE PYTHON -m alexnet_pipe ...`` with the same interpreter (default:
this checkout's .venv), so the version's own package is imported, not the editable install; the
tool checks that before it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 600
SHOWN = 100  # differences printed; all of them go to WORK/differences.txt


class ToolError(Exception):
    """The comparison could not be made (exit 2): not a difference between the versions."""


# ----------------------------------------------------------------------------- exemptions
# Everything not listed here must match exactly. Each entry says why it may differ.

# Output files compared by content instead of bytes, because they hold wall-clock fields
# (TIMING_KEYS) beside everything else: {relative path under the version's folder: how}.
BY_CONTENT = {
    # JSON lines, one per epoch and per --log-every steps: compare_rows, value by value.
    "train/metrics.jsonl": "rows",
    # test -o's row has no timing field today; rows keep the report readable if it ever gets one.
    "train/test.jsonl": "rows",
    # The weights file's "history" holds every epoch row of metrics.jsonl, timing fields included
    # (the pickled floats differ, so its SHA-256 trailer does too): compare_weights loads both
    # (each checked against its own trailer) and compares every tensor and value exactly.
    "train/w.pt": "weights",
}

# Fields of a metrics row that measure wall-clock time, by nature different on every run:
TIMING_KEYS = {
    "seconds": "the wall-clock duration of the epoch (or of the steps so far)",
    "img_per_s": "samples / seconds: a speed",
    "data_wait_s": "the wall-clock time the steps waited for their data",
}

# Substitutions made on every stdout/stderr line before the lines are compared, in order:
# (pattern, replacement, why). Only these; the paths are replaced first (see below).
TEXT_EXEMPTIONS: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"\bin \d+(?:\.\d+)? ?(?:s|ms|min)\b"), "in <T>",
     "a duration: convert's summary '(35 images in 0.9 s, ...)' and a --part run's '(24 images in 0.6 s)'"),
    (re.compile(r"\b\d[\d,]*(?:\.\d+)? img/s\b"), "<R> img/s",
     "a speed: convert's summary '41 img/s)' and train's 'epoch 1: train loss 1.2321, 12 img/s'"),
]

# Where a command's output names the code it ran (a traceback's file paths, a warning's source),
# the code root differs between the versions: it is replaced by <CODE>. The work dir (a temporary
# folder) is replaced by <WORK>; it is the same for both versions, so this only keeps reports
# readable and stable across invocations.

CLASSES = ("n01000001", "n01000002", "n01000003")  # sorted wnids: label k = CLASSES[k]
DEVKIT_ORDER = ("n01000003", "n01000001", "n01000002")  # the devkit's id order: a derangement of sorted
GT = "ILSVRC2012_validation_ground_truth.txt"
SHARD_SIZE = "8"

# ----------------------------------------------------------------------------- the fixed input


def _smooth(seed: int, width: int, height: int) -> np.ndarray:
    """A smooth gradient unique to ``seed`` (survives JPEG well); as tests/helpers/images.py draws them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, k = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(40, 200)
        out[..., c] = k + 50 * np.sin(a * xx / 37 + b * yy / 29 + c)
    return np.clip(out, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _meta_mat(order: tuple[str, ...]) -> bytes:
    """A devkit meta.mat: (N, 1) struct array of the devkit's eight fields, the classes in
    ``order`` (ids 1..N, no children), then one internal WordNet node over them."""
    import scipy.io

    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    rows = [(i, wnid, f"{wnid} words", "gloss", 0, [], 0, 1300) for i, wnid in enumerate(order, 1)]
    rows.append((len(order) + 1, "n00001740", "entity", "gloss", len(order), list(range(1, len(order) + 1)), 1, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for r, row in enumerate(rows):
        for name, value in zip(fields, row):
            synsets[r, 0][name] = value if isinstance(value, str) else np.array(value, float).reshape(1, -1)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    # savemat writes the time into the 116-byte text header: fix it, so every build is the same file
    return b"MATLAB 5.0 MAT-file, written by tools/same_bytes.py".ljust(116) + buf.getvalue()[116:]


def _devkit_tar_gz(path: Path, files: dict[str, bytes]) -> None:
    """ILSVRC2012_devkit_t12.tar.gz holding ILSVRC2012_devkit_t12/data/<name>; no timestamps."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())


def build_input(root: Path) -> dict[str, Path]:
    """Write the fixed input under ``root``: ``raw/`` (what convert reads) and ``mean_bgr.npy``
    (for update-mean). Deterministic: the same bytes on every call. Returns the paths."""
    raw = root / "raw"
    files: dict[str, bytes] = {}
    sizes = ((96, 72), (300, 200), (64, 160), (80, 80))
    seed = 0
    for cls in CLASSES:
        for i in range(6):
            w, h = sizes[seed % len(sizes)]
            files[f"train/{cls}/{cls}_{i}.JPEG"] = _encode(_smooth(seed, w, h), "JPEG", quality=95)
            seed += 1
    a, b, c = CLASSES
    # Stored after conversion: a clean baseline JPEG already at short side 256 (kept byte for byte),
    # a PNG named .JPEG, a CMYK JPEG (Adobe), a greyscale JPEG, a real PNG.
    files[f"train/{a}/passthrough.JPEG"] = _encode(_smooth(100, 320, 256), "JPEG", quality=90)
    files[f"train/{a}/png_named.JPEG"] = _encode(_smooth(101, 60, 50), "PNG")
    files[f"train/{b}/cmyk.JPEG"] = _encode(_smooth(102, 50, 40), "JPEG", mode="CMYK", quality=95)
    files[f"train/{c}/grey.JPEG"] = _encode(_smooth(103, 40, 60), "JPEG", mode="L", quality=95)
    files[f"train/{c}/photo.png"] = _encode(_smooth(104, 70, 50), "PNG")
    # Skipped, each with its reason in the manifest.
    noisy = _encode(np.random.default_rng(7).integers(0, 256, (96, 96, 3), dtype=np.uint8), "JPEG", quality=90)
    files[f"train/{a}/truncated.JPEG"] = noisy[: len(noisy) // 2]
    files[f"train/{b}/empty.JPEG"] = b""
    files[f"train/{c}/page.JPEG"] = b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n"
    files["train/notes.txt"] = b"a loose file beside the class folders\n"
    files["train/__MACOSX/._n01000001"] = b"\0\5\26\7resource fork"
    # A flat val/ labelled by the devkit (ids in DEVKIT_ORDER), read from its tar.gz in place.
    truth = {}
    for i in range(1, 10):
        stem = f"ILSVRC2012_val_{i:08d}"
        truth[stem] = CLASSES[(i * 7 + i // 3) % 3]
        w, h = sizes[seed % len(sizes)]
        data = _encode(_smooth(seed, w, h), "JPEG", quality=95)
        files[f"val/{stem}.JPEG"] = data[: len(data) // 3] if i == 5 else data  # no. 5 is truncated
        seed += 1
    ground_truth = "".join(f"{DEVKIT_ORDER.index(truth[s]) + 1}\n" for s in sorted(truth)).encode()
    if raw.exists():
        shutil.rmtree(raw)
    for name, data in files.items():
        path = raw / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    _devkit_tar_gz(raw / "ILSVRC2012_devkit_t12.tar.gz", {"meta.mat": _meta_mat(DEVKIT_ORDER), GT: ground_truth})
    mean = np.random.default_rng(11).uniform(60, 160, (32, 32, 3)).astype(np.float32)  # H x W x 3, BGR
    np.save(root / "mean_bgr.npy", mean)
    return {"raw": raw, "mean_npy": root / "mean_bgr.npy"}


def tree_digest(root: Path) -> str:
    """One sha256 over every path, type and content under ``root`` (to see that nobody wrote there)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file() and not path.is_symlink():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the job


def flip_inside_a_record(dataset: Path) -> list[str]:
    """Flip one byte in the middle of the JPEG of a record of train-00001, in its LMDB and in its
    RecordIO shard (found by the JPEG start marker: the damage lands inside a record, where only
    the per-record checksums see it). Returns what was flipped, for the log."""
    done = []
    for rel in ("lmdb/train-00001/data.mdb", "recordio/train-00001.rec"):
        path = dataset / rel
        data = bytearray(path.read_bytes())
        soi = data.find(b"\xff\xd8\xff")
        if soi < 0:
            raise ToolError(f"no JPEG found in {path}; cannot damage a record")
        eoi = data.find(b"\xff\xd9", soi)
        at = soi + max(400, (eoi - soi) // 2) if eoi > soi + 800 else soi + 200
        data[at] ^= 0x10
        path.write_bytes(bytes(data))
        done.append(f"{rel}: byte {at} (JPEG at {soi})")
    return done


@dataclass
class Step:
    """One thing done in WORK/run: a command of alexnet-pipe (``args``) or a Python action."""

    name: str
    args: list[str] = field(default_factory=list)
    action: Callable[[Path, dict[str, Path]], list[str]] | None = None
    quick: bool = True  # also run with --quick


def _copy_damaged(src: str, dst: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    def act(run: Path, inputs: dict[str, Path]) -> list[str]:
        shutil.copytree(run / src, run / dst, symlinks=True)
        return flip_inside_a_record(run / dst)
    return act


def _copy_file(src: str, dst: str) -> Callable[[Path, dict[str, Path]], list[str]]:
    def act(run: Path, inputs: dict[str, Path]) -> list[str]:
        source = inputs[src[1:]] if src.startswith("@") else run / src
        (run / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, run / dst)
        return [f"copied {src} to {dst}"]
    return act


def steps(run: Path, raw: Path, quick: bool) -> list[Step]:
    """The job. Every path is absolute, under WORK/run (the same for both versions)."""
    conv = ["convert", str(raw)]
    opts = ["--format", "both", "--shard-size", SHARD_SIZE, "--workers", "2", "--no-progress"]
    epochs = "1" if quick else "2"
    train = ["train", "-w", f"{run}/both", "-b", "cpu", "-e", epochs, "--crop", "67", "-z", "8", "--init", "kaiming",
             "--lr", "0.01", "-r", "3", "--data-threads", "1", "--read-workers", "0", "--log-every", "2",
             "-o", f"{run}/train/metrics.jsonl", "-s", f"{run}/train/w.pt", "--no-progress"]
    test = ["test", "-w", f"{run}/both", "--model-file", f"{run}/train/w.pt", "-b", "cpu", "-z", "8",
            "--data-threads", "1", "--read-workers", "0", "-o", f"{run}/train/test.jsonl", "--no-progress"]
    every = [
        Step("convert", conv + [f"{run}/both"] + opts),
        Step("convert-rerun", conv + [f"{run}/both"] + opts, quick=False),
        Step("convert-dry-run", conv + [f"{run}/dry"] + opts + ["--dry-run"], quick=False),
        Step("convert-part-0/2", conv + [f"{run}/parts"] + opts + ["--part", "0/2"]),
        Step("convert-part-1/2", conv + [f"{run}/parts"] + opts + ["--part", "1/2"]),
        Step("damage-copy-for-verify", action=_copy_damaged("both", "repair-verify")),
        Step("verify-damaged", ["verify", f"{run}/repair-verify", "--workers", "2", "--no-progress"], quick=False),
        Step("verify-repair", ["verify", f"{run}/repair-verify", "--repair", "--workers", "2", "--no-progress"]),
        Step("damage-copy-for-convert", action=_copy_damaged("both", "repair-convert"), quick=False),
        Step("convert-repair", conv + [f"{run}/repair-convert"] + opts + ["--repair"], quick=False),
        Step("verify", ["verify", f"{run}/both", "--workers", "2", "--no-progress"], quick=False),
        Step("info", ["info", f"{run}/both"], quick=False),
        Step("info-json", ["info", f"{run}/both", "--json"]),
        Step("copy-binaryproto", action=_copy_file("both/mean.binaryproto", "mean/mean.binaryproto")),
        Step("update-mean-binaryproto", ["update-mean", f"{run}/mean/mean.binaryproto"]),  # mean.json beside it
        Step("copy-npy", action=_copy_file("@mean_npy", "mean-npy/mean_bgr.npy"), quick=False),
        Step("update-mean-npy", ["update-mean", f"{run}/mean-npy/mean_bgr.npy", "--channel-order", "bgr"], quick=False),
        Step("train", train),
        Step("test", test),
    ]
    return [s for s in every if s.quick or not quick]


@dataclass
class Outcome:
    name: str
    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float


def version_env(code: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code)  # this version's package, ahead of the editable install
    env["CUDA_VISIBLE_DEVICES"] = ""  # the same CPU-only run on a GPU host (no "GPU present" defaults)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the checkouts as they are
    for var in ("PYTHONSTARTUP", "PYTHONHOME", "PYTHONSAFEPATH"):
        env.pop(var, None)
    return env


def check_import(python: str, code: Path) -> None:
    """The version's own package must be the one imported (not the .venv's editable install)."""
    probe = subprocess.run([python, "-c", "import alexnet_pipe; print(alexnet_pipe.__file__)"], cwd=code,
                           env=version_env(code), capture_output=True, text=True)
    where = Path(probe.stdout.strip() or "?").resolve()
    if probe.returncode != 0 or not where.is_relative_to(code.resolve()):
        raise ToolError(f"with PYTHONPATH={code}, {python} imports alexnet_pipe from {where}, "
                         f"not from {code}: {probe.stderr.strip()[-500:]}")


def run_version(label: str, code: Path, python: str, work: Path, inputs: dict[str, Path], quick: bool,
                say: Callable[[str], None]) -> list[Outcome]:
    """Run every step with the code in ``code`` in WORK/run, then rename WORK/run to WORK/<label>."""
    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir()
    env = version_env(code)
    outcomes = []
    started = time.perf_counter()
    for step in steps(run, inputs["raw"], quick):
        t0 = time.perf_counter()
        if step.action is not None:
            lines = step.action(run, inputs)
            outcomes.append(Outcome(step.name, [], 0, "\n".join(lines) + "\n", "", time.perf_counter() - t0))
            continue
        argv = [python, "-m", "alexnet_pipe", *step.args]
        try:
            proc = subprocess.run(argv, cwd=code, env=env, capture_output=True, text=True, errors="replace",
                                  stdin=subprocess.DEVNULL, timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ToolError(f"{label}: {step.name} ran for over {STEP_TIMEOUT_S} s: {' '.join(argv)}") from None
        outcomes.append(Outcome(step.name, step.args, proc.returncode, proc.stdout, proc.stderr,
                                time.perf_counter() - t0))
        say(f"  {label}: {step.name}: exit {proc.returncode} ({time.perf_counter() - t0:.1f} s)")
    say(f"  {label}: {len(outcomes)} steps in {time.perf_counter() - started:.1f} s")
    dest = work / label
    if dest.exists():
        shutil.rmtree(dest)
    run.rename(dest)
    (dest.parent / f"{label}.log.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return outcomes


# ----------------------------------------------------------------------------- comparisons


def _entries(root: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (kind, permission bits)} of everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else \
            "file" if stat.S_ISREG(st.st_mode) else "other"
        out[path.relative_to(root).as_posix()] = (kind, stat.S_IMODE(st.st_mode))
    return out


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _first_difference(a: Path, b: Path) -> str:
    x, y = a.read_bytes(), b.read_bytes()
    n = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
    return f"{len(x)} vs {len(y)} bytes, first difference at byte {n}"


def compare_trees(a: Path, b: Path, by_content: dict[str, str] | None = None,
                  names: tuple[str, str] = ("before", "after")) -> list[str]:
    """What differs between two folders: entries only in one, kinds (file, folder, link),
    permission bits, link targets and contents (``diff -r``, plus kinds and modes). A file named
    in ``by_content`` (relative path: "rows" or "weights") is compared by compare_rows or
    compare_weights instead of by its bytes. ``names`` name ``a`` and ``b`` in the report.
    Returns one line per difference."""
    by_content = BY_CONTENT if by_content is None else by_content
    na, nb = names
    ea, eb = _entries(a), _entries(b)
    diffs = [f"only in {na}: {p}" for p in sorted(ea.keys() - eb.keys())]
    diffs += [f"only in {nb}: {p}" for p in sorted(eb.keys() - ea.keys())]
    for rel in sorted(ea.keys() & eb.keys()):
        (ka, ma), (kb, mb) = ea[rel], eb[rel]
        if ka != kb:
            diffs.append(f"{rel}: a {ka} in {na}, a {kb} in {nb}")
            continue
        if ma != mb:
            diffs.append(f"{rel}: mode {ma:o} in {na}, {mb:o} in {nb}")
        if ka == "link" and os.readlink(a / rel) != os.readlink(b / rel):
            diffs.append(f"{rel}: links to {os.readlink(a / rel)} in {na}, {os.readlink(b / rel)} in {nb}")
        if ka != "file":
            continue
        how = by_content.get(rel)
        if how == "rows":
            diffs += [f"{rel}: {d}" for d in compare_rows(read_rows(a / rel), read_rows(b / rel))]
        elif how == "weights":
            diffs += [f"{rel}: {d}" for d in compare_weights(a / rel, b / rel)]
        elif not _same_file(a / rel, b / rel):
            diffs.append(f"{rel}: differs ({_first_difference(a / rel, b / rel)})")
    return diffs


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _value_diffs(x, y, where: str, timing_under: str | None = None, inside: bool = False) -> list[str]:
    """Where ``x`` and ``y`` differ: exactly, recursively, types included (1 != 1.0), dict keys in
    order, NaN equal to NaN (a NaN in both runs is the same behaviour), tensors by dtype, shape
    and every element. Keys in TIMING_KEYS are skipped inside a list named ``timing_under``."""
    if isinstance(x, dict) and isinstance(y, dict):
        if list(x) != list(y):
            return [f"{where or '.'}: keys {list(x)} vs {list(y)}"]
        out = []
        for k in x:
            if inside and k in TIMING_KEYS:
                continue
            out += _value_diffs(x[k], y[k], f"{where}/{k}", timing_under, inside)
        return out
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and type(x) is type(y):
        if len(x) != len(y):
            return [f"{where}: {len(x)} items vs {len(y)}"]
        below = inside or (timing_under is not None and where.rsplit("/", 1)[-1] == timing_under)
        out = []
        for i, (p, q) in enumerate(zip(x, y)):
            out += _value_diffs(p, q, f"{where}[{i}]", timing_under, below)
        return out
    if type(x).__name__ == "Tensor" and type(y).__name__ == "Tensor":
        import torch

        if x.dtype != y.dtype or x.shape != y.shape:
            return [f"{where}: tensor {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"]
        return [] if torch.equal(x, y) else [f"{where}: tensor values differ "
                                             f"(max |a-b| {(x.double() - y.double()).abs().max().item():.3g})"]
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return []
    if type(x) is not type(y) or x != y:
        return [f"{where}: {x!r:.120} vs {y!r:.120}"]
    return []


def compare_rows(rows_a: list[dict], rows_b: list[dict]) -> list[str]:
    """Metrics rows, value by value and exactly (same code, same seed: the same numbers), fields
    in the same order, without the values of the wall-clock fields in TIMING_KEYS (which must
    still be present in both rows or in neither)."""
    diffs = []
    if len(rows_a) != len(rows_b):
        diffs.append(f"{len(rows_a)} rows vs {len(rows_b)}")
    for i, (ra, rb) in enumerate(zip(rows_a, rows_b), 1):
        diffs += _value_diffs(ra, rb, f"row {i}", inside=True)
    return diffs


TRAILER = b"\n#alexnet-pipe-sha256:"  # the weights file's last line: SHA-256 of everything before it


def _load_weights(path: Path) -> tuple[object, str]:
    """The payload of a weights/checkpoint file and what is wrong with its trailer ('' if nothing)."""
    import torch

    data = path.read_bytes()
    cut = data.rfind(TRAILER)
    problem = ""
    if cut < 0 or len(data) - cut != len(TRAILER) + 65:
        problem, cut = "no SHA-256 trailer", len(data)
    elif hashlib.sha256(data[:cut]).hexdigest().encode() != data[cut + len(TRAILER):-1]:
        problem = "its SHA-256 trailer does not match its bytes"
    return torch.load(io.BytesIO(data[:cut]), map_location="cpu", weights_only=True), problem


def compare_weights(a: Path, b: Path) -> list[str]:
    """Two weights files: each must match its own SHA-256 trailer, and their payloads must be
    equal (every tensor exactly) except the timing fields of the epoch rows in ``history``."""
    (pa, qa), (pb, qb) = _load_weights(a), _load_weights(b)
    diffs = [f"{where}: {q}" for where, q in (("before", qa), ("after", qb)) if q]
    return diffs + _value_diffs(pa, pb, "", timing_under="history")


def normalise(text: str, replace: dict[str, str]) -> list[str]:
    """The lines of a command's output with paths and the TEXT_EXEMPTIONS replaced."""
    for old, new in sorted(replace.items(), key=lambda kv: -len(kv[0])):  # longest path first
        text = text.replace(old, new)
    out = []
    for line in text.splitlines():
        for pattern, repl, _why in TEXT_EXEMPTIONS:
            line = pattern.sub(repl, line)
        out.append(line)
    return out


def compare_outcomes(before: list[Outcome], after: list[Outcome], replace_a: dict[str, str],
                     replace_b: dict[str, str]) -> list[str]:
    """Exit codes and stdout/stderr lines of each step, after normalise()."""
    diffs = []
    if [o.name for o in before] != [o.name for o in after]:
        return [f"different steps: {[o.name for o in before]} vs {[o.name for o in after]}"]
    for a, b in zip(before, after):
        if a.rc != b.rc:
            diffs.append(f"{a.name}: exit {a.rc} before, {b.rc} after")
        for stream in ("stdout", "stderr"):
            la, lb = normalise(getattr(a, stream), replace_a), normalise(getattr(b, stream), replace_b)
            if la != lb:
                diffs += [f"{a.name} {stream}: {d}" for d in _line_diff(la, lb)]
    return diffs


def _line_diff(la: list[str], lb: list[str], limit: int = 12) -> list[str]:
    import difflib

    out = [line for line in difflib.unified_diff(la, lb, "before", "after", n=0, lineterm="")
           if not line.startswith(("---", "+++", "@@"))]
    return out[:limit] + ([f"... {len(out) - limit} more lines"] if len(out) > limit else [])


# ----------------------------------------------------------------------------- versions


def within_version(root: Path) -> list[str]:
    """What the README promises inside one version's outputs: the --part pair and both repairs
    give the bytes of the single run. Reported, not part of the verdict (a failure in both
    versions is no change; one in a single version already shows as an output difference)."""
    out = []
    for other in ("parts", "repair-verify", "repair-convert"):
        if (root / other).is_dir():
            found = compare_trees(root / "both", root / other, {}, ("both", other))
            out.append(f"{other} == both" if not found else f"{other} != both ({len(found)} differences)")
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def checkout(spec: str | None, say: Callable[[str], None]):
    """The code of ``spec``: None is this working tree, a directory is used as it is, anything
    else is a git revision checked out into a temporary worktree (removed afterwards)."""
    if spec is None:
        yield REPO, "working tree " + str(REPO)
        return
    if Path(spec).is_dir():
        yield Path(spec).resolve(), f"directory {Path(spec).resolve()}"
        return
    try:
        commit = _git("rev-parse", "--verify", f"{spec}^{{commit}}")
    except subprocess.CalledProcessError as exc:
        raise ToolError(f"{spec!r} is neither a directory nor a git revision: "
                         f"{exc.stderr.strip()}") from None
    path = Path(tempfile.mkdtemp(prefix=f"same-bytes-{commit[:10]}-"))
    path.rmdir()
    _git("worktree", "add", "--detach", str(path), commit)
    say(f"  worktree {path} at {spec} ({commit[:12]})")
    try:
        yield path, f"{spec} ({commit[:12]}, worktree {path})"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "remove", "--force", str(path))
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "prune")


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    """0: everything matches; 1: something differs; 2: the comparison could not be made."""
    try:
        return _main(argv)
    except ToolError as exc:
        print(f"same_bytes: {exc}", file=sys.stderr, flush=True)
        print("VERDICT: NOT COMPARED", flush=True)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision (or directory) of the code before the change")
    parser.add_argument("--after", help="git revision or directory of the code after it [default: this working tree]")
    parser.add_argument("--work", type=Path, help="folder for the input and outputs [default: a temporary one]")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (input, before/, after/, logs)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps (the tests' run): convert, the --part pair, verify --repair of a damaged "
                             "copy, info --json, update-mean of the .binaryproto, train for one epoch, test")
    parser.add_argument("--python", default=default_python(), help="interpreter for both versions [default: .venv's]")
    args = parser.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    if args.work:
        work = args.work.resolve()
        if work.exists() and any(work.iterdir()):
            raise ToolError(f"--work {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="same-bytes-work-"))
    try:
        inputs = build_input(work / "input")
        raw_digest = tree_digest(work / "input")
        with checkout(args.before, say) as (code_a, what_a), checkout(args.after, say) as (code_b, what_b):
            say(f"before: {what_a}\nafter:  {what_b}\nwork:   {work}")
            check_import(args.python, code_a)
            check_import(args.python, code_b)
            before = run_version("before", code_a, args.python, work, inputs, args.quick, say)
            touched = tree_digest(work / "input") != raw_digest
            after = run_version("after", code_b, args.python, work, inputs, args.quick, say)
            touched = touched or tree_digest(work / "input") != raw_digest
        work_repl = {str(work): "<WORK>"}
        diffs = {
            "input": ["a version wrote into the raw input"] if touched else [],
            "exit codes and output": compare_outcomes(before, after, {**work_repl, str(code_a): "<CODE>"},
                                                      {**work_repl, str(code_b): "<CODE>"}),
            "output files": compare_trees(work / "before", work / "after"),
        }
        files = sum(1 for p in (work / "after").rglob("*") if p.is_file())
        say(f"\ncompared: {len(after)} steps (exit code, stdout and stderr lines of each), {files} output files "
            f"(bytes, names, kinds, modes)\nexempt:   {', '.join(TIMING_KEYS)} in "
            f"{', '.join(BY_CONTENT)} (compared value by value); durations and img/s in output lines; "
            f"<WORK> and <CODE> paths in output lines")
        for label in ("before", "after"):
            say(f"note:     {label}: " + "; ".join(within_version(work / label)))
        listing = [f"DIFFERS {what}: {line}" for what, found in diffs.items() for line in found]
        (work / "differences.txt").write_text("".join(f"{line}\n" for line in listing))
        for line in listing[:SHOWN]:
            say(f"  {line}")
        if len(listing) > SHOWN:
            say(f"  ... {len(listing) - SHOWN} more: {work / 'differences.txt'} (with --keep)")
        bad = sum(len(v) for v in diffs.values())
        seconds = time.perf_counter() - started
        if bad:
            say(f"VERDICT: DIFFERENT ({bad} differences) in {seconds:.0f} s")
        else:
            say(f"VERDICT: SAME: every output file, metrics row, exit code and output line matches ({seconds:.0f} s)")
        return 1 if bad else 0
    finally:
        if args.keep:
            say(f"kept: {work}")
        elif args.work:
            for name in ("input", "before", "after", "run", "before.log.json", "after.log.json", "differences.txt"):
                target = work / name
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                elif target.exists():
                    target.unlink()
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
