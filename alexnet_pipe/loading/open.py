"""The loader ``fit`` reads, opened for anything else: your own model, ``inspect``, the benchmarks.

``open_loader`` (public as ``alexnet_pipe.loader``) takes a dataset path and a few settings;
``epoch_loader`` takes a ``TrainConfig``. Both build the loader through the run's ``Runtime``
(``train/runtime.py``), which derives the loader settings from the config as ``fit`` does, so
they yield exactly the records, order, crops, flips and mean that training sees.
"""

from __future__ import annotations

import os
from pathlib import Path

from alexnet_pipe.config import TrainConfig
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.train.runtime import open_run


def epoch_loader(cfg: TrainConfig, epoch: int, split: str = "train", batch_size: int | None = None,
                 start_step: int = 0) -> Loader:
    """The loader ``fit`` reads ``split`` from, positioned at ``epoch`` (and ``start_step`` within it):
    the same records, order, crops and flips (train), or centre crops in stored order (any other split).
    ``inspect``, the benchmarks, the tests and ``open_loader`` use it to see exactly what training sees."""
    rt = open_run(cfg)
    return rt.loader(split, split == "train", epoch, batch_size, start_step)


def open_loader(data_dir: str | os.PathLike, split: str = "train", *, batch_size: int = 128, crop: int = 224,
                epoch: int = 0, step: int = 0, backend: str = "auto", rank: int = 0, world_size: int = 1,
                seed: int = 0, **options) -> Loader:
    """Batches of a converted dataset for any torch model (public as ``alexnet_pipe.loader``).

    The loader ``fit`` would read with ``TrainConfig(data_dir, batch_size=..., crop=..., backend=...,
    rng_seed=seed, rank=rank, world_size=world_size, **options)``: the same records, global
    order, random crops, flips and dataset mean for ``split="train"`` (centre crops in stored order
    for any other split). Each rank of ``world_size`` reads its own share of every epoch; ``epoch``
    and ``step`` resume where a run stopped. ``options`` are further ``TrainConfig`` fields (e.g.
    ``datatype``, ``normalize_std``, ``reader``, ``read_workers``, ``data_threads``, ``subset_pct``,
    ``channels_last``, ``device_id``).

    Yields ``Batch``es: ``images`` (N x 3 x crop x crop, on the GPU with backend gpu, float16 there
    unless ``datatype="f32"``), ``labels`` (int64 class indices), ``valid`` (padding mask or None).
    Close it (``Loader.close``) when done.
    """
    cfg = TrainConfig(data_dir=Path(data_dir), batch_size=batch_size, crop=crop, backend=backend, rng_seed=seed,
                      rank=rank, world_size=world_size, **options)
    return epoch_loader(cfg, epoch, split, start_step=step)
