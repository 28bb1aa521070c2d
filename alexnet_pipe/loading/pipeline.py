"""DALI pipelines over converted shards: the only module that imports nvidia.dali.

Records reach DALI through an external source (``source.EpochSource``) that reads them in each
epoch's own global order (``order.py``) with each sample's crop position and flip; DALI decodes,
crops, flips and normalises. Train: a random crop of the short-side-N image, random horizontal
flip, per-channel mean subtraction (division by std optional), the neon recipe. Val: centre crop,
no flip, stored order. The same graph runs on the GPU (``device="mixed"`` decoding,
crop/flip/normalize on the device, fp16 output in the model's layout) and on the CPU
(``device_id=None``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.dataset.records import record_table
from alexnet_pipe.errors import ConfigError, DatasetError, InputError, TrainingError
from alexnet_pipe.loading.epoch_source import EpochSource, raise_reader_error
from alexnet_pipe.loading.order import OrderConfig


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a data loader needs; built from TrainConfig by the trainer (``train.epoch_loader``)."""

    split: str
    train: bool  # global per-epoch permutation, random crop + flip; False: stored order, centre crop
    batch_size: int
    crop: int = 224
    device_id: int | None = None  # None: CPU-only DALI
    shard_id: int = 0
    num_shards: int = 1
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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ConfigError(f"shard id {self.shard_id} outside 0..{self.num_shards - 1}")
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


    def knobs(self) -> dict:
        """The speed settings a run used, for its metrics (they change no pixel or order)."""
        return {"read_workers": self.read_workers, "data_threads": self.num_threads, "prefetch": self.prefetch,
                "source_queue": source_queue_depth(self) if self.read_workers else 0,
                "hw_decoder_load": self.hw_decoder_load, "jpeg_fancy_upsampling": self.jpeg_fancy_upsampling,
                "roi_decode": self.roi_decode, "device": "cpu" if self.device_id is None else f"cuda:{self.device_id}"}


def _reader_kind(ds: Dataset, cfg: LoaderConfig) -> str:
    if cfg.reader != "auto":
        return cfg.reader
    return "lmdb" if "lmdb" in ds.formats else "recordio"


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
        jpegs, labels, pos_x, pos_y, mirror = fn.external_source(
            source=source, num_outputs=5, batch=True, batch_info=True,
            dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32], **source_options(cfg),
        )
        if cfg.roi_decode:
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
    return int(np.random.SeedSequence([cfg.seed % 2**63, cfg.shard_id]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class Batch:
    """One step's data from a ``Loader``: images in the model's layout (on the loader's device,
    mean-subtracted), their labels (int64 class indices), which were flipped,
    and which are padding (``valid``; None when none are) so every rank takes the same steps."""

    images: torch.Tensor  # N x 3 x H x W (a channels_last view when the pipeline emits NHWC)
    labels: torch.Tensor  # N, int64
    flipped: torch.Tensor  # N, bool (on the CPU)
    valid: torch.Tensor | None = None  # N, bool, on the images' device; None: no padding in this batch
    real_total: int = 0  # real (non-padding) samples in this step over all ranks: the loss's divisor
    step: int = 0  # this batch's step within its epoch


class Loader:
    """Epochs of batches from a DALI pipeline, as torch tensors in the model's layout.

    The first pass over the loader is epoch ``epoch``, the next pass ``epoch + 1``, and so on;
    a pass that is left early leaves the loader mid-epoch (build a new loader instead). Every
    record of the split is read exactly once per epoch over all shards (ranks), plus padding
    that ``Batch.valid`` marks; the last batch may be smaller.
    """

    def __init__(self, ds: Dataset, cfg: LoaderConfig, epoch: int = 0, start_step: int = 0):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if cfg.roi_decode and not ds.all_at_least(cfg.split, cfg.crop):
            cfg = replace(cfg, roi_decode=False)  # the ROI decoder cannot pad a window past the image
        self.cfg, self._root = cfg, ds.root
        table = record_table(ds, cfg.split, _reader_kind(ds, cfg))
        order = OrderConfig(len(table), cfg.train, cfg.seed, cfg.shard_id, cfg.num_shards, cfg.subset_pct)
        self.source = EpochSource(table, order, cfg.batch_size, epoch, start_step)
        self.samples = order.per_shard  # samples this shard reads per epoch (padding included)
        self.epoch = epoch  # the epoch the next pass yields
        self.start_step = start_step  # the step the next pass starts at (a run resumed mid-epoch)
        if start_step * cfg.batch_size >= max(self.samples, 1):
            raise InputError(f"step {start_step} is past the end of an epoch of {len(self)} steps")
        try:
            self._pipe = build_pipeline(self.source, cfg)
            self._pipe.build()
        except RuntimeError as exc:
            _raise_gpu_start_error(exc, cfg)
            raise DatasetError(f"cannot start the DALI pipeline over the {cfg.split} shards of {ds.root}: "
                               f"{dali_cause(exc)}") from exc
        try:  # the iterator runs the first batch already
            self._it = DALIGenericIterator([self._pipe], ["images", "labels"], size=-1,
                                           last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        except RuntimeError as exc:
            _raise_gpu_start_error(exc, cfg)
            _raise_record_error(exc, ds.root, cfg.split)
        except Exception as exc:  # DALI's reader processes pass errors on as plain Exceptions
            raise_reader_error(exc)
            raise

    def __len__(self) -> int:
        """Steps in a whole epoch."""
        return math.ceil(self.samples / self.cfg.batch_size)

    def close(self) -> None:
        """Stop the pipeline and close the shard files (also done when the loader is collected)."""
        if getattr(self, "_pipe", None) is not None:
            self._it = self._pipe = None  # the iterator and pipeline hold the source; drop them first
        if getattr(self, "source", None) is not None:
            self.source.close()

    def __del__(self) -> None:
        self.close()

    def __iter__(self) -> Iterator[Batch]:
        plan = self.source.plan(self.epoch)
        b = self.cfg.batch_size
        try:
            for k, (out,) in enumerate(self._it, start=self.start_step):
                images = out["images"]
                if self.cfg.channels_last:
                    images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last
                flipped = torch.from_numpy(plan.mirror[k * b : (k + 1) * b]).bool()
                valid = plan.valid[k * b : (k + 1) * b]
                yield Batch(images, out["labels"].reshape(-1).long(), flipped,
                            None if valid.all() else torch.from_numpy(valid).to(images.device),
                            self.source.order.step_total(k, b), k)
        except RuntimeError as exc:
            _raise_record_error(exc, self._root, self.cfg.split)
        except Exception as exc:  # DALI's reader processes pass errors on as plain Exceptions
            raise_reader_error(exc)
            raise
        self.epoch += 1
        self.start_step = 0


def dali_cause(exc: Exception) -> str:
    """DALI's multi-page error -> the operator and the real cause, without the C++ context."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    where = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "")
    after = [i + 1 for i, line in enumerate(lines) if line.endswith("encountered:")]
    cause = []
    for line in lines[after[0]:] if after else lines:
        if line.startswith(("C++ context", "Current pipeline object", "Stacktrace")):
            break
        cause.append(line)
    text = " ".join(cause) or type(exc).__name__
    return "; ".join(x for x in (where, text[:1000]) if x)


def _raise_gpu_start_error(exc: Exception, cfg: LoaderConfig) -> None:
    """DALI's GPU operators failing to start (driver too old for the wheel, no device) -> one
    line naming the wheel to install, instead of DALI's trace. Other errors return."""
    if cfg.device_id is None:
        return
    from alexnet_pipe.loading.wheels import detect_driver, gpu_init_hint

    hint = gpu_init_hint(str(exc), detect_driver())
    if hint:
        raise TrainingError(f"cannot start DALI on GPU {cfg.device_id}: {hint}") from exc


def _raise_record_error(exc: RuntimeError, root: Path, split: str) -> None:
    """A decoding failure -> one line naming the cause and the command that finds the record.
    Other runtime errors propagate unchanged."""
    text = str(exc)
    if "Critical error" not in text and "Failed to decode" not in text:
        raise exc
    raise DatasetError(
        f"a record in the {split} shards of {root} could not be read ({dali_cause(exc)}); "
        f"DALI cannot skip bad records: run alexnet-pipe verify {root} to name the shard and key"
    ) from exc
