"""`alexnet-pipe benchmark`: the seed's timing method against a same-run plain-PyTorch baseline.

Method (neon model zoo, ANCHORS.md): one minibatch (default 128 x 3 x 224 x 224), the training
step run ``iterations`` times (default 12), the first ``warmup`` (2) dropped, the mean of the rest
reported for fprop (forward + loss), bprop, update and the whole iteration; then img/s over
``throughput_steps`` back-to-back steps. The baseline is the same network as plain PyTorch runs
it (fp32, NCHW, eager, default SGD), measured in the same process, so ratios are fair on any
machine.

With ``data_dir`` an end-to-end row: the loader ``train`` builds (the same read workers, DALI
threads, prefetch and decoding settings, through ``Runtime.loader_config``) feeding train's own
step (``train.step_loss``, a GradScaler with f16), over as many epochs as it takes: the batches
queued while the loader started are passed over with the warm-up, then ``throughput_steps`` steps
(and at least ``min_seconds``) are timed. With ``loader_dir`` the same loader alone against a PIL
DataLoader on every core this process may use, each timed only once its start-up queue is drained
(its steady rate, not a queue being emptied).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet_pipe.config import default_read_workers, default_workers
from alexnet_pipe.errors import ConfigError, InputError
from alexnet_pipe.model.alexnet import AlexNet, AlexNetConfig, compile_fixed_batch, param_groups

PIL_PREFETCH = 2  # the PIL DataLoader's prefetch_factor (torch's default): batches queued per worker


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
    from alexnet_pipe.train.loop import step_loss, update

    def step(batch) -> None:
        with autocast():
            loss, _, _ = step_loss(run(batch.images), batch, 1)
        update(loss, opt, scaler)

    return step


def device_of(cfg: BenchConfig) -> torch.device:
    return torch.device("cuda", cfg.device_id) if cfg.backend == "gpu" else torch.device("cpu")


def syncer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def train_config(cfg: BenchConfig, data_dir: Path):
    """The TrainConfig `train -b <backend>` would run with on ``data_dir``, for these settings."""
    from alexnet_pipe.config import TrainConfig

    threads = {"data_threads": cfg.data_threads} if cfg.data_threads else {}
    return TrainConfig(data_dir=data_dir, backend=cfg.backend, device_id=cfg.device_id, datatype=cfg.datatype,
                       batch_size=cfg.batch_size, crop=cfg.crop, channels_last=cfg.channels_last, rng_seed=cfg.seed,
                       progress=False, read_workers=cfg.read_workers, compile=cfg.compile, **threads)


def open_train_loader(cfg: BenchConfig, data_dir: Path, **overrides):
    """(Loader, Runtime): exactly the train loader ``fit`` builds for epoch 0 (through
    ``Runtime.loader_config``), with ``overrides`` of LoaderConfig fields (the levers)."""
    from alexnet_pipe.loading.pipeline import Loader
    from alexnet_pipe.train.runtime import open_run

    rt = open_run(train_config(cfg, data_dir))
    lcfg = rt.loader_config("train", True)
    if overrides:
        lcfg = replace(lcfg, **overrides)
    return Loader(rt.ds, lcfg, 0), rt


def queued_batches(lcfg) -> int:
    """Batches a DALI loader has ready or in flight right after it starts: the pipeline's prefetch
    queue, plus the external source's own queue with reader processes."""
    from alexnet_pipe.loading.pipeline import source_queue_depth

    return lcfg.prefetch + (source_queue_depth(lcfg) if lcfg.read_workers else 0)


class Epochs:
    """Batches over as many epochs as are asked for: each pass of ``passes()`` is one epoch;
    ``epochs`` counts the passes begun."""

    def __init__(self, passes: Callable[[], Iterable]):
        self.passes, self.epochs = passes, 0

    def __iter__(self) -> Iterator:
        while True:
            self.epochs += 1
            got = 0
            for item in self.passes():
                got += 1
                yield item
            if not got:
                raise InputError("the data set yields no training batches")


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
    from alexnet_pipe.loading.pipeline import Batch

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


def time_end_to_end(cfg: BenchConfig, device: torch.device) -> dict:
    """img/s of train's loader feeding train's step, in its steady state: the loader's start-up
    queue and ``warmup`` steps untimed, then ``throughput_steps`` steps over as many epochs as
    that takes."""
    loader, rt = open_train_loader(cfg, cfg.data_dir)
    try:
        epochs = Epochs(lambda: loader)
        train = trainer(replace(cfg, num_classes=rt.ds.num_classes), device)
        rate = e2e_rate(cfg, device, iter(epochs), cfg.warmup + queued_batches(loader.cfg), train)
    finally:
        loader.close()
    return {"name": "end to end: DALI train pipeline + this config", "kind": "e2e", "baseline": False, **rate,
            "epochs": epochs.epochs, "steps_per_epoch": len(loader), "loader": loader.cfg.knobs()}


class _PILRecords(torch.utils.data.Dataset):
    """The loader users write first: a record per item, PIL decode, random crop, flip, mean subtracted."""

    def __init__(self, root: Path, crop: int):
        from alexnet_pipe.dataset.manifest import load_dataset
        from alexnet_pipe.dataset.mean import load_dataset_mean
        from alexnet_pipe.dataset.records import record_table

        ds = load_dataset(root)
        self.table = record_table(ds, "train", "lmdb" if "lmdb" in ds.formats else "recordio")
        self.mean = torch.tensor(load_dataset_mean(root).rgb()[0], dtype=torch.float32).view(3, 1, 1)
        self.crop, self.reader = crop, None

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        import io
        import random

        import numpy as np
        from PIL import Image

        from alexnet_pipe.dataset.records import RecordReader

        if self.reader is None:  # opened in each worker process, after the fork
            self.reader = RecordReader(self.table)
        jpeg, label = self.reader.read(i)
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        c = self.crop
        x, y = random.randint(0, max(0, img.width - c)), random.randint(0, max(0, img.height - c))
        img = img.crop((x, y, x + c, y + c))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) - self.mean, label


def _pil_rate(cfg: BenchConfig, device: torch.device, workers: int) -> dict:
    """The PIL DataLoader's steady rate: its ``workers x PIL_PREFETCH`` batches queued at start-up
    and ``warmup`` more are consumed untimed. Its workers end with this call."""
    data = torch.utils.data.DataLoader(_PILRecords(cfg.loader_dir, cfg.crop), batch_size=cfg.batch_size,
                                       shuffle=True, num_workers=workers, prefetch_factor=PIL_PREFETCH,
                                       pin_memory=device.type == "cuda", persistent_workers=True)
    epochs = Epochs(lambda: data)
    rate = steady_rate(iter(epochs), lambda b: b[0].to(device, non_blocking=True), lambda b: b[0].shape[0],
                       skip=cfg.warmup + workers * PIL_PREFETCH, steps=cfg.throughput_steps,
                       min_seconds=cfg.min_seconds, sync=syncer(device))
    return {**rate, "epochs": epochs.epochs}


def time_loaders(cfg: BenchConfig, device: torch.device) -> list[dict]:
    """The train pipeline alone (train's settings) against a torch DataLoader (PIL, one worker per
    core), same shards, same run, the same cores visible to both; each at its steady rate."""
    cores = default_workers()
    base = _pil_rate(cfg, device, cores)
    gc.collect()  # the DataLoader's worker processes end here, before our loader is timed
    loader, _ = open_train_loader(cfg, cfg.loader_dir)
    try:
        epochs = Epochs(lambda: loader)
        ours = steady_rate(iter(epochs), lambda b: b.images, lambda b: b.labels.shape[0],
                           skip=cfg.warmup + queued_batches(loader.cfg), steps=cfg.throughput_steps,
                           min_seconds=cfg.min_seconds, sync=syncer(device))
        ours["epochs"] = epochs.epochs
    finally:
        loader.close()
    knobs = loader.cfg.knobs()
    how = (f"{knobs['data_threads']} DALI threads, {knobs['read_workers']} read workers"
           f"{', ROI decode' if knobs.get('roi_decode') else ', full decode'}")
    return [{"name": f"loader baseline: torch DataLoader, PIL decode, random crop + flip, {cores} workers",
             "kind": "loader", "baseline": True, **base, "x_baseline": 1.0, "cores": cores, "workers": cores},
            {"name": "loader: DALI train pipeline", "kind": "loader", "baseline": False, **ours,
             "x_baseline": ours["img_per_s"] / base["img_per_s"], "cores": cores, "settings": how, "loader": knobs}]


def check_device(cfg: BenchConfig) -> None:
    """Raise, with the fix, when ``-b gpu`` is asked for and torch has no such CUDA device."""
    from alexnet_pipe.train.runtime import torch_device

    torch_device(cfg.backend, cfg.device_id)


def run_benchmark(cfg: BenchConfig) -> list[dict]:
    """Rows: the plain-PyTorch baseline first, then this configuration (and end to end)."""
    check_device(cfg)
    device = device_of(cfg)
    if device.type == "cuda":
        # CUDA events and streams belong to the current device: without this, with -i N the
        # timers would record on GPU 0 while the model runs on GPU N.
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    baseline = replace(cfg, datatype="f32", channels_last=False, fused=False, compile=False)
    rows = [time_steps(baseline, device, "baseline: plain PyTorch, fp32, NCHW, eager, SGD")]
    desc = f"alexnet-pipe: {cfg.datatype}, {'channels_last' if cfg.channels_last else 'NCHW'}"
    desc += ", fused SGD" if cfg.fused and device.type == "cuda" else ""
    desc += ", torch.compile" if cfg.compile else ", eager"
    rows.append(time_steps(cfg, device, desc))
    if cfg.data_dir is not None:
        rows.append(time_end_to_end(cfg, device))
    base = rows[0]["img_per_s"]
    for row in rows:
        row["x_baseline"] = row["img_per_s"] / base
    if cfg.loader_dir is not None:
        rows += time_loaders(cfg, device)  # ratios against their own baseline
    return rows


def format_rows(rows: list[dict], cfg: BenchConfig, device: str) -> str:
    head = (f"batch {cfg.batch_size} x 3 x {cfg.crop} x {cfg.crop}, {cfg.iterations} runs, first {cfg.warmup} "
            f"dropped, mean of the rest; img/s over {cfg.throughput_steps} steps; {device}")
    lines = [head, "", "| configuration | fprop ms | bprop ms | update ms | iteration ms | img/s | x baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("fprop_ms", "bprop_ms", "update_ms", "iteration_ms")]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['img_per_s']:,.0f} | {r['x_baseline']:.2f} |")
    return "\n".join(lines)
