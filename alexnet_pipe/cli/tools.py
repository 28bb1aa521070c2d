"""The commands around a model: benchmark, inspect (draw what training reads), plot (a metrics
file's curves), predict and import-weights. Each parses its options, resolves "GPU when present"
and the datatype through config.py's functions (as TrainConfig does), calls the job in
alexnet_pipe.apps or alexnet_pipe.model.weights, and prints its result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import alexnet_pipe.cli.options as options
from alexnet_pipe.cli.options import DIR, EXISTING_DIR, EXISTING_FILE, dataset
from alexnet_pipe.config import DEFAULT_CROP, TrainConfig, resolve_backend, resolve_datatype


@click.command()
@click.argument("metrics", type=EXISTING_FILE)
@options.drawing("curves.png")
def plot(metrics, output):
    """Draw loss, top-1/top-5, the learning rate and img/s against epoch from a -o metrics file,
    with the points where a run was resumed marked.

    \b
    Examples:
      alexnet-pipe plot metrics.jsonl -o curves.png
      alexnet-pipe plot metrics.jsonl -o curves.pdf      # or .svg
    """
    from alexnet_pipe.apps.figure_file import check_output
    from alexnet_pipe.apps.plot import plot_curves, read_metrics

    check_output(output, "curves.png")
    click.echo(f"wrote {plot_curves(read_metrics(metrics), output, title=str(metrics))}")


@click.command()
@dataset
@options.drawing("grid.png")
@click.option("--split", default="train", show_default=True)
@click.option("-n", "--count", type=click.IntRange(1, 256), default=16, show_default=True)
@options.crop(DEFAULT_CROP)
@options.rng_seed(TrainConfig.rng_seed)
@options.normalize_std(from_weights=False)
@options.backend()
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
    path = inspect_batch(root, output, split, count, crop, rng_seed, normalize_std, resolve_backend(backend),
                         epoch - 1)
    click.echo(f"wrote {path}")


# The defaults are BenchConfig's, written out: its module imports torch, which --help and the
# dataset commands must not wait for (tests/cli/test_config_defaults.py holds them equal).
@click.command()
@options.backend()
@options.device_id(0)
@options.batch_size(128)
@options.crop(DEFAULT_CROP)
@options.datatype()
@click.option("--iterations", type=click.IntRange(min=2), default=12, show_default=True)
@click.option("--throughput-steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option("--nchw", is_flag=True, help="Keep NCHW instead of channels_last.")
@options.data_dir(default=None, help="Also time the DALI train pipeline feeding the model on this dataset.")
@click.option("--loader", "loader_dir", type=EXISTING_DIR, default=None,
              help="Also time the train pipeline alone on this dataset against a PIL DataLoader.")
@click.option("-o", "--output", type=DIR, default=None, help="Append the rows as JSON lines here.")
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

    from alexnet_pipe.apps.benchmark import format_rows, run_benchmark
    from alexnet_pipe.apps.step_timing import BenchConfig, check_device

    if output is not None:
        from alexnet_pipe.fsutil import check_output_file

        check_output_file(output, "-o", "bench.jsonl")  # before the timing, not after it
    backend = resolve_backend(backend)
    cfg = BenchConfig(backend=backend, device_id=device_id, batch_size=batch_size, crop=crop,
                      datatype=resolve_datatype(datatype, backend), channels_last=not nchw,
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


@click.command("import-weights")
@click.argument("src", type=EXISTING_FILE)
@click.option("-o", "--output", type=DIR, required=True, help="The alexnet-pipe weights file to write (.pt).")
@click.option("--format", "fmt", type=click.Choice(["auto", "neon", "caffe", "torchvision"]), default="auto",
              show_default=True, help="The source's format; auto tells it by the file's content.")
@click.option("--synsets", "--classes", "synsets", type=EXISTING_FILE, default=None,
              help="The source's class list, one 'wnid [name]' a line in the order of its fc8 rows (Caffe's "
                   "synset_words.txt; for neon the devkit's meta.mat order). fc8 is permuted to sorted-wnid order.")
@click.option("--mean", callback=_three_floats, default=None, metavar="R,G,B",
              help="Override the recorded mean (in the weights' value range: 0..255, torchvision 0..1).")
@click.option("--std", callback=_three_floats, default=None, metavar="R,G,B", help="Override the recorded std.")
@click.option("--mean-file", type=EXISTING_FILE, default=None,
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


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@options.model_file("Weights or a checkpoint: from alexnet-pipe train or import-weights.", required=True)
@options.synsets()
@options.batch_size(64, help="Images per forward pass.")  # PredictConfig's, as benchmark's above
@options.backend()
@options.device_id(0)
@options.json_flag(
              help="One JSON list, an object per image in input order: path and top5 (index, id, name, prob), "
                   "or path and error.")
def predict(images, model_file, synsets, batch_size, backend, device_id, as_json):
    """Top-5 classes of IMAGES (files, or folders of them, searched recursively) with --model-file,
    through the validation preprocessing: the converter's resize of the short side, the centre
    crop, the weights' channel order, mean and std. Exit code 1 when any input could not be read
    (the others are still predicted).

    \b
    Examples:
      alexnet-pipe predict --model-file alexnet.pt cat.jpg dog.png
      alexnet-pipe predict --model-file caffenet.pt photos/ --json > predictions.json
      alexnet-pipe predict --model-file alexnet.ckpt -b cpu -z 16 photos/
      alexnet-pipe predict --model-file bvlc_reference_caffenet.caffemodel --synsets synset_words.txt cat.jpg
    """
    from alexnet_pipe.apps.predict import PredictConfig, format_table, run_predict

    result = run_predict(PredictConfig(model_file=model_file, inputs=tuple(images), batch_size=batch_size,
                                       backend=resolve_backend(backend), device_id=device_id, synsets=synsets))
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
