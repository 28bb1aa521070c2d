"""Progress of a long job, one behaviour for every command (convert, verify, train, test).

On a terminal (stderr is a tty) a tqdm bar; otherwise (batch jobs, CI, ``| tee``) plain log lines:
at most one every ``PROGRESS_EVERY_S`` and one at the end, never a bar's carriage-return frames.
``enabled`` False (--no-progress) shows nothing. A job with its own line (training: loss, lr,
img/s) passes ``lines=False``, asks ``due()`` when it has figures and logs that line itself.
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

from alexnet_pipe.config import PROGRESS_EVERY_S

log = logging.getLogger("alexnet_pipe.progress")


class Progress:
    """A tqdm bar (``bar`` True: stderr is a terminal) or plain log lines over ``total`` units."""

    def __init__(self, total: int, desc: str, unit: str, *, enabled: bool = True, bar: bool = True,
                 initial: int = 0, lines: bool = True, leave: bool = True, smoothing: float = 0.3):
        self.desc, self.unit, self.total, self.done = desc, unit, total, initial
        self._bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                         smoothing=smoothing, leave=leave) if enabled and bar else None
        self._lines = enabled and not bar and lines
        self._plain = enabled and not bar
        self._postfix: dict[str, object] = {}
        self._started = self._last = time.monotonic()
        self._initial = initial

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and self.due():
            log.info("%s", self._line(final=False))

    def set_postfix(self, **figures: object) -> None:
        self._postfix = figures
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **figures)

    def due(self) -> bool:
        """Plain mode only: True at most once every PROGRESS_EVERY_S (and the clock restarts)."""
        if not self._plain or time.monotonic() - self._last < PROGRESS_EVERY_S:
            return False
        self._last = time.monotonic()
        return True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            log.info("%s", self._line(final=True))

    def _line(self, final: bool) -> str:
        seconds = time.monotonic() - self._started
        rate = (self.done - self._initial) / seconds if seconds else 0.0
        extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
        if final:
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} in {seconds:.1f} s "
                    f"({rate:.0f} {self.unit}/s{extra})")
        eta = (self.total - self.done) / rate if rate else 0.0
        share = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({share:.0f}%), {rate:.0f} {self.unit}/s{extra}, "
                f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
