"""Command line: parse -> build a config -> call the job -> map errors to exit codes."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .config import ConvertConfig, ImageSettings, UpdateMeanConfig, VerifyConfig, default_workers
from .errors import AlexnetPipeError

_DIR = click.Path(path_type=Path)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


class _Group(click.Group):
    """Turns our typed errors (and bad config values) into one clean line, exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (AlexnetPipeError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alexnet-pipe")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """ImageNet-style images -> sharded LMDB/RecordIO -> DALI -> AlexNet."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO,
        format="%(levelname)s %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.argument("raw", type=_EXISTING_DIR)
@click.argument("out", type=_DIR)
@click.option("--format", "fmt", type=click.Choice(["lmdb", "recordio", "both"]), default="lmdb", show_default=True,
              help="Shard format: Caffe Datum LMDB, MXNet RecordIO, or both.")
@click.option("--short-side", type=click.IntRange(min=0), default=256, show_default=True,
              help="Scale the shorter side down to this (never up); 0 keeps the size.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--shard-size", type=click.IntRange(min=1), default=5000, show_default=True, help="Records per shard.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the stored shuffle order.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=ImageSettings.max_pixels, show_default=True,
              help="Larger images are skipped as decompression bombs.")
@click.option("--no-passthrough", is_flag=True, help="Re-encode every image, even clean small JPEGs.")
@click.option("--val-labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Labels of a flat val/ (LOC_val_solution.csv, the devkit ground truth, or Caffe val.txt).")
@click.option("--synsets", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Synset list giving the order of the ground truth's 1-based ids.")
@click.option("--force", is_flag=True, help="Discard an earlier conversion in OUT made with other settings.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert(raw, out, fmt, short_side, quality, shard_size, workers, seed, max_pixels, no_passthrough,
            val_labels, synsets, force, no_progress):
    """Convert RAW (ImageNet layout) into validated, shuffled shards in OUT.

    Rerunning the same command after an interruption finishes the job.
    """
    from .convert import run_convert

    cfg = ConvertConfig(
        src=raw, dst=out,
        formats=("lmdb", "recordio") if fmt == "both" else (fmt,),
        image=ImageSettings(short_side=short_side, quality=quality, max_pixels=max_pixels,
                            passthrough=not no_passthrough),
        shard_size=shard_size, workers=workers or default_workers(), seed=seed, force=force,
        progress=not no_progress, val_labels=val_labels, synsets=synsets,
    )
    result = run_convert(cfg)
    counts = ", ".join(f"{split} {n}" for split, n in result.records.items())
    click.echo(f"wrote {out}: {counts} records, {result.skipped} skipped "
               f"({result.converted_now} images in {result.seconds:.1f} s, {result.images_per_second:.0f} img/s)")


@main.command()
@click.argument("root", type=_EXISTING_DIR)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")
@click.option("--quick", is_flag=True, help="Check structure, labels and checksums without decoding images.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def verify(root, workers, quick, no_progress):
    """Read every record of ROOT back and check it against the manifest."""
    from .verify import run_verify

    result = run_verify(VerifyConfig(root, workers or default_workers(), not quick, not no_progress))
    for problem in result.problems:
        click.echo(f"PROBLEM {problem}", err=True)
    if not result.ok:
        raise click.ClickException(f"{len(result.problems)} problems in {root}")
    click.echo(f"ok: {result.records} records in {result.shards} shards match the manifest")


@main.command()
@click.argument("root", type=_EXISTING_DIR)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(root, as_json):
    """Classes, counts, shards, size, mean/std and settings of a converted dataset."""
    from .info import dataset_summary, format_summary
    from .manifest import load_dataset

    summary = dataset_summary(load_dataset(root))
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@main.command("update-mean")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--into", type=_DIR, default=None, help="Write mean.json into this dataset directory.")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default=None,
              help="Channel order of an .npy mean (default rgb).")
def update_mean(path, into, channel_order):
    """Upgrade an old full-image mean (neon cache, mean.binaryproto, .npy) to per-channel mean.json."""
    from .legacy_mean import run_update_mean

    result = run_update_mean(UpdateMeanConfig(path, into, channel_order))
    click.echo(result.summary())
