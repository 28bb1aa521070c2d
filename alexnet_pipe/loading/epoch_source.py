"""The DALI external-source callback that feeds a pipeline its epochs (no torch, no DALI imports).

DALI calls it with a BatchInfo (iteration within the epoch, epoch index since the pipeline
started); it answers with that batch's JPEG bytes, labels and augmentation parameters, or raises
StopIteration at the end of the epoch. It is stateless apart from caches, so DALI may run it in
several reader processes (``parallel=True``), each holding its own open shard files (and the
per-record checksums of the shards it has read, ``records.RecordReader``).
"""

from __future__ import annotations

import numpy as np

from alexnet_pipe.dataset.records import RecordReader, RecordTable
from alexnet_pipe.errors import DatasetError
from alexnet_pipe.loading.order import EpochShare, OrderConfig, epoch_share


class EpochSource:
    """Batch ``k`` of epoch ``first_epoch + epoch_idx``, for one rank. The first epoch starts at
    batch ``first_step`` (a run resumed mid-epoch); later ones at batch 0."""

    def __init__(self, table: RecordTable, order: OrderConfig, batch_size: int, first_epoch: int, first_step: int = 0,
                 lighting: tuple[np.ndarray, np.ndarray] | None = None):
        """``lighting``: (mean, rows) in the decoded channel order, with ``order.lighting`` > 0: each
        sample's normalisation mean is ``mean - alpha @ rows`` (rows[i] = eigenvalue_i * eigenvector_i),
        a sixth output; that subtracts the mean and adds the PCA lighting offset in one step."""
        self.table, self.order, self.batch_size, self.first_epoch = table, order, batch_size, first_epoch
        self.first_step = first_step
        self.lighting = lighting
        self._reader: RecordReader | None = None
        self._share: tuple[int, EpochShare] | None = None

    def share(self, epoch: int) -> EpochShare:
        """The rank's share of ``epoch`` (kept for the epoch: one permutation per epoch, not per batch)."""
        if self._share is None or self._share[0] != epoch:
            self._share = (epoch, epoch_share(self.order, epoch))
        return self._share[1]

    def __call__(self, info) -> tuple:
        share = self.share(self.first_epoch + info.epoch_idx)
        step = info.iteration + (self.first_step if info.epoch_idx == 0 else 0)
        start = step * self.batch_size
        if start >= len(share):
            raise StopIteration
        if self._reader is None:
            self._reader = RecordReader(self.table)
        end = start + self.batch_size
        jpegs, labels = [], np.empty(min(end, len(share)) - start, np.int32)
        for j, i in enumerate(share.indices[start:end]):
            data, labels[j] = self._reader.read(int(i))
            jpegs.append(np.frombuffer(data, np.uint8))
        out = (jpegs, labels, share.crop_x[start:end], share.crop_y[start:end], share.mirror[start:end])
        if self.lighting is None:
            return out
        mean, rows = self.lighting
        return (*out, (mean[None, :] - share.alpha[start:end] @ rows).astype(np.float32))

    def close(self) -> None:
        """Close the shard files this process opened (reader processes close theirs on exit)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __getstate__(self) -> dict:
        # Reader processes get the table and the config; open files and caches stay behind.
        return {**self.__dict__, "_reader": None, "_share": None}


# How DALI's reader processes pass on an exception: the pipeline's process raises a plain
# Exception whose text is the worker's traceback, which ends with this and the message.
_FROM_READER = "alexnet_pipe.errors.DatasetError: "


def raise_reader_error(exc: BaseException) -> None:
    """Raise the one-line DatasetError that a reader process raised, if ``exc`` carries one
    (``parallel=True``: a damaged record read there); return otherwise."""
    text = str(exc)
    if _FROM_READER in text:
        message = text.rsplit(_FROM_READER, 1)[1].strip().splitlines()
        raise DatasetError(message[0] if message else text) from exc
