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

Here: the command's rows (``run_benchmark``) and their table (``format_rows``), and the rows that
read a data set, end to end and the loaders (train's loader opened as ``fit`` opens it, the PIL
baseline). ``BenchConfig``, the model-step timing and the timing loop are ``apps/step_timing.py``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from alexnet_pipe.apps.step_timing import (
    BenchConfig,
    check_device,
    device_of,
    e2e_rate,
    steady_rate,
    syncer,
    time_steps,
    trainer,
)
from alexnet_pipe.config import default_workers
from alexnet_pipe.errors import InputError

PIL_PREFETCH = 2  # the PIL DataLoader's prefetch_factor (torch's default): batches queued per worker


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
    from alexnet_pipe.loading.loader import Loader
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
        from alexnet_pipe.formats import preferred_format

        ds = load_dataset(root)
        self.table = record_table(ds, "train", preferred_format(ds.formats))
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
