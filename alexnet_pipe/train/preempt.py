"""When training stops or checkpoints between steps: SIGTERM/SIGINT and the periodic timer.

A preemptible machine gets SIGTERM and a short grace period. ``Preemption`` turns the first
SIGTERM or SIGINT into a request; the trainer finishes the step it is in, writes a mid-epoch
checkpoint and exits with 143 or 130. A second signal acts as usual (the handlers are restored).
``--checkpoint-minutes`` asks for a checkpoint every N minutes in the same way.

Ranks must agree on the step at which they stop or checkpoint (each writes nothing, but all take
part in the collectives around it). Alone, the decision is taken every step; under torchrun the
ranks sum their requests every ``sync_every`` steps, a point where they synchronise anyway.
"""

from __future__ import annotations

import enum
import signal
import time

import torch

from alexnet_pipe.train.distributed import Dist

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Action(enum.Enum):
    GO_ON = "go on"
    CHECKPOINT = "checkpoint"  # a periodic checkpoint, then go on
    STOP = "stop"  # a checkpoint, then stop


class Preemption:
    """Signal handlers and the checkpoint timer for one training run (a context manager)."""

    def __init__(self, dist: Dist, minutes: float | None, sync_every: int):
        self.dist, self.sync_every = dist, sync_every
        self.period_s = minutes * 60 if minutes else None
        self.signal: int | None = None  # the first signal received, kept for the exit code
        self._last = time.monotonic()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
        self._restore()  # a second signal stops the process the usual way

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1)

    def poll(self, steps_done: int) -> Action:
        """What to do after a step (``steps_done`` counts the epoch's steps so far)."""
        if self.dist.active and steps_done % self.sync_every:
            return Action.GO_ON
        stop, due = self._agree(self.period_s is not None and time.monotonic() - self._last >= self.period_s)
        if stop:
            return Action.STOP
        if due:
            return Action.CHECKPOINT
        return Action.GO_ON

    def stop_after_epoch(self) -> bool:
        """Whether the run stops after the epoch it just finished, agreed by every rank (a signal
        that reached one rank only stops them all; each rank must call it)."""
        return self._agree(False)[0]

    def _agree(self, due: bool) -> tuple[bool, bool]:
        """(stop, checkpoint due) over every rank: true where any rank says so."""
        stop = self.signal is not None
        if self.dist.active:
            votes = torch.tensor([int(stop), int(due)], device=self.dist.device)
            self.dist.sum_(votes)
            stop, due = (bool(v) for v in votes.tolist())
            if stop and self.signal is None:
                self.signal = signal.SIGTERM  # another rank was told to stop: stop with it
        return stop, due

    def checkpointed(self) -> None:
        self._last = time.monotonic()
