"""Data-parallel setup and the few collectives training needs, on torch.distributed.

A run with one process uses the same calls; they cost nothing there. Under torchrun each rank
builds a ``Dist`` from its rank and world size (the CLI reads them from torchrun's environment),
wraps the model in DistributedDataParallel, and sums its metrics with the other ranks. NCCL
carries GPU runs and gloo CPU runs; a rank that dies or stops answering surfaces as a
``TrainingError`` on the others within ``timeout_s`` (usually at once: the peer's sockets close).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrainingError


@dataclass(frozen=True)
class DistConfig:
    rank: int = 0
    world_size: int = 1
    timeout_s: float = 600.0  # a collective waiting longer than this ends the job

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1}")
        if self.timeout_s <= 0:
            raise ValueError(f"the distributed timeout must be > 0 s, got {self.timeout_s}")


class Dist:
    """This process's place in the job, and sums/gathers over all ranks (no-ops alone)."""

    def __init__(self, cfg: DistConfig, device: torch.device):
        self.rank, self.world_size, self.device = cfg.rank, cfg.world_size, device
        self._owns_group = False
        if self.active and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:  # env:// reads MASTER_ADDR/MASTER_PORT, which torchrun sets
                dist.init_process_group(backend, rank=cfg.rank, world_size=cfg.world_size,
                                        timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                        device_id=device if device.type == "cuda" else None)
            except (ValueError, RuntimeError) as exc:
                raise TrainingError(f"cannot join the distributed job as rank {cfg.rank} of {cfg.world_size} "
                                    f"({str(exc).splitlines()[0]}); start it with torchrun or --nproc") from exc
            self._owns_group = True

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints progress."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, bf16_grads: bool = False) -> torch.nn.Module:
        """DistributedDataParallel around ``model`` (which stays the one to save), or the model itself.
        ``bf16_grads``: all-reduce gradients in bfloat16, half the bytes of float32 (docs/SCALING.md)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradients written straight into the all-reduce buckets: one copy less per step.
        ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        if bf16_grads:
            ddp.register_comm_hook(None, _bf16_allreduce)
        return ddp

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over all ranks, in place (every rank must call this at the same point)."""
        if self.active:
            with self.collective("a metrics sum"):
                for t in tensors:
                    dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def gather(self, obj) -> list:
        """``obj`` from every rank, in rank order (small, picklable values only)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        with self.collective("a start-up exchange"):
            dist.all_gather_object(out, obj)
        return out

    def check_same(self, settings: dict) -> None:
        """Refuse to start when ranks disagree on something global (the epoch order, the lr, ...)."""
        mine = json.dumps(settings, sort_keys=True, default=str)
        everyone = self.gather(mine)
        first = json.loads(everyone[0])
        for rank, text in enumerate(everyone[1:], start=1):
            theirs = json.loads(text)
            differ = sorted(k for k in first.keys() | theirs.keys() if first.get(k) != theirs.get(k))
            if differ:
                k = differ[0]
                raise TrainingError(f"rank {rank} disagrees with rank 0 on {k} ({theirs.get(k)!r} vs "
                                    f"{first.get(k)!r}); start every rank with the same command line and data")

    def barrier(self) -> None:
        if self.active:
            with self.collective("a barrier"):
                dist.barrier()

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a lost peer into one line instead of a backend trace."""
        try:
            yield
        except (dist.DistError, RuntimeError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise TrainingError(f"rank {self.rank}: {what} with the other ranks failed "
                                f"({lines[0] if lines else type(exc).__name__}); another rank has probably "
                                "died: see its output, then resume from the last checkpoint") from exc

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def _bf16_allreduce(group, bucket):  # no annotations: DDP checks them against real types
    """DDP comm hook: average a gradient bucket over the ranks in bfloat16, then widen it back.
    (torch's own ``bf16_compress_hook`` does the same but refuses gloo, which CPU runs use.)"""
    buffer = bucket.buffer()
    world = dist.get_world_size(group)
    half = buffer.to(torch.bfloat16).div_(world)
    future = dist.all_reduce(half, group=group, async_op=True).get_future()

    def widen(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(widen)
