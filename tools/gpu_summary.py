#!/usr/bin/env python3
"""The JSON side of tools/gpu_check.sh: the machine's description, and one summary of every figure.

    python tools/gpu_summary.py env OUT [--backend cpu]   write OUT/env.json (device, driver, CUDA,
                                                          torch, DALI, lmdb, simplejpeg, date)
    python tools/gpu_summary.py collect OUT   write OUT/summary.json from OUT/steps.json and the outputs

env exits 1 when torch sees no GPU (unless --backend cpu, the CPU rehearsal) or when DALI, lmdb or
simplejpeg (the offline bundle) does not import. collect merges: the steps (name, status, exit code,
seconds, cap, log, note), env.json, the benchmark rows (bench.jsonl), the levers against the
same-run default (levers.json), the DALI sweep (sweep.json), the GPU tests (pytest.xml: passed /
failed / skipped and the failing test names), test's metrics (test.jsonl), the number of
predictions (predict.json) and the training runs' last metrics (train*.jsonl, finetune.jsonl). A
missing or unreadable output is named in "missing", never fatal: the summary must exist whatever
failed. Only the standard library at module level: collect must work where nothing else imports.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def env(out: Path, backend: str = "gpu") -> int:
    """The machine and versions; exit 1 when torch sees no GPU (with backend gpu) or the bundle does not import."""
    from alexnet_pipe.loading.wheels import driver_major

    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "host_cpus": _run(["nproc"]), "python": platform.python_version(), "nvidia_smi": smi,
                  "driver_branch": driver_major(smi), "git": _run(["git", "rev-parse", "HEAD"]),
                  "cuda_driver": (_run(["nvidia-smi"]).split("CUDA Version:")[-1].split()[:1] or [None])[0],
                  "backend": backend}
    ok = True
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count())
        elif backend == "gpu":
            ok = False
    except Exception as exc:  # report, don't stop: the summary is the point
        info["torch_error"], ok = str(exc)[:300], False
    for key, module in (("dali", "nvidia.dali"), ("lmdb", "lmdb"), ("simplejpeg", "simplejpeg")):
        try:  # the offline bundle's three
            info[key] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as exc:
            info[f"{key}_error"], ok = f"{type(exc).__name__}: {str(exc)[:300]}", False
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(info))
    return 0 if ok else 1


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pytest(path: Path) -> dict:
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    res = {"passed": 0, "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            res["failed"].append(name)
        elif case.find("skipped") is not None:
            res["skipped"].append(name)
        else:
            res["passed"] += 1
    return res


def _levers(path: Path) -> list[dict]:
    """tools/gpu_levers.py's rows: a JSON list (or {"rows": [...]}) of {"name", "img_per_s", "x_default", ...}."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    rows = rows["rows"] if isinstance(rows, dict) else rows
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise ValueError("not a list of rows with a name")
    return rows


def _predict(path: Path) -> dict:
    """predict --json: how many images were predicted and how many could not be read."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return {"images": len(rows), "errors": sum(1 for r in rows if "error" in r)}


def collect(out: Path) -> int:
    """summary.json: the steps and every figure; exit 1 when a step did not succeed."""
    summary: dict = {"missing": []}
    readers = {"steps": ("steps.json", lambda p: json.loads(p.read_text(encoding="utf-8"))),
               "env": ("env.json", lambda p: json.loads(p.read_text(encoding="utf-8"))),
               "benchmark": ("bench.jsonl", _jsonl),
               "levers": ("levers.json", _levers),
               "sweep": ("sweep.json", lambda p: json.loads(p.read_text(encoding="utf-8"))["rows"]),
               "gpu_tests": ("pytest.xml", _pytest),
               "test": ("test.jsonl", _jsonl),
               "predict": ("predict.json", _predict)}
    for key, (name, read) in readers.items():
        try:
            summary[key] = read(out / name)
        except Exception as exc:  # absent because its step failed or was skipped
            summary["missing"].append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
    for path in sorted(out.glob("train*.jsonl")) + sorted(out.glob("finetune.jsonl")):
        try:
            summary.setdefault("training", {})[path.stem] = _jsonl(path)[-3:]
        except Exception as exc:
            summary["missing"].append(f"{path.name}: {type(exc).__name__}: {str(exc)[:200]}")
    steps = summary.get("steps", {}).get("steps", [])
    summary["failed_steps"] = [s["name"] for s in steps if s["status"] not in ("ok", "na")]  # na: not in this mode
    summary["ok"] = bool(steps) and not summary["failed_steps"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0 if summary["ok"] else 1


def main(argv: list[str]) -> int:
    backend = "gpu"
    if len(argv) == 4 and argv[0] == "env" and argv[2] == "--backend" and argv[3] in ("gpu", "cpu"):
        argv, backend = argv[:2], argv[3]
    if len(argv) != 2 or argv[0] not in ("env", "collect"):
        print("usage: gpu_summary.py env OUT [--backend gpu|cpu] | gpu_summary.py collect OUT", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    return env(out, backend) if argv[0] == "env" else collect(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
