"""Small frozen configs that flow from the CLI into the jobs, and every default that depends on
the machine or the moment.

Each config checks itself in ``__post_init__`` so a bad value fails before any work starts. The
defaults that are not constants (the cores, "GPU when present", the datatype and reader processes
that follow the backend, a training run's timestamped save path, the rank, world size and GPU a
launcher assigns) are decided here once, by the ``default_*`` / ``resolve_*`` functions below;
the configs and the CLI both call them, so ``alexnet-pipe <command>`` and the same config built
in Python run alike (tests/cli/test_config_defaults.py holds them together). A little over 400
lines: the configs and the defaults they resolve are read together, and TrainConfig is most of it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alexnet_pipe.errors import ConfigError

FORMATS = ("lmdb", "recordio")


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """``workers``, or all cores (``default_workers``) for None: convert's and verify's processes."""
    return default_workers() if workers is None else workers


def default_read_workers(backend: str) -> int:
    """Processes reading records for DALI when not given: none on the CPU (decoding is the cost
    there); on the GPU a quarter of the cores, 1 to 4, since reading a record costs 10-25 us of
    Python, which at GPU rates belongs off the training thread."""
    return 0 if backend == "cpu" else max(1, min(4, default_workers() // 4))


def default_data_threads() -> int:
    """DALI's CPU threads when not given: a thread per core, at most 4."""
    return min(4, default_workers())


def default_backend() -> str:
    """"gpu" when torch sees a CUDA device, else "cpu": the one "GPU when present" rule of every
    command (train, test, inspect, benchmark, predict, --nproc) and of ``TrainConfig(backend="auto")``."""
    import torch  # here, not at the top: the converter's processes never need torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_backend(backend: str | None) -> str:
    """``backend`` as given ("gpu", "cpu"), or ``default_backend()`` for "auto" or None (no -b)."""
    return default_backend() if backend in (None, "auto") else backend


def default_datatype(backend: str) -> str:
    """bf16 autocast on the GPU (tensor cores, no loss scaling), f32 on the CPU."""
    return "bf16" if backend == "gpu" else "f32"


def resolve_datatype(datatype: str | None, backend: str) -> str:
    """``datatype`` as given, or ``default_datatype(backend)`` for "auto" or None (no -d)."""
    return default_datatype(backend) if datatype in (None, "auto") else datatype


RUNS_DIR = Path("alexnet-runs")


def run_save_path(now: float | None = None) -> Path:
    """Where a training run from the command line without -s writes its weights:
    alexnet-runs/<date-time>/alexnet.pt (local time of ``now``, default: this moment).

    The CLI uses it, TrainConfig does not: a trained model from the command line must never be
    discarded, but a config built in Python (tests, benchmarks, inspect, a notebook) must not
    write files into the current directory that nobody asked for; a caller that wants weights
    passes ``save_path``."""
    return RUNS_DIR / time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) / "alexnet.pt"


# How long `train --nproc` waits, after Ctrl-C or SIGTERM, for its ranks to finish their step,
# checkpoint and exit before it kills them (torch's launcher alone waits 30 s).
STOP_GRACE_S = 300


def threads_per_rank(nproc: int) -> int:
    """OpenMP threads of each of ``nproc`` ranks started on this machine: the cores shared out
    (torchrun's default of one thread per rank starves CPU ranks)."""
    return max(1, default_workers() // nproc)


# How the converter scales: "antialias" (a Gaussian pre-blur for the scale, then bicubic; closest
# to an antialiased Lanczos resize), or OpenCV's plain "cubic", "linear" (im2rec's and Caffe's
# default) and "area" (FFCV's) interpolation. Measured in benchmarks/convert.md.
RESIZE_FILTERS = ("antialias", "cubic", "linear", "area")
# How the stored size is chosen: "short-side" (im2rec --resize: the short side becomes --short-side,
# aspect kept) or "squash" (Caffe's convert_imageset --resize_height/--resize_width, used by its
# ImageNet recipe at 256x256: every image becomes exactly H x W, aspect ratio ignored).
RESIZE_MODES = ("short-side", "squash")
# The largest stored side convert accepts (--short-side, --resize-height/-width, --min-short-side), and
# the manifest check with it (dataset/manifest_checks.py): no image this project reads is larger.
MAX_SIDE = 1 << 16
# How many skipped inputs convert's summary names, with their reasons (`info` lists them all).
SKIPPED_SHOWN = 3
PROGRESS_EVERY_S = 30.0  # plain progress (stderr is not a terminal): at most one log line this often


@dataclass(frozen=True)
class ImageSettings:
    """How every image is normalised before it is stored. Part of the output's identity."""

    short_side: int = 256  # scale so the shorter side is exactly this (up or down); 0 keeps the size
    quality: int = 90  # JPEG quality of re-encoded images
    max_pixels: int = 89_478_485  # larger images are skipped as decompression bombs
    passthrough: bool = True  # keep a clean baseline RGB JPEG that needs no resize byte for byte
    upscale: bool = True  # False: never scale up (a short side below short_side is kept as it is)
    max_file_mb: int = 64  # larger input files (MiB) are skipped before they are read into memory
    resize_filter: str = "antialias"  # one of RESIZE_FILTERS: how images are scaled
    min_short_side: int = 0  # inputs whose original short side is below this are skipped (0: none)
    resize: str = "short-side"  # one of RESIZE_MODES: keep the aspect (short side) or squash to H x W
    resize_height: int = 0  # squash: the stored height (0 with resize_width 0: short_side, squared)
    resize_width: int = 0  # squash: the stored width

    def __post_init__(self) -> None:
        if self.resize_filter not in RESIZE_FILTERS:
            raise ConfigError(f"resize filter must be one of {', '.join(RESIZE_FILTERS)}, got {self.resize_filter!r}")
        if not 0 <= self.short_side <= MAX_SIDE:
            raise ConfigError(f"short side must be 0..{MAX_SIDE} (0 keeps the size), got {self.short_side}")
        if max(self.resize_height, self.resize_width) > MAX_SIDE:
            raise ConfigError(f"--resize-height and --resize-width must be at most {MAX_SIDE}, got "
                              f"{self.resize_height} and {self.resize_width}")
        self._resolve_squash()
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ConfigError(f"max pixels must be >= 1, got {self.max_pixels}")
        if self.max_file_mb < 1:
            raise ConfigError(f"max file size must be >= 1 MiB, got {self.max_file_mb}")
        if not 0 <= self.min_short_side <= MAX_SIDE:
            raise ConfigError(f"min short side must be 0..{MAX_SIDE} (0 keeps every size), got {self.min_short_side}")

    def _resolve_squash(self) -> None:
        """Squash alone is short_side x short_side; with both sides given the short side recorded (and
        the mean image's side) is the smaller of them, the side every stored image then has."""
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        h, w = self.resize_height, self.resize_width
        if h < 0 or w < 0 or (h == 0) != (w == 0):
            raise ConfigError(f"--resize-height and --resize-width go together, both > 0 (as convert_imageset's), "
                              f"got {h} and {w}")
        if self.resize == "short-side":
            if h:
                raise ConfigError("--resize-height/--resize-width squash every image to that size: they need "
                                  "--resize squash, not short-side")
            return
        if not h:
            if self.short_side == 0:
                raise ConfigError("--resize squash needs a size: --short-side N (N x N) or --resize-height and "
                                  "--resize-width, not --short-side 0")
            h = w = self.short_side
        if not self.upscale:
            raise ConfigError("--resize squash gives every image the same size, so it scales small ones up: "
                              "drop --no-upscale")
        for name, value in (("resize_height", h), ("resize_width", w), ("short_side", min(h, w))):
            object.__setattr__(self, name, value)  # frozen: resolved once, here

    @property
    def squash(self) -> tuple[int, int] | None:
        """(height, width) every image is squashed to (``resize`` "squash"), or None (short side)."""
        return (self.resize_height, self.resize_width) if self.resize == "squash" else None

    @property
    def mean_size(self) -> int:
        """Side S of the stored mean image: the centre S x S of every image is averaged."""
        return self.short_side if self.short_side > 0 else 256


# Estimated peak memory (MiB) of the image decodes running at once, all workers or threads together
# (imaging/budget.py): a 9400x9400 lossless WebP is estimated at ~2,370 MiB (it peaks at ~1,480), a
# 24 Mpx PNG at ~650, an ordinary photograph at a few. A decode estimated above it runs alone.
DECODE_MEMORY_MB = 2048


def check_decode_memory(mb: int) -> None:
    if mb < 64:
        raise ConfigError(f"decode memory must be >= 64 MiB, got {mb}")


@dataclass(frozen=True)
class ConvertConfig:
    """Inputs of the `convert` job."""

    src: Path
    dst: Path
    formats: tuple[str, ...] = ("lmdb",)
    image: ImageSettings = field(default_factory=ImageSettings)
    shard_size: int = 5000
    workers: int | None = None  # processes; None: all cores (default_workers)
    decode_memory_mb: int = DECODE_MEMORY_MB  # the workers' decodes together (imaging/budget.py)
    seed: int = 0
    force: bool = False
    progress: bool = True
    progress_bar: bool = True  # a tqdm bar; False: a log line every 30 s (stderr is not a terminal)
    tensorboard_dir: Path | None = None  # also write TensorBoard scalars here
    val_labels: Path | None = None  # overrides auto-detection of the flat-val label file
    synsets: Path | None = None  # overrides auto-detection of the synset list
    part: tuple[int, int] | None = None  # (I, N): write only shards k with k % N == I (split work)
    train_list: Path | None = None  # a Caffe list or im2rec .lst naming the train images (paths under src)
    val_list: Path | None = None  # the same for the val images
    val_ratio: float | None = None  # carve this fraction of each class out of train as val (holdout.py)
    repair: bool = False  # re-check finished shards, rewrite the damaged ones (identical inputs only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", resolve_workers(self.workers))  # frozen: resolved once, here
        if self.repair and self.force:
            raise ConfigError("--repair keeps the conversion in OUT and --force discards it: use one of them")
        if self.repair and self.part is not None:
            raise ConfigError("--repair checks and rewrites every shard of OUT: run it without --part")
        if self.val_list is not None and self.train_list is None:
            raise ConfigError("--list-val needs --list, the list of the training images")
        if self.train_list is not None and self.val_labels is not None:
            raise ConfigError("--val-labels labels a flat val/ folder; with --list, give the validation list "
                             "with --list-val")
        if self.val_ratio is not None and not 0 < self.val_ratio < 1:
            raise ConfigError(f"--val-ratio must be between 0 and 1 (0.05: 5% of each class), got {self.val_ratio}")
        if self.val_ratio is not None and self.val_list is not None:
            raise ConfigError("--val-ratio carves a validation split, and --list-val gives one: use one of them")
        if self.part is not None and not (self.part[1] >= 1 and 0 <= self.part[0] < self.part[1]):
            raise ConfigError(f"part must be I/N with 0 <= I < N, got {self.part[0]}/{self.part[1]}")
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise ConfigError(f"formats must be a non-empty subset of {FORMATS}, got {self.formats}")
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be >= 1, got {self.shard_size}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        check_decode_memory(self.decode_memory_mb)

    def settings(self) -> dict:
        """The settings that define the output bytes (recorded in the manifest)."""
        image = asdict(self.image)
        for key in ("max_file_mb", "resize_filter", "min_short_side", "resize", "resize_height", "resize_width"):
            if image[key] == getattr(ImageSettings, key):
                del image[key]  # the default: conversions from before the option still resume
        return {
            "formats": list(self.formats),
            **image,
            "shard_size": self.shard_size,
            "seed": self.seed,
            # Only when set: the settings of earlier conversions (and their resumes) stay the same.
            **({"val_ratio": self.val_ratio} if self.val_ratio is not None else {}),
        }


@dataclass(frozen=True)
class VerifyConfig:
    """Inputs of the `verify` job."""

    root: Path
    workers: int | None = None  # processes; None: all cores (default_workers)
    decode: bool = True  # decode every image (slow); False checks structure and checksums only
    progress: bool = True
    progress_bar: bool = True  # a tqdm bar; False: a log line every 30 s (stderr is not a terminal)
    tensorboard_dir: Path | None = None  # also write TensorBoard scalars here
    repair: bool = False  # first rewrite damaged shards from the raw inputs recorded at conversion

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", resolve_workers(self.workers))  # frozen: resolved once, here
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class UpdateMeanConfig:
    """Inputs of the `update-mean` job."""

    path: Path
    into: Path | None = None  # a converted dataset for mean.json of a Caffe/npy file (default: beside the file)
    channel_order: str | None = None  # override the channel order of an .npy mean (rgb/bgr)

    def __post_init__(self) -> None:
        if self.channel_order not in (None, "rgb", "bgr"):
            raise ConfigError(f"channel order must be rgb or bgr, got {self.channel_order}")


DATATYPES = ("f32", "bf16", "f16")
DEFAULT_CROP = 224  # the network's input side unless the weights or --crop say otherwise
# The smallest crop for which AlexNet's pool5 is at least 1x1 (model/alexnet.py's layer sizes;
# tests/model/test_model.py holds them together). Here, so that --crop is checked at parse time without torch.
MIN_CROP = 67
FREEZE_CHOICES = ("none", "conv", "features")
# train --lr-schedule: step (neon's Schedule(lr_step, lr_gamma), per epoch) or cosine (SGDR, per step).
LR_SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Inputs of `train` / `test`. Flag names follow the neon model-zoo script.

    The defaults are the CLI's, which takes them from here (``alexnet-pipe train -w DIR`` runs
    ``TrainConfig(data_dir=DIR)`` plus a save path, ``run_save_path``; tests/cli/test_config_defaults.py
    holds them together). The ones that depend on the machine or on the weights are written "auto"
    or None and resolved in ``__post_init__`` (``_resolve``), so every instance, and so every
    ``to_dict`` stored in a checkpoint, holds concrete values: backend "auto"/None ->
    ``default_backend()``; datatype "auto"/None -> ``default_datatype(backend)``; read_workers None
    -> ``default_read_workers(backend)``; data_threads None -> ``default_data_threads()``; crop None
    -> 224 and normalize_std None -> False, each also marked in ``settings_from_weights`` so that a
    ``model_file`` supplies it. ``dataclasses.replace`` keeps resolved values (a replace of backend
    alone does not redo datatype or read_workers: pass them too).
    """

    data_dir: Path
    epochs: int = 10
    save_path: Path | None = None  # final weights (model + config + data settings)
    checkpoint_path: Path | None = None  # where --serialize writes (default: beside save_path)
    serialize: int = 0  # checkpoint every N epochs (0: only at the end, if a path is known)
    model_file: Path | None = None  # weights to start from (ours, or neon/Caffe/torchvision), or a checkpoint to resume
    # a neon/Caffe/torchvision model_file's class list in the order of its fc8 rows (model/model_file.py)
    synsets: Path | None = None
    test_only: bool = False
    per_class_file: Path | None = None  # test: per-class results (.json, and a .png beside it)
    # also evaluate on ten views per image (corners + centre, mirrored; Krizhevsky et al. 2012): test,
    # and train's last epoch (--eval-ten-crop)
    ten_crop: bool = False
    # take (crop, normalize_std) from model_file; set by _resolve for a crop / normalize_std of None
    settings_from_weights: tuple[bool, bool] = (False, False)
    eval_freq: int = 1
    backend: str = "auto"  # "gpu", "cpu" or "auto": gpu when one is present (default_backend)
    device_id: int = 0
    rng_seed: int = 0
    datatype: str = "auto"  # f32, bf16, f16 or "auto": bf16 on the GPU, f32 on the CPU (default_datatype)
    batch_size: int = 128
    subset_pct: float = 100.0
    output_file: Path | None = None  # per-epoch metrics, JSON lines
    progress: bool = True
    progress_bar: bool = True  # a tqdm bar; False: a log line every 30 s (stderr is not a terminal)
    tensorboard_dir: Path | None = None  # also write TensorBoard scalars here
    crop: int | None = None  # None: model_file's crop, else DEFAULT_CROP
    lr: float = 0.01  # weights; biases get lr * bias_lr_mult (neon: 0.02)
    bias_lr_mult: float = 2.0
    lr_step: int = 20  # lr x lr_gamma every lr_step epochs (neon's Schedule(20, 0.1))
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # weights only; biases get none
    normalize_std: bool | None = None  # divide by the per-channel std after the mean (None: model_file's, else no)
    # weight init of the layers drawn fresh: neon (model zoo) or kaiming (small data sets, see model.py);
    # None: not chosen, neon. Refused where --model-file gives every layer (train/start.py).
    init: str | None = None
    channels_last: bool = True  # NHWC activations: faster in cuDNN and oneDNN alike (CPU: ~20%)
    compile: bool = False  # torch.compile the model (GPU)
    reader: str = "auto"  # lmdb / recordio / auto
    data_threads: int | None = None  # DALI's CPU threads (None: default_data_threads())
    read_workers: int | None = None  # processes reading records for DALI (0: in the training process;
    # None: default_read_workers(backend))
    # DALI's decoding knobs (tools/dali_sweep.py measures them): the hardware JPEG decoder's share
    # (A100/H100; None: DALI's own default), nvJPEG upsampling chroma as libjpeg-turbo does, the
    # pipeline's prefetch depth, and decoding only the crop window (off by itself for images
    # smaller than the crop).
    hw_decoder_load: float | None = None
    jpeg_fancy_upsampling: bool = False
    prefetch: int = 2
    roi_decode: bool = True
    rank: int = 0  # this process among those that share the run (torchrun's RANK)
    world_size: int = 1  # how many processes share the run (torchrun's WORLD_SIZE)
    log_every: int = 20  # steps between host syncs for the progress bar
    lr_scale: str = "linear"  # linear: --lr holds for 128 images and scales with the global batch; none
    dist_timeout_s: float = 600.0  # a rank waiting longer than this on the others ends the job
    checkpoint_minutes: float | None = None  # also checkpoint every N minutes, mid-epoch too
    keep_checkpoints: int = 3  # checkpoint files kept: the newest as <path>, older as <path>.1, .2
    allreduce_dtype: str | None = None  # gradients' all-reduce: f32 or bf16 (None: bf16 with -d bf16)
    finetune: bool = False  # start a new run from model_file's weights, a new fc8 when the classes differ
    freeze: str = "none"  # fine-tuning: none, conv (conv1..conv5) or features (everything but fc8)
    head_lr_mult: float = 10.0  # fine-tuning: a new fc8 learns at lr x this (Caffe's fine-tuning practice)
    # Large batches (Goyal et al. 2017): per step, linear from lr/k to the scheduled lr over N epochs,
    # k = max(1, global batch / 128) (train/loop.py lr_at); 0: off.
    warmup_epochs: int = 0
    lr_schedule: str = "step"  # step: neon's rule (lr_step, lr_gamma); cosine: per step down to 0 (SGDR)
    # PCA lighting (Krizhevsky et al. 2012, section 4.1): the std of each image's alphas over the
    # dataset's RGB eigenvectors (mean.json); 0: off.
    lighting: float = 0.0

    def __post_init__(self) -> None:
        self._resolve()
        self._check()

    def _resolve(self) -> None:
        """Replace every "auto"/None default by its value on this machine (frozen: object.__setattr__).
        Idempotent, so ``dataclasses.replace`` and a second pass keep the values."""
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        put("backend", resolve_backend(self.backend))
        put("datatype", resolve_datatype(self.datatype, self.backend))
        if self.read_workers is None:
            put("read_workers", default_read_workers(self.backend))
        if self.data_threads is None:
            put("data_threads", default_data_threads())
        crop_from, std_from = self.settings_from_weights
        if self.crop is None:
            put("crop", DEFAULT_CROP)
            crop_from = True
        if self.normalize_std is None:
            put("normalize_std", False)
            std_from = True
        put("settings_from_weights", (bool(crop_from), bool(std_from)))

    def _check(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.serialize >= 0, f"--serialize must be >= 0, got {self.serialize}"),
            (self.eval_freq >= 0, f"--eval-freq must be >= 0, got {self.eval_freq}"),
            (self.backend in ("gpu", "cpu"), f"backend must be gpu, cpu or auto, got {self.backend}"),
            (self.datatype in DATATYPES, f"datatype must be auto or one of {DATATYPES}, got {self.datatype}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (0 < self.subset_pct <= 100, f"--subset-pct must be in (0, 100], got {self.subset_pct}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.lr_step >= 1, f"--lr-step must be >= 1, got {self.lr_step}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.rank < self.world_size, f"rank {self.rank} outside 0..{self.world_size - 1}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.read_workers >= 0, f"--read-workers must be >= 0, got {self.read_workers}"),
            (self.hw_decoder_load is None or 0 <= self.hw_decoder_load <= 1,
             f"--hw-decoder-load must be within 0..1, got {self.hw_decoder_load}"),
            (self.prefetch >= 1, f"--prefetch must be >= 1, got {self.prefetch}"),
            (self.init in (None, "neon", "kaiming"), f"init must be neon or kaiming, got {self.init}"),
            (self.lr_scale in ("linear", "none"), f"--lr-scale must be linear or none, got {self.lr_scale}"),
            (self.allreduce_dtype in (None, "f32", "bf16"),
             f"allreduce dtype must be f32 or bf16, got {self.allreduce_dtype}"),
            (self.checkpoint_minutes is None or self.checkpoint_minutes > 0,
             f"--checkpoint-minutes must be > 0, got {self.checkpoint_minutes}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.dist_timeout_s > 0, f"the distributed timeout must be > 0, got {self.dist_timeout_s}"),
            (not (self.test_only and self.model_file is None), "--test-only needs --model-file (the weights to test)"),
            (not (self.synsets is not None and self.model_file is None),
             "--synsets names the classes of a --model-file from neon, Caffe or torchvision; give --model-file"),
            (not (self.finetune and self.model_file is None),
             "--finetune needs --model-file (the weights to start from)"),
            (not (self.finetune and self.test_only), "--finetune trains; drop it to test"),
            (not (self.ten_crop and not self.test_only and not self.eval_freq),
             "--eval-ten-crop evaluates the last epoch, which --eval-freq 0 turns off: drop one of them"),
            (self.freeze in FREEZE_CHOICES, f"--freeze must be one of {FREEZE_CHOICES}, got {self.freeze}"),
            (self.freeze == "none" or self.finetune, f"--freeze {self.freeze} is for fine-tuning: add --finetune"),
            (self.head_lr_mult >= 0, f"--head-lr-mult must be >= 0, got {self.head_lr_mult}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (math.isfinite(self.lighting) and self.lighting >= 0, f"--lighting must be >= 0, got {self.lighting}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def resolved_allreduce_dtype(self) -> str:
        return self.allreduce_dtype or ("bf16" if self.datatype == "bf16" else "f32")

    def resolved_checkpoint_path(self) -> Path | None:
        if self.checkpoint_path is not None:
            return self.checkpoint_path
        if self.save_path is not None:
            return self.save_path.with_name(self.save_path.stem + ".ckpt")
        return None

    def to_dict(self) -> dict:
        """JSON-able form, stored in checkpoints and weight files (under the file format's names,
        ``_STORED_AS``). Fields in ``STORED_WHEN_SET`` are left out at their "off" value, so a run
        without them writes the bytes it wrote before they existed (an absent key reads as off)."""
        return {_STORED_AS.get(k, k): (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                if k not in STORED_WHEN_SET or v != STORED_WHEN_SET[k]}


# Fields stored under another name: the names checkpoints and weight files have always held (the
# fields were renamed, the files were not).
_STORED_AS = {"rank": "shard_id", "world_size": "num_shards"}
# Options added after checkpoints existed, stored only when on: {field: its off value}. A stored
# train_config without the key had the option off (train/state.py reads it so).
STORED_WHEN_SET = {"warmup_epochs": 0, "lr_schedule": "step", "ten_crop": False, "lighting": 0.0, "synsets": None}
