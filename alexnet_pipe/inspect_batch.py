"""`inspect`: the first samples of a training epoch drawn as a grid, to see crops and flips; or the
dataset's mean image."""

from __future__ import annotations

import io
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


MEAN_IMAGE_FILE = "mean_image.npy"


def draw_mean_image(root: Path, out: Path) -> Path:
    """Save the dataset's mean image (``mean_image.npy``, H x W x 3 RGB float) as a PNG."""
    import numpy as np
    from PIL import Image

    from .errors import DatasetError
    from .fsutil import atomic_write_bytes

    load_dataset(root)  # a converted dataset, or one clear error
    path = root / MEAN_IMAGE_FILE
    if not path.is_file():
        raise DatasetError(f"{root} has no {MEAN_IMAGE_FILE} (converted by an older alexnet-pipe); reconvert it "
                           "to get the mean image")
    try:
        mean = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} ({exc})") from exc
    if mean.ndim != 3 or mean.shape[2] != 3:
        raise DatasetError(f"{path} holds an array of shape {mean.shape}, expected H x W x 3")
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(mean), 0, 255).astype(np.uint8), "RGB").save(buf, "PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out
