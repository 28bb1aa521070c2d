"""DALI pipelines over converted shards: the only module that imports nvidia.dali.

Train: random crop of the short-side-256 image (one per sample per epoch), random horizontal
flip, per-channel mean subtraction (division by std optional) -- the neon recipe. Val: centre
crop, no flip. The same graph runs on the GPU (``device="mixed"`` decoding, crop/flip/normalize
on the device, fp16 output in the model's layout) and on the CPU (``device_id=None``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DatasetError
from .manifest import Dataset

SHUFFLE_BUFFER = 4096  # records held for the reader's random shuffle (encoded JPEGs, ~30 KB each)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a data loader needs; built from TrainConfig by the trainer, or by `inspect`."""

    split: str
    train: bool  # random crop + flip, shuffled; False: centre crop, stored order
    batch_size: int
    crop: int = 224
    device_id: int | None = None  # None: CPU-only DALI
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    num_threads: int = 2
    fp16: bool = False  # emit float16 (GPU); float32 otherwise
    channels_last: bool = False  # NHWC output (channels_last model input); NCHW otherwise
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # RGB, 0..255
    std: tuple[float, float, float] | None = None  # RGB; None: mean subtraction only (neon)
    reader: str = "auto"  # "lmdb", "recordio", or "auto" (LMDB when present)
    return_params: bool = False  # also output each sample's flip flag (for `inspect`)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard id {self.shard_id} outside 0..{self.num_shards - 1}")
        if self.reader not in ("auto", "lmdb", "recordio"):
            raise ValueError(f"reader must be auto, lmdb or recordio, got {self.reader}")


def _reader_kind(ds: Dataset, cfg: LoaderConfig) -> str:
    if cfg.reader != "auto":
        return cfg.reader
    return "lmdb" if "lmdb" in ds.formats else "recordio"


def _check_files(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetError(
            f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}; "
            "rerun alexnet-pipe convert with the same arguments to rewrite them"
        )


def build_pipeline(ds: Dataset, cfg: LoaderConfig):
    """Build (not yet run) the DALI pipeline for one split of a dataset."""
    from nvidia.dali import fn, pipeline_def, types

    kind = _reader_kind(ds, cfg)
    if not ds.shards(cfg.split):
        raise DatasetError(f"the {cfg.split} split of {ds.root} has no records")
    if kind == "lmdb":
        paths = ds.lmdb_paths(cfg.split)
        _check_files(paths)
        reader_args = {"path": [str(p) for p in paths]}
    else:
        recs, index = ds.recordio_paths(cfg.split)
        _check_files(recs + [index])
        reader_args = {"path": [str(p) for p in recs], "index_path": [str(index)]}
    gpu = cfg.device_id is not None
    std = cfg.std or (1.0, 1.0, 1.0)

    @pipeline_def(enable_conditionals=False)
    def graph():
        common = {
            "shard_id": cfg.shard_id,
            "num_shards": cfg.num_shards,
            "pad_last_batch": True,  # without it samples repeat or vanish after epoch 1
            "random_shuffle": cfg.train,
            "initial_fill": SHUFFLE_BUFFER,
            "name": "reader",
        }
        if kind == "lmdb":
            jpegs, labels = fn.readers.caffe(**reader_args, **common)
        else:
            jpegs, labels = fn.readers.mxnet(**reader_args, **common)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if cfg.train:
            mirror = fn.random.coin_flip(probability=0.5)
            pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
        else:
            mirror, pos_x, pos_y = 0, 0.5, 0.5
        images = fn.crop_mirror_normalize(
            images,
            crop=(cfg.crop, cfg.crop),
            crop_pos_x=pos_x,
            crop_pos_y=pos_y,
            mirror=mirror,
            mean=list(cfg.mean),
            std=list(std),
            dtype=types.FLOAT16 if cfg.fp16 else types.FLOAT,
            output_layout="HWC" if cfg.channels_last else "CHW",
            # An image smaller than the crop (the converter never upscales) is padded with
            # the mean colour instead of failing the whole pipeline.
            out_of_bounds_policy="pad",
            fill_values=0.0,
        )
        labels = labels.gpu() if gpu else labels
        outputs = [images, labels]
        if cfg.return_params:
            outputs.append(mirror if cfg.train else fn.constant(idata=0, shape=[1]))
        return tuple(outputs)

    threads = max(1, cfg.num_threads)
    return graph(batch_size=cfg.batch_size, num_threads=threads, device_id=cfg.device_id,
                 seed=cfg.seed & 0x7FFFFFFF, prefetch_queue_depth=2)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # N x 3 x H x W (a channels_last view when the pipeline emits NHWC)
    labels: torch.Tensor  # N, int64
    flipped: torch.Tensor | None = None


class Loader:
    """One epoch of batches from a DALI pipeline, with torch tensors in the model's layout.

    Every sample of this shard is yielded exactly once per epoch (pad_last_batch on the
    reader, padding dropped by the iterator); the last batch may be smaller.
    """

    def __init__(self, ds: Dataset, cfg: LoaderConfig):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.cfg = cfg
        self._pipe = build_pipeline(ds, cfg)
        try:
            self._pipe.build()
        except RuntimeError as exc:
            raise DatasetError(f"cannot open the {cfg.split} shards of {ds.root}: {_first_line(exc)}") from exc
        names = ["images", "labels"] + (["flipped"] if cfg.return_params else [])
        try:  # the iterator runs the first batch already
            self._it = DALIGenericIterator(
                [self._pipe], names, reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
            )
        except RuntimeError as exc:
            _raise_record_error(exc, ds.root, cfg.split)
        self._root = ds.root
        self.samples = self._it.size  # samples of this shard per epoch (without padding)

    def __len__(self) -> int:
        return math.ceil(self.samples / self.cfg.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for (out,) in self._it:
                images = out["images"]
                if self.cfg.channels_last:
                    images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last
                labels = out["labels"].reshape(-1).long()
                flipped = out["flipped"].reshape(-1).bool() if self.cfg.return_params else None
                yield Batch(images, labels, flipped)
        except RuntimeError as exc:
            _raise_record_error(exc, self._root, self.cfg.split)


def _raise_record_error(exc: RuntimeError, root: Path, split: str) -> None:
    """DALI's multi-page pipeline trace -> one line saying what failed and how to find the record.
    Other runtime errors propagate unchanged."""
    text = str(exc)
    if "Critical error" not in text and "Failed to decode" not in text:
        raise exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    where = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "")
    after = [i + 1 for i, line in enumerate(lines) if line.endswith("encountered:")]
    detail = lines[after[0]] if after and after[0] < len(lines) else ""
    raise DatasetError(
        f"a record in the {split} shards of {root} could not be read ({'; '.join(x for x in (where, detail) if x)}); "
        f"DALI cannot skip bad records: run alexnet-pipe verify {root} to name the shard and key"
    ) from exc


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
