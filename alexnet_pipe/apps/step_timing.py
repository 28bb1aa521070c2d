"""How fast train's step runs, and the timing loop every img/s figure of the benchmarks uses.

``BenchConfig`` (the ``benchmark`` command's settings: every row is set up from it, so it sits here,
below ``apps/benchmark.py``), the device it names; the seed's fprop/bprop/update timing of one
random minibatch (``time_steps``); train's own step as the benchmarks run it (``trainer``,
``train_step``) and its rate alone (``model_rate``) or fed by a loader (``e2e_rate``); and
``steady_rate``, warm-up untimed then at least N steps and S seconds timed, which the loader rows
(``apps/benchmark.py``) and tools/gpu_levers.py time with too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet_pipe.config import default_read_workers
from alexnet_pipe.errors import ConfigError
from alexnet_pipe.model.alexnet import AlexNet, AlexNetConfig
from alexnet_pipe.model.compiled import compile_fixed_batch
from alexnet_pipe.model.params import param_groups


@dataclass(frozen=True)
class BenchConfig:
    backend: str = "cpu"
    device_id: int = 0
    batch_size: int = 128
    crop: int = 224
    num_classes: int = 1000
    datatype: str = "f32"  # f32 / bf16 / f16 (autocast; f16 with a GradScaler, as train)
    channels_last: bool = True
    fused: bool = True  # fused SGD (CUDA only)
    compile: bool = False
    compile_backend: str | None = None  # None: torch.compile's default (inductor)
    iterations: int = 12
    warmup: int = 2
    throughput_steps: int = 50
    data_dir: Path | None = None  # add an end-to-end row: DALI reading this dataset
    loader_dir: Path | None = None  # add loader rows: our train pipeline alone against a PIL DataLoader
    seed: int = 0
    # The loader's processes and threads; None: what `train -b <backend>` uses (config.default_read_workers,
    # TrainConfig's data_threads).
    read_workers: int | None = None
    data_threads: int | None = None
    min_seconds: float = 0.0  # end to end and loaders: also time at least this long

    def __post_init__(self) -> None:
        if self.iterations <= self.warmup:
            raise ConfigError(f"iterations ({self.iterations}) must exceed warmup ({self.warmup})")
        if self.backend not in ("gpu", "cpu"):
            raise ConfigError(f"backend must be gpu or cpu, got {self.backend}")
        if self.datatype not in ("f32", "bf16", "f16"):
            raise ConfigError(f"datatype must be f32, bf16 or f16, got {self.datatype}")
        if self.throughput_steps < 1 or self.warmup < 0 or self.min_seconds < 0:
            raise ConfigError("throughput_steps must be >= 1, warmup and min_seconds >= 0")
        if self.read_workers is None:  # frozen: resolved once, so replace() keeps the value
            object.__setattr__(self, "read_workers", default_read_workers(self.backend))
        if self.read_workers < 0:
            raise ConfigError(f"read workers must be >= 0, got {self.read_workers}")


def device_of(cfg: BenchConfig) -> torch.device:
    return torch.device("cuda", cfg.device_id) if cfg.backend == "gpu" else torch.device("cpu")


def syncer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def check_device(cfg: BenchConfig) -> None:
    """Raise, with the fix, when ``-b gpu`` is asked for and torch has no such CUDA device."""
    from alexnet_pipe.train.runtime import torch_device

    torch_device(cfg.backend, cfg.device_id)


class _Clock:
    """Elapsed milliseconds between marks: CUDA events on the GPU (no sync inside a step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _setup(cfg: BenchConfig, device: torch.device, **model_kw):
    """The model (``model_kw``: AlexNet's speed options), what runs it (compiled or not), the
    optimizer and autocast, built as ``train`` builds them."""
    model = AlexNet(AlexNetConfig(num_classes=cfg.num_classes, crop=cfg.crop),
                    generator=torch.Generator().manual_seed(cfg.seed), **model_kw).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fused = cfg.fused and device.type == "cuda"
    opt = torch.optim.SGD(param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9, fused=fused or None)
    backend = {"backend": cfg.compile_backend} if cfg.compile_backend else {}
    run = compile_fixed_batch(model, cfg.batch_size, **backend) if cfg.compile else model
    amp = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[cfg.datatype]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    return model, run, opt, autocast


def grad_scaler(cfg: BenchConfig, device: torch.device):
    """train's: a GradScaler with -d f16, none otherwise."""
    return torch.amp.GradScaler(device.type) if cfg.datatype == "f16" else None


def train_step(run, opt, autocast, scaler) -> Callable:
    """``step(batch)``: one training step as ``train.train_one_epoch`` takes it (its loss, with
    padding masked, and the GradScaler when there is one), without its bookkeeping."""
    from alexnet_pipe.train.epoch import step_loss, update

    def step(batch) -> None:
        with autocast():
            loss, _, _ = step_loss(run(batch.images), batch, 1)
        update(loss, opt, scaler)

    return step


def steady_rate(batches: Iterator, consume: Callable, count: Callable, *, skip: int, steps: int,
                min_seconds: float = 0.0, max_seconds: float | None = None,
                sync: Callable[[], None] = lambda: None) -> dict:
    """img/s of ``consume(batch)`` over ``batches``: the first ``skip`` batches (warm-up, and the
    queue filled while the loader started) are consumed untimed, then at least ``steps`` batches
    and ``min_seconds`` are timed (fewer when ``max_seconds`` runs out: ``cut`` says so).
    ``count(batch)`` is its number of images."""
    for _ in range(skip):
        consume(next(batches))
    sync()
    seen = done = 0
    cut = False
    start = time.perf_counter()
    while True:
        batch = next(batches)
        consume(batch)
        seen += count(batch)
        done += 1
        elapsed = time.perf_counter() - start
        if done >= steps and elapsed >= min_seconds:
            break
        if max_seconds is not None and elapsed >= max_seconds:
            cut = True
            break
    sync()
    seconds = time.perf_counter() - start
    return {"img_per_s": seen / seconds, "timed_steps": done, "timed_images": seen, "timed_s": seconds,
            "skipped_steps": skip, **({"cut_short": True} if cut else {})}


def time_steps(cfg: BenchConfig, device: torch.device, name: str) -> dict:
    """The seed's fprop/bprop/update/iteration means and a throughput figure, for one config."""
    model, run, opt, autocast = _setup(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.crop, cfg.crop, generator=gen).mul_(50).to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)
    scaler = torch.amp.GradScaler(device.type) if cfg.datatype == "f16" else None
    clock = _Clock(device)
    marks = []

    def step(record: bool) -> None:
        t0 = clock.mark() if record else None
        with autocast():
            loss = F.cross_entropy(run(x).float(), y)
        t1 = clock.mark() if record else None
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        t2 = clock.mark() if record else None
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        t3 = clock.mark() if record else None
        if record:
            marks.append((t0, t1, t2, t3))

    model.train()
    for _ in range(cfg.iterations):
        step(True)
        clock.sync()
    kept = marks[cfg.warmup:]
    parts = [[clock.ms(a, b) for a, b in ((m[0], m[1]), (m[1], m[2]), (m[2], m[3]), (m[0], m[3]))] for m in kept]
    fprop, bprop, update, iteration = (statistics.fmean(p[i] for p in parts) for i in range(4))
    clock.sync()
    start = time.perf_counter()
    for _ in range(cfg.throughput_steps):
        step(False)
    clock.sync()
    seconds = time.perf_counter() - start
    return {"name": name, "kind": "model", "baseline": name.startswith("baseline"),
            "fprop_ms": fprop, "bprop_ms": bprop, "update_ms": update, "iteration_ms": iteration,
            "img_per_s": cfg.throughput_steps * cfg.batch_size / seconds}


def batch_images(batch) -> int:
    return batch.labels.shape[0]


@dataclass
class Trainer:
    """A model and train's step over it (``train_step``), built as ``train`` builds them."""

    model: torch.nn.Module
    step: Callable
    scaler: object | None


def trainer(cfg: BenchConfig, device: torch.device, **model_kw) -> Trainer:
    """A fresh model for ``cfg`` (``model_kw``: AlexNet's speed options) and its training step."""
    model, run, opt, autocast = _setup(cfg, device, **model_kw)
    scaler = grad_scaler(cfg, device)
    model.train()
    return Trainer(model, train_step(run, opt, autocast, scaler), scaler)


def e2e_rate(cfg: BenchConfig, device: torch.device, batches: Iterator, skip: int, train: Trainer,
             max_seconds: float | None = None) -> dict:
    """img/s of ``train``'s step fed by ``batches`` (pipeline.Batch), after ``skip`` untimed
    batches (``steady_rate``)."""
    rate = steady_rate(batches, train.step, batch_images, skip=skip, steps=cfg.throughput_steps,
                       min_seconds=cfg.min_seconds, max_seconds=max_seconds, sync=syncer(device))
    return {**rate, "grad_scaler": train.scaler is not None}


def model_rate(cfg: BenchConfig, device: torch.device, train: Trainer, max_seconds: float | None = None) -> dict:
    """img/s of ``train``'s step alone on one random batch (no loader), ``warmup`` steps untimed;
    a model with ``input_channels=4`` gets a zero 4th channel, as the padding pipeline emits."""
    from alexnet_pipe.loading.loader import Batch

    channels = getattr(train.model, "input_channels", 3)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.crop, cfg.crop, generator=gen).mul_(50)
    if channels > 3:
        x = torch.cat([x, x.new_zeros(cfg.batch_size, channels - 3, cfg.crop, cfg.crop)], 1)
    x = x.to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen).to(device)
    batch = Batch(x, y, torch.zeros(cfg.batch_size, dtype=torch.bool), None, cfg.batch_size, 0)
    return e2e_rate(cfg, device, iter(lambda: batch, None), cfg.warmup, train, max_seconds)
