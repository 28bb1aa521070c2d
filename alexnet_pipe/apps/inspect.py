"""`inspect`: the first samples of a training epoch drawn as a grid, to see crops and flips; or the
dataset's mean image. Both are drawn by :mod:`.image_grid` (matplotlib) as PNG, SVG or PDF by the suffix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alexnet_pipe.apps.figure_file import check_output, save_figure
from alexnet_pipe.apps.image_grid import denormalize, draw_grid, image_figure
from alexnet_pipe.config import TrainConfig
from alexnet_pipe.dataset.layout import MEAN_IMAGE_NPY
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.mean import load_dataset_mean
from alexnet_pipe.dataset.schema import ClassEntry, MeanImage
from alexnet_pipe.dataset.update_mean import read_npy_mean
from alexnet_pipe.errors import DatasetError
from alexnet_pipe.text import plural

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def require_gpu(backend: str) -> None:
    """Raise, with the fix, when ``backend`` is "gpu" and torch sees no CUDA device."""
    from alexnet_pipe.train.runtime import torch_device

    torch_device(backend)


def _caption(c: ClassEntry) -> str:
    """A class's name, or its id when the name is empty. A class with no name at all (a hand-made
    manifest) raises KeyError, as it always has."""
    if c.name is None:
        raise KeyError("name")
    return c.name or c.id


def grid_title(root: Path, split: str, crop: int, normalize_std: bool, epoch: int, seed: int) -> str:
    """The grid's title: what was drawn and with which settings (``epoch`` counts from 0)."""
    how = f"epoch {epoch + 1}, seed {seed}: random crops and flips" if split == "train" else "centre crops"
    norm = "mean and std normalised" if normalize_std else "mean subtracted"
    return f"{Path(root).resolve().name}, {split} split, {how}\ncrop {crop}, {norm} (added back to draw)"


def inspect_batch(root: Path, out: Path, split: str, count: int, crop: int, seed: int,
                  normalize_std: bool, backend: str, epoch: int = 0) -> Path:
    """Draw the first ``count`` samples of ``epoch`` exactly as training with ``-r seed`` reads
    them (train: that epoch's order, crops and flips; other splits: centre crops); return the path."""
    from alexnet_pipe.loading.open import epoch_loader

    check_output(out, "grid.png")
    require_gpu(backend)
    cfg = TrainConfig(data_dir=root, backend=backend, crop=crop, rng_seed=seed, normalize_std=normalize_std,
                      batch_size=count, data_threads=1, progress=False)
    loader = epoch_loader(cfg, epoch, split)
    batch = next(iter(loader))
    mean_rgb, std_rgb = load_dataset_mean(root).rgb()
    images = denormalize(batch.images.float().cpu().numpy(), mean_rgb, std_rgb if normalize_std else None, "NCHW")
    names = [_caption(c) for c in load_dataset(root).meta.classes]
    captions = ["flipped" if f else "" for f in batch.flipped.tolist()]
    return draw_grid(images, batch.labels.cpu().tolist(), names, out, captions=captions,
                     title=grid_title(root, split, crop, normalize_std, epoch, seed))


def draw_mean_image(root: Path, out: Path) -> Path:
    """Draw the dataset's mean image (``mean_image.npy``, H x W x 3 RGB float) under a title into ``out``."""
    check_output(out, "mean.png")
    return save_figure(mean_figure(root), out)


def mean_figure(root: Path) -> Figure:
    """The figure of :func:`draw_mean_image`: the mean image at native size or larger, its title wrapped to fit."""
    import numpy as np

    ds = load_dataset(root)  # a converted dataset, or one clear error
    path = root / MEAN_IMAGE_NPY
    if path.exists() and not path.is_file():  # a FIFO would block the read forever, a device never end
        raise DatasetError(f"{path} is not a regular file; reconvert the dataset to get the mean image")
    if not path.is_file():
        raise DatasetError(f"{root} has no {MEAN_IMAGE_NPY} (converted by an older alexnet-pipe); reconvert it "
                           "to get the mean image")
    try:  # header checked against the file's bytes first: a header may declare terabytes
        mean = read_npy_mean(path)
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror or exc})") from exc
    if mean.ndim != 3 or mean.shape[2] != 3 or 0 in mean.shape or not np.issubdtype(mean.dtype, np.number):
        raise DatasetError(f"{path} holds an array of shape {mean.shape} ({mean.dtype}), expected H x W x 3 numbers")
    info = ds.meta.mean_image
    images = info.images if isinstance(info, MeanImage) else None
    over = f", over {plural(images, 'train image')}" if isinstance(images, int) else ""
    title = f"{Path(root).resolve().name}: mean image {mean.shape[0]}x{mean.shape[1]}{over}"
    pixels = np.clip(np.rint(np.nan_to_num(mean.astype(np.float64))), 0, 255).astype(np.uint8)
    return image_figure(pixels[None], [""], 1, title)
