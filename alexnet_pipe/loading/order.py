"""Which records one process reads in one epoch, in which order, with which crop and flip (pure).

Training draws a fresh permutation of the whole split every epoch from (seed, epoch) alone, as
torch's DistributedSampler does, so it is the same on every rank and every machine, and a record's
neighbours in one epoch are unrelated to its neighbours in the next. (DALI's own readers cannot do
this: the Caffe reader walks each LMDB with a cursor and the MXNet reader sorts its index by
offset, so with a shuffle buffer a record would meet the same few thousand neighbours every
epoch.) The crop position and flip of every sample are drawn here too, per epoch position, so the
data of an epoch is a pure function of (seed, epoch): a resumed run, another rank count, `inspect`
and the benchmarks all see exactly what training sees.

Ranks take every ``world_size``-th position of the epoch order. Each gets the same number of
samples; where the split does not divide evenly the last positions wrap to the start of the order
and are marked invalid (padding: they keep the ranks in step and must count nowhere).

Worked example: 10 records, 3 ranks, train. The order is a permutation p of 0..9; rank 1 reads
positions 1, 4, 7 and 10, i.e. p[1], p[4], p[7] and p[0] (position 10 wraps), the last invalid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alexnet_pipe.errors import ConfigError

_STREAM = 0xA1E7  # separates this random stream from any other use of the run's seed
_LIGHTING_STREAM = 0x11E7  # the PCA lighting alphas: their own stream, so lighting 0 changes no other draw


@dataclass(frozen=True)
class OrderConfig:
    """What fixes the order: everything but the epoch."""

    records: int  # records in the split
    train: bool  # permuted with random crops and flips; False: stored order, centre crop
    seed: int = 0
    rank: int = 0  # this process (torchrun rank)
    world_size: int = 1  # processes sharing the split
    subset_pct: float = 100.0  # train only: the first ceil(pct% of records) of each epoch's order
    lighting: float = 0.0  # train only: the std of the PCA lighting alphas (Krizhevsky et al. 2012); 0: none

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lighting) and self.lighting >= 0):
            raise ConfigError(f"lighting must be a number >= 0, got {self.lighting}")
        if self.records < 1:
            raise ConfigError("a split needs at least one record")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} outside 0..{self.world_size - 1}")
        if not 0 < self.subset_pct <= 100:
            raise ConfigError(f"subset percentage must be in (0, 100], got {self.subset_pct}")

    @property
    def epoch_records(self) -> int:
        """Distinct records read per epoch, over all ranks."""
        if not self.train:
            return self.records
        return max(1, math.ceil(self.records * self.subset_pct / 100))

    @property
    def per_rank(self) -> int:
        """Samples each rank reads per epoch, padding included."""
        return math.ceil(self.epoch_records / self.world_size)

    def step_total(self, step: int, batch_size: int) -> int:
        """Real (non-padding) samples over all ranks in ``step`` of an epoch, each rank reading
        ``batch_size``: step k covers the global positions [k*b*W, min((k+1)*b, per_rank)*W)."""
        start = step * batch_size * self.world_size
        end = min((step + 1) * batch_size, self.per_rank) * self.world_size
        return max(0, min(end, self.epoch_records) - start)


@dataclass(frozen=True)
class EpochShare:
    """One rank's share of an epoch: record numbers in reading order and each sample's augmentation."""

    indices: np.ndarray  # int64 record numbers (positions in the split's stored order)
    valid: np.ndarray  # bool; False = padding
    crop_x: np.ndarray  # float32 in [0, 1): crop window position, left .. right
    crop_y: np.ndarray  # float32 in [0, 1): top .. bottom
    mirror: np.ndarray  # int32 0/1: flip horizontally
    alpha: np.ndarray | None = None  # (n, 3) float64 PCA lighting alphas; None: no lighting

    def __len__(self) -> int:
        return len(self.indices)


def epoch_order(cfg: OrderConfig, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The global epoch: (record order, crop_x, crop_y, mirror), each of length ``epoch_records``."""
    m = cfg.epoch_records
    if not cfg.train:
        half = np.full(m, 0.5, np.float32)
        return np.arange(m, dtype=np.int64), half, half, np.zeros(m, np.int32)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed % 2**63, epoch, _STREAM])))
    order = rng.permutation(cfg.records)[:m].astype(np.int64)
    crop_x = rng.random(m, dtype=np.float32)
    crop_y = rng.random(m, dtype=np.float32)
    mirror = rng.integers(0, 2, m, dtype=np.int32)
    return order, crop_x, crop_y, mirror


def epoch_alphas(cfg: OrderConfig, epoch: int) -> np.ndarray | None:
    """The global epoch's PCA lighting alphas, (epoch_records, 3) float64 ~ N(0, lighting), one
    triple per epoch position from (seed, epoch) alone; None without lighting (or for val)."""
    if not cfg.train or not cfg.lighting:
        return None
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed % 2**63, epoch, _LIGHTING_STREAM])))
    return rng.standard_normal((cfg.epoch_records, 3)) * cfg.lighting


def epoch_share(cfg: OrderConfig, epoch: int) -> EpochShare:
    """This rank's share of ``epoch`` (see the module docstring for the padding rule)."""
    order, crop_x, crop_y, mirror = epoch_order(cfg, epoch)
    m = len(order)
    positions = np.arange(cfg.rank, cfg.per_rank * cfg.world_size, cfg.world_size)
    valid = positions < m
    positions = positions % m
    alpha = epoch_alphas(cfg, epoch)
    return EpochShare(order[positions], valid, crop_x[positions], crop_y[positions], mirror[positions],
                      None if alpha is None else alpha[positions])
