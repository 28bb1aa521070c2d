"""`alexnet-pipe benchmark`: the seed's timing method against a same-run plain-PyTorch baseline.

Method (neon model zoo, ANCHORS.md): one minibatch (default 128 x 3 x 224 x 224), the training
step run ``iterations`` times (default 12), the first ``warmup`` (2) dropped, the mean of the rest
reported for fprop (forward + loss), bprop, update and the whole iteration; then img/s over
``throughput_steps`` back-to-back steps. The baseline is the same network as plain PyTorch runs
it (fp32, NCHW, eager, default SGD), measured in the same process, so ratios are fair on any
machine. With ``data_dir`` an end-to-end row adds the DALI pipeline feeding the model.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import AlexNet, AlexNetConfig, param_groups


@dataclass(frozen=True)
class BenchConfig:
    backend: str = "cpu"
    device_id: int = 0
    batch_size: int = 128
    crop: int = 224
    num_classes: int = 1000
    datatype: str = "f32"  # f32 / bf16 / f16 (autocast)
    channels_last: bool = True
    fused: bool = True  # fused SGD (CUDA only)
    compile: bool = False
    iterations: int = 12
    warmup: int = 2
    throughput_steps: int = 50
    data_dir: Path | None = None  # add an end-to-end row: DALI reading this dataset
    loader_dir: Path | None = None  # add loader rows: our train pipeline alone against a PIL DataLoader
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations <= self.warmup:
            raise ValueError(f"iterations ({self.iterations}) must exceed warmup ({self.warmup})")
        if self.backend not in ("gpu", "cpu"):
            raise ValueError(f"backend must be gpu or cpu, got {self.backend}")
        if self.datatype not in ("f32", "bf16", "f16"):
            raise ValueError(f"datatype must be f32, bf16 or f16, got {self.datatype}")


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


def _setup(cfg: BenchConfig, device: torch.device):
    model = AlexNet(AlexNetConfig(num_classes=cfg.num_classes, crop=cfg.crop),
                    generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fused = cfg.fused and device.type == "cuda"
    opt = torch.optim.SGD(param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9, fused=fused or None)
    run = torch.compile(model) if cfg.compile else model
    amp = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[cfg.datatype]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    return model, run, opt, autocast


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


def time_end_to_end(cfg: BenchConfig, device: torch.device) -> dict:
    """img/s with the DALI train pipeline feeding the model (one epoch, or throughput_steps)."""
    from .config import TrainConfig
    from .manifest import load_dataset
    from .train import epoch_loader

    ds = load_dataset(cfg.data_dir)
    model, run, opt, autocast = _setup(replace(cfg, num_classes=ds.num_classes), device)
    # Exactly the loader training builds for its first epoch.
    loader = epoch_loader(TrainConfig(data_dir=cfg.data_dir, backend=cfg.backend, device_id=cfg.device_id,
                                      datatype=cfg.datatype, batch_size=cfg.batch_size, crop=cfg.crop,
                                      channels_last=cfg.channels_last, rng_seed=cfg.seed, progress=False), 0)
    clock = _Clock(device)
    seen, start = 0, None
    for i, batch in enumerate(loader):
        if i == cfg.warmup:
            clock.sync()
            start, seen = time.perf_counter(), 0
        with autocast():
            loss = F.cross_entropy(run(batch.images).float(), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += batch.labels.shape[0]
        if i + 1 >= cfg.warmup + cfg.throughput_steps:
            break
    clock.sync()
    if start is None:
        raise ValueError(f"{cfg.data_dir} has too few batches for a warm-up of {cfg.warmup}; lower -z")
    return {"name": "end to end: DALI train pipeline + this config", "kind": "e2e", "baseline": False,
            "img_per_s": seen / (time.perf_counter() - start)}


def _loader_rate(batches, cfg: BenchConfig, device: torch.device) -> float:
    """img/s over up to ``throughput_steps`` batches after ``warmup``, passing over epochs as needed."""
    clock = _Clock(device)
    seen, start, i = 0, None, 0
    while start is None or i < cfg.warmup + cfg.throughput_steps:
        before = i
        for images, _ in batches():
            images.to(device, non_blocking=True)
            if i == cfg.warmup:
                clock.sync()
                start, seen = time.perf_counter(), 0
            seen += images.shape[0]
            i += 1
            if i >= cfg.warmup + cfg.throughput_steps:
                break
        if i == before:
            raise ValueError(f"{cfg.loader_dir} has no training batches")
    clock.sync()
    return seen / (time.perf_counter() - start)


class _PILRecords(torch.utils.data.Dataset):
    """The loader users write first: a record per item, PIL decode, random crop, flip, mean subtracted."""

    def __init__(self, root: Path, crop: int):
        from .manifest import load_dataset
        from .mean import load_dataset_mean
        from .records import record_table

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

        from .records import RecordReader

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


def time_loaders(cfg: BenchConfig, device: torch.device) -> list[dict]:
    """The train pipeline alone against a torch DataLoader (PIL, one worker per core), same shards, same run."""
    import os

    from .config import TrainConfig
    from .train import epoch_loader

    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    data = torch.utils.data.DataLoader(_PILRecords(cfg.loader_dir, cfg.crop), batch_size=cfg.batch_size,
                                       shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=True)
    base = _loader_rate(lambda: iter(data), cfg, device)
    loader = epoch_loader(TrainConfig(data_dir=cfg.loader_dir, backend=cfg.backend, device_id=cfg.device_id,
                                      datatype=cfg.datatype, batch_size=cfg.batch_size, crop=cfg.crop,
                                      channels_last=cfg.channels_last, rng_seed=cfg.seed, progress=False), 0)
    try:
        ours = _loader_rate(lambda: ((b.images, b.labels) for b in loader), cfg, device)
    finally:
        loader.close()
    return [{"name": f"loader baseline: torch DataLoader, PIL decode, random crop + flip, {workers} workers",
             "kind": "loader", "baseline": True, "img_per_s": base, "x_baseline": 1.0},
            {"name": "loader: DALI train pipeline", "kind": "loader", "baseline": False, "img_per_s": ours,
             "x_baseline": ours / base}]


def check_device(cfg: BenchConfig) -> None:
    """Raise, with the fix, when ``-b gpu`` is asked for and torch has no such CUDA device."""
    from .runtime import torch_device

    torch_device(cfg.backend, cfg.device_id)


def run_benchmark(cfg: BenchConfig) -> list[dict]:
    """Rows: the plain-PyTorch baseline first, then this configuration (and end to end)."""
    check_device(cfg)
    device = torch.device("cuda", cfg.device_id) if cfg.backend == "gpu" else torch.device("cpu")
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
