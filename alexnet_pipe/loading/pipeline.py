"""The DALI pipelines over converted shards (train and val, CPU or GPU) and their settings.

Records reach DALI through an external source (``epoch_source.EpochSource``) that reads them in
each epoch's own global order (``order.py``) with each sample's crop position and flip; DALI
decodes, crops, flips and normalises. Train: a random crop of the short-side-N image, random
horizontal flip, per-channel mean subtraction (division by std optional), the neon recipe. Val:
centre crop, no flip, stored order (or ten views per image: ``LoaderConfig.ten_crop``). The
same graph runs on the GPU (``device="mixed"`` decoding, crop/flip/normalize on the device, fp16
output in the model's layout) and on the CPU (``device_id=None``). ``loader.py`` runs the graph
and hands its output to torch; nvidia.dali is imported only in these two modules, inside the
functions that use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.errors import ConfigError
from alexnet_pipe.formats import preferred_format
from alexnet_pipe.loading.epoch_source import EpochSource


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a data loader needs; built from a TrainConfig by ``Runtime.loader_config``."""

    split: str
    train: bool  # global per-epoch permutation, random crop + flip; False: stored order, centre crop
    batch_size: int
    crop: int = 224
    device_id: int | None = None  # None: CPU-only DALI
    rank: int = 0  # this process (torchrun rank)
    world_size: int = 1  # processes sharing the split
    seed: int = 0
    subset_pct: float = 100.0  # train: read only this share of each epoch's (fresh) order
    num_threads: int = 2  # DALI CPU threads (decoding on the CPU, host work on the GPU)
    read_workers: int = 0  # processes reading records for DALI; 0: in this process
    fp16: bool = False  # emit float16 (GPU); float32 otherwise
    channels_last: bool = False  # NHWC output (channels_last model input); NCHW otherwise
    # The network's input is (pixel - mean) / std, per channel in ``channel_order``, pixels 0..255
    # (``InputSpec.pixel_normalization``: imported weights may want BGR or 0..1).
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] | None = None  # None: mean subtraction only (neon)
    channel_order: str = "RGB"  # "BGR": decode to BGR (neon and Caffe weights)
    reader: str = "auto"  # "lmdb", "recordio", or "auto" (LMDB when present)
    # GPU decoding knobs (ignored on the CPU). None: DALI's own default share for the hardware
    # JPEG decoder (A100/H100); fancy upsampling makes nvJPEG upsample chroma as libjpeg-turbo does.
    hw_decoder_load: float | None = None
    jpeg_fancy_upsampling: bool = False
    prefetch: int = 2  # DALI's prefetch queue depth (batches in flight)
    # Decode only the crop window (fn.decoders.image_crop): about 57% of a short-side-256 image's
    # pixels at crop 224, pixel-identical to decoding whole and cropping. The decoder cannot pad a
    # window past the image: Loader turns it off for a split with images smaller than the crop.
    roi_decode: bool = True
    pad_channels: bool = False  # emit a 4th, zero channel (crop_mirror_normalize's pad_output)
    # Val only: each image's ten views (TEN_CROP_VIEWS), N x 10 x C x H x W (test --ten-crop); the
    # whole stored image is decoded (roi_decode does not apply) and each view is cut from it.
    ten_crop: bool = False
    # Train only: PCA lighting (Krizhevsky et al. 2012, section 4.1): each image gets
    # sum_i alpha_i * eigenvalues[i] / 255 * eigenvectors[i] added (lighting_rows says why / 255),
    # alpha_i ~ N(0, lighting) drawn per (seed, epoch, sample) in order.py; ``eigen`` = (eigenvalues,
    # eigenvectors) of the dataset's RGB covariance on the 0..255 scale (mean.json). 0: off, the graph
    # is today's.
    lighting: float = 0.0
    eigen: tuple[tuple[float, ...], tuple[tuple[float, ...], ...]] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lighting) and self.lighting >= 0):
            raise ConfigError(f"lighting must be a number >= 0, got {self.lighting}")
        if self.lighting and (not self.train or self.eigen is None):
            raise ConfigError("lighting is a training augmentation and needs the dataset's colour eigenvectors")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} outside 0..{self.world_size - 1}")
        if self.reader not in ("auto", "lmdb", "recordio"):
            raise ConfigError(f"reader must be auto, lmdb or recordio, got {self.reader}")
        if self.read_workers < 0:
            raise ConfigError(f"read workers must be >= 0, got {self.read_workers}")
        if self.hw_decoder_load is not None and not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f"hw_decoder_load must be within 0..1, got {self.hw_decoder_load}")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch depth must be >= 1, got {self.prefetch}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"channel order must be RGB or BGR, got {self.channel_order}")
        if self.ten_crop and self.train:
            raise ConfigError("ten crops are a test-time view of the val split, not a training augmentation")


    def knobs(self) -> dict:
        """The speed settings a run used, for its metrics (they change no pixel or order)."""
        return {"read_workers": self.read_workers, "data_threads": self.num_threads, "prefetch": self.prefetch,
                "source_queue": source_queue_depth(self) if self.read_workers else 0,
                "hw_decoder_load": self.hw_decoder_load, "jpeg_fancy_upsampling": self.jpeg_fancy_upsampling,
                "roi_decode": self.roi_decode, "device": "cpu" if self.device_id is None else f"cuda:{self.device_id}"}


# The ten views of Krizhevsky et al. 2012 (and Caffe's classic multi-view test), in the order the
# pipeline stacks them: (crop_pos_x, crop_pos_y, mirror) for the centre and the four corners of the
# stored image, each as it is and mirrored. Anchors are DALI's: 0 the left/top edge, 1 the
# right/bottom one, 0.5 the single-crop centre.
TEN_CROP_ANCHORS = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
TEN_CROP_VIEWS = tuple((x, y, mirror) for x, y in TEN_CROP_ANCHORS for mirror in (0, 1))


def _reader_kind(ds: Dataset, cfg: LoaderConfig) -> str:
    if cfg.reader != "auto":
        return cfg.reader
    return preferred_format(ds.formats)


def source_queue_depth(cfg: LoaderConfig) -> int:
    """Batches the external source keeps in flight with reader processes. DALI hands a whole batch
    to one reader process, so a queue of ``prefetch`` batches keeps at most ``prefetch`` of them
    busy: the queue holds one batch per reader plus the pipeline's own prefetch."""
    return cfg.read_workers + cfg.prefetch if cfg.read_workers else cfg.prefetch


def source_options(cfg: LoaderConfig) -> dict:
    """fn.external_source's arguments for reading in ``cfg.read_workers`` processes (none: in this one)."""
    return {"parallel": True, "prefetch_queue_depth": source_queue_depth(cfg)} if cfg.read_workers else {}


def pipeline_options(cfg: LoaderConfig) -> dict:
    """The pipeline's own arguments (threads, device, prefetch, reader processes), seed aside."""
    extra = {"py_num_workers": cfg.read_workers, "py_start_method": "spawn"} if cfg.read_workers else {}
    return {"batch_size": cfg.batch_size, "num_threads": max(1, cfg.num_threads), "device_id": cfg.device_id,
            "prefetch_queue_depth": cfg.prefetch, **extra}


def lighting_rows(cfg: LoaderConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """EpochSource's ``lighting``: (the normalisation mean, rows[i] = eigenvalues[i] / 255 *
    eigenvectors[i]) in the decoded channel order, float64; None when lighting is off.

    The paper's offset ``sum_i alpha_i * lambda_i * p_i`` is not scale-free: its lambdas are those of
    pixel values on the 0..1 scale, as the published implementations read it (fb.resnet.torch's
    eigval 0.2175, 0.0188, 0.0045; MXNet's pca_noise the same x 255). mean.json holds the
    covariance on the 0..255 scale, whose eigenvalues are 255^2 times those; the offset in 0..255
    units is 255 * alpha * (lambda_255 / 255^2) * p = alpha * lambda_255 / 255 * p. Taking
    lambda_255 as it is would add offsets of about 1,400 grey levels at sigma 0.1."""
    if not cfg.lighting:
        return None
    values, vectors = cfg.eigen
    rows = np.asarray(values, np.float64)[:, None] / 255.0 * np.asarray(vectors, np.float64)  # RGB columns
    if cfg.channel_order == "BGR":
        rows = rows[:, ::-1]
    return np.asarray(cfg.mean, np.float64), np.ascontiguousarray(rows)


def build_pipeline(source: EpochSource, cfg: LoaderConfig):
    """Build (not yet run) the DALI graph fed by ``source``."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = cfg.device_id is not None
    std = cfg.std or (1.0, 1.0, 1.0)

    decoder = {"device": "mixed" if gpu else "cpu",
               "output_type": types.BGR if cfg.channel_order == "BGR" else types.RGB}
    if gpu and cfg.hw_decoder_load is not None:
        decoder["hw_decoder_load"] = cfg.hw_decoder_load
    if gpu and cfg.jpeg_fancy_upsampling:
        decoder["jpeg_fancy_upsampling"] = True
    crop = {"crop": (cfg.crop, cfg.crop)}
    normalize = {
        "mean": list(cfg.mean), "std": list(std), "dtype": types.FLOAT16 if cfg.fp16 else types.FLOAT,
        "output_layout": "HWC" if cfg.channels_last else "CHW", "pad_output": cfg.pad_channels,
    }

    @pipeline_def(enable_conditionals=False)
    def graph():
        lit = bool(cfg.lighting)
        jpegs, labels, pos_x, pos_y, mirror, *means = fn.external_source(
            source=source, num_outputs=6 if lit else 5, batch=True, batch_info=True,
            dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32] + [types.FLOAT] * lit,
            **source_options(cfg),
        )
        if lit:  # each sample's own mean: the dataset's minus its lighting offset (EpochSource)
            normalize["mean"] = means[0]
        if cfg.ten_crop:
            # Ten views of the whole stored image, stacked per sample, padded like the single crop
            # below. The centre pair takes the source's window and flip (val: 0.5, 0.5, none), so
            # the first view is the single-crop pass's very crop.
            images = fn.decoders.image(jpegs, **decoder)
            views = []
            for x, y, flip in TEN_CROP_VIEWS:
                if (x, y) == (0.5, 0.5):
                    x, y, flip = pos_x, pos_y, (1 - mirror if flip else mirror)
                views.append(fn.crop_mirror_normalize(images, **crop, crop_pos_x=x, crop_pos_y=y, mirror=flip,
                                                      out_of_bounds_policy="pad", fill_values=0.0, **normalize))
            images = fn.stack(*views, axis=0)
        elif cfg.roi_decode:
            # The decoder places the window exactly as crop_mirror_normalize would (same crop
            # arguments, same rounding), so the pixels are the same as decoding whole, then cropping.
            images = fn.decoders.image_crop(jpegs, **crop, crop_pos_x=pos_x, crop_pos_y=pos_y, **decoder)
            images = fn.crop_mirror_normalize(images, mirror=mirror, **normalize)
        else:
            images = fn.decoders.image(jpegs, **decoder)
            # An image smaller than the crop (converted with --no-upscale) is padded with the
            # mean colour instead of failing the whole pipeline.
            images = fn.crop_mirror_normalize(images, **crop, crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
                                              out_of_bounds_policy="pad", fill_values=0.0, **normalize)
        return images, (labels.gpu() if gpu else labels)

    return graph(seed=_pipeline_seed(cfg), **pipeline_options(cfg))


def _pipeline_seed(cfg: LoaderConfig) -> int:
    """DALI's own seed, distinct per rank and fixed by ``-r`` (the order and augmentation come from
    ``order.py`` and are global; this seeds whatever randomness DALI keeps for itself)."""
    return int(np.random.SeedSequence([cfg.seed % 2**63, cfg.rank]).generate_state(1)[0] & 0x7FFFFFFF)
