"""tools/gpu_check.sh's control flow, on the CPU: a python stand-in fails or stalls chosen steps.

The stand-in passes `tools/gpu_summary.py collect` to the real interpreter (the summary is real
code), answers the rest by pattern; the script itself, timeout, the JSON it writes are real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STEPS = ["env", "data", "bench", "e2e", "levers", "train", "gpu-tests", "sweep", "train-recordio", "test", "predict",
         "finetune", "bench-compile"]
NEED_DATA = ["e2e", "levers", "train", "sweep", "train-recordio", "test", "predict", "finetune"]


def _fake_bin(tmp: Path, cases: str) -> Path:
    """A PATH folder with nvidia-smi and `fakepy`; ``cases`` are extra `case` arms, first match wins."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'Driver Version: 580.65.06   CUDA Version: 13.0'\n")
    (bin_dir / "fakepy").write_text(f"""#!/usr/bin/env bash
case "$*" in
{cases}
  *"gpu_summary.py collect"*) exec {sys.executable} "$@";;
  *"gpu_summary.py env"*) echo "ran: $*"; echo '{{"device": "fake"}}' > "$OUT/env.json";;
  *"gpu_levers.py"*) echo "ran: $*"; echo '[{{"name": "default", "img_per_s": 2.0, "x_default": 1.0}}]' > "$OUT/levers.json";;
  *"alexnet_pipe predict"*) echo '[{{"path": "a.jpg", "top5": []}}, {{"path": "b.jpg", "error": "bad"}}]';;
  *"alexnet_pipe benchmark"*) echo "ran: $*"; echo '{{"name": "baseline", "kind": "model", "img_per_s": 1.0}}' >> "$OUT/bench.jsonl";;
  *) echo "ran: $*";;
esac
""")  # noqa: E501  the script's case arms stay one per line
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
    assert summary["levers"] == [{"name": "default", "img_per_s": 2.0, "x_default": 1.0}]
    assert not any(m.startswith("levers.json") for m in summary["missing"])
    assert summary["predict"] == {"images": 2, "errors": 1}


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
    cases = '  *make_image_tree*"$WORK/raw 64 8 3"*) exit 1;;\n  *"benchmark -b gpu -o"*) sleep 30;;'
    rc, steps, summary = _run(tmp_path, cases, CAP_BENCH="1")
    assert rc != 0
    status = _status(steps)
    assert status["data"] == "failed"
    assert [status[s] for s in NEED_DATA] == ["skipped"] * len(NEED_DATA)
    assert status["bench"] == "timeout"
    assert status["env"] == status["gpu-tests"] == status["bench-compile"] == "ok"
    bench = next(s for s in steps["steps"] if s["name"] == "bench")
    assert bench["rc"] == 124 and float(bench["seconds"]) < 15
    assert set(summary["failed_steps"]) == {"data", "bench", *NEED_DATA}
    assert any(m.startswith("levers.json") for m in summary["missing"])


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


def test_a_failed_training_skips_test_predict_and_finetune_one_by_one(tmp_path):
    rc, steps, summary = _run(tmp_path, '  *"train -w"*"-e 3"*) exit 4;;')
    status = _status(steps)
    assert status["train"] == "failed"
    assert [status[s] for s in ("test", "predict", "finetune")] == ["skipped"] * 3
    assert status["train-recordio"] == status["bench-compile"] == "ok"
    notes = {s["name"]: s["note"] for s in steps["steps"]}
    assert notes["finetune"] == "needs step train, which did not succeed"


def test_each_step_is_its_own_process_with_its_own_cap(tmp_path):
    # test, predict and finetune used to share one 60 s timeout
    _run(tmp_path)
    out = tmp_path / "out"
    assert "alexnet_pipe test -w" in (out / "test.log").read_text()
    assert json.loads((out / "predict.json").read_text())[0]["path"] == "a.jpg"
    assert "--finetune --freeze conv" in (out / "finetune.log").read_text()
    caps = {s["name"]: s["cap_s"] for s in json.loads((out / "steps.json").read_text())["steps"]}
    assert caps == _script_caps()


def _script_caps() -> dict[str, int]:
    """Each `step NAME CAP NEEDS ...` line of the script: its cap at CAP_SCALE 1."""
    text = (REPO / "tools/gpu_check.sh").read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s*step ([\w-]+) (\d+) ", text, re.M)}


def _script_default(name: str) -> int:
    text = (REPO / "tools/gpu_check.sh").read_text()
    m = re.search(rf"^{name}=(?:\$\{{{name}:-\$\(\()?(\d+)", text, re.M)
    assert m, f"no default for {name} in gpu_check.sh"
    return int(m[1])


def test_the_caps_fit_the_budget_and_the_budget_fits_eight_minutes():
    caps = _script_caps()
    assert list(caps) == STEPS  # every step has a literal cap, in this order
    budget, reserve = _script_default("BUDGET_S"), _script_default("RESERVE_S")
    assert sum(caps.values()) <= budget - reserve, (sum(caps.values()), budget, reserve)
    # 8 minutes on the device with 60 s of unpacking the bundle (5-10 s measured) and 20 s to spare
    assert budget + 60 + 20 <= 8 * 60
    # the figures first: env, data, bench, e2e, levers before anything that only passes or fails
    assert STEPS.index("levers") < STEPS.index("train") < STEPS.index("gpu-tests") < STEPS.index("bench-compile")


def test_cpu_mode_runs_every_step_with_the_cpu_backend_and_says_what_it_changed(tmp_path):
    rc, steps, summary = _run(tmp_path, BACKEND="cpu")
    assert rc == 0, steps
    assert steps["backend"] == "cpu"
    status = _status(steps)
    assert status.pop("bench-compile") == "na"
    assert set(status.values()) == {"ok"}
    assert summary["ok"] is True and summary["failed_steps"] == []
    notes = {s["name"]: s["note"] for s in steps["steps"]}
    assert all(notes[n].startswith("CPU mode") for n in STEPS), notes
    out = tmp_path / "out"
    logs = {n: (out / f"{n}.log").read_text() for n in ("bench", "e2e", "train", "test", "finetune", "sweep")}
    for name in ("bench", "e2e", "train", "test", "finetune"):
        assert "-b cpu" in logs[name] and "-b gpu" not in logs[name], (name, logs[name])
    assert "--cpu" in logs["sweep"]
    assert "--backend cpu" in (out / "env.log").read_text()
    # caps and budget scaled for the slower CPU
    caps = {s["name"]: s["cap_s"] for s in steps["steps"] if s["status"] == "ok"}
    assert caps["bench"] == 6 * _script_caps()["bench"] and steps["budget_s"] == 6 * 400


def test_a_zero_cap_turns_a_step_off_without_failing_the_run(tmp_path):
    rc, steps, summary = _run(tmp_path, CAP_BENCH_COMPILE="0")
    assert rc == 0
    assert _status(steps)["bench-compile"] == "na" and summary["failed_steps"] == []


def test_the_tools_budget_follows_the_steps_limit(tmp_path):
    _run(tmp_path, CAP_LEVERS="100", CAP_SWEEP="40")
    out = tmp_path / "out"
    assert "--budget-s 85" in (out / "levers.log").read_text()
    assert "--budget-s 28" in (out / "sweep.log").read_text()


def test_an_unknown_backend_is_refused(tmp_path):
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "BACKEND": "tpu", "OUT": str(tmp_path / "o"), "WORK": str(tmp_path)})
    assert proc.returncode == 2 and "BACKEND" in proc.stderr
