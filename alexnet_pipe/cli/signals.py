"""How a command ends on Ctrl-C (SIGINT) or SIGTERM: one line, "stopped by SIGINT (Ctrl-C): <what
now>", and exit code 130 or 143 (128 + the signal), as `train` does; never click's "Aborted!" and 1.

``stopped_by_signal`` wraps a job that says what a stop leaves (convert: finished shards kept, rerun
resumes; verify: nothing changed). The group wraps every command in it with a general line
(``sigterm=False``: SIGTERM keeps its default there; `train` handles both itself).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click


@contextmanager
def stopped_by_signal(after: str | Callable[[], str], sigterm: bool = True) -> Iterator[None]:
    """Ctrl-C (and SIGTERM, with ``sigterm``) inside the block: the job's own cleanup runs (its
    ``finally`` blocks), then one line "stopped by <signal>: <after>" (``after()`` if a callable)
    and exit 128 + the signal."""
    received = [signal.SIGINT]

    def on_sigterm(signum, frame):
        received[0] = signal.Signals(signum)
        raise KeyboardInterrupt  # the same path out as Ctrl-C

    previous = signal.signal(signal.SIGTERM, on_sigterm) if sigterm else None
    try:
        yield
    except KeyboardInterrupt:
        name = received[0].name
        sys.stdout.flush()
        click.echo(f"stopped by {name}{' (Ctrl-C)' if name == 'SIGINT' else ''}: "
                   f"{after() if callable(after) else after}", err=True)
        raise click.exceptions.Exit(128 + received[0]) from None
    finally:
        if sigterm:
            signal.signal(signal.SIGTERM, previous)
