#!/usr/bin/env python3
"""Converter benchmark: `alexnet-pipe convert` against MXNet's im2rec.py and a naive PIL loop.

    .venv/bin/python tools/bench_convert.py [--images 2400] [--rounds 2] [--out DIR]
        [--photos DIR | --photo-python PY] [--mxnet-python PY] [--results FILE.md]

The image set (tools/photo_set.py): ImageNet-like JPEGs cut from real photographs, 85% with the
long side in 400-500 px and 15% in 800-1600 px, mean about 56 KiB. It is made once (and reused
from --out); every contender then converts exactly those files to short side 256, quality 90.

Every contender runs as its own process, timed end to end from start to exit (interpreter
start, imports, reading, decoding, resizing, encoding, writing), in interleaved rounds: each
round runs every contender once, in an order rotated from round to round; medians are reported.

  naive       one process: for each file Image.open().convert("RGB"), resize to short side 256
              (Pillow BICUBIC), save(quality=90), one output file per input.
  im2rec      MXNet 1.9.1's tools/im2rec.py (shipped in the mxnet wheel), from its own
              virtualenv (--mxnet-python): `im2rec.py PREFIX ROOT --resize 256 --quality 90
              --num-thread N`, reading a .lst made beforehand (not timed); writes .rec + .idx.
              cv2.imread, cv2.resize (INTER_LINEAR), cv2.imencode; N reader processes plus a
              writer process when N > 1. It imports mxnet, ~3.5 s of CPU, once.
  convert     `python -m alexnet_pipe convert ROOT OUT --format recordio|lmdb --workers N`:
              also validates every image, computes the per-channel statistics and the mean
              image, writes checksums, the manifest, mean.json and the mean image, with fsync.
              Its modules are byte-compiled once beforehand (not timed), as pip does when it
              installs a package (the checkout may run with PYTHONDONTWRITEBYTECODE set).
              Also with `--resize-filter linear`: im2rec's resize, everything else the same
              (like for like; the default filter is the antialiased one).

"Per core" divides img/s by N (the naive loop is one core). Levers (one core, in this process,
on the same files): each stage of the converter's per-image work, with the alternatives that
were measured, including the statistics and mean-image accumulation alone. No figure is hard-coded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import PIL
import simplejpeg
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from photo_set import DEFAULT_PHOTO_PYTHON, SETUP_HINT, find_photos, make_photo_set, set_stats  # noqa: E402

from alexnet_pipe.config import ImageSettings  # noqa: E402
from alexnet_pipe.convert.encode import CHUNK  # noqa: E402
from alexnet_pipe.dataset.mean import centre_box  # noqa: E402
from alexnet_pipe.imaging import decode, geometry  # noqa: E402
from alexnet_pipe.imaging import process as imaging  # noqa: E402
from alexnet_pipe.imaging.centre_sums import CentreSums  # noqa: E402
from alexnet_pipe.imaging.encode import encode_jpeg  # noqa: E402
from alexnet_pipe.inputs.table import Source  # noqa: E402

SHORT_SIDE = 256
QUALITY = 90

NAIVE = """
import os, sys
from PIL import Image
src, out = sys.argv[1], sys.argv[2]
for d, _, names in os.walk(src):
    for name in sorted(names):
        if not name.endswith(".JPEG"):
            continue
        im = Image.open(os.path.join(d, name)).convert("RGB")
        w, h = im.size
        s = %d / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        dst = os.path.join(out, os.path.relpath(d, src))
        os.makedirs(dst, exist_ok=True)
        im.save(os.path.join(dst, name), "JPEG", quality=%d)
""" % (SHORT_SIDE, QUALITY)  # noqa: UP031  a script template: %d keeps it readable as Python


# ---------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    name: str
    workers: int  # cores it is meant to use
    kind: str  # naive / im2rec / convert
    fmt: str = ""  # convert: recordio or lmdb
    resize_filter: str = ""  # convert: --resize-filter (empty: the default)
    wall: list[float] = field(default_factory=list)

    def command(self, ctx: Context, out: Path) -> list[str]:
        if self.kind == "naive":
            return [sys.executable, "-c", NAIVE, str(ctx.root / "train"), str(out)]
        if self.kind == "im2rec":
            return [ctx.mxnet_python, ctx.im2rec, str(out / "set"), str(ctx.root / "train"), "--resize",
                    str(SHORT_SIDE), "--quality", str(QUALITY), "--num-thread", str(self.workers)]
        return [sys.executable, "-m", "alexnet_pipe", "convert", str(ctx.root), str(out / "ds"), "--format", self.fmt,
                "--workers", str(self.workers), "--short-side", str(SHORT_SIDE), "--quality", str(QUALITY),
                "--no-progress", *(["--resize-filter", self.resize_filter] if self.resize_filter else [])]

    def run(self, ctx: Context, out: Path) -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if self.kind == "im2rec":
            shutil.copyfile(ctx.lst, out / "set.lst")  # made beforehand, not timed
        env = dict(os.environ, PYTHONPATH=str(REPO))
        t0 = time.perf_counter()
        proc = subprocess.run(self.command(ctx, out), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{self.name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        got = self.outputs(out)
        if got != ctx.n:
            raise SystemExit(f"{self.name} wrote {got} images, expected {ctx.n}")
        shutil.rmtree(out)
        self.wall.append(wall)

    def outputs(self, out: Path) -> int:
        """Count what is really in the output (not what the tool claims)."""
        if self.kind == "naive":
            return sum(1 for _ in out.rglob("*.JPEG"))
        if self.kind == "im2rec":
            return len((out / "set.idx").read_text().splitlines())
        if self.fmt == "recordio":
            return len((out / "ds" / "recordio" / "train.idx").read_text().splitlines())
        import lmdb

        n = 0
        for shard in sorted((out / "ds" / "lmdb").iterdir()):
            with lmdb.open(str(shard), readonly=True, lock=False) as env:
                n += env.stat()["entries"]
        return n

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


@dataclass
class Context:
    root: Path
    n: int
    lst: Path
    mxnet_python: str
    im2rec: str


def find_im2rec(mxnet_python: str) -> tuple[str | None, str]:
    """(path of im2rec.py inside the mxnet wheel, versions) or (None, why not)."""
    code = ("import os, mxnet, cv2, numpy; print(os.path.join(os.path.dirname(mxnet.__file__), 'tools', 'im2rec.py')); "
            "print(f'mxnet {mxnet.__version__}, OpenCV {cv2.__version__}, numpy {numpy.__version__}')")
    try:
        out = subprocess.run([mxnet_python, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"not run: no MXNet at {mxnet_python} ({exc}); make it with: {SETUP_HINT}"
    return out[0], out[1]


def write_lst(root: Path, files: list[Path], path: Path) -> None:
    """im2rec's list: index, label, path relative to ROOT, tab-separated."""
    classes = sorted({p.parent.name for p in files})
    lines = [f"{i}\t{classes.index(p.parent.name)}\t{p.relative_to(root / 'train')}\n" for i, p in enumerate(files)]
    path.write_text("".join(lines))


# ---------------------------------------------------------------------------- levers


def _best_ms(fn, items, repeats: int = 3) -> float:
    """Best of ``repeats`` passes over ``items``, in ms per item (best: the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / len(items)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse) if mse else float("inf")


def levers(files: list[Path], sample: int) -> tuple[list[str], dict[str, float]]:
    """Per-stage costs on one core (ms/img) and the resize filters' fidelity."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    datas = [p.read_bytes() for p in files[:sample]]
    settings = ImageSettings(short_side=SHORT_SIDE, quality=QUALITY)

    def target(w, h):
        return geometry.target_size(w, h, SHORT_SIDE)

    def pil_decode(d):
        im = Image.open(io.BytesIO(d))
        im.draft("RGB", target(*im.size))
        im.load()
        return np.asarray(im)

    def turbo_decode(d):
        head = decode.jpeg_header(d)
        return decode.decode_jpeg(d, head, target(head.width, head.height))

    def cv_decode(d):  # session 4's decoder: OpenCV with its DCT-scaled modes
        head = decode.jpeg_header(d)
        k, flag = decode._reduction(head.width, head.height, target(head.width, head.height))
        return cv2.imdecode(np.frombuffer(d, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)

    def turbo_m8(d):  # libjpeg-turbo's M/8 scaled IDCT (6/8, 7/8, ...) straight to just above the target
        head = decode.jpeg_header(d)
        size = target(head.width, head.height)
        a = simplejpeg.decode_jpeg(d, "BGR", min_height=size[1], min_width=size[0], strict=False)
        return cv2.resize(a, size, interpolation=cv2.INTER_CUBIC)

    def cv_decode_full(d):
        return cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)

    decoded = [turbo_decode(d) for d in datas]
    full = [(Image.open(io.BytesIO(d)).size, a) for d, a in zip(datas, decoded)]
    jobs = [(a, target(*size)) for size, a in full]
    rgb_jobs = [(np.ascontiguousarray(a[..., ::-1]), s) for a, s in jobs]

    def torch_resize(job):
        a, s = job
        x = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)
        return (F.interpolate(x, size=(s[1], s[0]), mode="bicubic", antialias=True)[0]
                .permute(1, 2, 0).contiguous().numpy())

    resizers = {
        "OpenCV INTER_AREA (--resize-filter area)": lambda job: geometry.resize(*job, "area"),
        "OpenCV INTER_LINEAR (im2rec; --resize-filter linear)": lambda job: geometry.resize(*job, "linear"),
        "OpenCV INTER_CUBIC (--resize-filter cubic)": lambda job: geometry.resize(*job, "cubic"),
        "Gaussian pre-blur + INTER_CUBIC, --resize-filter antialias, the default (convert now)":
            lambda job: geometry.resize(*job),
        "torch antialiased bicubic (convert before)": torch_resize,
        "Pillow BICUBIC (naive loop)":
            lambda job: np.asarray(Image.fromarray(job[0]).resize(job[1], Image.Resampling.BICUBIC)),
    }
    refs = [np.asarray(Image.fromarray(a).resize(s, Image.Resampling.LANCZOS)) for a, s in rgb_jobs]
    resized = [geometry.resize(a, s) for a, s in jobs]

    def pil_encode(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=QUALITY)
        return buf.getvalue()

    def pil_hist_stats(a):
        hist = np.asarray(Image.fromarray(a).histogram(), np.int64).reshape(3, 256)
        v = np.arange(256, dtype=np.int64)
        return hist @ v, hist @ (v * v)

    size = settings.mean_size

    # The default arrays are the accumulators on purpose: one canvas shared by every call, as convert had.
    def hist_stats_and_canvas(a, canvas=np.zeros((size, size, 3), np.uint16),  # noqa: B008
                              count=np.zeros((size, size), np.uint16)):  # noqa: B008
        """convert before: three calcHist of the centre box, then the box added to a uint16 canvas."""
        box = centre_box(a.shape[1], a.shape[0], size)
        pixels = a[box.y : box.y + box.height, box.x : box.x + box.width]
        hist = np.stack([cv2.calcHist([pixels], [c], None, [256], [0, 256]).ravel() for c in range(3)]).astype(np.int64)
        v = np.arange(256, dtype=np.int64)
        sums, sq_sums = tuple(int(x) for x in hist @ v), tuple(int(x) for x in hist @ (v * v))
        if count[0, 0] > 60000:  # a fresh canvas well before uint16 could wrap (as each 32-image chunk has)
            canvas[:] = 0
            count[:] = 0
        cy, cx = box.canvas_y, box.canvas_x
        canvas[cy : cy + box.height, cx : cx + box.width] += pixels
        count[cy : cy + box.height, cx : cx + box.width] += 1
        return sums, sq_sums

    chunk = {"sums": CentreSums(size, CHUNK)}

    def centre_sums(a):
        """convert now: accumulate + accumulateSquare into the chunk's float canvases."""
        if chunk["sums"].images == CHUNK:
            chunk["sums"].stats(), chunk["sums"].mean_sum()  # what each chunk pays once
            chunk["sums"] = CentreSums(size, CHUNK)
        chunk["sums"].add(a)

    import_ms = {}
    workers = ("alexnet_pipe.imaging.process (convert's workers)", "alexnet_pipe.imaging.process")
    for name, mod in (workers, ("torch", "torch")):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {mod}"], check=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
            runs.append(time.perf_counter() - t0)
        import_ms[name] = 1000 * min(runs)

    rows = [
        ("decode", "Pillow open + draft (DCT scaling) (convert, session 2)", _best_ms(pil_decode, datas), ""),
        ("decode", "OpenCV full size (im2rec)", _best_ms(cv_decode_full, datas), ""),
        ("decode", "header walk + OpenCV, IMREAD_REDUCED_2/4/8 (convert, session 4)", _best_ms(cv_decode, datas), ""),
        ("decode", "header walk + TurboJPEG (simplejpeg), DCT 1/2/4/8 + EOI check (convert now)",
         _best_ms(turbo_decode, datas), ""),
    ]
    m8_fidelity = statistics.fmean(_psnr(turbo_m8(d)[..., ::-1], r) for d, r in zip(datas, refs))
    for name, fn in resizers.items():
        inputs = rgb_jobs if "Pillow" in name or "torch" in name else jobs
        outs = [fn(job) for job in inputs]
        fidelity = statistics.fmean(
            _psnr(o if inputs is rgb_jobs else o[..., ::-1], r) for o, r in zip(outs, refs))
        rows.append(("resize", name, _best_ms(fn, inputs), f"{fidelity:.1f} dB"))
    rows.append(("resize", "TurboJPEG M/8 scaled decode (6/8, 7/8) + INTER_CUBIC: decode and resize together, "
                 "not used", _best_ms(turbo_m8, datas), f"{m8_fidelity:.1f} dB"))
    rows += [
        ("encode", "Pillow save (convert before)", _best_ms(pil_encode, [r[..., ::-1] for r in resized]), ""),
        ("encode", "OpenCV imencode (im2rec, convert now)",
         _best_ms(lambda a: encode_jpeg(a, QUALITY), resized), ""),
        ("statistics + mean image", "Pillow histogram of the whole image, numpy canvas add (convert, session 2)",
         _best_ms(lambda a: (pil_hist_stats(a), hist_stats_and_canvas(a)), resized), ""),
        ("statistics + mean image", "3 x OpenCV calcHist of the centre box, numpy canvas add (convert, session 4)",
         _best_ms(hist_stats_and_canvas, resized), ""),
        ("statistics + mean image",
         f"OpenCV accumulate + accumulateSquare on {size}x{size} float canvases (convert now)",
         _best_ms(centre_sums, resized), ""),
    ]
    loop = {f: _loop_ms(files, f) for f in ("antialias", "linear")}
    lines = [
        "## Levers",
        "",
        f"One core, in the benchmark process, on the first {len(datas)} images of the set (ms per image, "
        "best of 3 passes). Fidelity: mean PSNR against Pillow's Lanczos resize of the same decoded pixels "
        "(higher = closer to an ideal antialiased filter).",
        "",
        "| stage | method | ms/img | fidelity |",
        "|---|---|---:|---:|",
        *[f"| {stage} | {name} | {ms:.3f} | {fid} |" for stage, name, ms, fid in rows],
        *[f"| worker start | import {name} | {ms:.0f} ms per process | |" for name, ms in import_ms.items()],
        *[f"| in the loop | a worker's whole per-image work (`imaging.process_batch`, chunks of {CHUNK}), "
          f"all {len(files)} images, --resize-filter {f} | {ms:.3f} | |" for f, ms in loop.items()],
    ]
    named = {name: ms for _, name, ms, _ in rows}
    cost = {
        "convert": sum(ms for _, name, ms, _ in rows if "(convert now)" in name),
        "im2rec": named["OpenCV full size (im2rec)"] + named["OpenCV INTER_LINEAR (im2rec; --resize-filter linear)"]
        + named["OpenCV imencode (im2rec, convert now)"],
        "codecs": named["header walk + TurboJPEG (simplejpeg), DCT 1/2/4/8 + EOI check (convert now)"]
        + named["OpenCV imencode (im2rec, convert now)"],
        "mean": rows[-1][2],
        "loop": loop["antialias"],
        "loop_linear": loop["linear"],
    }
    return lines, cost


def _loop_ms(files: list[Path], resize_filter: str) -> float:
    """ms per image of the worker's own loop over every file (best of 2 passes): each stage as
    it runs beside the others (caches shared), which costs more than the stages timed alone."""
    settings = ImageSettings(short_side=SHORT_SIDE, quality=QUALITY, resize_filter=resize_filter)
    sources = [Source(p.name, 0, str(p)) for p in files]
    chunks = [sources[i : i + CHUNK] for i in range(0, len(sources), CHUNK)]
    return (_best_ms(lambda chunk: imaging.process_batch(chunk, settings), chunks, repeats=2)
            * len(chunks) / len(sources))


# ---------------------------------------------------------------------------- report


def _machine() -> str:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"{model}, {cores} usable cores"


def _git_revision() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" with uncommitted changes" if dirty else "")


def table(rows: list[Contender], n: int) -> tuple[list[str], dict]:
    """The results table; also returns img/s per contender name."""
    ips = {c.name: n / c.median for c in rows if c.wall}
    naive = next((ips[c.name] for c in rows if c.kind == "naive"), None)
    im2rec = {c.workers: ips[c.name] for c in rows if c.kind == "im2rec" and c.wall}
    one = {(c.kind, c.fmt, c.resize_filter): ips[c.name] for c in rows if c.workers == 1 and c.wall}
    lines = [
        "| contender | workers | median s (all rounds) | img/s | per core | x im2rec per core (same workers) "
        "| x naive per core | scaling vs 1 worker |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in rows:
        if not c.wall:
            lines.append(f"| {c.name} | {c.workers} | not run | | | | | |")
            continue
        rate = ips[c.name]
        per_core = rate / c.workers
        vs_im2rec = f"{per_core / (im2rec[c.workers] / c.workers):.2f}" if c.workers in im2rec else ""
        vs_naive = f"{per_core / naive:.2f}" if naive else ""
        base = one.get((c.kind, c.fmt, c.resize_filter))
        scaling = f"{100 * rate / (c.workers * base):.0f}%" if base and c.workers > 1 else ""
        walls = ", ".join(f"{w:.2f}" for w in c.wall)
        lines.append(f"| {c.name} | {c.workers} | {c.median:.2f} ({walls}) | {rate:.0f} | {per_core:.0f} | {vs_im2rec} "
                     f"| {vs_naive} | {scaling} |")
    return lines, ips


def goals(rows: list[Contender], ips: dict) -> list[str]:
    naive = next((ips[c.name] for c in rows if c.kind == "naive"), None)
    im2rec = {c.workers: ips[c.name] for c in rows if c.kind == "im2rec" and c.name in ips}
    out = []
    for flt in dict.fromkeys(c.resize_filter for c in rows if c.kind == "convert"):
        conv = {c.workers: ips[c.name] for c in rows
                if c.kind == "convert" and c.fmt == "recordio" and c.resize_filter == flt and c.name in ips}
        label = f"convert (RecordIO{', --resize-filter ' + flt if flt else ''})"
        for w, rate in sorted(conv.items()):
            per_core = rate / w
            if w in im2rec:
                r = per_core / (im2rec[w] / w)
                out.append(f"{label} {w} worker(s) vs im2rec {w}: {r:.2f}x per core "
                           f"(goal >= 1.5x: {'met' if r >= 1.5 else 'NOT met'})")
            if naive:
                r = per_core / naive
                out.append(f"{label} {w} worker(s) vs the naive loop: {r:.2f}x per core "
                           f"(goal >= 2x: {'met' if r >= 2 else 'NOT met'})")
        for w, rate in sorted(conv.items()):
            if w > 1 and 1 in conv:
                sc = rate / (w * conv[1])
                out.append(f"{label} scaling 1 -> {w} workers: {100 * sc:.0f}% of linear "
                           f"(goal >= 90%: {'met' if sc >= 0.9 else 'NOT met'})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the image set here and reuse it (default: a temp dir)")
    ap.add_argument("--photos", type=Path, default=None, help="base photographs to cut the set from")
    ap.add_argument("--photo-python", default=DEFAULT_PHOTO_PYTHON,
                    help="python with scikit-image + scikit-learn, whose bundled photos are the default bases")
    ap.add_argument("--mxnet-python", default=DEFAULT_PHOTO_PYTHON, help="python with mxnet 1.9.1 (for im2rec.py)")
    ap.add_argument("--lever-images", type=int, default=400, help="images for the per-stage lever timings")
    ap.add_argument("--results", type=Path, default=None, help="write a markdown results file")
    args = ap.parse_args()

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    tmp = tempfile.TemporaryDirectory(prefix="bench_convert_") if args.out is None else None
    base = Path(tmp.name) if tmp else args.out
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bench-runs-", dir=base))
    try:
        t0 = time.perf_counter()
        files = make_photo_set(base / "photos", args.images, find_photos(args.photos, args.photo_python), args.seed)
        stats = set_stats(files)
        print(f"image set ready in {time.perf_counter() - t0:.1f} s: {stats.describe()}", flush=True)
        im2rec, mx_versions = find_im2rec(args.mxnet_python)
        lst = scratch / "set.lst"
        write_lst(base / "photos", files, lst)
        ctx = Context(base / "photos", len(files), lst, args.mxnet_python, im2rec or "")
        rows = [Contender("naive PIL loop", 1, "naive")]
        rows += [Contender(f"im2rec.py --num-thread {w}", w, "im2rec") for w in (1, 2)]
        rows += [Contender(f"convert --format recordio --workers {w}", w, "convert", "recordio") for w in (1, 2)]
        rows += [Contender("convert --format lmdb --workers 2", 2, "convert", "lmdb")]
        # Like for like: im2rec's resize filter (INTER_LINEAR), everything else as the default.
        rows += [Contender(f"convert --format recordio --workers {w} --resize-filter linear", w, "convert", "recordio",
                           "linear") for w in (1, 2)]
        timed = [c for c in rows if c.kind != "im2rec" or im2rec]
        for p in files:  # page cache: every contender reads from memory
            p.read_bytes()
        # As an installed package: byte-compiled (mxnet's and the naive loop's modules are).
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "alexnet_pipe")], check=True)
        load_before = os.getloadavg()[0]
        for r in range(args.rounds):
            k = r % len(timed)
            for c in timed[k:] + timed[:k]:
                c.run(ctx, scratch / "out")
                print(f"  round {r + 1}: {c.name}: {c.wall[-1]:.2f} s", flush=True)
        load_after = os.getloadavg()[0]
        lines, ips = table(rows, len(files))
        lever_lines, cost = levers(files, min(args.lever_images, len(files)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp:
            tmp.cleanup()
    conv1 = next(c for c in rows if c.kind == "convert" and c.workers == 1 and not c.resize_filter)
    total_ms = 1000 * conv1.median / len(files)
    mean_ms = cost["mean"]
    goal_lines = goals(rows, ips)
    reading = []
    im2rec1 = next((c for c in rows if c.kind == "im2rec" and c.workers == 1 and c.wall), None)
    if im2rec1 is not None:
        budget = 1000 * im2rec1.median / 1.5 / len(files)
        if budget < cost["codecs"]:
            verdict = (f"less than the JPEG decode and encode alone take ({cost['codecs']:.2f} ms): out of reach "
                       "with the same codec library, whatever else is saved")
        elif budget < cost["convert"]:
            verdict = (f"more than the JPEG decode and encode alone ({cost['codecs']:.2f} ms) but less than all the "
                       f"converter's stages ({cost['convert']:.2f} ms)")
        else:
            verdict = f"more than all the converter's stages ({cost['convert']:.2f} ms)"
        loops = []
        for name, ms in (("the default filter", cost["loop"]), ("--resize-filter linear", cost["loop_linear"])):
            room = (f"{budget - ms:.2f} ms are left for start-up, writing and the shard's close" if ms < budget
                    else "over the budget before start-up, writing and the shard's close")
            loops.append(f"{ms:.2f} ms with {name} ({room})")
        reading = [
            "## Reading",
            "",
            f"Per image on one core (levers below), the converter's stages timed alone add up to "
            f"{cost['convert']:.2f} ms (decode, resize, encode, statistics, mean image); im2rec's decode at full size, "
            f"INTER_LINEAR resize and encode add up to {cost['im2rec']:.2f} ms. "
            "1.5x im2rec's end-to-end rate at 1 worker "
            f"({1.5 * len(files) / im2rec1.median:.0f} img/s) allows {budget:.2f} ms per image end to end, start-up "
            f"included: {verdict}. In its own loop (levers: every image of the set, one core, timed after the "
            f"rounds) a worker spends {' and '.join(loops)}.",
            "",
        ]
    env = [
        f"- date: {started}",
        f"- machine: {_machine()}; OS {platform.platform()}",
        f"- Python {platform.python_version()}, Pillow {PIL.__version__}, OpenCV {cv2.__version__}, "
        f"numpy {np.__version__} (alexnet-pipe and the naive loop)",
        f"- im2rec: {mx_versions}" + (f" ({args.mxnet_python})" if im2rec else ""),
        f"- alexnet-pipe revision: {_git_revision()}",
        f"- image set: {stats.describe()}",
        f"- load average (1 min) before / after the rounds: {load_before:.2f} / {load_after:.2f}",
        f"- timing: median of {args.rounds} interleaved rounds, order rotated each round; each run a fresh process",
    ]
    mean_line = (f"- statistics and mean-image accumulation: {mean_ms:.3f} ms/img (centre box accumulated into the "
                 f"chunk's canvases, timed alone on the resized arrays) of {total_ms:.2f} ms/img in total "
                 "(convert, 1 worker, end to end): "
                 f"{100 * mean_ms / total_ms:.1f}%")
    report = [*env, "", *lines, "", *[f"- {g}" for g in goal_lines], mean_line, "", *reading, *lever_lines]
    print("\n" + "\n".join(report))
    print(f"\ncommand: {command}")
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text("\n".join([
            "# Converter benchmark results", "",
            "Generated by `tools/bench_convert.py`; every figure below comes from the run recorded here.", "",
            "Command:", "", "```", command, "```", "", *report, "", "## What is timed", "",
            "```", *__doc__.split("\n\n", 2)[2].rstrip().splitlines(), "```", "",
        ]) + "\n", encoding="utf-8")
        print(f"results written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
