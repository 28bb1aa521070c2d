"""The commands on a converted dataset: convert (raw images -> shards, with --part, --repair and
--dry-run), verify, info, upgrade and update-mean. Each parses its options, builds its config
(config.py owns the defaults: image settings, shard size, seed, workers) and prints the job's
result; errors are mapped by the group (cli/__init__.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from alexnet_pipe.cli.options import DIR, EXISTING_DIR, EXISTING_FILE, dataset, json_flag, no_progress, verbose, workers
from alexnet_pipe.cli.signals import stopped_by_signal
from alexnet_pipe.config import (
    RESIZE_FILTERS,
    RESIZE_MODES,
    ConvertConfig,
    ImageSettings,
    UpdateMeanConfig,
    VerifyConfig,
)
from alexnet_pipe.errors import ConfigError


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


@click.command()
@click.argument("raw", type=EXISTING_DIR)
@click.argument("out", type=DIR)
@click.option("--format", "fmt", type=click.Choice(["lmdb", "recordio", "both"]), default="lmdb", show_default=True,
              help="Shard format: Caffe Datum LMDB, MXNet RecordIO, or both.")
@click.option("--short-side", type=click.IntRange(min=0), default=ImageSettings.short_side, show_default=True,
              help="Scale every image, up or down, so its shorter side is exactly this (as im2rec --resize); "
                   "0 keeps the size.")
@click.option("--no-upscale", is_flag=True, help="Never scale up: images with a shorter short side keep their size.")
@click.option("--resize", "resize_mode", type=click.Choice(RESIZE_MODES), default=None,
              help="short-side: scale so the short side is --short-side, aspect kept (im2rec --resize) [default]; "
                   "squash: every image to exactly --short-side x --short-side, or --resize-height x --resize-width, "
                   "aspect ignored (Caffe's convert_imageset, 256x256 in its ImageNet recipe).")
@click.option("--resize-height", type=click.IntRange(min=1), default=None,
              help="With --resize-width: squash every image to this height (convert_imageset --resize_height).")
@click.option("--resize-width", type=click.IntRange(min=1), default=None,
              help="With --resize-height: squash every image to this width (convert_imageset --resize_width).")
@click.option("--resize-filter", type=click.Choice(RESIZE_FILTERS), default=ImageSettings.resize_filter,
              show_default=True,
              help="How images are scaled: antialias (Gaussian pre-blur + bicubic, the closest to a Lanczos "
                   "resize), or OpenCV's plain cubic, linear (im2rec's and Caffe's default; the fastest) or area.")
@click.option("--quality", type=click.IntRange(1, 100), default=ImageSettings.quality, show_default=True,
              help="JPEG quality.")
@click.option("--shard-size", type=click.IntRange(min=1), default=ConvertConfig.shard_size, show_default=True,
              help="Records per shard.")
@workers
@click.option("--decode-memory-mb", type=click.IntRange(min=64), default=ConvertConfig.decode_memory_mb,
              show_default=True,
              help="Estimated peak memory (MiB) of the decodes running at once, all workers together; an image "
                   "estimated above it (a huge PNG or WebP) decodes alone. Ordinary photographs need a few MiB each.")
@click.option("--seed", type=int, default=ConvertConfig.seed, show_default=True,
              help="Seed of the stored shuffle order.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=ImageSettings.max_pixels, show_default=True,
              help="Larger images are skipped as decompression bombs.")
@click.option("--max-file-mb", type=click.IntRange(min=1), default=ImageSettings.max_file_mb, show_default=True,
              help="Larger input files (MiB) are skipped, with a reason, before they are read.")
@click.option("--min-short-side", type=click.IntRange(min=0), default=ImageSettings.min_short_side,
              show_default=True, help="Inputs whose original short side (pixels) is below this are skipped, with "
                                      "a reason (as im2rec users filter thumbnails); 0 keeps every size.")
@click.option("--no-passthrough", is_flag=True, help="Re-encode every image, even clean small JPEGs.")
@click.option("--val-labels", type=EXISTING_FILE, default=None,
              help="Labels of a flat val/: LOC_val_solution.csv, Caffe val.txt, the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt, or the devkit ILSVRC2012_devkit_t12.tar.gz.")
@click.option("--synsets", type=EXISTING_FILE, default=None,
              help="The devkit's id order for its ground truth: ILSVRC2012_devkit_t12.tar.gz, its data/meta.mat "
                   "or map_clsloc.txt [default: found in RAW]; a plain wnid list only if in devkit (unsorted) order. "
                   "With --list: the class names, line k naming label k (e.g. Caffe's synset_words.txt).")
@click.option("--list", "train_list", type=EXISTING_FILE, default=None, metavar="FILE",
              help="Take the training images from a list file instead of class folders: Caffe's "
                   "'<path> <label>' lines, or an im2rec .lst (tab-separated index, label, path); paths are relative "
                   "to RAW, labels are taken as given.")
@click.option("--list-val", "val_list", type=EXISTING_FILE, default=None, metavar="FILE",
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
@no_progress()
def convert(raw, out, fmt, short_side, no_upscale, resize_mode, resize_height, resize_width, resize_filter, quality,
            shard_size, workers, decode_memory_mb, seed, max_pixels,
            max_file_mb, min_short_side, no_passthrough, val_labels, synsets, train_list, val_list, val_ratio, dry_run,
            force, part, repair, no_progress):
    """Convert RAW (ImageNet layout, or the images that list files name) into validated, shuffled shards in OUT.

    Rerunning the same command after an interruption finishes the job.

    \b
    Examples:
      alexnet-pipe convert raw/ batches/ --format both
      alexnet-pipe convert images/ batches/ --list train.txt --list-val val.txt --synsets synset_words.txt
      alexnet-pipe convert flowers/ batches/ --val-ratio 0.05 --dry-run
    """
    sized = resize_height is not None or resize_width is not None
    if sized and click.get_current_context().get_parameter_source("short_side") == ParameterSource.COMMANDLINE:
        raise ConfigError("--short-side sizes the squash only without --resize-height/--resize-width: use one of them")
    cfg = ConvertConfig(
        src=raw, dst=out,
        formats=("lmdb", "recordio") if fmt == "both" else (fmt,),
        image=ImageSettings(short_side=short_side, quality=quality, max_pixels=max_pixels,
                            passthrough=not no_passthrough, upscale=not no_upscale, max_file_mb=max_file_mb,
                            resize_filter=resize_filter, min_short_side=min_short_side,
                            resize=resize_mode or ("squash" if sized else ImageSettings.resize),
                            resize_height=resize_height or 0, resize_width=resize_width or 0),
        shard_size=shard_size, workers=workers, decode_memory_mb=decode_memory_mb, seed=seed, force=force,
        progress=not no_progress, progress_bar=sys.stderr.isatty(), val_labels=val_labels, synsets=synsets, part=part,
        train_list=train_list, val_list=val_list, val_ratio=val_ratio, repair=repair,
    )
    if dry_run:
        from alexnet_pipe.convert.dryrun import format_plan, plan_convert

        plan = plan_convert(cfg)
        click.echo(format_plan(plan))
        if plan.stops:  # the run would stop: so does its dry run, for scripts that check first
            raise click.exceptions.Exit(1)
        return
    # numpy's OpenBLAS starts a thread per core at import, which spins ~0.1 s of CPU in every
    # process (this one, the forkserver): taken from the workers on a small machine. The
    # converter does no linear algebra. Set before numpy is imported here and in the forkserver.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if cfg.workers > 1:
        from alexnet_pipe.convert.supervisor import start_early

        start_early("alexnet_pipe.imaging.process")  # its imports overlap this process's
    from alexnet_pipe.convert.job import run_convert
    from alexnet_pipe.text import plural

    with stopped_by_signal("the finished shards are kept; rerun the same command to resume"):
        result = run_convert(cfg)
    if repair:
        _echo_repaired(result)
    if result.remaining_shards:
        click.echo(f"part {part[0]}/{part[1]} done "
                   f"({plural(result.converted_now, 'image')} in {result.seconds:.1f} s); "
                   f"{plural(result.remaining_shards, 'shard')} of other parts "
                   f"{'is' if result.remaining_shards == 1 else 'are'} not in {out} yet. "
                   "The run that completes the last part writes the manifest; or gather all "
                   "shards and .parts/ into one directory and rerun the command without --part.")
        return
    counts = ", ".join(f"{split} {n}" for split, n in result.records.items())
    click.echo(f"wrote {out}: {counts} records, {result.skipped} skipped "
               f"({plural(result.converted_now, 'image')} in {result.seconds:.1f} s, "
               f"{result.images_per_second:.0f} img/s)")
    for where, why in result.skipped_shown:
        click.echo(f"skipped   {where}: {why}")
    if result.skipped:
        more = result.skipped - len(result.skipped_shown)
        click.echo(f"skipped   {f'... {more} more; ' if more else ''}`alexnet-pipe info {out}` lists every skipped "
                   "input with its reason")


def _echo_repaired(result) -> None:
    """One line per shard that --repair rewrote."""
    from alexnet_pipe.text import plural

    for name, why in result.repaired:
        click.echo(f"REPAIRED {name}: {why}")
    if result.sums_added:
        click.echo(f"wrote per-record checksums for {plural(result.sums_added, 'intact shard')}")
    if not result.repaired:
        click.echo("nothing to repair: every shard matches its recorded checksum")


@click.command()
@dataset
@workers
@click.option("--quick", is_flag=True, help="Check structure, labels and checksums without decoding images.")
@click.option("--repair", is_flag=True,
              help="First re-check every shard against its recorded checksum and rewrite the damaged ones from "
                   "the raw inputs ROOT was converted from (byte-identical to a clean run).")
@no_progress()
@verbose
def verify(root, workers, quick, repair, no_progress):
    """Read every record of ROOT back and check it against the manifest.

    \b
    Examples:
      alexnet-pipe verify batches/
      alexnet-pipe verify batches/ --quick --workers 8     # no decoding: structure and checksums
      alexnet-pipe verify batches/ --repair                # rewrite damaged shards from the raw images
    """
    from alexnet_pipe.convert.verify import run_verify
    from alexnet_pipe.dataset.manifest import load_dataset
    from alexnet_pipe.text import plural

    cfg = VerifyConfig(root, workers, not quick, not no_progress, progress_bar=sys.stderr.isatty(), repair=repair)
    if cfg.repair:
        from alexnet_pipe.convert.repair import run_repair

        with stopped_by_signal("the shards repaired so far are kept (the damaged ones not yet rewritten are "
                               "untouched); rerun the same command to continue"):
            _echo_repaired(run_repair(cfg))
    with stopped_by_signal("nothing was changed" + (" by the check; the repairs above are kept" if repair else "")
                           + "; rerun to verify again"):
        result = run_verify(cfg)
    for note in result.notes:
        click.echo(f"NOTE {note}", err=True)
    for problem in result.problems:
        click.echo(f"PROBLEM {problem}", err=True)
    if not result.ok:
        raise click.ClickException(f"{plural(len(result.problems), 'problem')} in {root}")
    ds = load_dataset(root)
    images = sum(ds.split_entry(name).records for name in ds.splits())
    click.echo(f"ok: {plural(images, 'image')} in {plural(len(ds.formats), 'format')} "
               f"({plural(result.records, 'record')} in {plural(result.shards, 'shard')}) match the manifest")


@click.command()
@dataset
@json_flag("Machine-readable output.")
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


@click.command()
@dataset
def upgrade(root):
    """Bring a dataset converted by an older alexnet-pipe to the current format (no image is rewritten).

    \b
    Example:
      alexnet-pipe upgrade batches/ && alexnet-pipe verify batches/
    """
    from alexnet_pipe.convert.upgrade import run_upgrade

    click.echo(run_upgrade(root).summary())


@click.command("update-mean")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--into", type=DIR, default=None,
              help="Write mean.json into this dataset directory (one alexnet-pipe convert wrote; nothing is created). "
                   "A mean.json there with a std is never replaced.")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default=None,
              help="Channel order of an .npy mean (default rgb).")
def update_mean(path, into, channel_order):
    """Upgrade an old full-image mean (neon cache, mean.binaryproto, .npy) to per-channel mean.json.

    A current mean.json with a std (convert's) is kept when the values agree, else the run is refused.

    \b
    Examples:
      alexnet-pipe update-mean batches/                         # dataset dir: in place
      alexnet-pipe update-mean mean.binaryproto --into batches/  # Caffe's mean
      alexnet-pipe update-mean mean.npy --channel-order bgr
    """
    from alexnet_pipe.dataset.update_mean import run_update_mean

    result = run_update_mean(UpdateMeanConfig(path, into, channel_order))
    click.echo(result.summary())

