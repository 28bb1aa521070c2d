#!/usr/bin/env python3
"""The levers toward 25,000 img/s on one H100, each measured against the same-run default.

    python tools/gpu_levers.py DATA_DIR -o OUT.json [--budget-s N] [-b gpu|cpu] [--steps K]
        [--warmup W] [-z B] [--crop C] [-d f32|bf16|f16] [--compile-backend NAME] [-i DEVICE]
        [--hw-loads 0.9,1.0] [--threads 8,12] [--min-seconds S] [--compile-s S] [--read-workers N]

DATA_DIR is a converted dataset (`alexnet-pipe convert`). In one process, every row is a real
measurement of img/s, and ``x_default`` is its ratio to the default row of its own kind, measured
in the same run. The default is what `train -b <backend>` runs: batch -z (128 on the GPU), the
loader `train` builds (Runtime.loader_config: ROI decoding, DALI's hardware-decoder share, 4 DALI
threads at most, read workers by config.default_read_workers, prefetch 2), bf16 on the GPU (f32 on
the CPU), channels_last, fused SGD on the GPU, eager, nn.LocalResponseNorm, 3-channel conv1.
Kinds of row:

  loader  the train loader alone (batches drawn, nothing else);
  e2e     the loader feeding train's step (alexnet_pipe.apps.step_timing.train_step: train's loss, a
          GradScaler with -d f16);
  model   train's step alone on one random batch (no loader); a model row and an e2e row with the
          same batch, compilation and model options share one model (compiled once: the row's
          "graphs_compiled" says how many graphs it compiled);
  lrn     the two LRN layers alone (norm1's and norm2's input shapes at this crop), forward and
          backward; img/s = batch / (seconds per step).

Levers (one at a time against the default of the row's kind):
  ROI decode off (LoaderConfig.roi_decode False: decode the whole image, then crop), loader and e2e;
  hw_decoder_load (--hw-loads) and more DALI threads (--threads): loader, GPU only;
  conv1 with 4 input channels (LoaderConfig.pad_channels + AlexNet(input_channels=4), a zero 4th
  filter plane: the same network), model and e2e, and the padding loader alone;
  the LRN layers as shifted sums ("sum") or torch.compile'd alone ("compiled"): lrn, model, e2e;
  batch 2 x -z and torch.compile (model.compile_fixed_batch, as train --compile): model and e2e.

Each row drops the batches its loader queued while starting and --warmup more (at least one
with compilation, which happens there, as cuDNN's autotuning does), then times --steps steps and
at least --min-seconds, passing over epochs as often as that takes; loaders are shared by rows
with the same settings (a row continues the epochs where the previous one stopped). Rows run in
order of value; a row that fails records its error and the others go on; a row timing when
--budget-s runs out stops there ("cut_short"), the remaining rows are recorded as skipped, and a
compile row is skipped when less is left than its compilation is likely to take (--compile-s).
OUT.json ({"rows": [...], ...}) is rewritten after every row, so a run cut short by a timeout
keeps what it measured. Exit status 1 when a row failed.

On the CPU (-b cpu: DALI with device_id=None) the defaults are -z 16, --crop 112, 3 steps (at
least 0.5 s) and torch.compile's aot_eager backend (inductor's CPU code takes minutes to build and
is not the GPU's); the GPU-only rows say so. The CPU run proves the rows, not the GPU's figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GPU_ONLY = "skipped: GPU only (DALI's hardware decoder and its CPU threads feed GPU decoding)"


@dataclass
class Lever:
    """One row: ``kind`` (loader / e2e / model / lrn), the lever it pulls and its settings."""

    name: str
    kind: str
    lever: str  # "default" or what is changed
    loader: dict = field(default_factory=dict)  # LoaderConfig overrides
    model: dict = field(default_factory=dict)  # AlexNet speed options (input_channels, lrn)
    batch_scale: int = 1  # batch = -z x this
    compile: bool = False
    gpu_only: bool = False

    @property
    def default(self) -> bool:
        return self.lever == "default"

    def compiles(self) -> bool:
        return self.compile or self.model.get("lrn") == "compiled"


def plan(hw_loads: list[float], threads: list[int], batch: int) -> list[Lever]:
    """Every row, most valuable first (the loader and the whole step, then the cheap model levers,
    compilation last: it is the slowest to measure)."""
    b2 = 2 * batch
    rows = [
        Lever("loader: default", "loader", "default"),
        Lever("e2e: default", "e2e", "default"),
        Lever("e2e: LRN as shifted sums", "e2e", "lrn sum", model={"lrn": "sum"}),
        Lever("model: default", "model", "default"),
        Lever("loader: full decode (no ROI)", "loader", "roi_decode off", loader={"roi_decode": False}),
        Lever("e2e: full decode (no ROI)", "e2e", "roi_decode off", loader={"roi_decode": False}),
    ]
    rows += [Lever(f"loader: hw_decoder_load {h:g}", "loader", f"hw_decoder_load {h:g}",
                   loader={"hw_decoder_load": h}, gpu_only=True) for h in sorted(hw_loads, reverse=True)]
    rows += [Lever(f"loader: {t} DALI threads", "loader", f"{t} threads", loader={"num_threads": t}, gpu_only=True)
             for t in threads]
    rows += [
        Lever(f"model: batch {b2}", "model", f"batch {b2}", batch_scale=2),
        Lever("model: conv1 4 channels", "model", "conv1 4 channels", model={"input_channels": 4}),
        Lever("model: LRN as shifted sums", "model", "lrn sum", model={"lrn": "sum"}),
        Lever("lrn: nn.LocalResponseNorm", "lrn", "default"),
        Lever("lrn: shifted sums", "lrn", "lrn sum", model={"lrn": "sum"}),
        Lever("loader: 4 channels (pad_output)", "loader", "pad channels", loader={"pad_channels": True}),
        Lever("e2e: conv1 4 channels (pad_output)", "e2e", "conv1 4 channels", loader={"pad_channels": True},
              model={"input_channels": 4}),
        Lever(f"loader: batch {b2}", "loader", f"batch {b2}", batch_scale=2),
        Lever(f"e2e: batch {b2}", "e2e", f"batch {b2}", batch_scale=2),
        Lever("lrn: torch.compile", "lrn", "lrn compiled", model={"lrn": "compiled"}),
        Lever("model: LRN torch.compile'd alone", "model", "lrn compiled", model={"lrn": "compiled"}),
        Lever("model: torch.compile", "model", "compile", compile=True),
        Lever("e2e: torch.compile", "e2e", "compile", compile=True),
        Lever(f"model: batch {b2} + torch.compile", "model", f"batch {b2} + compile", batch_scale=2, compile=True),
        Lever(f"e2e: batch {b2} + torch.compile", "e2e", f"batch {b2} + compile", batch_scale=2, compile=True),
    ]
    return rows


class Runner:
    """Runs the rows in one process, sharing loaders between rows with the same settings."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from alexnet_pipe.apps.step_timing import BenchConfig, check_device, device_of
        from alexnet_pipe.dataset.manifest import load_dataset

        self.args = args
        self.gpu = args.backend == "gpu"
        self.cfg = BenchConfig(backend=args.backend, device_id=args.device_id, batch_size=args.batch, crop=args.crop,
                               datatype=args.datatype, compile_backend=args.compile_backend,
                               iterations=args.warmup + 1, warmup=args.warmup, throughput_steps=args.steps,
                               min_seconds=args.min_seconds, read_workers=args.read_workers)
        check_device(self.cfg)
        self.device = device_of(self.cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # as train
        self.ds = load_dataset(args.data)
        self._loader = None  # (key, Loader, batches, Epochs): the one loader kept open between rows
        self._trainers: list = []  # [(key, Trainer)], the two used last: model and e2e rows share them

    def bench_cfg(self, lever: Lever):
        return replace(self.cfg, batch_size=self.cfg.batch_size * lever.batch_scale, compile=lever.compile,
                       num_classes=self.ds.num_classes)

    def loader(self, lever: Lever):
        """(Loader, endless batches) for the lever's loader settings, reusing the open one when equal."""
        from alexnet_pipe.apps.benchmark import Epochs, open_train_loader

        key = (lever.batch_scale, tuple(sorted(lever.loader.items())))
        if self._loader is not None and self._loader[0] == key:
            return self._loader[1], self._loader[2]
        self.close_loader()
        loader, _ = open_train_loader(self.bench_cfg(lever), self.args.data, **lever.loader)
        epochs = Epochs(lambda: loader)
        self._loader = (key, loader, iter(epochs), epochs)
        return loader, self._loader[2]

    def trainer(self, lever: Lever):
        """The model and step for the lever's batch, compilation and model options: shared by its
        model and e2e rows (a compiled one is compiled once; FixedBatch keeps every shape static)."""
        from alexnet_pipe.apps.step_timing import trainer

        key = (lever.batch_scale, lever.compile, tuple(sorted(self._model_kw(lever).items())))
        for k, t in self._trainers:
            if k == key:
                return t
        t = trainer(self.bench_cfg(lever), self.device, **self._model_kw(lever))
        self._trainers = [*self._trainers[-1:], (key, t)]
        return t

    def close_loader(self) -> None:
        if self._loader is not None:
            loader = self._loader[1]
            self._loader = None
            loader.close()

    def close(self) -> None:
        """Close the open loader and drop the kept models."""
        self.close_loader()
        self._trainers = []

    def measure(self, lever: Lever, max_seconds: float) -> dict:
        from alexnet_pipe.apps.benchmark import queued_batches
        from alexnet_pipe.apps.step_timing import batch_images, e2e_rate, model_rate, steady_rate, syncer

        cfg = self.bench_cfg(lever)
        if lever.compiles() and cfg.warmup < 1:  # compilation happens in the first step: never timed
            cfg = replace(cfg, warmup=1, iterations=2)
        if lever.kind == "model":
            return model_rate(cfg, self.device, self.trainer(lever), max_seconds)
        if lever.kind == "lrn":
            return self.lrn_rate(cfg, lever, max_seconds)
        loader, batches = self.loader(lever)
        epochs = self._loader[3]
        before = epochs.epochs
        skip = cfg.warmup + queued_batches(loader.cfg)
        if lever.kind == "loader":
            rate = steady_rate(batches, lambda b: b.images, batch_images, skip=skip, steps=cfg.throughput_steps,
                               min_seconds=cfg.min_seconds, max_seconds=max_seconds, sync=syncer(self.device))
        else:
            rate = e2e_rate(cfg, self.device, batches, skip, self.trainer(lever), max_seconds)
        knobs = loader.cfg.knobs()
        knobs["pad_channels"] = loader.cfg.pad_channels
        return {**rate, "epochs": epochs.epochs - before + 1, "steps_per_epoch": len(loader), "loader": knobs}

    def _model_kw(self, lever: Lever) -> dict:
        kw = dict(lever.model)
        if kw.get("lrn") == "compiled":
            kw["lrn_backend"] = self.args.compile_backend or "inductor"
        return kw

    def lrn_rate(self, cfg, lever: Lever, max_seconds: float) -> dict:
        """Both LRN layers alone, forward and backward, on inputs of their shapes at this crop, in
        the dtype autocast gives them and the model's memory format."""
        import torch

        from alexnet_pipe.apps.step_timing import steady_rate, syncer
        from alexnet_pipe.model.alexnet import _LRN, AlexNet, AlexNetConfig
        from alexnet_pipe.model.lrn import LRN

        shapes = {}
        probe = AlexNet(AlexNetConfig(num_classes=cfg.num_classes, crop=cfg.crop))
        hooks = [getattr(probe, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, i[0].shape[1:]))
                 for n in ("norm1", "norm2")]
        with torch.no_grad():
            probe(torch.zeros(1, 3, cfg.crop, cfg.crop))
        for h in hooks:
            h.remove()
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[cfg.datatype]
        gen = torch.Generator().manual_seed(cfg.seed)
        xs, gs = [], []
        for name in ("norm1", "norm2"):
            x = torch.relu(torch.randn(cfg.batch_size, *shapes[name], generator=gen)).mul_(10)
            x = x.to(self.device, dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            xs.append(x)
            gs.append(torch.randn(x.shape, generator=gen).to(self.device, dtype))
        impl = lever.model.get("lrn", "torch")
        norm = LRN(**_LRN, impl=impl, backend=self.args.compile_backend or "inductor")

        def step(_):
            ys = [norm(x) for x in xs]
            torch.autograd.backward(ys, gs)

        rate = steady_rate(itertools.repeat(None), step, lambda _: cfg.batch_size, skip=cfg.warmup,
                           steps=cfg.throughput_steps, min_seconds=cfg.min_seconds, max_seconds=max_seconds,
                           sync=syncer(self.device))
        return {**rate, "shapes": {n: list(s) for n, s in shapes.items()}, "dtype": cfg.datatype}


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def describe(lever: Lever, runner: Runner) -> dict:
    cfg = runner.bench_cfg(lever)
    return {"batch_size": cfg.batch_size, "crop": cfg.crop, "datatype": cfg.datatype,
            "channels_last": cfg.channels_last, "compile": lever.compile,
            **({"compile_backend": runner.args.compile_backend or "inductor"} if lever.compiles() else {}),
            **lever.model, **{f"loader.{k}": v for k, v in lever.loader.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("data", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True, help="JSON file for the rows")
    ap.add_argument("-b", "--backend", choices=["gpu", "cpu"], default=None, help="default: gpu when torch sees one")
    ap.add_argument("-i", "--device-id", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="the whole run; later rows are skipped with a note")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row [gpu 50, cpu 3]")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per row, besides the loader's queue "
                    "[gpu 5, cpu 1]")
    ap.add_argument("--min-seconds", type=float, default=None, help="time each row at least this long [gpu 0, "
                    "cpu 0.5: a CPU loader row's few steps take milliseconds]")
    ap.add_argument("-z", "--batch", type=int, default=None, help="the default batch [gpu 128, cpu 16]")
    ap.add_argument("--crop", type=int, default=None, help="[gpu 224, cpu 112]")
    ap.add_argument("-d", "--datatype", choices=["f32", "bf16", "f16"], default=None, help="[gpu bf16, cpu f32]")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend [gpu inductor, cpu aot_eager]")
    ap.add_argument("--compile-s", type=float, default=None,
                    help="seconds a compile row needs at least; skipped with less left [gpu 30, cpu 5]")
    ap.add_argument("--read-workers", type=int, default=None,
                    help="the loader's reader processes [train's default: config.default_read_workers]")
    ap.add_argument("--hw-loads", default="0.9,1.0", help="hw_decoder_load values (GPU)")
    ap.add_argument("--threads", default="8,12", help="DALI CPU thread counts (GPU)")
    args = ap.parse_args(argv)
    if args.backend is None:
        import torch

        args.backend = "gpu" if torch.cuda.is_available() else "cpu"
    gpu = args.backend == "gpu"
    for name, on_gpu, on_cpu in (("steps", 50, 3), ("warmup", 5, 1), ("batch", 128, 16), ("crop", 224, 112),
                                 ("datatype", "bf16", "f32"), ("compile_backend", "inductor", "aot_eager"),
                                 ("compile_s", 30.0, 5.0), ("min_seconds", 0.0, 0.5)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("--steps and -z must be >= 1, --warmup >= 0")
    hw_loads = [float(v) for v in args.hw_loads.split(",") if v.strip()]
    threads = [int(v) for v in args.threads.split(",") if v.strip()]

    began = time.perf_counter()
    deadline = began + args.budget_s if args.budget_s is not None else None
    levers = plan(hw_loads, threads, args.batch)
    rows = [{"name": lv.name, "kind": lv.kind, "lever": lv.lever, "default": lv.default, "status": "not reached",
             "img_per_s": None, "x_default": None} for lv in levers]
    meta = {"backend": args.backend, "data": str(args.data), "batch_size": args.batch, "crop": args.crop,
            "datatype": args.datatype, "steps": args.steps, "warmup": args.warmup, "budget_s": args.budget_s,
            "compile_backend": args.compile_backend, "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "host": platform.processor() or platform.machine()}

    def write() -> None:
        meta["elapsed_s"] = time.perf_counter() - began
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps({"rows": rows, **meta}, indent=1) + "\n", encoding="utf-8")
        tmp.replace(args.output)

    try:
        runner = Runner(args)
    except Exception as exc:  # no device, no dataset: every row says why
        for row in rows:
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        write()
        print(f"cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    meta["device"] = (__import__("torch").cuda.get_device_name(runner.device) if gpu else meta["host"])
    defaults: dict[str, float] = {}
    failed = False
    try:
        for lever, row in zip(levers, rows):
            row["settings"] = describe(lever, runner)
            left = None if deadline is None else deadline - time.perf_counter()
            if lever.gpu_only and not gpu:
                row["status"] = GPU_ONLY
            elif left is not None and left <= 0:
                row["status"] = f"skipped: budget (--budget-s {args.budget_s:g}) spent"
            elif left is not None and lever.compiles() and left < args.compile_s:
                row["status"] = (f"skipped: {left:.0f} s of --budget-s left, compilation needs about "
                                 f"{args.compile_s:g} s (--compile-s)")
            else:
                row["status"] = "running"  # what a file cut short by a timeout shows for this row
                write()
                t0 = time.perf_counter()
                graphs = compiled_graphs()
                try:
                    row.update(runner.measure(lever, left if left is not None else None))
                    row["status"] = "ok"
                    if lever.compiles():  # 0: a model compiled by an earlier row, reused
                        row["graphs_compiled"] = compiled_graphs() - graphs
                    if lever.default:
                        defaults[lever.kind] = row["img_per_s"]
                except Exception as exc:  # one lever failing must not cost the others
                    failed = True
                    runner.close()  # a loader or model that failed may be broken: the next row builds its own
                    row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500],
                               trace=traceback.format_exc(limit=3)[-1500:])
                row["seconds"] = time.perf_counter() - t0
            if row.get("img_per_s") and lever.kind in defaults:
                row["x_default"] = row["img_per_s"] / defaults[lever.kind]
            elif row.get("img_per_s"):
                row["note"] = f"no {lever.kind} default row measured in this run"
            shown = (f"{row['img_per_s']:>10,.0f} img/s  x{row['x_default']:.2f}" if row.get("x_default")
                     else f"{row['img_per_s']:>10,.0f} img/s" if row.get("img_per_s")
                     else row.get("error", row["status"]))
            print(f"{lever.name:<42} {shown}", flush=True)
            write()
    finally:
        runner.close()
        write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
