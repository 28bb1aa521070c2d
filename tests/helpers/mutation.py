"""What a reader takes from a dataset, digested (in a child process), and the files a mutation may hit."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # seconds for a child to digest a dataset


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
    res = subprocess.run([sys.executable, "-c", "import sys; from tests.helpers.mutation import snapshot; "
                          "print(snapshot(sys.argv[1]))", str(root)], capture_output=True, text=True,
                         timeout=TIMEOUT, cwd=REPO)
    return res.stdout.strip() if res.returncode == 0 else None


def mutation_targets(root: Path) -> dict[str, list[Path]]:
    rel = lambda paths: sorted(p.relative_to(root) for p in paths)  # noqa: E731
    return {
        "data.mdb": rel(root.glob("lmdb/*/data.mdb")),
        ".rec": rel(root.glob("recordio/*.rec")),
        ".idx": rel(root.glob("recordio/*-*.idx")),
        "combined .idx": rel(p for p in root.glob("recordio/*.idx") if "-" not in p.name),
        "manifest.json": [Path("manifest.json")],
        "mean.json": [Path("mean.json")],
    }


PAGE = 4096


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
