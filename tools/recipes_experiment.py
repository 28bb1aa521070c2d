#!/usr/bin/env python3
"""The recipes' small experiment: top-1 with and without --lighting and ten-crop testing, and the
CPU cost of each recipe option.

    .venv/bin/python tools/recipes_experiment.py OUT [--seeds 0 1 2] [--epochs 18] [--markdown FILE]

Two image sets drawn by tools/make_shapes.py (120 train / 30 val per class, 10 classes, 96x72):
"shapes", the demo's (texture 0.3), and "clutter", photo-like background clutter (texture 1.0,
another drawing seed). Each is converted once; then for every seed, AlexNet is trained as the
demo trains it (crop 67, batch 32, lr 0.012 stepped at 13, kaiming init, CPU) with and without
``--lighting 0.1``, and its last epoch is evaluated on the centre crop and on ten crops
(``--eval-ten-crop``). Each training is a real ``alexnet-pipe train`` process; the figures are
read back from its metrics file.

The costs, measured in this process on the same data: the train loader's time per batch with and
without lighting, the validation pass per image on one crop and on ten, training img/s with
warm-up + cosine against neon's step rule (short runs, alternated), and convert's img/s with
``--resize squash`` against the short-side rule. Pairs are alternated so drift hits both sides.

Results: OUT/results.json and a markdown table (``--markdown``, e.g. benchmarks/recipes.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchenv
from benchenv import REPO

APP = [sys.executable, "-m", "alexnet_pipe"]
SETS = {  # name -> make_shapes.py arguments
    "shapes": ["--texture", "0.3", "--seed", "0"],
    "clutter": ["--texture", "1.0", "--seed", "1"],
}
TRAIN = ["-b", "cpu", "--crop", "67", "-z", "32", "--lr", "0.012", "--lr-step", "13", "--init", "kaiming",
         "--data-threads", "1", "--no-progress", "--eval-ten-crop"]
LIGHTING = 0.1  # the paper's sigma


def run(cmd: list[str]) -> float:
    """Run a command, fail loudly, return its wall time."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def make_set(out: Path, name: str) -> Path:
    raw, batches = out / name / "raw", out / name / "batches"
    if not (batches / "manifest.json").is_file():
        run([sys.executable, str(REPO / "tools" / "make_shapes.py"), str(raw), "--train", "120", "--val", "30",
             "--size", "96x72", *SETS[name]])
        run([*APP, "convert", str(raw), str(batches), "--short-side", "72", "--no-progress"])
    return batches


def last_epoch(metrics: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if "val_top1" in r][-1]


def train_runs(out: Path, batches: Path, name: str, seeds: list[int], epochs: int) -> list[dict]:
    rows = []
    for seed in seeds:
        for lighting in (0.0, LIGHTING):
            tag = f"{name}-s{seed}-l{lighting:g}"
            metrics = out / "runs" / f"{tag}.jsonl"
            if not metrics.is_file():
                wall = run([*APP, "train", "-w", str(batches), *TRAIN, "-e", str(epochs), "-r", str(seed),
                            "--lighting", str(lighting), "-s", str(out / "runs" / f"{tag}.pt"),
                            "-o", str(metrics)])
            else:
                wall = None
            last = last_epoch(metrics)
            rows.append({"set": name, "seed": seed, "lighting": lighting, "top1": last["val_top1"],
                         "ten_crop_top1": last["val_ten_crop_top1"], "train_img_per_s": last["img_per_s"],
                         "wall_s": wall})
            print(f"{tag}: top-1 {last['val_top1']:.1f}, ten-crop {last['val_ten_crop_top1']:.1f}", flush=True)
    return rows


def timed_batches(batches: Path, split: str, n: int, **options) -> float:
    """Seconds per batch of a loader (after one warm-up batch)."""
    import alexnet_pipe

    loader = alexnet_pipe.loader(batches, split, batch_size=32, crop=67, backend="cpu", data_threads=1, **options)
    try:
        it = iter(loader)
        next(it)
        t0, k = time.perf_counter(), 0
        for _ in range(n):
            try:
                next(it)
            except StopIteration:
                break
            k += 1
        return (time.perf_counter() - t0) / k
    finally:
        loader.close()


def alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for _ in range(repeats):
        xs.append(a())
        ys.append(b())
    return xs, ys


def costs(out: Path, batches: Path, weights: Path, epochs_short: int) -> dict:
    import alexnet_pipe

    result = {}
    plain, lit = alternate(lambda: timed_batches(batches, "train", 30),
                           lambda: timed_batches(batches, "train", 30, lighting=LIGHTING), 5)
    result["loader_batch_s"] = {"off": plain, "lighting": lit}

    def evaluate(ten: bool) -> float:
        cfg = alexnet_pipe.TrainConfig(batches, model_file=weights, test_only=True, ten_crop=ten, backend="cpu",
                                       batch_size=32, data_threads=1, progress=False)
        t0 = time.perf_counter()
        alexnet_pipe.evaluate_weights(cfg)
        return time.perf_counter() - t0

    one, ten = alternate(lambda: evaluate(False), lambda: evaluate(True), 3)
    result["test_wall_s"] = {"one_crop": one, "ten_crop_and_one": ten}

    def short_train(extra: list[str], tag: str) -> float:
        metrics = out / "cost" / f"{tag}-{time.monotonic_ns()}.jsonl"
        run([*APP, "train", "-w", str(batches), *TRAIN[:-1], "-e", str(epochs_short), "--eval-freq", "0",
             "-s", str(metrics.with_suffix(".pt")), "-o", str(metrics), *extra])
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return statistics.mean(r["img_per_s"] for r in rows if "seconds" in r)

    step, sched = alternate(lambda: short_train([], "step"),
                            lambda: short_train(["--warmup-epochs", "1", "--lr-schedule", "cosine"], "cosine"), 3)
    result["train_img_per_s"] = {"step": step, "warmup_cosine": sched}

    raw = batches.parent / "raw"

    def convert(extra: list[str]) -> float:
        dst = out / "cost" / f"convert-{time.monotonic_ns()}"
        return run([*APP, "convert", str(raw), str(dst), "--short-side", "72", "--no-progress", "--workers", "1",
                    *extra])

    short, squash = alternate(lambda: convert([]), lambda: convert(["--resize", "squash"]), 5)
    result["convert_wall_s"] = {"short_side": short, "squash": squash}
    return result


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def markdown(rows: list[dict], cost: dict, head: list[str]) -> str:
    lines = [*head, "",
             "Top-1 on the validation split (300 images, 10 classes) after the last epoch, mean ± sample standard "
             "deviation over the seeds (`-r`); each seed is one full training run.", "",
             "| set | --lighting | seeds | top-1 (centre crop) | top-1 (ten crops) | ten-crop gain per run |",
             "|---|---|---|---|---|---|"]
    for name in SETS:
        for lighting in (0.0, LIGHTING):
            sel = [r for r in rows if r["set"] == name and r["lighting"] == lighting]
            if not sel:
                continue
            gains = [r["ten_crop_top1"] - r["top1"] for r in sel]
            lines.append(f"| {name} | {lighting:g} | {len(sel)} | {spread([r['top1'] for r in sel])} | "
                         f"{spread([r['ten_crop_top1'] for r in sel])} | {spread(gains)} |")
    lines += ["", "Per run:", "", "| set | seed | --lighting | top-1 | ten-crop top-1 | train img/s |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['seed']} | {r['lighting']:g} | {r['top1']:.1f} | {r['ten_crop_top1']:.1f} | "
              f"{r['train_img_per_s']:.0f} |" for r in rows]
    med = statistics.median

    def ratio(pair: dict, a: str, b: str) -> str:
        return f"{med(pair[b]) / med(pair[a]):.3f}"

    lb, tw, ti, cw = cost["loader_batch_s"], cost["test_wall_s"], cost["train_img_per_s"], cost["convert_wall_s"]
    lines += ["", "CPU cost of each option (medians of alternated repeats, same process or same machine minute):", "",
              "| option | baseline | with the option | ratio |", "|---|---|---|---|",
              f"| `--lighting 0.1`, train loader s/batch (32 images) | {med(lb['off']):.4f} | "
              f"{med(lb['lighting']):.4f} | "
              f"{ratio(lb, 'off', 'lighting')} |",
              f"| `test --ten-crop` (runs the centre crop too), s per validation pass | {med(tw['one_crop']):.2f} | "
              f"{med(tw['ten_crop_and_one']):.2f} | {ratio(tw, 'one_crop', 'ten_crop_and_one')} |",
              f"| `--warmup-epochs 1 --lr-schedule cosine`, train img/s | {med(ti['step']):.0f} | "
              f"{med(ti['warmup_cosine']):.0f} | {ratio(ti, 'step', 'warmup_cosine')} |",
              f"| `convert --resize squash` (72x72), s per convert of 1,500 images, 1 worker | "
              f"{med(cw['short_side']):.2f} | "
              f"{med(cw['squash']):.2f} | {ratio(cw, 'short_side', 'squash')} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--cost-epochs", type=int, default=2)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    revision0 = benchenv.git_revision()  # the header's revision is the one at the end
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    (args.out / "cost").mkdir(parents=True, exist_ok=True)
    rows = []
    sets = {name: make_set(args.out, name) for name in SETS}
    for name, batches in sets.items():
        rows += train_runs(args.out, batches, name, args.seeds, args.epochs)
    weights = args.out / "runs" / f"shapes-s{args.seeds[0]}-l0.pt"
    cost = costs(args.out, sets["shapes"], weights, args.cost_epochs)
    (args.out / "results.json").write_text(json.dumps({"runs": rows, "costs": cost}, indent=1))
    command = " ".join([".venv/bin/python tools/recipes_experiment.py", *sys.argv[1:]])
    head = benchenv.report_head("Recipes: lighting and ten-crop testing on two small sets",
                                "tools/recipes_experiment.py", command, started, args.out,
                                (load0, os.getloadavg()[0])) + [f"- alexnet-pipe revision at the start: {revision0}"]
    text = markdown(rows, cost, head)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
