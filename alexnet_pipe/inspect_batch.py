"""`inspect`: the first samples of a training epoch drawn as a grid, to see crops and flips."""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .manifest import load_dataset
from .mean import load_dataset_mean
from .plot import denormalize, draw_grid
from .train import epoch_loader


def inspect_batch(root: Path, out: Path, split: str, count: int, crop: int, seed: int,
                  normalize_std: bool, backend: str, epoch: int = 0) -> Path:
    """Draw the first ``count`` samples of ``epoch`` exactly as training with ``-r seed`` reads
    them (train: that epoch's order, crops and flips; other splits: centre crops); return the path."""
    cfg = TrainConfig(data_dir=root, backend=backend, crop=crop, rng_seed=seed, normalize_std=normalize_std,
                      batch_size=count, data_threads=1, progress=False)
    loader = epoch_loader(cfg, epoch, split)
    batch = next(iter(loader))
    mean_rgb, std_rgb = load_dataset_mean(root).rgb()
    images = denormalize(batch.images.float().cpu().numpy(), mean_rgb, std_rgb if normalize_std else None, "NCHW")
    names = [c["name"] or c["id"] for c in load_dataset(root).classes]
    captions = ["flipped" if f else "" for f in batch.flipped.tolist()]
    return draw_grid(images, batch.labels.cpu().tolist(), names, out, captions=captions)
