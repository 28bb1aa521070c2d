"""The ``Loader``: epochs of ``Batch``es from a DALI pipeline, as torch tensors in the model's layout.

It builds the split's record table and epoch source, runs ``pipeline.build_pipeline`` through
DALI's PyTorch iterator, and attaches to each batch what the model's step needs besides the
pixels: the flips, the padding mask and the real samples over all ranks. DALI's failures
(a driver too old for the wheel, an undecodable record, an error in a reader process) become
one-line errors naming the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.dataset.records import record_table
from alexnet_pipe.errors import DatasetError, InputError, TrainingError
from alexnet_pipe.loading.epoch_source import EpochSource, raise_reader_error
from alexnet_pipe.loading.order import OrderConfig
from alexnet_pipe.loading.pipeline import LoaderConfig, _reader_kind, build_pipeline, lighting_rows
from alexnet_pipe.text import plural


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
    views: int = 1  # images per sample: 10 with ten crops (``images`` holds N x views rows, a sample's together)


class Loader:
    """Epochs of batches from a DALI pipeline, as torch tensors in the model's layout.

    The first pass over the loader is epoch ``epoch``, the next pass ``epoch + 1``, and so on;
    a pass that is left early leaves the loader mid-epoch (build a new loader instead). Every
    record of the split is read exactly once per epoch over all ranks, plus padding
    that ``Batch.valid`` marks; the last batch may be smaller.
    """

    def __init__(self, ds: Dataset, cfg: LoaderConfig, epoch: int = 0, start_step: int = 0):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if cfg.roi_decode and not ds.all_at_least(cfg.split, cfg.crop):
            cfg = replace(cfg, roi_decode=False)  # the ROI decoder cannot pad a window past the image
        self.cfg, self._root = cfg, ds.root
        table = record_table(ds, cfg.split, _reader_kind(ds, cfg))
        order = OrderConfig(len(table), cfg.train, cfg.seed, cfg.rank, cfg.world_size, cfg.subset_pct, cfg.lighting)
        self.source = EpochSource(table, order, cfg.batch_size, epoch, start_step, lighting_rows(cfg))
        self.samples = order.per_rank  # samples this rank reads per epoch (padding included)
        self.epoch = epoch  # the epoch the next pass yields
        self.start_step = start_step  # the step the next pass starts at (a run resumed mid-epoch)
        if start_step * cfg.batch_size >= max(self.samples, 1):
            raise InputError(f"step {start_step} is past the end of an epoch of {plural(len(self), 'step')}")
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
        share = self.source.share(self.epoch)
        b = self.cfg.batch_size
        try:
            for k, (out,) in enumerate(self._it, start=self.start_step):
                images = out["images"]
                views = 1
                if self.cfg.ten_crop:  # N x 10 x (C, H, W or H, W, C) -> N*10 rows, each sample's views together
                    views = images.shape[1]
                    images = images.reshape(-1, *images.shape[2:])
                if self.cfg.channels_last:
                    images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels_last
                flipped = torch.from_numpy(share.mirror[k * b : (k + 1) * b]).bool()
                valid = share.valid[k * b : (k + 1) * b]
                yield Batch(images, out["labels"].reshape(-1).long(), flipped,
                            None if valid.all() else torch.from_numpy(valid).to(images.device),
                            self.source.order.step_total(k, b), k, views)
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
