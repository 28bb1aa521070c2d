"""`inspect`: one batch of the train pipeline drawn as a grid, to see crops and flips."""

from __future__ import annotations

from pathlib import Path

from .manifest import load_dataset
from .mean import load_dataset_mean
from .pipeline import Loader, LoaderConfig
from .plot import denormalize, draw_grid


def inspect_batch(root: Path, out: Path, split: str, count: int, crop: int, seed: int,
                  normalize_std: bool, backend: str) -> Path:
    """Run the pipeline for one batch of ``count`` and draw it; return the PNG path."""
    ds = load_dataset(root)
    mean_rgb, std_rgb = load_dataset_mean(root).rgb()
    std = std_rgb if normalize_std else None
    loader = Loader(ds, LoaderConfig(
        split=split, train=split == "train", batch_size=count, crop=crop,
        device_id=0 if backend == "gpu" else None, seed=seed, mean=mean_rgb, std=std, return_params=True,
    ))
    batch = next(iter(loader))
    images = denormalize(batch.images.float().cpu().numpy(), mean_rgb, std, "NCHW")
    labels = batch.labels.cpu().tolist()
    names = [c["name"] or c["id"] for c in ds.classes]
    captions = ["flipped" if f else "" for f in batch.flipped.cpu().tolist()]
    return draw_grid(images, labels, names, out, captions=captions)
