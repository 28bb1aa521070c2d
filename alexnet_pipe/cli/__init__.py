"""Command line: parse -> build a config -> call the job -> map errors to exit codes.

This module owns the click group ``main`` (the console script ``alexnet_pipe.cli:main``), -v,
and the error mapping: an AlexnetPipeError becomes one line and exit code 1, Ctrl-C one line and
130 (cli/signals.py), standard output that cannot be written (``> file`` on a full disk) one line
and 1, anything else is a bug that keeps its traceback with -v. The commands live
by what they work on: dataset.py (convert, verify, info, upgrade, update-mean), training.py (train,
test), tools.py (benchmark, inspect, plot, predict, import-weights); options.py declares the
options they share. No command decides a default: config.py does, for the CLI and the library
alike.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path

import click

from alexnet_pipe import __version__
from alexnet_pipe.cli.dataset import convert, info, update_mean, upgrade, verify
from alexnet_pipe.cli.options import VERBOSE
from alexnet_pipe.cli.signals import stopped_by_signal
from alexnet_pipe.cli.tools import benchmark, import_weights_cmd, inspect, plot, predict
from alexnet_pipe.cli.training import test_cmd, train, train_config
from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.fsutil import output_error

__all__ = ["main", "train_config", "convert", "verify", "info", "upgrade", "update_mean", "train", "test_cmd",
           "benchmark", "inspect", "plot", "predict", "import_weights_cmd"]


class _Group(click.Group):
    """Turns our typed errors (AlexnetPipeError: bad input, bad settings as ConfigError, a damaged
    file) into one clean line, exit code 1; click's own errors pass through as click prints them.

    Anything else is a bug, not the user's input (a ValueError inside numpy, a KeyError): with -v it
    propagates with its traceback; without -v it is one line, exit code 1, that names the exception
    and says to rerun with -v for the traceback (a user is not handed a wall of text by default, and
    nothing is passed off as their mistake)."""

    def main(self, *args, **kwargs):
        _buffer_stdout()
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:  # click itself ends quietly on a closed pipe (EPIPE: `| head`), not on these
            error = _stdout_error(exc)
            if error is None:
                raise
            error.show()
            try:  # what stdout could not take would fail again (a traceback) as Python flushes it at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            sys.exit(1)

    def invoke(self, ctx):
        try:
            with stopped_by_signal(lambda: f"`{ctx.invoked_subcommand}` did not finish; rerun it", sigterm=False):
                return super().invoke(ctx)
        except AlexnetPipeError as exc:
            raise click.ClickException(str(exc)) from exc
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and _writing_stdout(exc):  # for main: not a bug
                raise
            if ctx.params.get("verbose") or ctx.meta.get(VERBOSE):  # -v, before or after the command
                raise
            raise click.ClickException(f"internal error, not a problem with the input: {type(exc).__name__}: {exc} "
                                       "(rerun with -v for the traceback, and please report it)") from exc


def _buffer_stdout() -> None:
    """Put a buffer under an unbuffered standard output (PYTHONUNBUFFERED, python -u). Its text layer
    then hands each write to the file itself, and CPython drops, with no error, what a short write
    did not take: on a disk that fills midway the output ended cut short, with exit 0. A buffer
    writes the rest or raises; line buffering (and click.echo's flush) keeps the output as prompt."""
    out = sys.stdout
    if isinstance(getattr(out, "buffer", None), io.FileIO):
        raw = io.FileIO(out.fileno(), "w", closefd=False)
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=out.encoding, errors=out.errors,
                                      line_buffering=True)


def _writing_stdout(exc: OSError) -> bool:
    """Whether ``exc`` was raised writing standard output: by ``click.echo`` without ``err`` (all our
    output to stdout goes through it, help and --version included, and none names another file)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is click.utils.echo.__code__:
            return not tb.tb_frame.f_locals.get("err")
        tb = tb.tb_next
    return False


def _stdout_error(exc: OSError) -> click.ClickException | None:
    """One line for standard output that could not be written (a full disk, a file size limit under
    ``> file``), naming the file it goes to; None for any other error."""
    if not _writing_stdout(exc):
        return None
    try:
        target = Path(os.readlink(f"/proc/self/fd/{sys.stdout.fileno()}"))
    except (OSError, ValueError, AttributeError):  # no /proc, or stdout without a descriptor
        target = Path("standard output")
    error = output_error(exc, target, "it is where standard output goes: free some space (or send the output "
                                      "elsewhere), then rerun the same command")
    return None if error is None else click.ClickException(str(error))


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
