#!/usr/bin/env python3
"""Sweep the DALI settings that matter over the training loader: hardware-decoder share, CPU threads, prefetch depth.

    python tools/dali_sweep.py DATA_DIR -o sweep.json [--device-id 0 | --cpu] [--batch 256]
        [--hw-loads 0,0.65,0.9,1] [--threads 2,4,8,16] [--prefetch 1,2,3,4] [--read-workers N]
        [--seconds 2] [--budget-s 90]

DATA_DIR is a converted dataset (`alexnet-pipe convert`). Each setting builds the training
loader exactly as `alexnet-pipe train` does (alexnet_pipe.loading.open.epoch_loader over a TrainConfig:
external source with train's read workers, ROI decode, random crop + flip, normalise; fp16 NHWC
on the GPU), drops --warmup batches, then counts images for
--seconds (passing over epochs as often as needed) and reports img/s. One knob is varied at a
time around the base setting (DALI's default hardware share, --base-threads, prefetch 2); a last
row combines the best value of each knob. --budget-s bounds the whole sweep: settings left when
it is spent are reported as not run. Every row goes to the -o JSON file (kind "loader"), with
the `alexnet-pipe train` command line that trains with the fastest row's settings (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class Setting:
    hw_decoder_load: float | None  # None: DALI's default
    threads: int
    prefetch: int
    varied: str  # which knob this row varies ("base", "hw_decoder_load", "threads", "prefetch", "best")


def settings(hw_loads: list[float], threads: list[int], prefetch: list[int], base_threads: int,
             gpu: bool) -> list[Setting]:
    """One knob at a time around the base; the hardware share only where decoding is on the GPU."""
    rows = [Setting(None, base_threads, 2, "base")]
    if gpu:
        rows += [Setting(h, base_threads, 2, "hw_decoder_load") for h in hw_loads]
    rows += [Setting(None, t, 2, "threads") for t in threads if t != base_threads]
    rows += [Setting(None, base_threads, p, "prefetch") for p in prefetch if p != 2]
    return rows


def best_of(rows: list[dict]) -> Setting | None:
    """The best value of each knob, from the rows that vary it (base values where none ran)."""
    ran = [r for r in rows if r.get("img_per_s")]
    if not ran:
        return None
    base = next((r for r in ran if r["varied"] == "base"), ran[0])

    def pick(knob: str):
        cands = [r for r in ran if r["varied"] in (knob, "base")]
        return max(cands, key=lambda r: r["img_per_s"])[knob] if cands else base[knob]

    return Setting(pick("hw_decoder_load"), pick("threads"), pick("prefetch"), "best")


def measure(data: Path, s: Setting, device_id: int | None, batch: int, warmup: int, seconds: float,
            read_workers: int) -> dict:
    """img/s of the train loader with setting ``s``, built as `alexnet-pipe train` builds it (the
    same TrainConfig defaults, read workers included); start-up is building it until its first batch."""
    import torch

    from alexnet_pipe.config import TrainConfig
    from alexnet_pipe.loading.open import epoch_loader

    gpu = device_id is not None
    cfg = TrainConfig(data_dir=data, backend="gpu" if gpu else "cpu", device_id=device_id or 0,
                      datatype="bf16" if gpu else "f32", batch_size=batch, data_threads=s.threads,
                      read_workers=read_workers, hw_decoder_load=s.hw_decoder_load, prefetch=s.prefetch,
                      progress=False)
    sync = (lambda: torch.cuda.synchronize(device_id)) if gpu else (lambda: None)
    t0 = time.perf_counter()
    loader = epoch_loader(cfg, 0)
    startup = seen = batches = 0
    start = None
    try:
        while True:
            before = batches
            for batch_out in loader:
                batches += 1
                if batches == 1:
                    startup = time.perf_counter() - t0
                if batches == warmup:
                    sync()
                    start, seen = time.perf_counter(), 0
                    continue
                seen += batch_out.labels.shape[0]
                if start is not None and time.perf_counter() - start >= seconds:
                    break
            if start is not None and time.perf_counter() - start >= seconds:
                break
            if batches == before:
                raise ValueError(f"{data} has no training batches")
        sync()
        elapsed = time.perf_counter() - start
        knobs = loader.cfg.knobs()
    finally:
        loader.close()
    return {**asdict(s), "kind": "loader", "baseline": False, "img_per_s": seen / elapsed, "startup_s": startup,
            "timed_images": seen, "timed_s": elapsed, "batch_size": batch, "read_workers": read_workers,
            "roi_decode": knobs["roi_decode"], "device": knobs["device"]}


def train_command(data: Path, best: dict, device_id: int | None) -> str:
    """The `alexnet-pipe train` command line that trains with the best row's settings."""
    import shlex

    args = ["alexnet-pipe", "train", "-w", str(data), "-b", "cpu" if device_id is None else "gpu",
            "-z", str(best["batch_size"]), "--data-threads", str(best["threads"]), "--prefetch", str(best["prefetch"]),
            "--read-workers", str(best["read_workers"])]
    if device_id:
        args += ["-i", str(device_id)]
    if best.get("hw_decoder_load") is not None:
        args += ["--hw-decoder-load", f"{best['hw_decoder_load']:g}"]
    return shlex.join(args)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("data", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True, help="JSON file for the rows")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--device-id", type=int, default=0)
    where.add_argument("--cpu", action="store_true", help="decode on the CPU (device_id=None)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hw-loads", type=_floats, default=[0.0, 0.65, 0.9, 1.0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ap.add_argument("--threads", type=_ints, default=sorted({2, 4, max(1, cores // 2), cores}))
    ap.add_argument("--base-threads", type=int, default=max(1, cores // 2))
    ap.add_argument("--prefetch", type=_ints, default=[1, 2, 3, 4])
    ap.add_argument("--read-workers", type=int, default=None,
                    help="reader processes [default: as `alexnet-pipe train` picks for the backend]")
    ap.add_argument("--warmup", type=int, default=3, help="batches not timed, the first included")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per setting")
    ap.add_argument("--budget-s", type=float, default=90.0, help="the whole sweep; later settings are skipped")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.warmup < 1 or args.seconds <= 0:
        ap.error("--batch and --warmup must be >= 1, --seconds > 0")
    device_id = None if args.cpu else args.device_id
    from alexnet_pipe.config import default_read_workers

    read_workers = (default_read_workers("cpu" if args.cpu else "gpu") if args.read_workers is None
                    else args.read_workers)
    began = time.perf_counter()
    rows: list[dict] = []
    plan = settings(args.hw_loads, args.threads, args.prefetch, args.base_threads, device_id is not None)
    failed = False
    for s in plan + [None]:  # None: the best-of row, chosen once the others ran
        if s is None:
            s = best_of(rows)
            if s is None:
                break
        if rows and time.perf_counter() - began > args.budget_s:  # the base row always runs
            rows.append({**asdict(s), "kind": "loader", "img_per_s": None, "skipped": "budget spent"})
            continue
        try:
            row = measure(args.data, s, device_id, args.batch, args.warmup, args.seconds, read_workers)
        except Exception as exc:  # one setting failing (e.g. a load DALI refuses) must not end the sweep
            failed = True
            row = {**asdict(s), "kind": "loader", "img_per_s": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
        rows.append(row)
        shown = f"{row['img_per_s']:,.0f} img/s" if row.get("img_per_s") else row.get("error", "")
        print(f"{s.varied:>15}: hw {s.hw_decoder_load}, threads {s.threads}, prefetch {s.prefetch}: {shown}",
              flush=True)
    ran = [r for r in rows if r.get("img_per_s")]
    command = train_command(args.data, max(ran, key=lambda r: r["img_per_s"]), device_id) if ran else None
    if command:
        print(f"train with the best setting: {command}", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - began, "train_command": command},
                                      indent=1) + "\n", encoding="utf-8")
    return 1 if failed or not any(r.get("img_per_s") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
