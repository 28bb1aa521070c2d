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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alexnet_pipe.errors import ConfigError, TrainingError


def launched(env: Mapping[str, str]) -> bool:
    """Whether a launcher (torchrun, or SLURM with RANK/WORLD_SIZE exported) started this process as a rank."""
    return "RANK" in env and "WORLD_SIZE" in env


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    if key not in env:
        return None
    text = env[key].strip()
    if key == "SLURM_GPUS_PER_TASK":  # "2", or "h100:2" with a typed --gpus-per-task
        text = text.rsplit(":", 1)[-1]
    try:
        value = int(text)
    except ValueError:
        raise TrainingError(f"{key}={env[key]!r} is not a number; the launcher sets it to this process's "
                            "place on the machine") from None
    if value < 0:
        raise TrainingError(f"{key}={value} is negative; the launcher sets it to this process's place on the machine")
    return value


def local_device(env: Mapping[str, str], device_count: int) -> int:
    """The CUDA device (an index into the devices this process sees) that this rank trains on.

    ``env`` is the process's environment, ``device_count`` what ``torch.cuda.device_count()`` says.
    The rules, in order:

    - no CUDA device: the local rank, unused (a CPU run; ``-b gpu`` is refused elsewhere);
    - SLURM gave each task its own GPUs (``--gpus-per-task=k`` binds them: the task sees exactly
      its k) and this rank is the task itself (no torchrun inside it): the task's first GPU, 0;
    - ``LOCAL_RANK`` (torchrun), else ``SLURM_LOCALID``, below the device count, with no more ranks
      on this machine (``LOCAL_WORLD_SIZE``) than devices: that index, as torchrun users expect;
    - the process sees one device and ``CUDA_VISIBLE_DEVICES`` names exactly one: a launcher gave
      each rank its own GPU (SLURM binding, or ``CUDA_VISIBLE_DEVICES=$LOCAL_RANK`` per rank): 0;
    - no local rank at all but only one device, or one rank in the job: 0.

    Anything else is ambiguous (more local ranks than visible GPUs, no local rank on a multi-GPU
    machine): ``TrainingError`` in one line, raised alike on every rank, so no rank starts and
    waits for the others. Ranks that end up on one GPU anyway (``CUDA_VISIBLE_DEVICES=0`` for all)
    are refused by NCCL at start-up ("Duplicate GPU detected").
    """
    local_rank, slurm_local = _env_int(env, "LOCAL_RANK"), _env_int(env, "SLURM_LOCALID")
    local = local_rank if local_rank is not None else slurm_local
    if device_count < 1:
        return local or 0
    ranks_here = _env_int(env, "LOCAL_WORLD_SIZE")
    per_task = _env_int(env, "SLURM_GPUS_PER_TASK")
    rank_is_task = slurm_local is not None and ranks_here is None and local_rank in (None, slurm_local)
    if rank_is_task and per_task == device_count:
        return 0
    if local is not None and local < device_count and (ranks_here is None or ranks_here <= device_count):
        return local
    visible = env.get("CUDA_VISIBLE_DEVICES")
    named = [v for v in visible.split(",") if v.strip()] if visible is not None else None
    if device_count == 1 and named is not None and len(named) == 1:
        return 0
    if local is None and (device_count == 1 or _env_int(env, "WORLD_SIZE") == 1):
        return 0
    fix = (f"give each rank its own GPU (torchrun --nproc-per-node {device_count} or fewer, SLURM "
           "--gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank), or train with -b cpu")
    shown = visible if visible is not None else "unset"
    sees = f"this process sees {device_count} GPU(s) (CUDA_VISIBLE_DEVICES={shown})"
    if local is None:
        raise TrainingError(f"RANK and WORLD_SIZE are set but neither LOCAL_RANK nor SLURM_LOCALID, and {sees}: "
                            f"cannot tell which GPU is this rank's; start the ranks with torchrun, or {fix}")
    of = f" of {ranks_here}" if ranks_here is not None else ""
    raise TrainingError(f"cannot tell which GPU is local rank {local}{of}'s: {sees}; {fix}")


@dataclass(frozen=True)
class DistConfig:
    rank: int = 0
    world_size: int = 1
    timeout_s: float = 600.0  # a collective waiting longer than this ends the job

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} outside 0..{self.world_size - 1}")
        if self.timeout_s <= 0:
            raise ConfigError(f"the distributed timeout must be > 0 s, got {self.timeout_s}")


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


def launcher_placement(env: Mapping[str, str], device_count: int | None = None) -> dict:
    """This process's ``rank``, ``world_size`` and ``device_id`` under torchrun or SLURM (read from
    their environment variables ``env``), as TrainConfig fields; {} when no launcher started it.

    The GPU follows ``local_device``: LOCAL_RANK (or SLURM_LOCALID) where it indexes
    the ``device_count`` visible devices (None: ``torch.cuda.device_count()``), device 0 where the
    launcher gave each rank its own (SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank). The
    backend is not known here: an ambiguous layout gets device 0, unused on the CPU and refused,
    with the reason, by ``runtime.torch_device`` on a GPU run only."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return {}
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    try:
        device = local_device(env, device_count)
    except TrainingError:  # ambiguous: unused on the CPU, and torch_device refuses it on the GPU
        device = 0
    return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]), "device_id": device}
