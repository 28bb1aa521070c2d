"""The command line's shared vocabulary: the path types, the hidden neon spellings of an option,
-v after a command, and every option that several commands take (the dataset as ROOT or -w,
--workers, --no-progress, -b, -i, -z, --crop, -d, -r, --model-file, --normalize-std, a drawing's
-o, --json), each declared once here. A command passes only what differs for it (its help text,
a default); the defaults that the configs own are read from them by the command modules.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from alexnet_pipe.config import DATATYPES, MIN_CROP
from alexnet_pipe.inputs.entries import refuse_special

DIR = click.Path(path_type=Path)
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


class _ExistingFile(click.Path):
    """An existing regular file, or a link to one. Anything else named where a file is read is refused
    before it is opened, in one line: a FIFO would block its reader forever, a device never end."""

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        refuse_special(path, "the file" if param is None else param.opts[0] if param.param_type_name == "option"
                       else param.human_readable_name)  # SRC, METRICS
        return path


EXISTING_FILE = _ExistingFile(exists=True, dir_okay=False, path_type=Path)

# ctx.meta key: -v was given after the command (the group's context shares meta with the command's).
VERBOSE = "alexnet_pipe.verbose"


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
        ctx.meta[VERBOSE] = True  # shared with the group's context: the group shows a bug's traceback
    return value


# `-v` after the subcommand too (`alexnet-pipe train -v ...`), as well as before it.
verbose = click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_verbose,
                       help="Debug log output.")


def data_dir(name: str = "data_dir", **kw):
    """-w/--data-dir (neon's --data_dir hidden): a converted dataset, a folder that exists."""
    return opt("-w", "--data-dir", "--data_dir", name, type=EXISTING_DIR, **kw)


def dataset(fn):
    """The converted dataset: a positional ROOT, or -w/--data-dir as in train, test and benchmark."""
    def resolve(ctx, param, value):
        root = ctx.params.pop("root_arg", None)
        if root is not None and value is not None and root != value:
            raise click.UsageError(f"two datasets given: {root} and -w {value}; pass one")
        if (root or value) is None:
            raise click.UsageError("pass the converted dataset: ROOT, or -w DIR")
        return root or value

    fn = data_dir("root", default=None, callback=resolve, help="The converted dataset (the same as ROOT).")(fn)
    return click.argument("root_arg", metavar="ROOT", type=EXISTING_DIR, required=False, is_eager=True)(fn)


# convert and verify: processes; None: all cores (config.resolve_workers).
workers = click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")


def no_progress(help: str = "No progress bar.", neon: bool = False):
    """--no-progress; ``neon``: also neon's --no_progress_bar (hidden)."""
    if neon:
        return opt("--no-progress", "--no_progress_bar", "no_progress", is_flag=True, help=help)
    return click.option("--no-progress", is_flag=True, help=help)


def backend(help: str = "Default: gpu when present."):
    """-b gpu/cpu; None when not given: config.resolve_backend decides (GPU when present)."""
    return click.option("-b", "--backend", type=click.Choice(["gpu", "cpu"]), default=None, help=help)


def datatype(help: str = "Default: bf16 on the GPU, f32 on the CPU."):
    """-d; None when not given: config.resolve_datatype decides by the backend."""
    return click.option("-d", "--datatype", type=click.Choice(DATATYPES), default=None, help=help)


def device_id(default: int):
    return opt("-i", "--device-id", "--device_id", "device_id", type=click.IntRange(min=0), default=default,
               show_default=True)


def batch_size(default: int, help: str | None = None):
    return opt("-z", "--batch-size", "--batch_size", "batch_size", type=click.IntRange(min=1), default=default,
               show_default=True, help=help)


def rng_seed(default: int, hidden: bool = False):
    """-r; ``hidden``: accepted (test takes it from the seed's command lines) but not in --help."""
    if hidden:
        return click.option("-r", "--rng-seed", "--rng_seed", "rng_seed", type=int, default=default, hidden=True)
    return opt("-r", "--rng-seed", "--rng_seed", "rng_seed", type=int, default=default, show_default=True)


def crop(default: int | None, help: str | None = None, hidden: bool = False):
    """--crop, refused below MIN_CROP at parse time; a default of None leaves it to the weights (train, test)."""
    shown = {"show_default": True} if default is not None else {}
    return click.option("--crop", type=click.IntRange(min=MIN_CROP), default=default, help=help, hidden=hidden,
                        **shown)


def normalize_std(help: str | None = None, hidden: bool = False, from_weights: bool = True):
    """--normalize-std; ``from_weights``: None when not given, so the weights decide (train, test)."""
    unset = {"default": None} if from_weights else {}
    return click.option("--normalize-std", is_flag=True, help=help, hidden=hidden, **unset)


def model_file(help: str, required: bool = False):
    return opt("--model-file", "--model_file", "model_file", type=EXISTING_FILE, required=required,
               **({} if required else {"default": None}),
               help=help + " neon (alexnet.p), Caffe (.caffemodel) and torchvision (.pth) weights are imported in "
                           "memory, told by content.")


def synsets():
    """--synsets of train, test and predict: a foreign --model-file's class order (model/model_file.py)."""
    return click.option("--synsets", type=EXISTING_FILE, default=None,
                        help="For neon, Caffe or torchvision --model-file weights: their class list, one 'wnid "
                             "[name]' a line in the order of fc8's rows (Caffe's synset_words.txt; neon: the devkit's "
                             "meta.mat order, known without this for a dataset converted with the devkit).")


def drawing(default: str):
    """-o of the commands that draw: the file's suffix chooses the format."""
    return click.option("-o", "--output", type=DIR, default=Path(default), show_default=True,
                        help="The drawing: .png, .svg or .pdf, chosen by the suffix.")


def json_flag(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)
