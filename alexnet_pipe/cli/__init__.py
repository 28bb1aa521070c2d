"""Command line: parse -> build a config -> call the job -> map errors to exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from alexnet_pipe import __version__
from alexnet_pipe.config import (
    RESIZE_FILTERS,
    ConvertConfig,
    ImageSettings,
    UpdateMeanConfig,
    VerifyConfig,
    default_backend,
    default_datatype,
    default_workers,
)
from alexnet_pipe.errors import AlexnetPipeError

_DIR = click.Path(path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_LIST_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


_VERBOSE = "alexnet_pipe.verbose"


class _Group(click.Group):
    """Turns our typed errors (AlexnetPipeError: bad input, bad settings as ConfigError, a damaged
    file) into one clean line, exit code 1; click's own errors pass through as click prints them.

    Anything else is a bug, not the user's input (a ValueError inside numpy, a KeyError): with -v it
    propagates with its traceback; without -v it is one line, exit code 1, that names the exception
    and says to rerun with -v for the traceback (a user is not handed a wall of text by default, and
    nothing is passed off as their mistake)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AlexnetPipeError as exc:
            raise click.ClickException(str(exc)) from exc
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("verbose") or ctx.meta.get(_VERBOSE):  # -v, before or after the command
                raise
            raise click.ClickException(f"internal error, not a problem with the input: {type(exc).__name__}: {exc} "
                                       "(rerun with -v for the traceback, and please report it)") from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alexnet-pipe")
@click.option("-v", "--verbose", is_flag=True, help="Debug log output.")
def main(verbose: bool) -> None:
    """ImageNet-style images -> sharded LMDB/RecordIO -> DALI -> AlexNet."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(message)s",
        stream=sys.stderr,
    )


class _Option(click.Option):
    """An option whose old spellings (neon's ``--data_dir``, ``-eval``) still work but stay out of
    --help: one hyphenated name per option, the seed's command lines unchanged."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kw):
        super().__init__(*args, **kw)
        self.hidden_aliases = set(hidden_aliases)

    def get_help_record(self, ctx):
        saved = self.opts
        self.opts = [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = saved


def opt(*decls: str, **kw):
    """click.option where spellings with "_" (and ``-eval``) are hidden aliases of the first name."""
    aliases = tuple(d for d in decls if d.startswith("-") and ("_" in d or d == "-eval"))
    return click.option(*decls, cls=_Option, hidden_aliases=aliases, **kw)


def _verbose(ctx, param, value):
    if value:
        logging.getLogger().setLevel(logging.DEBUG)
        ctx.meta[_VERBOSE] = True  # shared with the group's context: _Group shows a bug's traceback
    return value


# `-v` after the subcommand too (`alexnet-pipe train -v ...`), as well as before it.
_verbose_option = click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True,
                               callback=_verbose, help="Debug log output.")


def _dataset(fn):
    """The converted dataset: a positional ROOT, or -w/--data-dir as in train, test and benchmark."""
    def resolve(ctx, param, value):
        root = ctx.params.pop("root_arg", None)
        if root is not None and value is not None and root != value:
            raise click.UsageError(f"two datasets given: {root} and -w {value}; pass one")
        if (root or value) is None:
            raise click.UsageError("pass the converted dataset: ROOT, or -w DIR")
        return root or value

    fn = opt("-w", "--data-dir", "--data_dir", "root", type=_EXISTING_DIR, default=None, callback=resolve,
             help="The converted dataset (the same as ROOT).")(fn)
    return click.argument("root_arg", metavar="ROOT", type=_EXISTING_DIR, required=False, is_eager=True)(fn)


def _parse_part(ctx, param, value):
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N such as 0/4, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"I/N needs 0 <= I < N, got {value}")
    return i, n


@main.command()
@click.argument("raw", type=_EXISTING_DIR)
@click.argument("out", type=_DIR)
@click.option("--format", "fmt", type=click.Choice(["lmdb", "recordio", "both"]), default="lmdb", show_default=True,
              help="Shard format: Caffe Datum LMDB, MXNet RecordIO, or both.")
@click.option("--short-side", type=click.IntRange(min=0), default=256, show_default=True,
              help="Scale every image, up or down, so its shorter side is exactly this (as im2rec --resize); "
                   "0 keeps the size.")
@click.option("--no-upscale", is_flag=True, help="Never scale up: images with a shorter short side keep their size.")
@click.option("--resize-filter", type=click.Choice(RESIZE_FILTERS), default=ImageSettings.resize_filter,
              show_default=True,
              help="How images are scaled: antialias (Gaussian pre-blur + bicubic, the closest to a Lanczos "
                   "resize), or OpenCV's plain cubic, linear (im2rec's and Caffe's default; the fastest) or area.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--shard-size", type=click.IntRange(min=1), default=5000, show_default=True, help="Records per shard.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the stored shuffle order.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=ImageSettings.max_pixels, show_default=True,
              help="Larger images are skipped as decompression bombs.")
@click.option("--max-file-mb", type=click.IntRange(min=1), default=ImageSettings.max_file_mb, show_default=True,
              help="Larger input files (MiB) are skipped, with a reason, before they are read.")
@click.option("--no-passthrough", is_flag=True, help="Re-encode every image, even clean small JPEGs.")
@click.option("--val-labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Labels of a flat val/: LOC_val_solution.csv, Caffe val.txt, the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt, or the devkit ILSVRC2012_devkit_t12.tar.gz.")
@click.option("--synsets", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The devkit's id order for its ground truth: ILSVRC2012_devkit_t12.tar.gz, its data/meta.mat "
                   "or map_clsloc.txt [default: found in RAW]; a plain wnid list only if in devkit (unsorted) order. "
                   "With --list: the class names, line k naming label k (e.g. Caffe's synset_words.txt).")
@click.option("--list", "train_list", type=_LIST_FILE, default=None, metavar="FILE",
              help="Take the training images from a list file instead of class folders: Caffe's "
                   "'<path> <label>' lines, or an im2rec .lst (tab-separated index, label, path); paths are relative "
                   "to RAW, labels are taken as given.")
@click.option("--list-val", "val_list", type=_LIST_FILE, default=None, metavar="FILE",
              help="The validation images' list file (with --list; same formats).")
@click.option("--val-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="For an input without a val split: hold out this fraction of each class as val "
                   "(stratified, chosen by --seed; im2rec's --train-ratio is 1 minus this).")
@click.option("--dry-run", is_flag=True,
              help="Print the layout, classes, counts per split, shard plan and the inputs that would be "
                   "skipped; write nothing.")
@click.option("--force", is_flag=True, help="Discard an earlier conversion in OUT made with other settings.")
@click.option("--part", callback=_parse_part, default=None, metavar="I/N",
              help="Write only every N-th shard, starting at I (split the work across machines).")
@click.option("--repair", is_flag=True,
              help="Re-check every finished shard in OUT against its recorded checksum and rewrite the damaged "
                   "ones from RAW (byte-identical to a clean run; refused if the inputs changed).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert(raw, out, fmt, short_side, no_upscale, resize_filter, quality, shard_size, workers, seed, max_pixels,
            max_file_mb, no_passthrough, val_labels, synsets, train_list, val_list, val_ratio, dry_run, force, part,
            repair, no_progress):
    """Convert RAW (ImageNet layout, or the images that list files name) into validated, shuffled shards in OUT.

    Rerunning the same command after an interruption finishes the job.

    \b
    Examples:
      alexnet-pipe convert raw/ batches/ --format both
      alexnet-pipe convert images/ batches/ --list train.txt --list-val val.txt --synsets synset_words.txt
      alexnet-pipe convert flowers/ batches/ --val-ratio 0.05 --dry-run
    """
    cfg = ConvertConfig(
        src=raw, dst=out,
        formats=("lmdb", "recordio") if fmt == "both" else (fmt,),
        image=ImageSettings(short_side=short_side, quality=quality, max_pixels=max_pixels,
                            passthrough=not no_passthrough, upscale=not no_upscale, max_file_mb=max_file_mb,
                            resize_filter=resize_filter),
        shard_size=shard_size, workers=workers or default_workers(), seed=seed, force=force,
        progress=not no_progress, val_labels=val_labels, synsets=synsets, part=part,
        train_list=train_list, val_list=val_list, val_ratio=val_ratio, repair=repair,
    )
    if dry_run:
        from alexnet_pipe.convert.dryrun import format_plan, plan_convert

        click.echo(format_plan(plan_convert(cfg)))
        return
    # numpy's OpenBLAS starts a thread per core at import, which spins ~0.1 s of CPU in every
    # process (this one, the forkserver): taken from the workers on a small machine. The
    # converter does no linear algebra. Set before numpy is imported here and in the forkserver.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if cfg.workers > 1:
        from alexnet_pipe.convert.workers import start_early

        start_early("alexnet_pipe.imaging.process")  # its imports overlap this process's
    from alexnet_pipe.apps.info import plural
    from alexnet_pipe.convert.job import run_convert

    result = run_convert(cfg)
    if repair:
        _echo_repaired(result)
    if result.remaining_shards:
        click.echo(f"part {part[0]}/{part[1]} done ({result.converted_now} images in {result.seconds:.1f} s); "
                   f"{plural(result.remaining_shards, 'shard')} of other parts "
                   f"{'is' if result.remaining_shards == 1 else 'are'} not in {out} yet. "
                   "The run that completes the last part writes the manifest; or gather all "
                   "shards and .parts/ into one directory and rerun the command without --part.")
        return
    counts = ", ".join(f"{split} {n}" for split, n in result.records.items())
    click.echo(f"wrote {out}: {counts} records, {result.skipped} skipped "
               f"({result.converted_now} images in {result.seconds:.1f} s, {result.images_per_second:.0f} img/s)")


def _echo_repaired(result) -> None:
    """One line per shard that --repair rewrote."""
    from alexnet_pipe.apps.info import plural

    for name, why in result.repaired:
        click.echo(f"REPAIRED {name}: {why}")
    if result.sums_added:
        click.echo(f"wrote per-record checksums for {plural(result.sums_added, 'intact shard')}")
    if not result.repaired:
        click.echo("nothing to repair: every shard matches its recorded checksum")


@main.command()
@_dataset
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")
@click.option("--quick", is_flag=True, help="Check structure, labels and checksums without decoding images.")
@click.option("--repair", is_flag=True,
              help="First re-check every shard against its recorded checksum and rewrite the damaged ones from "
                   "the raw inputs ROOT was converted from (byte-identical to a clean run).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_verbose_option
def verify(root, workers, quick, repair, no_progress):
    """Read every record of ROOT back and check it against the manifest.

    \b
    Examples:
      alexnet-pipe verify batches/
      alexnet-pipe verify batches/ --quick --workers 8     # no decoding: structure and checksums
      alexnet-pipe verify batches/ --repair                # rewrite damaged shards from the raw images
    """
    from alexnet_pipe.apps.info import plural
    from alexnet_pipe.convert.verify import run_verify
    from alexnet_pipe.dataset.manifest import load_dataset

    cfg = VerifyConfig(root, workers or default_workers(), not quick, not no_progress, repair=repair)
    if cfg.repair:
        from alexnet_pipe.convert.repair import run_repair

        _echo_repaired(run_repair(cfg))
    result = run_verify(cfg)
    for note in result.notes:
        click.echo(f"NOTE {note}", err=True)
    for problem in result.problems:
        click.echo(f"PROBLEM {problem}", err=True)
    if not result.ok:
        raise click.ClickException(f"{plural(len(result.problems), 'problem')} in {root}")
    ds = load_dataset(root)
    images = sum(ds.split(name)["records"] for name in ds.splits())
    click.echo(f"ok: {plural(images, 'image')} in {plural(len(ds.formats), 'format')} "
               f"({plural(result.records, 'record')} in {plural(result.shards, 'shard')}) match the manifest")


@main.command()
@_dataset
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(root, as_json):
    """Classes, counts, shards, size, mean/std and settings of a converted dataset.

    \b
    Examples:
      alexnet-pipe info batches/
      alexnet-pipe info batches/ --json > batches.json
    """
    from alexnet_pipe.apps.info import dataset_summary, format_summary
    from alexnet_pipe.dataset.manifest import load_dataset

    summary = dataset_summary(load_dataset(root))
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@main.command()
@_dataset
def upgrade(root):
    """Bring a dataset converted by an older alexnet-pipe to the current format (no image is rewritten).

    \b
    Example:
      alexnet-pipe upgrade batches/ && alexnet-pipe verify batches/
    """
    from alexnet_pipe.convert.upgrade import run_upgrade

    click.echo(run_upgrade(root).summary())


@main.command("update-mean")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--into", type=_DIR, default=None, help="Write mean.json into this dataset directory.")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default=None,
              help="Channel order of an .npy mean (default rgb).")
def update_mean(path, into, channel_order):
    """Upgrade an old full-image mean (neon cache, mean.binaryproto, .npy) to per-channel mean.json.

    \b
    Examples:
      alexnet-pipe update-mean batches/                         # dataset dir: in place
      alexnet-pipe update-mean mean.binaryproto --into batches/  # Caffe's mean
      alexnet-pipe update-mean mean.npy --channel-order bgr
    """
    from alexnet_pipe.dataset.update_mean import run_update_mean

    result = run_update_mean(UpdateMeanConfig(path, into, channel_order))
    click.echo(result.summary())


# The `train` options: (parameter name, decorator). `test` takes its own subset (_TEST_OPTIONS).
_TRAIN_OPTIONS = [
    ("data_dir", opt("-w", "--data-dir", "--data_dir", "data_dir", type=_EXISTING_DIR, required=True,
        help="Converted dataset (output of alexnet-pipe convert).")),
    ("epochs", click.option("-e", "--epochs", type=click.IntRange(min=1), default=10, show_default=True)),
    ("save_path", opt("-s", "--save-path", "--save_path", "save_path", type=_DIR, default=None,
        help="Write the final weights here.")),
    ("serialize", click.option("--serialize", type=click.IntRange(min=0), default=0, show_default=True,
        help="Checkpoint every N epochs (to --checkpoint, default <save_path>.ckpt).")),
    ("checkpoint_path", click.option("--checkpoint", "checkpoint_path", type=_DIR, default=None,
        help="Checkpoint file for --serialize.")),
    ("model_file", opt("--model-file", "--model_file", "model_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
        help="Weights to start from or test, or a checkpoint to resume.")),
    ("test_only", opt("--test-only", "--test_only", "test_only", is_flag=True,
        help="Only evaluate --model-file on the validation split.")),
    ("eval_freq", opt("--eval-freq", "-eval", "--eval_freq", "eval_freq", type=click.IntRange(min=0), default=1,
        show_default=True,
        help="Evaluate every N epochs and after the last (0: never).")),
    ("backend", click.option("-b", "--backend", type=click.Choice(["gpu", "cpu"]), default=None,
        help="Default: gpu when one is present.")),
    ("device_id", opt("-i", "--device-id", "--device_id", "device_id", type=click.IntRange(min=0), default=0,
        show_default=True)),
    ("rng_seed", opt("-r", "--rng-seed", "--rng_seed", "rng_seed", type=int, default=0, show_default=True)),
    ("datatype", click.option("-d", "--datatype", type=click.Choice(["f32", "bf16", "f16"]), default=None,
        help="Default: bf16 autocast on the GPU, f32 on the CPU.")),
    ("batch_size", opt("-z", "--batch-size", "--batch_size", "batch_size", type=click.IntRange(min=1), default=128,
        show_default=True, help="Images per step per rank.")),
    ("subset_pct", opt("--subset-pct", "--subset_pct", "subset_pct", type=click.FloatRange(0, 100, min_open=True),
        default=100.0, show_default=True)),
    ("output_file", opt("-o", "--output-file", "--output_file", "output_file", type=_DIR, default=None,
        help="Metrics as JSON lines: a row per epoch and per --log-every steps.")),
    ("no_progress", opt("--no-progress", "--no_progress_bar", "no_progress", is_flag=True,
        help="No progress bar or lines.")),
    ("crop", click.option("--crop", type=click.IntRange(min=1), default=None,
        help="Crop size (227 = Caffe geometry; 112 for quick CPU runs) [default: the --model-file's, else 224].")),
    ("lr", click.option("--lr", type=float, default=0.01, show_default=True,
        help="Weights' lr for 128 images per step (biases get 2x); see --lr-scale.")),
    ("lr_scale", click.option("--lr-scale", type=click.Choice(["linear", "none"]), default="linear", show_default=True,
        help="linear: the lr used is --lr x (-z x ranks) / 128; none: --lr as given.")),
    ("lr_step", click.option("--lr-step", type=click.IntRange(min=1), default=20, show_default=True,
        help="lr x0.1 every N epochs.")),
    ("momentum", click.option("--momentum", type=float, default=0.9, show_default=True)),
    ("weight_decay", click.option("--weight-decay", type=float, default=5e-4, show_default=True)),
    ("normalize_std", click.option("--normalize-std", is_flag=True, default=None,
        help="Also divide by the per-channel std [default: as the --model-file was trained, else no].")),
    ("finetune", click.option("--finetune", is_flag=True,
        help="Start a new run from --model-file's weights (trained here or imported); a new fc8 when this "
        "dataset's classes differ.")),
    ("freeze", click.option("--freeze", type=click.Choice(["none", "conv", "features"]), default="none",
        show_default=True,
        help="With --finetune: keep conv1-conv5 (conv) or all but fc8 (features) as they are.")),
    ("head_lr_mult", click.option("--head-lr-mult", type=click.FloatRange(min=0), default=10.0, show_default=True,
        help="With --finetune: a new fc8 learns at --lr x this.")),
    ("init", click.option("--init", type=click.Choice(["neon", "kaiming"]), default="neon", show_default=True,
        help="Weight init: neon's model zoo, or torchvision's (learns faster on small data).")),
    ("reader", click.option("--reader", type=click.Choice(["auto", "lmdb", "recordio"]), default="auto",
        show_default=True)),
    ("compile_model", click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (GPU).")),
    ("data_threads", click.option("--data-threads", type=click.IntRange(min=1), default=None,
        help="DALI CPU threads.")),
    ("read_workers", click.option("--read-workers", type=click.IntRange(min=0), default=None,
        help="Processes reading records for DALI; 0: the training process reads them "
        "[default: 0 with -b cpu; with -b gpu a quarter of the cores, 1 to 4].")),
    ("hw_decoder_load", click.option("--hw-decoder-load", type=click.FloatRange(0, 1), default=None,
        help="Share of the JPEGs the GPU's hardware decoder takes (A100/H100) [default: DALI's, 0.65]; "
        "tools/dali_sweep.py finds the best.")),
    ("jpeg_fancy_upsampling", click.option("--jpeg-fancy-upsampling", is_flag=True,
        help="GPU decoding upsamples chroma as libjpeg-turbo does (the CPU's pixels; a little slower).")),
    ("prefetch", click.option("--prefetch", type=click.IntRange(min=1), default=2, show_default=True,
        help="Batches DALI prepares ahead of the training step.")),
    ("roi_decode", click.option("--roi-decode/--no-roi-decode", default=True, show_default=True,
        help="Decode only each image's crop window (the same pixels, fewer decoded).")),
    ("tensorboard_dir", click.option("--tensorboard", "tensorboard_dir", type=_DIR, default=None,
        help="Also write TensorBoard scalars (loss, lr, val, img/s, data wait) to this directory "
        "(needs pip install 'alexnet-pipe[tensorboard]').")),
    ("log_every", click.option("--log-every", type=click.IntRange(min=1), default=20, show_default=True,
        help="Steps between progress updates and the per-step rows of -o.")),
    ("checkpoint_minutes", click.option("--checkpoint-minutes", type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Also checkpoint every N minutes, mid-epoch too (SIGTERM/SIGINT always checkpoint).")),
    ("keep_checkpoints", click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3, show_default=True,
        help="Checkpoint files kept: the newest at --checkpoint, older ones as .1, .2, ...")),
    ("nproc", click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
        help="Launch this many ranks on this machine with torchrun (one per GPU).")),
    ("allreduce_dtype", click.option("--allreduce-dtype", type=click.Choice(["f32", "bf16"]), default=None,
        help="Gradients' all-reduce between ranks [default: bf16 with -d bf16, else f32].")),
    ("dist_timeout_s", click.option("--dist-timeout", "dist_timeout_s", type=click.FloatRange(min=1), default=600.0,
        show_default=True, help="Seconds a rank waits for the others before the job ends.")),
]
_TEST_OPTIONS = {"data_dir", "backend", "device_id", "datatype", "batch_size", "output_file", "no_progress", "reader",
                 "data_threads", "read_workers", "nproc", "dist_timeout_s", "hw_decoder_load", "jpeg_fancy_upsampling",
                 "prefetch", "roi_decode"}


def _train_options(fn):
    """The neon model-zoo script's flags (plus a few), hyphenated, the neon spellings kept as aliases."""
    for _, option in reversed([*_TRAIN_OPTIONS, ("verbose", _verbose_option)]):
        fn = option(fn)
    return fn


def _test_options(fn):
    """`test`: the dataset, the weights and how to run; crop and normalisation come from the weights."""
    own = [
        opt("--model-file", "--model_file", "model_file", required=True,
            type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Weights or checkpoint to evaluate."),
        click.option("--per-class", "per_class_file", type=_DIR, default=None,
                     help="Write per-class top-1/top-5 and the confusion matrix to this .json, and a drawing of "
                          "the worst classes and most confused pairs beside it (.png)."),
        # Accepted for the seed's command lines; they must match the weights file (refused otherwise).
        click.option("--crop", type=click.IntRange(min=1), default=None, hidden=True),
        click.option("--normalize-std", is_flag=True, default=None, hidden=True),
        click.option("-r", "--rng-seed", "--rng_seed", "rng_seed", type=int, default=0, hidden=True),
    ]
    chosen = [o for n, o in _TRAIN_OPTIONS if n in _TEST_OPTIONS]
    for option in reversed([*chosen, *own, _verbose_option]):
        fn = option(fn)
    return fn


def train_config(kw: dict, test_only: bool):
    """The TrainConfig of `train` (``test_only`` False) or `test` (True) from their parsed options
    ``kw`` (a click context's params; consumed). Options the user left out arrive as None/"auto" and
    TrainConfig resolves them itself (backend, datatype, read workers, crop, --normalize-std), so the
    CLI and ``TrainConfig(data_dir=...)`` from Python run alike. Only these are the CLI's own:

    - progress_bar follows the terminal (a bar on a tty, a log line every 30 s otherwise);
    - shard_id / num_shards / device_id come from torchrun's or SLURM's variables (_torchrun_rank);
    - save_path: a training run without -s writes alexnet-runs/<date-time>/alexnet.pt. This stays
      here, not in TrainConfig: a trained model from the command line must never be discarded, but
      a config built in Python (tests, benchmarks, inspect, a notebook) must not write files into
      the current directory that nobody asked for; a caller that wants weights passes save_path.
    """
    from alexnet_pipe.config import TrainConfig

    kw = dict(kw)
    kw.pop("nproc", None)
    test_only = bool(kw.pop("test_only", False)) or test_only
    if kw.get("save_path") is None and not test_only:  # a trained model is never discarded
        import time

        kw["save_path"] = Path("alexnet-runs") / time.strftime("%Y%m%d-%H%M%S") / "alexnet.pt"
    for name, auto in (("backend", "auto"), ("datatype", "auto")):
        kw[name] = kw[name] or auto
    if kw.get("data_threads") is None:
        kw.pop("data_threads", None)  # TrainConfig's default
    return TrainConfig(
        test_only=test_only, progress=not kw.pop("no_progress"), progress_bar=sys.stderr.isatty(),
        compile=kw.pop("compile_model", False), **_torchrun_rank(kw), **kw,
    )


def _torchrun_rank(kw: dict) -> dict:
    """This process's rank, world size and GPU under torchrun or SLURM (their environment variables), or {}.

    The GPU follows ``distributed.local_device``: LOCAL_RANK (or SLURM_LOCALID) where it indexes
    the visible devices, device 0 where the launcher gave each rank its own (SLURM
    --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank). -b is not known here: an ambiguous layout
    is refused by ``runtime.torch_device`` on a GPU run only (a -b cpu run does not care)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return {}
    import torch

    from alexnet_pipe.errors import TrainingError
    from alexnet_pipe.train.distributed import local_device

    rank, world = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE"))
    if rank:  # one voice: the other ranks report errors only
        logging.getLogger().setLevel(logging.ERROR)
    kw.pop("device_id")
    try:
        device = local_device(os.environ, torch.cuda.device_count())
    except TrainingError:  # ambiguous: unused on the CPU, and torch_device refuses it, with the reason, on the GPU
        device = 0
    return {"shard_id": rank, "num_shards": world, "device_id": device}


def _launch(nproc: int, backend: str | None) -> None:
    """`train --nproc N`: run this same command line as N torchrun ranks on this machine."""
    import uuid

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "RANK" in os.environ:
        raise click.UsageError("--nproc starts torchrun itself; under torchrun, drop it")
    gpus = torch.cuda.device_count()
    # Every rank started here inherits this process's CUDA_VISIBLE_DEVICES and takes device
    # LOCAL_RANK of what it sees (distributed.local_device): one rank per visible GPU, never shared.
    if (backend or default_backend()) == "gpu" and gpus < nproc:
        fix = f"pass --nproc {gpus} or -b cpu" if gpus else "pass -b cpu"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        limit = f" (CUDA_VISIBLE_DEVICES={visible} limits what it sees)" if visible is not None else ""
        raise click.UsageError(f"--nproc {nproc} runs one rank per GPU, and this machine has {gpus}{limit}; {fix}")
    args = _argv_without("--nproc")
    # torchrun's default of one thread per rank starves CPU ranks; share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, default_workers() // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=1.0)
    try:
        elastic_launch(config, sys.executable)("-m", "alexnet_pipe", *args)
    except ChildFailedError as exc:
        deaths = []
        for rank, failure in sorted(exc.failures.items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            deaths.append(f"rank {rank} ended with {how}")
        raise click.ClickException(f"the {nproc}-rank job failed: {'; '.join(deaths)} (each rank's own message is "
                                   "above); resume from the last checkpoint with --model-file") from None


def _run_training(cfg) -> None:
    from alexnet_pipe.train.loop import fit, run_test

    if cfg.test_only:
        result = run_test(cfg)
        if cfg.shard_id == 0:  # every rank has the same figures; one prints them
            click.echo(result.neon_line())
        return
    from alexnet_pipe.fsutil import check_output_file
    from alexnet_pipe.train.preempt import EXIT_CODES

    for path, what in ((cfg.save_path, "-s"), (cfg.resolved_checkpoint_path(), "--checkpoint"),
                       (cfg.output_file, "-o")):
        if path is not None:
            check_output_file(path, what)  # before any work: a bad path must not cost a trained model
    if cfg.shard_id == 0:
        logging.getLogger(__name__).info("weights will be written to %s, checkpoints to %s", cfg.save_path,
                                         cfg.resolved_checkpoint_path())
    result = fit(cfg)
    if cfg.shard_id != 0:
        if result.stopped_by is not None:
            sys.exit(EXIT_CODES.get(result.stopped_by, 1))
        return
    if result.stopped_by is not None:
        import signal

        name = signal.Signals(result.stopped_by).name
        click.echo(f"stopped by {name} after {result.epochs_run} epochs; checkpoint: {result.checkpoint_path}",
                   err=True)
        click.echo(f"resume with: {_resume_command(result.checkpoint_path)}", err=True)
        sys.exit(EXIT_CODES.get(result.stopped_by, 1))
    if result.final is not None:
        click.echo(result.final.neon_line())
    if result.weights_path is not None:
        click.echo(f"weights: {result.weights_path}")


def _resume_command(ckpt) -> str:
    """This process's command line with --model-file pointing at ``ckpt``."""
    import shlex

    return shlex.join(["alexnet-pipe", *_argv_without("--model_file", "--model-file"), "--model-file", str(ckpt)])


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


@main.command()
@_train_options
def train(**kw):
    """Train the neon AlexNet on a converted dataset (DALI on the GPU, or -b cpu).

    \b
    Several GPUs: `--nproc N` on one machine, or torchrun for several machines
    (torchrun --nproc_per_node=8 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT
    -m alexnet_pipe train ...), with the same flags. Each rank reads its share of every
    epoch's global order. Batch and lr rule: -z is per rank, so a step sees -z x ranks
    images; --lr is neon's rate for 128 images and, with --lr-scale linear (the default),
    the rate used is --lr x (-z x ranks) / 128.

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
        _launch(kw["nproc"], kw["backend"])
        return
    _run_training(train_config(kw, test_only=False))


@main.command("test")
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


@main.command()
@click.argument("metrics", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=_DIR, default=Path("curves.png"), show_default=True,
              help="The drawing: .png, .svg or .pdf, chosen by the suffix.")
def plot(metrics, output):
    """Draw loss, top-1/top-5, the learning rate and img/s against epoch from a -o metrics file,
    with the points where a run was resumed marked.

    \b
    Examples:
      alexnet-pipe plot metrics.jsonl -o curves.png
      alexnet-pipe plot metrics.jsonl -o curves.pdf      # or .svg
    """
    from alexnet_pipe.apps.plot import check_output, plot_curves, read_metrics

    check_output(output)
    click.echo(f"wrote {plot_curves(read_metrics(metrics), output, title=str(metrics))}")


@main.command()
@_dataset
@click.option("-o", "--output", type=_DIR, default=Path("grid.png"), show_default=True,
              help="The drawing: .png, .svg or .pdf, chosen by the suffix.")
@click.option("--split", default="train", show_default=True)
@click.option("-n", "--count", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--crop", type=click.IntRange(min=1), default=224, show_default=True)
@opt("-r", "--rng-seed", "--rng_seed", "rng_seed", type=int, default=0, show_default=True)
@click.option("--normalize-std", is_flag=True)
@click.option("-b", "--backend", type=click.Choice(["gpu", "cpu"]), default=None, help="Default: gpu when present.")
@click.option("--epoch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Which epoch's order, crops and flips to draw (1 = the first).")
@click.option("--mean", "mean_image", is_flag=True, help="Draw the dataset's mean image instead (mean_image.npy).")
def inspect(root, output, split, count, crop, rng_seed, normalize_std, backend, epoch, mean_image):
    """Draw the first samples of an epoch exactly as training reads them (mean added back), with labels.

    \b
    Examples:
      alexnet-pipe inspect batches/ -o grid.png --crop 224 -n 32
      alexnet-pipe inspect batches/ --epoch 2 -o epoch2.png   # the next epoch: new order, crops, flips
      alexnet-pipe inspect batches/ --mean -o mean.png
    """
    from alexnet_pipe.apps.inspect import draw_mean_image, inspect_batch

    if mean_image:
        click.echo(f"wrote {draw_mean_image(root, output)}")
        return
    path = inspect_batch(root, output, split, count, crop, rng_seed, normalize_std, backend or default_backend(),
                         epoch - 1)
    click.echo(f"wrote {path}")


@main.command()
@click.option("-b", "--backend", type=click.Choice(["gpu", "cpu"]), default=None, help="Default: gpu when present.")
@opt("-i", "--device-id", "--device_id", "device_id", type=click.IntRange(min=0), default=0, show_default=True)
@opt("-z", "--batch-size", "--batch_size", "batch_size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--crop", type=click.IntRange(min=1), default=224, show_default=True)
@click.option("-d", "--datatype", type=click.Choice(["f32", "bf16", "f16"]), default=None,
              help="Default: bf16 on the GPU, f32 on the CPU.")
@click.option("--iterations", type=click.IntRange(min=2), default=12, show_default=True)
@click.option("--throughput-steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--nchw", is_flag=True, help="Keep NCHW instead of channels_last.")
@opt("-w", "--data-dir", "--data_dir", "data_dir", type=_EXISTING_DIR, default=None,
              help="Also time the DALI train pipeline feeding the model on this dataset.")
@click.option("--loader", "loader_dir", type=_EXISTING_DIR, default=None,
              help="Also time the train pipeline alone on this dataset against a PIL DataLoader.")
@click.option("-o", "--output", type=_DIR, default=None, help="Append the rows as JSON lines here.")
def benchmark(backend, device_id, batch_size, crop, datatype, iterations, throughput_steps, compile_model, nchw,
              data_dir, loader_dir, output):
    """Time fprop/bprop/update (the seed's method) against a plain-PyTorch baseline, same run.

    The seed's method (neon's README table): one batch of random images, 12 timed iterations of
    forward (with the loss), backward and the SGD update, each phase timed on its own with CUDA
    events (on the CPU with a clock), the first 2 iterations dropped and the other 10 averaged;
    then img/s over --throughput-steps whole steps. The baseline is the same network written the
    plain way (float32, NCHW, eager, plain SGD), timed in the same process.

    \b
    Examples:
      alexnet-pipe benchmark                       # GPU when present: bf16, channels_last
      alexnet-pipe benchmark --compile -o bench.jsonl
      alexnet-pipe benchmark -w batches/           # also the DALI pipeline feeding the model
      alexnet-pipe benchmark --loader batches/     # the train pipeline alone vs a PIL DataLoader
    """
    import platform

    import torch

    from alexnet_pipe.apps.benchmark import BenchConfig, check_device, format_rows, run_benchmark

    backend = backend or default_backend()
    cfg = BenchConfig(backend=backend, device_id=device_id, batch_size=batch_size, crop=crop,
                      datatype=datatype or default_datatype(backend), channels_last=not nchw,
                      compile=compile_model, iterations=iterations, throughput_steps=throughput_steps,
                      data_dir=data_dir, loader_dir=loader_dir)
    check_device(cfg)
    device = (torch.cuda.get_device_name(device_id) if backend == "gpu" else platform.processor() or "CPU")
    device += f", torch {torch.__version__}"
    rows = run_benchmark(cfg)
    click.echo(format_rows(rows, cfg, device))
    if output is not None:
        with open(output, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "device": device, "batch_size": batch_size, "crop": crop}) + "\n")


def _three_floats(ctx, param, value):
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise click.BadParameter(f"expected three numbers R,G,B such as 123.7,116.3,103.5, got {value!r}")
    return values


@main.command("import-weights")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=_DIR, required=True, help="The alexnet-pipe weights file to write (.pt).")
@click.option("--format", "fmt", type=click.Choice(["auto", "neon", "caffe", "torchvision"]), default="auto",
              show_default=True, help="The source's format; auto tells it by the file's content.")
@click.option("--synsets", "--classes", "synsets", type=_LIST_FILE, default=None,
              help="The source's class list, one 'wnid [name]' a line in the order of its fc8 rows (Caffe's "
                   "synset_words.txt; for neon the devkit's meta.mat order). fc8 is permuted to sorted-wnid order.")
@click.option("--mean", callback=_three_floats, default=None, metavar="R,G,B",
              help="Override the recorded mean (in the weights' value range: 0..255, torchvision 0..1).")
@click.option("--std", callback=_three_floats, default=None, metavar="R,G,B", help="Override the recorded std.")
@click.option("--mean-file", type=_LIST_FILE, default=None,
              help="Record the per-channel mean of this Caffe mean.binaryproto (e.g. imagenet_mean.binaryproto).")
def import_weights_cmd(src, output, fmt, synsets, mean, std, mean_file):
    """Import trained AlexNet weights: a neon model-zoo pickle (alexnet.p), a Caffe .caffemodel
    (CaffeNet) or a torchvision AlexNet state_dict (.pth), into an alexnet-pipe weights file that
    records the crop, channel order, value range, mean/std and classes the network expects.

    \b
    Examples:
      alexnet-pipe import-weights alexnet.p -o neon-alexnet.pt --synsets devkit-order-synsets.txt
      alexnet-pipe import-weights bvlc_reference_caffenet.caffemodel -o caffenet.pt --synsets synset_words.txt
      alexnet-pipe import-weights alexnet-owt-7be5be79.pth -o torchvision-alexnet.pt
    """
    from alexnet_pipe.model.weights import ImportConfig, import_weights

    result = import_weights(src, ImportConfig(output=output, fmt=fmt, synsets=synsets, mean=mean, std=std,
                                                    mean_file=mean_file))
    click.echo(result.summary())


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@opt("--model-file", "--model_file", "model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
     required=True, help="Weights or a checkpoint: from alexnet-pipe train or import-weights.")
@opt("-z", "--batch-size", "--batch_size", "batch_size", type=click.IntRange(min=1), default=64, show_default=True,
     help="Images per forward pass.")
@click.option("-b", "--backend", type=click.Choice(["gpu", "cpu"]), default=None, help="Default: gpu when present.")
@opt("-i", "--device-id", "--device_id", "device_id", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="One JSON list, an object per image in input order: path and top5 (index, id, name, prob), "
                   "or path and error.")
def predict(images, model_file, batch_size, backend, device_id, as_json):
    """Top-5 classes of IMAGES (files, or folders of them, searched recursively) with --model-file,
    through the validation preprocessing: the converter's resize of the short side, the centre
    crop, the weights' channel order, mean and std. Exit code 1 when any input could not be read
    (the others are still predicted).

    \b
    Examples:
      alexnet-pipe predict --model-file alexnet.pt cat.jpg dog.png
      alexnet-pipe predict --model-file caffenet.pt photos/ --json > predictions.json
      alexnet-pipe predict --model-file alexnet.ckpt -b cpu -z 16 photos/
    """
    from alexnet_pipe.apps.predict import PredictConfig, format_table, run_predict

    result = run_predict(PredictConfig(model_file=model_file, inputs=tuple(images), batch_size=batch_size,
                                       backend=backend or default_backend(), device_id=device_id))
    if result.passed_over:
        shown = ", ".join(result.passed_over[:3]) + (", ..." if len(result.passed_over) > 3 else "")
        click.echo(f"passed over {len(result.passed_over)} file(s) in the folders that are not images by their "
                   f"suffix ({shown}); name a file to read it anyway", err=True)
    if as_json:
        click.echo(json.dumps([p.to_json() for p in result.predictions], indent=1))
    else:
        click.echo(format_table(result))
    if result.failed:
        click.echo(f"{result.failed} of {len(result.predictions)} inputs could not be read", err=True)
        sys.exit(1)
