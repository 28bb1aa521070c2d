"""tools/gpu_levers.py on the CPU (every row a real measurement, or skipped with its reason), and
train --compile's graph count over epochs with a partial last batch (issue 19)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet_pipe.apps.synthetic import SynthConfig, make_image_tree
from alexnet_pipe.config import ConvertConfig, ImageSettings, TrainConfig
from alexnet_pipe.convert.job import run_convert

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_levers.py"
CROP = 67


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """4 classes of drawn shapes, 6 train (an epoch of 24) and 2 val each, short side 72 >= the
    crop, so the loader decodes only the crop window (ROI)."""
    root = tmp_path_factory.mktemp("levers")
    make_image_tree(SynthConfig(root / "raw", 6, 2, (96, 72), ("circle", "square", "hstripes", "vstripes"), seed=3))
    run_convert(ConvertConfig(src=root / "raw", dst=root / "data", formats=("lmdb",), workers=1, progress=False,
                              image=ImageSettings(short_side=72)))
    return root / "data"


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_levers", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_levers_run_on_the_cpu_every_row_measured_against_the_same_run_default(shapes, tmp_path):
    """The command gpu_check.sh runs, with -b cpu on tiny data: every row of the plan is there,
    measured (img/s > 0, its ratio to its own kind's default row of this run) or, for the
    GPU-only levers, skipped as such; the settings each row claims are the loader's own."""
    out = tmp_path / "levers.json"
    res = subprocess.run([sys.executable, str(TOOL), str(shapes), "-o", str(out), "--budget-s", "600", "-b", "cpu",
                          "--steps", "1", "--warmup", "1", "--min-seconds", "0", "-z", "2", "--crop", str(CROP)],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    planned = [lv.name for lv in _tool().plan([0.9, 1.0], [8, 12], 2)]
    assert list(rows) == planned and len(planned) == 25
    assert doc["backend"] == "cpu" and doc["compile_backend"] == "aot_eager"
    defaults = {r["kind"]: r for r in doc["rows"] if r["default"]}
    assert sorted(defaults) == ["e2e", "loader", "lrn", "model"]
    for r in doc["rows"]:
        if r["status"].startswith("skipped: GPU only"):
            assert r["kind"] == "loader" and ("hw_decoder_load" in r["lever"] or "threads" in r["lever"])
            assert r["img_per_s"] is None
            continue
        assert r["status"] == "ok", r
        assert r["img_per_s"] > 0 and r["timed_steps"] >= 1 and r["timed_s"] > 0
        assert r["x_default"] == pytest.approx(r["img_per_s"] / defaults[r["kind"]]["img_per_s"])
    assert sum(r["status"] == "ok" for r in doc["rows"]) == 21
    for r in defaults.values():
        assert r["x_default"] == 1.0
    # loader rows: the queue filled at start-up is passed over, and the knobs are the loader's own
    assert rows["loader: default"]["skipped_steps"] == 1 + 2  # --warmup + DALI's prefetch depth
    assert rows["loader: default"]["loader"]["roi_decode"] is True
    assert rows["loader: default"]["loader"]["read_workers"] == 0  # what train -b cpu uses
    assert rows["loader: full decode (no ROI)"]["loader"]["roi_decode"] is False
    assert rows["e2e: full decode (no ROI)"]["loader"]["roi_decode"] is False
    assert rows["loader: 4 channels (pad_output)"]["loader"]["pad_channels"] is True
    assert rows["e2e: conv1 4 channels (pad_output)"]["settings"]["input_channels"] == 4
    assert rows["loader: batch 4"]["settings"]["batch_size"] == 4
    assert rows["e2e: batch 4 + torch.compile"]["settings"]["compile"] is True
    assert rows["lrn: torch.compile"]["settings"]["compile_backend"] == "aot_eager"
    # compiled once per model, in the untimed warm-up; the e2e rows run the model rows' compiled steps
    assert (rows["model: torch.compile"]["graphs_compiled"]
            == rows["model: batch 4 + torch.compile"]["graphs_compiled"] == 1)
    assert rows["e2e: torch.compile"]["graphs_compiled"] == rows["e2e: batch 4 + torch.compile"]["graphs_compiled"] == 0
    assert rows["lrn: nn.LocalResponseNorm"]["shapes"] == {"norm1": [96, 7, 7], "norm2": [256, 3, 3]}
    assert "e2e: default" in res.stdout


def test_budget_and_failures_are_recorded_not_fatal(shapes, tmp_path, monkeypatch):
    """A row that fails records its error and the next one still runs (exit 1); compile rows are
    skipped when less than their compile time is left; once --budget-s is spent, the rest are
    skipped with a note. The file holds every row of the plan."""
    tool = _tool()
    lever = tool.Lever
    monkeypatch.setattr(tool, "plan", lambda *a: [
        lever("loader: default", "loader", "default"),
        lever("loader: broken", "loader", "broken", loader={"no_such_setting": 1}),
        lever("loader: full decode (no ROI)", "loader", "roi_decode off", loader={"roi_decode": False}),
        lever("model: torch.compile", "model", "compile", compile=True),
    ])
    out = tmp_path / "levers.json"
    args = [str(shapes), "-o", str(out), "-b", "cpu", "--steps", "1", "--min-seconds", "0", "-z", "2",
            "--crop", str(CROP)]
    assert tool.main([*args, "--budget-s", "300", "--compile-s", "1e6"]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows[:3]] == ["ok", "failed", "ok"]
    assert "no_such_setting" in rows[1]["error"] and rows[1]["img_per_s"] is None
    assert rows[2]["x_default"] == pytest.approx(rows[2]["img_per_s"] / rows[0]["img_per_s"])
    assert rows[3]["status"].startswith("skipped:") and "compilation needs" in rows[3]["status"]
    assert tool.main([*args, "--budget-s", "0"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["status"] == "skipped: budget (--budget-s 0) spent" for r in rows)


def _count_graphs(monkeypatch, cfg: TrainConfig, *, compile_block=None) -> int:
    """Graphs dynamo compiles over a whole `fit` (every torch.compile made with backend "eager":
    tracing only, so counting takes seconds on the CPU)."""
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: real(model, **{**kw, "backend": "eager"}))
    if compile_block is not None:
        import alexnet_pipe.model.compiled as model_mod

        monkeypatch.setattr(model_mod, "compile_fixed_batch", compile_block)
    from alexnet_pipe.train.loop import fit

    torch._dynamo.reset()
    counters.clear()
    try:
        res = fit(cfg)
        assert len(res.history) == cfg.epochs
        return counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("batch", [10, 4])
def test_compile_makes_one_graph_for_training_and_one_for_evaluation(shapes, monkeypatch, tmp_path, batch):
    """train --compile over 3 epochs of 24 images with a validation pass of 8 after each: two
    graphs (train, eval), both at the full batch, at -z 10 (steps of 10, 10, 4; one partial val
    batch of 8) as at -z 4 (no partial batch). Compiled as it was before (torch.compile alone),
    measured with torch 2.13: -z 10 compiles 4 graphs (train; a dynamic-batch one for the partial
    batch, the first epoch; eval; eval again for the val loader's first batch, made outside
    inference mode), -z 4 three; none after the second epoch."""
    cfg = TrainConfig(data_dir=shapes, backend="cpu", datatype="f32", crop=CROP, batch_size=batch, epochs=3,
                      lr=0.001, lr_scale="none", progress=False, data_threads=1, compile=True,
                      save_path=tmp_path / "w.pt")
    assert _count_graphs(monkeypatch, cfg) == 2
    if batch == 10:
        plain = _count_graphs(monkeypatch, cfg,
                              compile_block=lambda model, batch_size, **kw: torch.compile(model, **kw))
        assert plain > 2
