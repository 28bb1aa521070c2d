"""The training benchmark runs the seed's method on the CPU and reports against its baseline."""

from __future__ import annotations

import pytest
import torch

from alexnet_pipe.apps.benchmark import format_rows, run_benchmark
from alexnet_pipe.apps.step_timing import BenchConfig
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


def test_read_workers_default_is_trains():
    """The benchmark's loader gets the read workers `train -b <backend>` gets (one shared rule)."""
    from dataclasses import replace

    from alexnet_pipe.config import default_read_workers

    assert BenchConfig(backend="cpu").read_workers == default_read_workers("cpu") == 0
    assert BenchConfig(backend="gpu").read_workers == default_read_workers("gpu") >= 1
    assert BenchConfig(backend="gpu", read_workers=0).read_workers == 0
    assert replace(BenchConfig(backend="cpu", read_workers=3), batch_size=4).read_workers == 3
    with pytest.raises(ValueError, match="read workers"):
        BenchConfig(read_workers=-1)


def test_steady_rate_times_only_after_the_skipped_batches():
    """The first ``skip`` batches are consumed untimed (a queue filled at start-up empties there);
    then at least ``steps`` batches and ``min_seconds`` are timed."""
    import time

    from alexnet_pipe.apps.step_timing import steady_rate

    consumed = []

    def consume(b):
        consumed.append(b)
        time.sleep(0.0 if b < 5 else 0.01)  # 5 queued batches come at once, then the steady rate

    rate = steady_rate(iter(range(1000)), consume, lambda b: 2, skip=5, steps=4, min_seconds=0.05)
    assert consumed[:5] == [0, 1, 2, 3, 4] and rate["skipped_steps"] == 5
    assert rate["timed_steps"] == len(consumed) - 5 >= 4 and rate["timed_s"] >= 0.05
    assert rate["timed_images"] == 2 * rate["timed_steps"]
    assert rate["img_per_s"] == pytest.approx(rate["timed_images"] / rate["timed_s"])
    assert rate["img_per_s"] < 2 / 0.01  # no batch of the queue counted
    cut = steady_rate(iter(range(1000)), consume, lambda b: 2, skip=0, steps=10**6, max_seconds=0.05)
    assert cut["cut_short"] and cut["timed_steps"] < 10**6


def test_end_to_end_is_trains_step_over_several_epochs(tmp_path, raw_tree):
    """-w: train's loader and step in their steady state: the loader's start-up queue passed over,
    then more steps than an epoch holds (epochs pass)."""
    from alexnet_pipe.apps.benchmark import time_end_to_end
    from alexnet_pipe.config import ConvertConfig
    from alexnet_pipe.convert.job import run_convert

    run_convert(ConvertConfig(src=raw_tree, dst=tmp_path / "data", formats=("lmdb",), workers=1, progress=False))
    cfg = BenchConfig(backend="cpu", batch_size=4, crop=67, iterations=2, warmup=1, throughput_steps=7,
                      data_dir=tmp_path / "data")
    row = time_end_to_end(cfg, torch.device("cpu"))
    assert row["steps_per_epoch"] == 5  # 18 records: 4 + 4 + 4 + 4 + 2
    assert row["skipped_steps"] == 1 + 2  # warm-up + DALI's prefetch queue
    assert row["timed_steps"] == 7 and row["epochs"] == 2  # 10 steps: two whole epochs
    assert row["grad_scaler"] is False and row["img_per_s"] > 0
    assert row["loader"]["read_workers"] == 0 and row["loader"]["roi_decode"] is True


def test_f16_steps_use_a_grad_scaler_as_train_does():
    """-d f16: the benchmark's step scales the loss with a GradScaler (train's), and it steps."""
    from alexnet_pipe.apps.step_timing import model_rate, trainer

    cfg = BenchConfig(backend="cpu", batch_size=2, crop=67, num_classes=3, datatype="f16", iterations=1, warmup=0,
                      throughput_steps=1)
    train = trainer(cfg, torch.device("cpu"))
    assert isinstance(train.scaler, torch.amp.GradScaler)
    assert train.scaler._scale is None  # made lazily, by the first scale()
    row = model_rate(cfg, torch.device("cpu"), train)
    assert row["grad_scaler"] is True and row["timed_steps"] == 1
    assert train.scaler._scale is not None  # the step scaled its loss (and stepped through the scaler)
    assert trainer(BenchConfig(backend="cpu", batch_size=2, crop=67, num_classes=3, datatype="bf16", iterations=1,
                               warmup=0), torch.device("cpu")).scaler is None
