"""Child process of the pickle fuzz (test_safe_pickle_fuzz): runs many mutants, one JSON line each.

Usage: python tests/model/pickle_fuzz_runner.py {update-mean|loads} MUTANT_FILE...

Each line: {"file", "outcome", "detail"}, outcome one of
- "ok": loaded (and for update-mean: upgraded), and the checks below held;
- "refused": an AlexnetPipeError (what the CLI prints as one line, exit 1);
- "multiline": refused, but with a message of several lines;
- "crash": any other exception, even a ValueError the CLI would print as one line (it is no
  typed refusal); detail is the traceback;
- "leak": loaded, but the result or the rewritten file holds something not derived from the input.
A death by signal shows as missing lines; the parent reruns those mutants one per process.

Checks on "ok": every array and string in what the loader returned appears in the input bytes
(arrays as stored, or byte-swapped, as the loader makes them native). For update-mean, the
rewritten cache holds the input's other keys unchanged and a global_mean equal to the per-channel
mean of the input's global_mean (BGR, (3, 1)), its backup is the input, mean.json holds the same
means in RGB, and an unchanged cache is byte for byte the input.
"""

from __future__ import annotations

import json
import pickle
import sys
import traceback
from pathlib import Path

import numpy as np

from alexnet_pipe.config import UpdateMeanConfig
from alexnet_pipe.dataset.mean import read_mean_file
from alexnet_pipe.dataset.update_mean import run_update_mean
from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.safe_pickle import loads


def _walk(obj):
    """Every node of a loaded pickle, each container once (the loader refuses cycles)."""
    seen, stack = set(), [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
        yield item


def _appears(data: bytes, raw: bytes, itemsize: int) -> bool:
    """``raw`` (or it byte-swapped) is in ``data``, as bytes or as the latin-1 text Python 3 writes."""
    swapped = np.frombuffer(raw, f"u{itemsize}").byteswap().tobytes() if itemsize in (2, 4, 8) else raw
    return any(form in data for form in (raw, swapped, raw.decode("latin1").encode("utf-8"),
                                         swapped.decode("latin1").encode("utf-8")))


def foreign_parts(obj, data: bytes) -> list[str]:
    """What in ``obj`` is not in ``data``: arrays, scalars and strings are checked byte for byte."""
    bad = []
    for item in _walk(obj):
        if isinstance(item, (np.ndarray, np.generic)) and not isinstance(item, np.dtype):
            arr = np.asarray(item)
            if not _appears(data, arr.tobytes(order="A"), arr.dtype.itemsize):
                bad.append(f"array {arr.dtype} {arr.shape}")
        elif isinstance(item, str) and item.encode("latin1", "replace") not in data \
                and item.encode("utf-8", "surrogatepass") not in data:
            bad.append(f"str {item[:40]!r}")
        elif isinstance(item, bytes) and item not in data:
            bad.append(f"bytes {item[:40]!r}")
        elif not isinstance(item, (dict, list, tuple, str, bytes, int, float, type(None), np.dtype, np.generic,
                                   np.ndarray)):
            bad.append(f"a {type(item).__name__}")
    return bad


def same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes(order="A") == b.tobytes(order="A"))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def check_loads(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    obj = loads(data)
    bad = foreign_parts(obj, data)
    pickle.dumps(obj, protocol=2)  # what a consumer may do: must not fail or blow up
    return ("leak", "; ".join(bad[:5])) if bad else ("ok", "")


def check_update_mean(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    result = run_update_mean(UpdateMeanConfig(path))
    before = loads(data)  # update-mean read it, so it loads
    problems = foreign_parts(before, data)
    gm = before["global_mean"]
    bgr = (gm.reshape(3) if gm.shape in ((3,), (3, 1)) else gm.reshape(3, -1).mean(axis=1, dtype=np.float64)[::-1])
    if path in result.written:
        after_bytes = path.read_bytes()
        after = loads(after_bytes)
        if Path(f"{path}.bak").read_bytes() != data:
            problems.append("backup differs from the input")
        if list(after) != list(before):
            problems.append("keys changed")
        problems += [f"key {k!r} changed" for k in before if k != "global_mean" and not same(before[k], after[k])]
        expected = bgr.reshape(3, 1).astype(gm.dtype if gm.dtype.kind == "f" else np.float64)
        if not same(after["global_mean"], expected):
            problems.append(f"global_mean {after['global_mean'].ravel()} is not the input's mean {expected.ravel()}")
    elif path.read_bytes() != data:
        problems.append("cache changed though reported current")
    rgb = read_mean_file(path.parent / "mean.json").rgb()[0]
    if not np.allclose(rgb, bgr[::-1], rtol=0, atol=1e-9):
        problems.append(f"mean.json {rgb} is not the input's mean {bgr[::-1]}")
    return ("leak", "; ".join(problems[:5])) if problems else ("ok", "")


def main() -> None:
    mode, files = sys.argv[1], sys.argv[2:]
    check = check_update_mean if mode == "update-mean" else check_loads
    for name in files:
        try:
            outcome, detail = check(Path(name))
        except AlexnetPipeError as exc:  # the CLI prints it as one line, exit 1
            outcome, detail = ("multiline" if "\n" in str(exc) else "refused"), str(exc)[:300]
        except BaseException:  # noqa: BLE001 -- anything else is what the fuzz looks for
            outcome, detail = "crash", traceback.format_exc()[-2000:]
        print(json.dumps({"file": name, "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    main()
