"""What a run derives from its TrainConfig: device, precision, rank and the data loaders.

``open_run(cfg)`` loads the dataset and its mean and returns a ``Runtime``; ``fit``, ``run_test``,
``inspect`` and the benchmarks all build their loaders through it, so each sees exactly the
records, order and augmentation training sees.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import replace

import torch

from alexnet_pipe.config import MIN_CROP, TrainConfig
from alexnet_pipe.dataset.manifest import Dataset, load_dataset
from alexnet_pipe.dataset.mean import ChannelMean, eigen, load_dataset_mean, missing_std_fix
from alexnet_pipe.errors import DatasetError, TrainingError
from alexnet_pipe.loading.loader import Loader
from alexnet_pipe.loading.pipeline import LoaderConfig
from alexnet_pipe.loading.shm import check_loader_shm, local_ranks
from alexnet_pipe.model.inputspec import InputSpec
from alexnet_pipe.train.distributed import Dist, DistConfig

log = logging.getLogger(__name__)

BASE_BATCH = 128  # the neon recipe's lr holds for this many images per step


def torch_device(backend: str, device_id: int = 0) -> torch.device:
    """The torch device ``-b``/``-i`` name; one line with the fix when torch has no such device.
    A rank started by a launcher (torchrun, SLURM) refuses here, on every rank alike, a GPU layout
    where its GPU cannot be told (``distributed.local_device``), rather than index past the devices."""
    import os

    from alexnet_pipe.train.distributed import launched, local_device

    if backend != "gpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError("-b gpu was asked for but torch sees no CUDA device; use -b cpu")
    if launched(os.environ):
        local_device(os.environ, torch.cuda.device_count())  # raises the launcher's line when ambiguous
    if device_id >= torch.cuda.device_count():
        raise TrainingError(f"-i {device_id}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0; pick one of them")
    return torch.device("cuda", device_id)


class Runtime:
    """Device, precision, rank and loaders for one run. ``dist`` joins the process group only
    when ``join`` is set (training and testing; a loader for ``inspect`` needs none)."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, mean: ChannelMean, join: bool = False):
        self.cfg, self.ds = cfg, ds
        self.device = torch_device(cfg.backend, cfg.device_id)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        self.amp_dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[cfg.datatype]
        self.mean = mean
        self._input: InputSpec | None = None
        dist_cfg = DistConfig(cfg.rank, cfg.world_size, cfg.dist_timeout_s)
        self.dist = Dist(dist_cfg if join else DistConfig(), self.device)

    @property
    def input(self) -> InputSpec:
        """The network's input: the dataset's mean (and std with --normalize-std) on RGB 0..255,
        unless ``use_input`` set the one a weights file records."""
        if self._input is None:
            mean_rgb, std_rgb = self.mean.rgb()
            if self.cfg.normalize_std and std_rgb is None:
                fix = missing_std_fix(self.ds.root)
                raise DatasetError(f"{self.ds.root}/mean.json has no std (an upgraded old mean); {fix}")
            self._input = InputSpec(self.cfg.crop, tuple(mean_rgb), tuple(std_rgb) if self.cfg.normalize_std else None,
                                    short_side=self.ds.meta.settings.short_side,
                                    squash=self.ds.meta.settings.squash)
        return self._input

    def use_input(self, spec: InputSpec | None) -> None:
        """Feed the network what ``spec`` says (weights from elsewhere: BGR, 0..1, their own mean)."""
        if spec is not None:
            self._input = spec

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.world_size

    @property
    def lr(self) -> float:
        """The weights' base lr: ``--lr`` as given, or scaled from 128 images to the global batch."""
        if self.cfg.lr_scale == "linear":
            return self.cfg.lr * self.global_batch / BASE_BATCH
        return self.cfg.lr

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loader_config(self, split: str, train: bool, batch_size: int | None = None) -> LoaderConfig:
        """The loader settings that follow from the run's config (one place: fit, test, inspect)."""
        cfg = self.cfg
        gpu = self.device.type == "cuda"
        mean, std = self.input.pixel_normalization()
        return LoaderConfig(
            split=split, train=train, batch_size=batch_size or cfg.batch_size, crop=self.input.crop,
            device_id=cfg.device_id if gpu else None, rank=cfg.rank, world_size=cfg.world_size,
            seed=cfg.rng_seed, subset_pct=cfg.subset_pct if train else 100.0, num_threads=cfg.data_threads,
            read_workers=cfg.read_workers, fp16=gpu and self.amp_dtype is not None,
            channels_last=cfg.channels_last, mean=mean, std=std, channel_order=self.input.channel_order,
            reader=cfg.reader, hw_decoder_load=cfg.hw_decoder_load, jpeg_fancy_upsampling=cfg.jpeg_fancy_upsampling,
            prefetch=cfg.prefetch, roi_decode=cfg.roi_decode, **(self._lighting() if train else {}),
        )

    def _lighting(self) -> dict:
        """--lighting's loader settings: the sigma and the dataset's RGB eigen-decomposition."""
        if not self.cfg.lighting:
            return {}
        cov = self.mean.rgb_covariance()
        if cov is None:
            raise DatasetError(f"--lighting needs the RGB covariance in {self.ds.root}/mean.json, which was converted "
                               "before convert recorded it: rerun the alexnet-pipe convert command that made it")
        values, vectors = eigen(cov)
        return {"lighting": self.cfg.lighting, "eigen": (tuple(values), tuple(map(tuple, vectors)))}

    def loader(self, split: str, train: bool, epoch: int, batch_size: int | None = None, start_step: int = 0,
               ten_crop: bool = False) -> Loader:
        """``ten_crop``: ten views per image (val; ``LoaderConfig.ten_crop``)."""
        cfg = self.loader_config(split, train, batch_size)
        if ten_crop:
            cfg = replace(cfg, ten_crop=True)
        if cfg.read_workers:  # reader processes hand batches over in /dev/shm: refuse now, not by SIGBUS later
            check_loader_shm(self.ds, cfg, ranks=local_ranks(os.environ, self.cfg.world_size))
        return Loader(self.ds, cfg, epoch, start_step)

    def data_meta(self) -> dict:
        """Data settings that travel with the weights: the classes and the input (``InputSpec``)."""
        classes = self.ds.meta.classes
        return {"classes": [c.id for c in classes], "class_names": [c.name or "" for c in classes],
                **self.input.to_data()}

    def warn_small_images(self, splits: tuple[str, ...] | None = None, crop_option: bool = True) -> None:
        """Warn about the stored images of ``splits`` (None: all) smaller than the crop; ``crop_option``:
        the command can take a smaller --crop (not when the crop comes from the weights)."""
        if self.dist.is_main:
            warning = small_image_warning(self.ds, self.input.crop, splits, crop_option)
            if warning is not None:
                log.warning("%s", warning)

    def close(self) -> None:
        self.dist.close()


def small_image_warning(ds: Dataset, crop: int, splits: tuple[str, ...] | None = None,
                        crop_option: bool = True) -> str | None:
    """Which stored images of ``splits`` (None: all) are smaller than the crop, or None; the fix offers
    a smaller --crop only where the command takes one (``crop_option``) and one exists (MIN_CROP)."""
    found = [f"{n} of {ds.split_entry(name).records} {name} images" for name, n in ds.smaller_than(crop).items()
             if splits is None or name in splits]
    if not found:
        return None
    fix = f"reconvert with --short-side {max(crop, 256)} (without --no-upscale)"
    if crop_option and crop > MIN_CROP:
        fix += f" or pass a smaller --crop (at least {MIN_CROP})"
    return padded_warning(" and ".join(found), crop, fix)


def padded_warning(found: str, crop: int, fix: str) -> str:
    """The one rule, in the words train, test and predict all use: ``found`` (e.g. "3 of 8 val images")
    have a short side below the crop, so their crops are padded with the mean colour; ``fix``."""
    return f"{found} have a short side below the crop {crop}: their crops are padded with the mean colour; {fix}"


def open_run(cfg: TrainConfig, join: bool = False) -> Runtime:
    """Load the dataset and its mean (refusing an old full-image mean with the update-mean hint)."""
    ds = load_dataset(cfg.data_dir)
    mean = load_dataset_mean(cfg.data_dir)
    rt = Runtime(cfg, ds, mean, join)
    if not join:  # training and testing warn once the crop is known (it may come from the weights)
        rt.warn_small_images()
    return rt
