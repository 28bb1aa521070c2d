"""The training benchmark runs the seed's method on the CPU and reports against its baseline."""

from __future__ import annotations

import pytest
import torch

from alexnet_pipe.bench import BenchConfig, format_rows, run_benchmark
from alexnet_pipe.errors import TrainingError


def test_benchmark_rows_on_cpu():
    cfg = BenchConfig(backend="cpu", batch_size=2, crop=67, num_classes=10, iterations=3, warmup=1, throughput_steps=2)
    rows = run_benchmark(cfg)
    assert [r["name"].split(":")[0] for r in rows] == ["baseline", "alexnet-pipe"]
    assert rows[0]["x_baseline"] == 1.0
    assert [(r["kind"], r["baseline"]) for r in rows] == [("model", True), ("model", False)]
    for row in rows:
        assert 0 < row["fprop_ms"] < row["iteration_ms"] and row["bprop_ms"] > 0 and row["update_ms"] > 0
        # the iteration is the three phases back to back
        assert row["iteration_ms"] == pytest.approx(row["fprop_ms"] + row["bprop_ms"] + row["update_ms"], rel=0.05)
        assert row["img_per_s"] > 0
    table = format_rows(rows, cfg, "CPU")
    assert "| baseline: plain PyTorch, fp32, NCHW, eager, SGD |" in table


def test_benchmark_rejects_too_few_iterations():
    with pytest.raises(ValueError, match="must exceed warmup"):
        BenchConfig(iterations=2, warmup=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_benchmark_on_gpu_without_one_says_use_cpu():
    with pytest.raises(TrainingError, match="-b gpu was asked for but torch sees no CUDA device; use -b cpu"):
        run_benchmark(BenchConfig(backend="gpu", iterations=3, warmup=1))
