"""Shared memory for DALI's reader processes: what a run needs in /dev/shm, and a start-up check.

With ``--read-workers N > 0`` the external source runs in N processes (``parallel=True``) that hand
each batch to the pipeline through a shared-memory slot. How DALI 2.4 lays them out
(``nvidia/dali/_multiproc/pool.py``, ``shared_batch.py``, ``dali/util/shared_mem.cc``):

- A slot is a file made with ``shm_open`` in ``/dev/shm`` (``/run/shm`` when that is missing),
  unlinked at once and passed to the workers as a descriptor: ``df`` shows the space, ``ls`` no file.
- A loader has ``keep_alive + source queue`` slots, one batch each (``batch=True``: one mini-batch
  per slot, whatever the worker count): ``keep_alive`` is the pipeline's ``prefetch_queue_depth``
  (batches the pipeline may still read), the source queue is the external source's
  ``prefetch_queue_depth`` (``pipeline.source_queue_depth``: one batch per worker plus the prefetch).
  So the read workers count through the queue, and with 4 workers and prefetch 2 a loader holds
  2 + (4 + 2) = 8 batches.
- A slot starts at 1 MiB (``min_initial_chunk_size``; ``bytes_per_sample_hint`` is not passed) and
  a batch that does not fit grows it with ``ftruncate`` to max(needed + 1 MiB, 2 x capacity). tmpfs
  charges only the pages written, so what a slot really holds is the largest batch written into it
  (measured: slots of 1 MiB capacity holding 52 KiB each, tests/gpu/test_gpu_readiness.py); the
  doubled capacity is address space. A write to a page that tmpfs cannot supply kills the reader
  with SIGBUS, hours into a run: hence the check before the pipeline starts.
- A batch is its JPEG bytes, each array padded to 128 bytes (``SAMPLE_ALIGNMENT``), the pickled
  per-array metadata, and the task message behind it: ``SAMPLE_OVERHEAD`` and ``BATCH_OVERHEAD``.

The estimate is ``SAFETY`` (2) x ranks on this machine x slots x batch x (mean record + overhead).
Why 2: a slot keeps the largest batch it ever held, not the mean one (JPEG sizes spread widely, and
small batches spread most); a val loader runs beside the train loader in ``fit``; NCCL's intra-node
transport also lives in /dev/shm; and a refusal costs a flag, a SIGBUS a run. Docker gives
containers 64 MiB by default, which ImageNet's ~110 KB records fill with 4 batches of 128.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.errors import TrainingError
from alexnet_pipe.formats import get_format
from alexnet_pipe.loading.pipeline import LoaderConfig, pipeline_options, source_options

SHM_PATH = "/dev/shm"
SAFETY = 2.0
SAMPLE_OVERHEAD = 512  # per record: up to 127 B of padding to 128 B, ~35 B of pickled SampleMeta; rounded up
BATCH_OVERHEAD = 16 * 1024  # per batch: the label/crop/flip arrays, the task message, page rounding


def slots(cfg: LoaderConfig) -> int:
    """Batches DALI holds in shared memory at once for one loader (0 without reader processes)."""
    if not cfg.read_workers:
        return 0
    return pipeline_options(cfg)["prefetch_queue_depth"] + source_options(cfg)["prefetch_queue_depth"]


def shm_need(batch_size: int, record_bytes: float, slots: int, ranks: int = 1, safety: float = SAFETY) -> int:
    """Bytes of /dev/shm that ``ranks`` loaders on this machine need: ``slots`` batches of
    ``batch_size`` records of ``record_bytes`` each, with DALI's overheads, times ``safety``."""
    if slots <= 0 or ranks <= 0:
        return 0
    per_batch = batch_size * (record_bytes + SAMPLE_OVERHEAD) + BATCH_OVERHEAD
    return math.ceil(safety * ranks * slots * per_batch)


def mean_record_bytes(ds: Dataset, split: str) -> float:
    """A split's mean stored record: the shard bytes the manifest records (in the format whose
    bytes are closest to the JPEGs first, ``Format.size_rank``: RecordIO's records are the JPEG plus
    a 24-byte frame; an LMDB file also holds its B-tree), else the files' sizes on disk, over the
    split's records. An upper bound of the JPEG bytes a reader passes on."""
    shards = ds.shard_entries(split)
    records = sum(s.records for s in shards)
    if not records:
        return 0.0
    formats = sorted(map(get_format, ds.formats), key=lambda f: f.size_rank)  # the closest to the JPEGs first
    for fmt in formats:
        if all(s.files(fmt.name).bytes is not None for s in shards):
            return sum(s.files(fmt.name).bytes for s in shards) / records
    total = 0
    for s in shards:
        path = Path(ds.root) / formats[0].data_path(s.files(formats[0].name))
        files = [path] if path.is_file() else list(path.glob("*")) if path.is_dir() else []
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total / records


def local_ranks(env: Mapping[str, str], world_size: int) -> int:
    """How many ranks share this machine's /dev/shm: torchrun's LOCAL_WORLD_SIZE, SLURM's
    SLURM_NTASKS_PER_NODE, else all ``world_size`` (the safe side)."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        try:
            return max(1, int(env[key].split("(")[0].split(",")[0]))
        except (KeyError, ValueError):
            continue
    return max(1, world_size)


def loader_shm_need(ds: Dataset, cfg: LoaderConfig, ranks: int = 1) -> int:
    """``shm_need`` for a loader built from ``cfg``, over ``ranks`` ranks on this machine."""
    n = slots(cfg)
    return shm_need(cfg.batch_size, mean_record_bytes(ds, cfg.split), n, ranks) if n else 0


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def check_shm(need_bytes: int, path: str = SHM_PATH, what: str = "DALI's reader processes") -> None:
    """Refuse to start, in one line, when ``path`` has less free space than ``need_bytes``.

    The line names the two ways out: a bigger /dev/shm (docker run --shm-size, sized to what is
    used already plus the need) or no reader processes (--read-workers 0)."""
    if need_bytes <= 0:
        return
    if path == SHM_PATH and not os.path.isdir(path) and os.path.isdir("/run/shm"):
        path = "/run/shm"  # where DALI looks next
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise TrainingError(f"{what} pass batches through {path}, which cannot be read ({exc.strerror}); "
                            "mount a tmpfs there (docker: --shm-size) or pass --read-workers 0") from exc
    free = st.f_bavail * st.f_frsize
    if free >= need_bytes:
        return
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    ask = math.ceil((used + need_bytes) / 2**20 / 64) * 64  # MiB, a multiple of 64
    raise TrainingError(
        f"{what} need about {_mib(need_bytes)} of shared memory and {path} has {_mib(free)} free: they would "
        f"die with SIGBUS mid-run; give the container more (docker run --shm-size={ask}m, or a bigger tmpfs "
        "on /dev/shm) or pass --read-workers 0 (records read in the training process)")


def check_loader_shm(ds: Dataset, cfg: LoaderConfig, ranks: int = 1, path: str = SHM_PATH) -> None:
    """``check_shm`` for a loader about to be built from ``cfg``, with ``ranks`` ranks on this machine."""
    need = loader_shm_need(ds, cfg, ranks)
    if need:
        check_shm(need, path, f"the {cfg.split} loader's {cfg.read_workers} reader process(es) x {ranks} rank(s)")
