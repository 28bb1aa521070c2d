"""tools/gpu_check.sh's control flow, on the CPU: a python stand-in fails or stalls chosen steps.

The stand-in passes `tools/gpu_summary.py collect` to the real interpreter (the summary is real
code), answers the rest by pattern; the script itself, timeout, the JSON it writes are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ["env", "data", "gpu-tests", "bench", "sweep", "e2e", "train", "train-recordio", "test-predict", "bench-compile"]


def _fake_bin(tmp: Path, cases: str) -> Path:
    """A PATH folder with nvidia-smi and `fakepy`; ``cases`` are extra `case` arms, first match wins."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Driver Version: 580.65.06   CUDA Version: 13.0'\n")
    (bin_dir / "fakepy").write_text(f"""#!/usr/bin/env bash
case "$*" in
{cases}
  *"gpu_summary.py collect"*) exec {sys.executable} "$@";;
  *"gpu_summary.py env"*) echo '{{"device": "fake"}}' > "$OUT/env.json";;
  *"alexnet_pipe benchmark"*) echo '{{"name": "baseline", "kind": "model", "img_per_s": 1.0}}' >> "$OUT/bench.jsonl";;
  *) echo "ran: $*";;
esac
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _run(tmp: Path, cases: str = "", **env: str) -> tuple[int, dict, dict]:
    bin_dir = _fake_bin(tmp, cases)
    out = tmp / "out"
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": "fakepy", "OUT": str(out),
                "WORK": str(tmp / "work"), **env}
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=120)
    steps = json.loads((out / "steps.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return proc.returncode, steps, summary


def _status(steps: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in steps["steps"]}


def test_all_steps_ok_exits_zero(tmp_path):
    rc, steps, summary = _run(tmp_path)
    assert rc == 0
    assert _status(steps) == dict.fromkeys(STEPS, "ok")
    assert summary["ok"] is True and summary["failed_steps"] == []
    assert summary["env"] == {"device": "fake"}
    assert [r["kind"] for r in summary["benchmark"]] == ["model"] * 3  # bench, e2e, bench-compile


def test_a_failed_step_exits_nonzero_and_the_later_steps_still_run(tmp_path):
    rc, steps, summary = _run(tmp_path, '  *"-m pytest"*) echo "1 failed, 3 passed"; exit 3;;')
    assert rc != 0
    status = _status(steps)
    assert status.pop("gpu-tests") == "failed"
    assert set(status.values()) == {"ok"}  # everything after it ran
    failed = next(s for s in steps["steps"] if s["name"] == "gpu-tests")
    assert failed["rc"] == 3 and failed["note"] == "1 failed, 3 passed"
    assert summary["ok"] is False and summary["failed_steps"] == ["gpu-tests"]
    assert any(m.startswith("pytest.xml") for m in summary["missing"])


def test_dependents_of_a_failed_step_are_skipped_and_a_stalled_step_is_killed(tmp_path):
    cases = '  *make_shapes*) exit 1;;\n  *"benchmark -b gpu -o"*) sleep 30;;'
    rc, steps, summary = _run(tmp_path, cases, CAP_BENCH="1")
    assert rc != 0
    status = _status(steps)
    assert status["data"] == "failed"
    assert [status[s] for s in ("sweep", "e2e", "train", "train-recordio", "test-predict")] == ["skipped"] * 5
    assert status["bench"] == "timeout"
    assert status["env"] == status["gpu-tests"] == status["bench-compile"] == "ok"
    bench = next(s for s in steps["steps"] if s["name"] == "bench")
    assert bench["rc"] == 124 and float(bench["seconds"]) < 15
    assert set(summary["failed_steps"]) == {"data", "sweep", "e2e", "train", "train-recordio", "test-predict", "bench"}


def test_the_summary_exists_even_when_python_fails_everywhere(tmp_path):
    rc, steps, summary = _run(tmp_path, "  *) exit 1;;")
    assert rc != 0
    assert summary["ok"] is False and summary["collect"].startswith("failed")
    assert summary["failed_steps"] == STEPS  # data's dependents as skipped, the rest failed
    assert summary["steps"]["steps"][0]["status"] == "failed"


def test_a_spent_budget_skips_steps_instead_of_overrunning(tmp_path):
    rc, steps, summary = _run(tmp_path, BUDGET_S="20")
    assert rc != 0
    assert set(_status(steps).values()) == {"skipped"}
    assert "time budget" in steps["steps"][0]["note"]
