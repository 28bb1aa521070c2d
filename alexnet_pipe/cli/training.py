"""The commands that run the network on a dataset: train and test, and what only they need: their
option table (test takes a subset), the TrainConfig built from the parsed options, the launch of
--nproc ranks through torchrun, the placement of a rank that torchrun or SLURM started, and the
resume line printed when a run is stopped. Every default is TrainConfig's (config.py); the CLI
adds only what a command line implies (the progress bar follows the terminal, a training run
without -s saves to ``config.run_save_path()``, a launcher's rank, world size and GPU).
"""

from __future__ import annotations

import logging
import os
import sys

import click

import alexnet_pipe.cli.options as options
from alexnet_pipe.cli.options import DIR, opt, verbose
from alexnet_pipe.config import (
    FREEZE_CHOICES,
    LR_SCHEDULES,
    RUNS_DIR,
    STOP_GRACE_S,
    TrainConfig,
    resolve_backend,
    run_save_path,
    threads_per_rank,
)
from alexnet_pipe.text import plural

_TC = TrainConfig  # the defaults: TrainConfig's class attributes

# The `train` options: (parameter name, decorator). `test` takes its own subset (_TEST_OPTIONS).
_TRAIN_OPTIONS = [
    ("data_dir", options.data_dir(required=True, help="Converted dataset (output of alexnet-pipe convert).")),
    ("epochs", click.option("-e", "--epochs", type=click.IntRange(min=1), default=_TC.epochs, show_default=True)),
    ("save_path", opt("-s", "--save-path", "--save_path", "save_path", type=DIR, default=None,
        help="Write the final weights here.")),
    ("serialize", click.option("--serialize", type=click.IntRange(min=0), default=_TC.serialize, show_default=True,
        help="Checkpoint every N epochs (to --checkpoint, default <save_path>.ckpt).")),
    ("checkpoint_path", click.option("--checkpoint", "checkpoint_path", type=DIR, default=None,
        help="Checkpoint file for --serialize.")),
    ("model_file", options.model_file("Weights to start from or test, or a checkpoint to resume.")),
    ("synsets", options.synsets()),
    ("test_only", opt("--test-only", "--test_only", "test_only", is_flag=True,
        help="Only evaluate --model-file on the validation split.")),
    ("eval_freq", opt("--eval-freq", "-eval", "--eval_freq", "eval_freq", type=click.IntRange(min=0),
        default=_TC.eval_freq, show_default=True, help="Evaluate every N epochs and after the last (0: never).")),
    ("ten_crop", click.option("--eval-ten-crop", "ten_crop", is_flag=True, default=_TC.ten_crop,
        help="Also evaluate the last epoch on ten crops per image (corners and centre, mirrored; softmax "
        "averaged: Krizhevsky et al. 2012).")),
    ("backend", options.backend(help="Default: gpu when one is present.")),
    ("device_id", options.device_id(_TC.device_id)),
    ("rng_seed", options.rng_seed(_TC.rng_seed)),
    ("datatype", options.datatype(help="Default: bf16 autocast on the GPU, f32 on the CPU.")),
    ("batch_size", options.batch_size(_TC.batch_size, help="Images per step per rank.")),
    ("subset_pct", opt("--subset-pct", "--subset_pct", "subset_pct", type=click.FloatRange(0, 100, min_open=True),
        default=_TC.subset_pct, show_default=True)),
    ("output_file", opt("-o", "--output-file", "--output_file", "output_file", type=DIR, default=None,
        help="Metrics as JSON lines: a row per epoch and per --log-every steps.")),
    ("no_progress", options.no_progress(help="No progress bar or lines.", neon=True)),
    ("crop", options.crop(_TC.crop,
        help="Crop size (227 = Caffe geometry; 112 for quick CPU runs) [default: the --model-file's, else 224].")),
    ("lr", click.option("--lr", type=float, default=_TC.lr, show_default=True,
        help="Weights' lr for 128 images per step (biases get 2x); see --lr-scale.")),
    ("lr_scale", click.option("--lr-scale", type=click.Choice(["linear", "none"]), default=_TC.lr_scale,
        show_default=True, help="linear: the lr used is --lr x (-z x ranks) / 128; none: --lr as given.")),
    ("lr_step", click.option("--lr-step", type=click.IntRange(min=1), default=_TC.lr_step, show_default=True,
        help="lr x0.1 every N epochs.")),
    ("lr_schedule", click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=_TC.lr_schedule,
        show_default=True, help="step: neon's (--lr-step); cosine: per step from the lr down to 0 at the last "
        "epoch, after any warm-up (Loshchilov & Hutter, SGDR).")),
    ("warmup_epochs", click.option("--warmup-epochs", type=click.IntRange(min=0), default=_TC.warmup_epochs,
        show_default=True, help="Large batches: raise the lr per step, linearly from lr/k to the scheduled lr, over "
        "N epochs; k = max(1, (-z x ranks) / 128), so with --lr-scale linear it starts at --lr (Goyal et al. "
        "2017). 0: off.")),
    ("lighting", click.option("--lighting", type=click.FloatRange(min=0), default=_TC.lighting, show_default=True,
        help="PCA colour augmentation (Krizhevsky et al. 2012, section 4.1): add sum_i alpha_i lambda_i p_i to "
        "every pixel, p_i/lambda_i the dataset's RGB eigenvectors/values (mean.json), alpha_i ~ N(0, SIGMA) per "
        "image and epoch; the paper's is 0.1. 0: off.")),
    ("momentum", click.option("--momentum", type=float, default=_TC.momentum, show_default=True)),
    ("weight_decay", click.option("--weight-decay", type=float, default=_TC.weight_decay, show_default=True)),
    ("normalize_std", options.normalize_std(
        help="Also divide by the per-channel std [default: as the --model-file was trained, else no].")),
    ("finetune", click.option("--finetune", is_flag=True,
        help="Start a new run from --model-file's weights (trained here or imported); a new fc8 when this "
        "dataset's classes differ.")),
    ("freeze", click.option("--freeze", type=click.Choice(FREEZE_CHOICES), default=_TC.freeze,
        show_default=True,
        help="With --finetune: keep conv1-conv5 (conv) or all but fc8 (features) as they are.")),
    ("head_lr_mult", click.option("--head-lr-mult", type=click.FloatRange(min=0), default=_TC.head_lr_mult,
        show_default=True,
        help="With --finetune: a new fc8 learns at --lr x this.")),
    ("init", click.option("--init", type=click.Choice(["neon", "kaiming"]), default=_TC.init,
        help="Weight init of a fresh network (or of --finetune's new fc8): neon's model zoo, or torchvision's "
        "(learns faster on small data) [default: neon]; refused where --model-file gives every layer.")),
    ("reader", click.option("--reader", type=click.Choice(["auto", "lmdb", "recordio"]), default=_TC.reader,
        show_default=True)),
    ("compile_model", click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (GPU).")),
    ("data_threads", click.option("--data-threads", type=click.IntRange(min=1), default=_TC.data_threads,
        help="DALI CPU threads.")),
    ("read_workers", click.option("--read-workers", type=click.IntRange(min=0), default=_TC.read_workers,
        help="Processes reading records for DALI; 0: the training process reads them "
        "[default: 0 with -b cpu; with -b gpu a quarter of the cores, 1 to 4].")),
    ("hw_decoder_load", click.option("--hw-decoder-load", type=click.FloatRange(0, 1), default=_TC.hw_decoder_load,
        help="Share of the JPEGs the GPU's hardware decoder takes (A100/H100) [default: DALI's, 0.65]; "
        "tools/dali_sweep.py finds the best.")),
    ("jpeg_fancy_upsampling", click.option("--jpeg-fancy-upsampling", is_flag=True,
        help="GPU decoding upsamples chroma as libjpeg-turbo does (the CPU's pixels; a little slower).")),
    ("prefetch", click.option("--prefetch", type=click.IntRange(min=1), default=_TC.prefetch, show_default=True,
        help="Batches DALI prepares ahead of the training step.")),
    ("roi_decode", click.option("--roi-decode/--no-roi-decode", default=_TC.roi_decode, show_default=True,
        help="Decode only each image's crop window (the same pixels, fewer decoded).")),
    ("tensorboard_dir", click.option("--tensorboard", "tensorboard_dir", type=DIR, default=None,
        help="Also write TensorBoard scalars (loss, lr, val, img/s, data wait) to this directory "
        "(needs pip install 'alexnet-pipe[tensorboard]').")),
    ("log_every", click.option("--log-every", type=click.IntRange(min=1), default=_TC.log_every, show_default=True,
        help="Steps between progress updates and the per-step rows of -o.")),
    ("checkpoint_minutes", click.option("--checkpoint-minutes", type=click.FloatRange(min=0, min_open=True),
        default=_TC.checkpoint_minutes,
        help="Also checkpoint every N minutes, mid-epoch too (SIGTERM/SIGINT always checkpoint).")),
    ("keep_checkpoints", click.option("--keep-checkpoints", type=click.IntRange(min=1), default=_TC.keep_checkpoints,
        show_default=True, help="Checkpoint files kept: the newest at --checkpoint, older ones as .1, .2, ...")),
    ("nproc", click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
        help="Launch this many ranks on this machine with torchrun (one per GPU).")),
    ("allreduce_dtype", click.option("--allreduce-dtype", type=click.Choice(["f32", "bf16"]),
        default=_TC.allreduce_dtype,
        help="Gradients' all-reduce between ranks [default: bf16 with -d bf16, else f32].")),
    ("dist_timeout_s", click.option("--dist-timeout", "dist_timeout_s", type=click.FloatRange(min=1),
        default=_TC.dist_timeout_s,
        show_default=True, help="Seconds a rank waits for the others before the job ends.")),
]
_TEST_OPTIONS = {"data_dir", "synsets", "backend", "device_id", "datatype", "batch_size", "output_file", "no_progress",
                 "reader", "data_threads", "read_workers", "nproc", "dist_timeout_s", "hw_decoder_load",
                 "jpeg_fancy_upsampling", "prefetch", "roi_decode"}


def _train_options(fn):
    """The neon model-zoo script's flags (plus a few), hyphenated, the neon spellings kept as aliases."""
    for _, option in reversed([*_TRAIN_OPTIONS, ("verbose", verbose)]):
        fn = option(fn)
    return fn


def _test_options(fn):
    """`test`: the dataset, the weights and how to run; crop and normalisation come from the weights."""
    own = [
        options.model_file("Weights or checkpoint to evaluate.", required=True),
        click.option("--ten-crop", "ten_crop", is_flag=True, default=_TC.ten_crop,
                     help="Also evaluate on ten crops per image: the four corners and the centre of the stored "
                          "image, each mirrored too, softmax averaged (Krizhevsky et al. 2012; Caffe's "
                          "multi-view test). Printed after the single-crop line."),
        click.option("--per-class", "per_class_file", type=DIR, default=None,
                     help="Write per-class top-1/top-5 and the confusion matrix to this .json, and a drawing of "
                          "the worst classes and most confused pairs beside it (.png)."),
        # Accepted for the seed's command lines; they must match the weights file (refused otherwise).
        options.crop(_TC.crop, hidden=True),
        options.normalize_std(hidden=True),
        options.rng_seed(_TC.rng_seed, hidden=True),
    ]
    chosen = [o for n, o in _TRAIN_OPTIONS if n in _TEST_OPTIONS]
    for option in reversed([*chosen, *own, verbose]):
        fn = option(fn)
    return fn


def train_config(kw: dict, test_only: bool) -> TrainConfig:
    """The TrainConfig of `train` (``test_only`` False) or `test` (True) from their parsed options
    ``kw`` (a click context's params; not changed). Options the user left out arrive as None and
    TrainConfig resolves them itself (backend, datatype, read workers, data threads, crop,
    --normalize-std), so the CLI and ``TrainConfig(data_dir=...)`` from Python run alike. Only
    these are the command line's own:

    - progress_bar follows the terminal (a bar on a tty, a log line every 30 s otherwise);
    - rank / world_size / device_id come from torchrun's or SLURM's variables (``_placement``);
    - save_path: a training run without -s writes to ``config.run_save_path()`` (its docstring
      says why TrainConfig itself does not).
    """
    kw = dict(kw)
    kw.pop("nproc", None)
    test_only = bool(kw.pop("test_only", False)) or test_only
    if kw.get("save_path") is None and not test_only:  # a trained model is never discarded
        kw["save_path"] = run_save_path()
    return TrainConfig(
        test_only=test_only, progress=not kw.pop("no_progress"), progress_bar=sys.stderr.isatty(),
        compile=kw.pop("compile_model", False), **_placement(kw), **kw,
    )


def _placement(kw: dict) -> dict:
    """``distributed.launcher_placement`` of this process (rank, world size and GPU under torchrun or
    SLURM), or {}; under a launcher, -i is dropped from ``kw`` and ranks other than 0 log errors only."""
    from alexnet_pipe.train.distributed import launcher_placement  # torch: train and test import it anyway

    placement = launcher_placement(os.environ)
    if placement:
        if placement["rank"]:  # one voice: the other ranks report errors only
            logging.getLogger().setLevel(logging.ERROR)
        kw.pop("device_id")
    return placement


# Set by --nproc for the ranks it starts: rank 0's resume line launches as many ranks again.
_NPROC_ENV = "ALEXNET_PIPE_NPROC"


def _launch(nproc: int, backend: str | None, run: TrainConfig | None = None) -> None:
    """`train --nproc N` (``run``: its TrainConfig) or `test --nproc N` (None): run this same command
    line as N torchrun ranks on this machine. A training run without -s gets its default path here,
    once for every rank.

    Stopping: torchrun starts each rank in a session of its own, so Ctrl-C reaches this process
    alone; torch's launcher forwards it (or a SIGTERM) to every rank and waits up to
    ``STOP_GRACE_S``: each rank finishes its step, rank 0 checkpoints and prints the resume line,
    and this process exits as they did, 130 or 143, adding nothing. A rank that dies otherwise
    ends the job in one line naming the rank, how it ended and the last checkpoint."""
    import time
    import uuid

    import torch
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from alexnet_pipe.train.preempt import EXIT_CODES

    if "RANK" in os.environ:
        raise click.UsageError("--nproc starts torchrun itself; under torchrun, drop it")
    gpus = torch.cuda.device_count()
    # Every rank started here inherits this process's CUDA_VISIBLE_DEVICES and takes device
    # LOCAL_RANK of what it sees (distributed.local_device): one rank per visible GPU, never shared.
    if resolve_backend(backend) == "gpu" and gpus < nproc:
        fix = f"pass --nproc {gpus} or -b cpu" if gpus else "pass -b cpu"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        limit = f" (CUDA_VISIBLE_DEVICES={visible} limits what it sees)" if visible is not None else ""
        raise click.UsageError(f"--nproc {nproc} runs one rank per GPU, and this machine has {gpus}{limit}; {fix}")
    args = _argv_without("--nproc") + _default_save_args(run.save_path if run else None)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    os.environ[_NPROC_ENV] = str(nproc)
    _quiet_torch_launcher()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=1.0,
                          shutdown_timeout=STOP_GRACE_S)
    started = time.time()
    try:
        elastic_launch(config, sys.executable)("-m", "alexnet_pipe", *args)
    except SignalException as exc:  # the ranks were sent the signal, stopped and said so
        sys.exit(EXIT_CODES.get(exc.sigval, 128 + exc.sigval))
    except ChildFailedError as exc:
        # A rank still finishing its stop when torch's launcher, seeing another rank's 143, sends it
        # SIGTERM, ends by that signal: it was stopping too (seen under load).
        codes = {rank: EXIT_CODES.get(-f.exitcode, f.exitcode) if f.exitcode < 0 else f.exitcode
                 for rank, f in exc.failures.items()}
        if set(codes.values()) <= set(EXIT_CODES.values()):  # a rank was sent SIGTERM/SIGINT: all stopped
            sys.exit(codes.get(0, max(codes.values())))
        deaths = []
        for rank, failure in sorted(exc.failures.items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            deaths.append(f"rank {rank} ended with {how}")
        raise click.ClickException(f"the {nproc}-rank job failed: {'; '.join(deaths)} (each rank's own message is "
                                   f"above); {_after_failure(run, started)}") from None


def _quiet_torch_launcher() -> None:
    """torch's launcher logs every signal it forwards and every rank that fails, in lines of its own;
    `--nproc` says what happened once (-v keeps torch's lines)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _after_failure(run: TrainConfig | None, started: float) -> str:
    """What to do after a failed --nproc job: the checkpoint it wrote last and the resume line."""
    if run is None or run.test_only:
        return "rerun the same command"
    ckpt = run.resolved_checkpoint_path()
    if ckpt is not None and ckpt.is_file() and ckpt.stat().st_mtime >= started:
        return f"last checkpoint: {ckpt}; resume with: {_resume_command(ckpt, run.save_path, run.world_size)}"
    if run.model_file is not None:
        return f"it wrote no checkpoint: rerun the same command to start again from --model-file {run.model_file}"
    return "it wrote no checkpoint (--serialize N or --checkpoint-minutes M write them): rerun the same command"


def _run_training(cfg) -> None:
    from alexnet_pipe.fsutil import check_output_file
    from alexnet_pipe.train.evaluate import ResultNotSaved, run_test
    from alexnet_pipe.train.loop import fit

    outputs = [(cfg.output_file, "-o", "metrics.jsonl"), (cfg.per_class_file, "--per-class", "per-class.json")]
    if not cfg.test_only:
        outputs += [(cfg.save_path, "-s", "alexnet.pt"),
                    (cfg.resolved_checkpoint_path(), "--checkpoint", "alexnet.ckpt")]
    for path, what, example in outputs:
        if path is not None:  # before any work: a bad path must not cost a trained model
            new_folders = 2 if path.parent.parent == RUNS_DIR else 1  # the default: alexnet-runs/<date-time>/
            check_output_file(path, what, example, new_folders)
    if cfg.test_only:
        try:
            result, unsaved = run_test(cfg), None
        except ResultNotSaved as exc:  # a full disk under --per-class: the figures first, then its line
            result, unsaved = exc.result, exc
        if cfg.rank == 0:  # every rank has the same figures; one prints them
            for line in result.lines():
                click.echo(line)
        if unsaved is not None:
            raise unsaved
        return
    from alexnet_pipe.train.preempt import EXIT_CODES

    if cfg.rank == 0:
        logging.getLogger(__name__).info("weights will be written to %s, checkpoints to %s", cfg.save_path,
                                         cfg.resolved_checkpoint_path())
    result = fit(cfg)
    if cfg.rank != 0:
        if result.stopped_by is not None:
            sys.exit(EXIT_CODES.get(result.stopped_by, 1))
        return
    if result.stopped_by is not None:
        import signal

        name = signal.Signals(result.stopped_by).name
        click.echo(f"stopped by {name} after {plural(result.epochs_run, 'epoch')}; "
                   f"checkpoint: {result.checkpoint_path}", err=True)
        click.echo(f"resume with: {_resume_command(result.checkpoint_path, cfg.save_path, cfg.world_size)}",
                   err=True)
        sys.exit(EXIT_CODES.get(result.stopped_by, 1))
    if result.final is not None:
        for line in result.final.lines():
            click.echo(line)
    if result.weights_path is not None:
        click.echo(f"weights: {result.weights_path}")


def _resume_command(ckpt, save_path=None, world_size: int = 1) -> str:
    """The command that continues this run from ``ckpt``: this process's command line with
    --model-file pointing at it, -s where the run used the default path, and as many ranks: --nproc N
    where --nproc started them, or a placeholder for the outside launcher (torchrun, srun)."""
    import shlex

    args = _argv_without("--model_file", "--model-file") + _default_save_args(save_path)
    nproc = os.environ.get(_NPROC_ENV)
    if nproc and not _given("--nproc"):
        args += ["--nproc", nproc]
    if world_size > 1 and not nproc:
        return (f"<the same {world_size}-rank torchrun or srun launch of> "
                f"{shlex.join(['-m', 'alexnet_pipe', *args, '--model-file', str(ckpt)])}")
    return shlex.join(["alexnet-pipe", *args, "--model-file", str(ckpt)])


def _default_save_args(save_path) -> list[str]:
    """``-s PATH`` where a training run writes to the default path (no -s given): the launched ranks and
    the resume line then use the same path, not one of their own."""
    if save_path is None or _given("-s", "--save-path", "--save_path"):
        return []
    return ["-s", str(save_path)]


def _given(*names: str) -> bool:
    """Whether this process's command line holds one of the options ``names``."""
    return any(arg in names or arg.startswith(tuple(f"{n}=" for n in names)) for arg in sys.argv[1:])


def _argv_without(*names: str) -> list[str]:
    """This process's arguments with the options ``names`` (and their values) taken out."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{n}=" for n in names)):
            args.append(arg)
    return args


@click.command()
@_train_options
def train(**kw):
    """Train the neon AlexNet on a converted dataset (DALI on the GPU, or -b cpu).

    \b
    Several GPUs: `--nproc N` on one machine, or torchrun for several machines
    (torchrun --nproc_per_node=8 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT
    -m alexnet_pipe train ...), with the same flags. Each rank reads its share of every
    epoch's global order. Batch and lr rule: -z is per rank, so a step sees -z x ranks
    images; --lr is neon's rate for 128 images and, with --lr-scale linear (the default),
    the rate used is --lr x (-z x ranks) / 128. Large batches: --warmup-epochs 5 rises per
    step from that rate / k to it, k = max(1, (-z x ranks) / 128) (Goyal et al. 2017).

    \b
    Examples:
      alexnet-pipe train -w batches/ -e 90 -s alexnet.pt -o metrics.jsonl --serialize 1
      alexnet-pipe train -w batches/ -e 90 -s alexnet.pt --model-file alexnet.ckpt   # resume
      alexnet-pipe train -w batches/ -e 90 -s alexnet.pt --nproc 8 --checkpoint-minutes 30
      alexnet-pipe train -w flowers/ -e 10 -s flowers.pt --model-file caffenet.pt --finetune --lr 0.001

    \b
    --model-file: a checkpoint of this dataset's classes resumes; weights (trained here or
    imported with import-weights) start a new run from them, with the crop, channel order,
    value range and mean/std they record. Weights of other classes need --finetune.
    """
    if kw["nproc"] > 1:
        _launch(kw["nproc"], kw["backend"], train_config(kw, test_only=False))
        return
    _run_training(train_config(kw, test_only=False))


@click.command("test")
@_test_options
def test_cmd(**kw):
    """Evaluate --model-file on the validation split, with the crop and normalisation it was
    trained with (same as train --test-only).

    \b
    Examples:
      alexnet-pipe test -w batches/ --model-file alexnet.pt
      alexnet-pipe test -w batches/ --model-file alexnet.ckpt -o results.jsonl --per-class classes.json
      alexnet-pipe test -w batches/ --model-file alexnet.pt --nproc 8     # 8 GPUs
    """
    if kw["nproc"] > 1:
        _launch(kw["nproc"], kw["backend"])
        return
    _run_training(train_config(kw, test_only=True))

