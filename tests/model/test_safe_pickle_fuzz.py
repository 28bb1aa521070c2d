"""Seeded mutation fuzz of the safe unpickler: neon dataset caches through update-mean, neon weights.

Mutants (bit flips, byte replacements, truncations, inserted opcodes, duplicated and deleted
spans, interesting 32-bit values) run in child processes under a 2 GiB address-space limit,
many per child (tests/model/pickle_fuzz_runner.py); a child killed by a signal, or one that hangs, has
its unfinished mutants rerun one per process, so each signal is pinned on one mutant.
Asserted: no signal, no hang, no exception other than our one-line refusals, and nothing in a
result or a rewritten cache that is not derived from the input. `make test` runs 150 mutants of
each; `make faults` runs 2,500 of each.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import pickletools
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.pickle_samples import neon_cache, neon_weights_pre12, neon_weights_v14, py2_pickle

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("pickle_fuzz_runner.py")
ADDRESS_SPACE = 2 << 30
BATCH = 125
OPCODES = [op.code.encode("latin1") for op in pickletools.opcodes]
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 30]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not buf:
            break
        pos = rng.randrange(len(buf))
        kind = rng.randrange(7)
        if kind == 0:  # bit flip
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # byte replacement, half the time by an opcode byte
            buf[pos] = rng.choice(OPCODES)[0] if rng.random() < 0.5 else rng.randrange(256)
        elif kind == 2:  # truncation
            del buf[pos:]
        elif kind == 3:  # an inserted opcode, with a few argument bytes
            buf[pos:pos] = rng.choice(OPCODES) + bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
        elif kind == 4:  # a duplicated span
            start = rng.randrange(len(buf))
            span = buf[start:start + rng.randint(1, 64)]
            buf[pos:pos] = span
        elif kind == 5:  # a deleted span
            del buf[pos:pos + rng.randint(1, 32)]
        else:  # a length or size field set to an interesting value
            buf[pos:pos + 4] = rng.choice(INTERESTING).to_bytes(4, "little")
    return bytes(buf)


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_children(mode: str, files: list[Path], timeout: float) -> list[dict]:
    """Run ``files`` through the runner, many per process; pin signals and hangs on single mutants."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")

    def child(batch: list[Path], limit: float) -> tuple[dict[str, dict], str]:
        try:
            proc = subprocess.run([sys.executable, str(RUNNER), mode, *map(str, batch)], env=env,
                                  capture_output=True, text=True, timeout=limit, preexec_fn=_limit_address_space)
            out, fate = proc.stdout, (f"signal {-proc.returncode}" if proc.returncode < 0 else
                                      f"exit {proc.returncode}: {proc.stderr[-500:]}" if proc.returncode else "")
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            fate = f"hang (over {limit:.0f} s)"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return {r["file"]: r for r in lines}, fate

    results: list[dict] = []
    for start in range(0, len(files), BATCH):
        batch = files[start:start + BATCH]
        done, fate = child(batch, timeout)
        for path in batch:
            if str(path) in done:
                results.append(done[str(path)])
                continue
            alone, fate_alone = child([path], timeout)  # pin the death on this mutant
            results.append(alone.get(str(path)) or {"file": str(path), "outcome": "signal" if "signal" in fate_alone
                                                    else "hang" if "hang" in fate_alone else "crash",
                                                    "detail": fate_alone or fate})
    return results


# Pieces of the pickles the loader accepts, to string together at random.
_TOKENS = [b"(", b"0", b"1", b"2", b"N", b"\x88", b"\x89", b"K\x00", b"K\x01", b"K\x03", b"J\xff\xff\xff\xff",
           b"U\x01b", b"U\x06latin1", b"U\x02f4", b"U\x02u1", b"U\x01<", b"U\x04\x00\x00\x80?", b"C\x01b",
           b"}", b"]", b")", b"\x85", b"\x86", b"\x87", b"t", b"l", b"d", b"s", b"u", b"a", b"e", b"b", b"R",
           b"q\x00", b"q\x01", b"h\x00", b"h\x01", b"\x94", b"\x8c\x05numpy\x94", b"\x8c\x05dtype", b"\x93",
           b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\nscalar\n", b"cnumpy\nndarray\n",
           b"cnumpy\ndtype\n", b"c_codecs\nencode\n", b"c__builtin__\nbytes\n"]


def program(rng: random.Random) -> bytes:
    """A random string of accepted opcodes: the machine's stack, memo and type checks, not the parser."""
    return b"\x80\x02" + b"".join(rng.choice(_TOKENS) for _ in range(rng.randint(3, 40))) + b"."


def fuzz(tmp_path: Path, mode: str, bases: list[bytes], count: int, seed: int) -> collections.Counter:
    """``count`` mutants, taking the ``bases`` in turn (no bases: random opcode programs)."""
    rng = random.Random(seed)
    files = []
    for n in range(count):
        folder = tmp_path / f"m{n:05d}"
        folder.mkdir()
        path = folder / ("dataset_cache.pkl" if mode == "update-mean" else "alexnet.p")
        path.write_bytes(mutate(bases[n % len(bases)], rng) if bases else program(rng))
        files.append(path)
    results = run_children(mode, files, timeout=max(120.0, count * 0.5))
    outcomes = collections.Counter(r["outcome"] for r in results)
    bad = [r for r in results if r["outcome"] not in ("ok", "refused")]
    print(f"\n{mode}: {count} mutants (seed {seed}): {dict(outcomes)}")
    assert not bad, "\n".join(f"{r['file']}: {r['outcome']}: {r['detail']}" for r in bad[:5])
    assert len(results) == count
    return outcomes


def neon_caches() -> list[bytes]:
    """An old neon cache as Python 2 wrote it, and as Python 3 does at protocol 2 (bytes as latin-1 text)."""
    cache = dict(neon_cache(size=6), label_names=["n01440764", "n01443537"], global_mean_std=np.float32(0.5))
    return [py2_pickle(cache), pickle.dumps(cache, protocol=2)]


def neon_weights() -> list[bytes]:
    """neon v1.4 weights (float32) and pre-v1.2 ones (float16), as Python 2 wrote them."""
    return [py2_pickle(neon_weights_v14(seed=3)), py2_pickle(neon_weights_pre12(seed=4, dtype=np.float16))]


CASES = [("update-mean", neon_caches), ("loads", neon_weights), ("loads", list)]
IDS = ["neon-cache", "neon-weights", "opcode-programs"]


@pytest.mark.parametrize("mode, make", CASES, ids=IDS)
def test_fuzz_fast_subset(tmp_path, mode, make):
    outcomes = fuzz(tmp_path, mode, make(), 150, seed=7)
    assert outcomes["refused"] > 0 and (outcomes["ok"] > 0 or make is list)  # mutants: both paths exercised


@pytest.mark.faults
@pytest.mark.parametrize("mode, make", CASES, ids=IDS)
def test_fuzz_full(tmp_path, mode, make):
    outcomes = fuzz(tmp_path, mode, make(), 2500, seed=1007)
    assert outcomes["refused"] > 0 and (outcomes["ok"] > 0 or make is list)
