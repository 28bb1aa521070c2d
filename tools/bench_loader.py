#!/usr/bin/env python3
"""Loader throughput: DALI's own shard readers (the old training loader) against the external source (the new one).

    .venv/bin/python tools/bench_loader.py [--images 5000] [--size 500x375] [--rounds 3] [--batch 128]
        [--threads CORES] [--warmup 3] [--read-workers 1,2] [--out DIR] [--results benchmarks/loader.md]

One dataset is made once: procedurally drawn ImageNet-like JPEGs (alexnet_pipe.apps.synthetic, 500x375;
drawing takes about 30 ms an image on one core, so --out keeps it for the next run) converted by the
CLI with --short-side 256 --format both. Then, in this one process, every
contender reads one whole training epoch per round; rounds are interleaved (the order rotates
each round) and medians are reported.

Contenders, all on the CPU (DALI with device_id=None, --threads CPU threads, batch --batch, crop 224):
  old         the loader before the external source, rebuilt here from `git show c0f51d2:alexnet_pipe/pipeline.py`:
              fn.readers.caffe(path=[every LMDB shard]) or fn.readers.mxnet(path=[every .rec],
              index_path=[the combined .idx]) with random_shuffle=True, initial_fill=4096,
              pad_last_batch=True -> fn.decoders.image(cpu) -> fn.crop_mirror_normalize with a random
              crop position (fn.random.uniform) and flip (fn.random.coin_flip), read through
              DALIGenericIterator(reader_name="reader", PARTIAL) as the old Loader did;
  new         alexnet_pipe.loading.open.epoch_loader(TrainConfig(backend="cpu", reader=..., read_workers=...)),
              exactly the loader `fit` uses: a fresh global permutation per epoch, records read by key
              seek (LMDB) or pread (RecordIO) in this process (read_workers=0) or in reader processes;
              decoding only the crop window (ROI decode, the default) or, as before, the whole image;
  read-only   no decoding: the old readers alone (a pipeline returning the reader's outputs), the new
              source inside a DALI pipeline (fn.external_source returning the JPEG bytes and labels;
              in this process, or in 1 and 2 reader processes with the training pipeline's queue
              depth), and the new source called directly from Python as DALI calls it (records/s).

Per round and contender: start-up = building the loader until its first batch is in hand (the
old readers fill their 4,096-record shuffle buffer, the new loader reads every LMDB key or .idx
into its record table, reader processes are spawned); then --warmup batches (counting the first)
are dropped, and img/s is measured over the rest of the epoch. Every epoch is checked: each
record's label read exactly once (the class counts equal the manifest's).

No figure is hard-coded: all come from the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchenv  # a sibling helper of the tools

SHUFFLE_BUFFER = 4096  # the old loader's initial_fill
CROP = 224
STAMP = ".bench_loader.json"


# ---------------------------------------------------------------------------- the dataset


def make_dataset(base: Path, images: int, size: tuple[int, int], seed: int, workers: int) -> Path:
    """Synthetic 500x375 JPEGs converted with --short-side 256 --format both; reused when ``base`` has them."""
    from alexnet_pipe.apps.synthetic import CLASSES, SynthConfig, make_image_tree

    per_class = math.ceil(images / len(CLASSES))
    spec = {"per_class": per_class, "size": list(size), "seed": seed, "short_side": 256}
    raw, data, stamp = base / "raw", base / "data", base / STAMP
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == spec and (data / "manifest.json").is_file():
        return data
    if base.exists() and any(base.iterdir()) and not stamp.is_file():
        raise SystemExit(f"{base} is not empty and was not made by this benchmark; choose another --out")
    for path in (raw, data):
        shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    make_image_tree(SynthConfig(raw, per_class, 0, size, CLASSES, seed))
    print(f"drew {per_class * len(CLASSES)} images in {time.perf_counter() - t0:.1f} s", flush=True)
    subprocess.run([sys.executable, "-m", "alexnet_pipe", "convert", str(raw), str(data), "--format", "both",
                    "--short-side", "256", "--workers", str(workers), "--no-progress"], check=True,
                   cwd=benchenv.REPO)
    stamp.write_text(json.dumps(spec), encoding="utf-8")
    return data


# ---------------------------------------------------------------------------- the old loader (c0f51d2)


def old_pipeline(root: Path, kind: str, batch: int, threads: int, mean: tuple, seed: int, decode: bool):
    """The old train graph: DALI's own reader with a shuffle buffer, decode, random crop + flip, mean."""
    from nvidia.dali import fn, pipeline_def, types

    from alexnet_pipe.dataset.manifest import load_dataset

    ds = load_dataset(root)
    if kind == "lmdb":
        reader, args = fn.readers.caffe, {"path": [str(p) for p in ds.lmdb_paths("train")]}
    else:
        recs, index = ds.recordio_paths("train")
        reader, args = fn.readers.mxnet, {"path": [str(p) for p in recs], "index_path": [str(index)]}

    @pipeline_def(enable_conditionals=False)
    def graph():
        jpegs, labels = reader(**args, shard_id=0, num_shards=1, pad_last_batch=True, random_shuffle=True,
                               initial_fill=SHUFFLE_BUFFER, name="reader")
        if not decode:
            return jpegs, labels
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        mirror = fn.random.coin_flip(probability=0.5)
        pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
        images = fn.crop_mirror_normalize(
            images, crop=(CROP, CROP), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
            mean=list(mean), std=[1.0, 1.0, 1.0], dtype=types.FLOAT,
            output_layout="HWC",  # TrainConfig.channels_last is on by default, as the new loader emits
            out_of_bounds_policy="pad", fill_values=0.0,
        )
        return images, labels

    return graph(batch_size=batch, num_threads=threads, device_id=None, seed=seed & 0x7FFFFFFF,
                 prefetch_queue_depth=2)


def old_batches(pipe) -> Iterator[np.ndarray]:
    """The old Loader's iteration: DALIGenericIterator over the reader's epoch, NHWC seen as NCHW."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    pipe.build()
    it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
    for (out,) in it:
        out["images"].permute(0, 3, 1, 2)
        yield out["labels"].reshape(-1).long().numpy()


def reader_batches(pipe, batch: int) -> Iterator[np.ndarray]:
    """One epoch of a reader-only pipeline (pad_last_batch: the last batch's padding is dropped)."""
    pipe.build()
    epoch = pipe.epoch_size("reader")
    for k in range(math.ceil(epoch / batch)):
        _, labels = pipe.run()
        yield np.array(labels.as_tensor()).reshape(-1)[: min(batch, epoch - k * batch)]


# ---------------------------------------------------------------------------- the new loader


def train_config(root: Path, kind: str, read_workers: int, ctx: Context, roi_decode: bool = True):
    from alexnet_pipe.config import TrainConfig

    return TrainConfig(data_dir=root, backend="cpu", batch_size=ctx.batch, crop=CROP, reader=kind,
                       read_workers=read_workers, data_threads=ctx.threads, rng_seed=ctx.seed, progress=False,
                       roi_decode=roi_decode)


def new_batches(loader) -> Iterator[np.ndarray]:
    try:
        for batch in loader:
            yield batch.labels.numpy()
    finally:
        loader.close()


def source_pipeline(source, batch: int, threads: int, read_workers: int = 0):
    """The new loader's external source alone in a DALI pipeline: JPEG bytes and labels, no decoding;
    with ``read_workers``, in reader processes set up exactly as the training pipeline sets them up
    (alexnet_pipe.loading.pipeline.source_options / pipeline_options: the same queue depth)."""
    from nvidia.dali import fn, pipeline_def, types

    from alexnet_pipe.loading.pipeline import LoaderConfig, pipeline_options, source_options

    cfg = LoaderConfig("train", True, batch, num_threads=threads, read_workers=read_workers)

    @pipeline_def(enable_conditionals=False)
    def graph():
        jpegs, labels, _, _, _ = fn.external_source(
            source=source, num_outputs=5, batch=True, batch_info=True,
            dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32], **source_options(cfg))
        return jpegs, labels

    return graph(**pipeline_options(cfg))


def source_batches(pipe) -> Iterator[np.ndarray]:
    pipe.build()
    while True:
        try:
            _, labels = pipe.run()
        except StopIteration:
            return
        yield np.array(labels.as_tensor()).reshape(-1)


def direct_batches(source) -> Iterator[np.ndarray]:
    """The source called as DALI calls it, batch after batch, from this Python thread."""
    from nvidia.dali.types import BatchInfo

    k = 0
    while True:
        try:
            _, labels, *_ = source(BatchInfo(k, 0))
        except StopIteration:
            return
        yield labels
        k += 1


def detached_source(root: Path, kind: str, ctx: Context):
    """The training loader's own source object, its pipeline stopped (the source reopens its files)."""
    from alexnet_pipe.loading.open import epoch_loader

    loader = epoch_loader(train_config(root, kind, 0, ctx), 0)
    source = loader.source
    loader.close()
    return source


# ---------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Context:
    root: Path
    batch: int
    threads: int
    warmup: int
    seed: int
    mean: tuple
    class_counts: np.ndarray


@dataclass
class Row:
    name: str
    reader: str  # lmdb / recordio
    read_workers: int | None  # None: not applicable (the old readers)
    start: Callable[[Context], Iterator[np.ndarray]]  # builds the loader; yields each batch's labels
    read_only: bool = False
    startup: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    checks: list[bool] = field(default_factory=list)

    def run(self, ctx: Context) -> None:
        t0 = time.perf_counter()
        batches = self.start(ctx)
        labels = [next(batches)]
        self.startup.append(time.perf_counter() - t0)
        for _ in range(ctx.warmup - 1):
            labels.append(next(batches))
        t1, timed = time.perf_counter(), 0
        for lab in batches:
            labels.append(lab)
            timed += len(lab)
        seconds = time.perf_counter() - t1
        if timed == 0:
            raise SystemExit(f"{self.name}: the epoch has no batches after the {ctx.warmup} warm-up batches; "
                             "use more --images or fewer --warmup")
        self.rate.append(timed / seconds)
        counts = np.bincount(np.concatenate(labels).astype(np.int64), minlength=len(ctx.class_counts))
        self.checks.append(bool(np.array_equal(counts, ctx.class_counts)))
        del batches
        gc.collect()  # tear the pipeline (and any reader processes) down before the next contender

    def spread(self) -> str:
        med = statistics.median(self.rate)
        return f"{med:,.0f} ({min(self.rate):,.0f}-{max(self.rate):,.0f})" if len(self.rate) > 1 else f"{med:,.0f}"


def contenders(read_workers: list[int]) -> tuple[list[Row], list[Row]]:
    from alexnet_pipe.loading.open import epoch_loader

    def old(kind: str, decode: bool = True):
        def start(ctx: Context):
            pipe = old_pipeline(ctx.root, kind, ctx.batch, ctx.threads, ctx.mean, ctx.seed, decode)
            return old_batches(pipe) if decode else reader_batches(pipe, ctx.batch)
        return start

    def new(kind: str, workers: int, roi_decode: bool = True):
        return lambda ctx: new_batches(epoch_loader(train_config(ctx.root, kind, workers, ctx, roi_decode), 0))

    def source_in_dali(kind: str, workers: int = 0):
        return lambda ctx: source_batches(source_pipeline(detached_source(ctx.root, kind, ctx), ctx.batch, ctx.threads,
                                                          workers))

    def source_direct(kind: str):
        return lambda ctx: direct_batches(detached_source(ctx.root, kind, ctx))

    full = [Row("old: fn.readers.caffe + shuffle buffer", "lmdb", None, old("lmdb")),
            Row("old: fn.readers.mxnet + shuffle buffer", "recordio", None, old("recordio")),
            Row("new: external source, whole-image decode", "lmdb", 0, new("lmdb", 0, False)),
            Row("new: external source, whole-image decode", "recordio", 0, new("recordio", 0, False)),
            Row("new: external source, ROI decode", "lmdb", 0, new("lmdb", 0)),
            Row("new: external source, ROI decode", "recordio", 0, new("recordio", 0))]
    full += [Row("new: external source, ROI decode", kind, w, new(kind, w)) for w in read_workers
             for kind in ("lmdb", "recordio")]
    reads = [Row("old: fn.readers.caffe alone", "lmdb", None, old("lmdb", False), True),
             Row("old: fn.readers.mxnet alone", "recordio", None, old("recordio", False), True)]
    reads += [Row("new: source in a DALI pipeline", kind, w, source_in_dali(kind, w), True) for w in [0, *read_workers]
              for kind in ("lmdb", "recordio")]
    reads += [Row("new: source called from Python", "lmdb", 0, source_direct("lmdb"), True),
              Row("new: source called from Python", "recordio", 0, source_direct("recordio"), True)]
    return full, reads


# ---------------------------------------------------------------------------- report


def full_table(rows: list[Row]) -> list[str]:
    base = statistics.median(rows[0].rate)
    lines = ["| loader | format | read workers | img/s median (min-max) | x old LMDB | start-up s median (min-max) "
             "| every record once |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        s = row.startup
        lines.append(
            f"| {row.name} | {row.reader} | {'' if row.read_workers is None else row.read_workers} | {row.spread()} "
            f"| {statistics.median(row.rate) / base:.2f} | {statistics.median(s):.2f} ({min(s):.2f}-{max(s):.2f}) "
            f"| {'yes' if all(row.checks) else 'NO'} |")
    return lines


def read_table(rows: list[Row]) -> list[str]:
    base = statistics.median(rows[0].rate)
    lines = ["| records read by | format | read workers | records/s median (min-max) | x old Caffe reader alone "
             "| every record once |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        workers = "" if row.read_workers is None else row.read_workers
        lines.append(f"| {row.name} | {row.reader} | {workers} | {row.spread()} "
                     f"| {statistics.median(row.rate) / base:.2f} | {'yes' if all(row.checks) else 'NO'} |")
    return lines


def report(command: str, started: str, work: Path, load: tuple, ctx: Context, records: int, shards: int,
           rounds: int, full: list[Row], reads: list[Row], mean_kib: float) -> str:
    return "\n".join([
        *benchenv.report_head("Loader throughput: DALI's own readers (old) against the external source (new)",
                              "tools/bench_loader.py", command, started, work, load),
        f"- dataset: {records:,} train records in {shards} shard{'s' if shards != 1 else ''} per format, "
        "synthetic 500x375 JPEGs converted "
        f"with --short-side 256 (mean RecordIO record {mean_kib:.1f} KiB); it fits in the page cache",
        f"- batch {ctx.batch}, crop {CROP}, {ctx.threads} DALI CPU threads, float32 NHWC output (the CPU training "
        f"loader's settings); median of {rounds} interleaved rounds, one epoch per round and contender, the "
        f"first {ctx.warmup} batches of each epoch not timed",
        "",
        "## Training loader: read, decode, random crop, flip, normalise (CPU)",
        "",
        *full_table(full),
        "",
        "## Reading records alone, no decoding",
        "",
        *read_table(reads),
        "",
        "## What these figures do and do not tell",
        "",
        "- They are CPU-only figures: DALI decodes on the CPU here, and on these cores decoding the "
        "JPEGs costs far more than reading them, so the training-loader rows mostly measure the decoder; "
        "a difference between old and new there is the reading cost that shows through, plus any "
        "scheduling difference (the old readers run inside DALI's C++ prefetch, the new source is Python "
        "called from DALI).",
        "- On a GPU, decoding moves to the device (nvJPEG / the hardware decoder) and the host's job is "
        "mainly to deliver the records: there the read-only rows are the ones that matter. A loader "
        "feeds a GPU fast enough if its records/s exceed the GPU's training img/s with room to spare.",
        "- The dataset is small and sits in the page cache: random access costs a memory lookup here, "
        "not a disk seek. On ImageNet converted at short side 256 (some 40-50 GB of JPEGs; "
        "more than some machines cache), the new "
        "loader's random reads hit the disk where the old readers read each shard front to back; that "
        "cost depends on the storage (NVMe, network file system, ...) and is not measured here.",
        "- The old readers' start-up includes filling the 4,096-record shuffle buffer; the new loader's "
        "includes reading every LMDB key (or every .idx) into its record table and, with read workers, "
        "spawning the reader processes. Both are paid once per loader (the trainer keeps one train "
        "loader for the whole run).",
        "- 'every record once': the labels of each epoch, counted per class, equal the manifest's class "
        "counts (for the old readers: DALI's epoch with pad_last_batch, as the old loader read it).",
        "",
    ])


# ---------------------------------------------------------------------------- main


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 500x375, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return w, h


def _parse_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"read workers must be >= 1, got {text!r}")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--images", type=int, default=5000,
                    help="train images (rounded up to a multiple of 10; default 5000, more than the old "
                         "loader's 4,096-record shuffle buffer)")
    ap.add_argument("--size", type=_parse_size, default=(500, 375), help="WIDTHxHEIGHT before conversion")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=benchenv.usable_cores(), help="DALI CPU threads (default: cores)")
    ap.add_argument("--warmup", type=int, default=3, help="batches of each epoch not timed (the first included)")
    ap.add_argument("--read-workers", type=_parse_list, default=[1, 2],
                    help="reader-process counts for the new loader besides 0 (default 1,2; '' for none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="keep the dataset here and reuse it on the next run (default: a temporary directory)")
    ap.add_argument("--results", type=Path, default=benchenv.REPO / "benchmarks" / "loader.md")
    args = ap.parse_args()
    if args.rounds < 1 or args.warmup < 1 or args.batch < 1 or args.threads < 1:
        raise SystemExit("--rounds, --warmup, --batch and --threads must be >= 1")

    command, started = benchenv.command_line(), benchenv.now()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        base = Path(tmp.name)
    else:
        base = args.out.resolve()
        base.mkdir(parents=True, exist_ok=True)
    try:
        env = benchenv.header(base)
        print("\n".join(env), flush=True)
        root = make_dataset(base, args.images, args.size, args.seed, benchenv.usable_cores())

        from alexnet_pipe.dataset.manifest import load_dataset
        from alexnet_pipe.dataset.mean import load_dataset_mean

        ds = load_dataset(root)
        split = ds.split("train")
        rec_bytes = sum(p.stat().st_size for p in ds.recordio_paths("train")[0])
        ctx = Context(root, args.batch, args.threads, args.warmup, args.seed, load_dataset_mean(root).rgb()[0],
                      np.asarray(split["class_counts"], np.int64))
        full, reads = contenders(args.read_workers)
        rows = full + reads
        load_before = os.getloadavg()[0]
        for r in range(args.rounds):
            k = r % len(rows)
            for row in rows[k:] + rows[:k]:
                row.run(ctx)
                workers = "" if row.read_workers is None else f", read workers {row.read_workers}"
                print(f"  round {r + 1}: {row.name} ({row.reader}{workers}): {row.rate[-1]:,.0f}/s, "
                      f"start-up {row.startup[-1]:.2f} s{'' if row.checks[-1] else ', RECORD CHECK FAILED'}",
                      flush=True)
        load = (load_before, os.getloadavg()[0])
        text = report(command, started, base, load, ctx, split["records"], len(split["shards"]), args.rounds,
                      full, reads, rec_bytes / split["records"] / 1024)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\n" + text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text, encoding="utf-8")
    print(f"results written to {args.results}")
    return 0 if all(all(row.checks) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
