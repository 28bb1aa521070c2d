"""Command line: parse -> build a config -> call the job -> map errors to exit codes.

This module owns the click group ``main`` (the console script ``alexnet_pipe.cli:main``), -v,
and the error mapping: an AlexnetPipeError becomes one line and exit code 1, Ctrl-C one line and
130 (cli/signals.py), anything else is a bug that keeps its traceback with -v. The commands live
by what they work on: dataset.py (convert, verify, info, upgrade, update-mean), training.py (train,
test), tools.py (benchmark, inspect, plot, predict, import-weights); options.py declares the
options they share. No command decides a default: config.py does, for the CLI and the library
alike.
"""

from __future__ import annotations

import logging
import sys

import click

from alexnet_pipe import __version__
from alexnet_pipe.cli.dataset import convert, info, update_mean, upgrade, verify
from alexnet_pipe.cli.options import VERBOSE
from alexnet_pipe.cli.signals import stopped_by_signal
from alexnet_pipe.cli.tools import benchmark, import_weights_cmd, inspect, plot, predict
from alexnet_pipe.cli.training import test_cmd, train, train_config
from alexnet_pipe.errors import AlexnetPipeError

__all__ = ["main", "train_config", "convert", "verify", "info", "upgrade", "update_mean", "train", "test_cmd",
           "benchmark", "inspect", "plot", "predict", "import_weights_cmd"]


class _Group(click.Group):
    """Turns our typed errors (AlexnetPipeError: bad input, bad settings as ConfigError, a damaged
    file) into one clean line, exit code 1; click's own errors pass through as click prints them.

    Anything else is a bug, not the user's input (a ValueError inside numpy, a KeyError): with -v it
    propagates with its traceback; without -v it is one line, exit code 1, that names the exception
    and says to rerun with -v for the traceback (a user is not handed a wall of text by default, and
    nothing is passed off as their mistake)."""

    def invoke(self, ctx):
        try:
            with stopped_by_signal(lambda: f"`{ctx.invoked_subcommand}` did not finish; rerun it", sigterm=False):
                return super().invoke(ctx)
        except AlexnetPipeError as exc:
            raise click.ClickException(str(exc)) from exc
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("verbose") or ctx.meta.get(VERBOSE):  # -v, before or after the command
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


for _command in (convert, verify, info, upgrade, update_mean, train, test_cmd, plot, inspect, benchmark,
                 import_weights_cmd, predict):
    main.add_command(_command)
del _command
