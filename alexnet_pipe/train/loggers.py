"""Where a run's per-epoch rows go. Only the main rank writes; the others hold a silent logger.

``MetricsLog`` keeps the ``-o`` JSON-lines file: one row per epoch (and per ``test``). A fresh
run starts the file anew and keeps an existing one aside (``m.jsonl.1``, ``.2``, ...); a resumed
run first drops the rows after its checkpoint, so the file never holds an epoch twice (a file
holding lines that are no rows of ours is kept aside whole first: -o named another file), then marks
the resume for ``plot``: ``{"event": "resumed", "after_epoch": N, "after_step": S}``.
``TensorBoardLog`` writes the same figures as TensorBoard scalars. Both answer
``start``/``write``/``write_step``/``close``; ``Loggers`` fans out to several.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.fsutil import fsync_dir

log = logging.getLogger(__name__)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class MetricsLog:
    """JSON lines at ``path`` (None: keep nothing)."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = path if enabled else None

    def start(self, resumed_epoch: int | None, resumed_step: int = 0, changes: dict | None = None) -> None:
        """Fresh run (None): begin an empty file. Resume after epoch N (and ``resumed_step`` steps
        of epoch N+1): keep the rows up to there, then a "resumed" row with the settings changed."""
        if self.path is None:
            return
        if self.path.exists() and not self.path.is_file():  # /dev/null as -o must never be renamed aside
            raise AlexnetPipeError(f"-o {self.path} is not a regular file (a device, FIFO or socket); give a file name")
        if resumed_epoch is None:
            if self.path.exists():
                self._keep_aside()
            return
        if not self.path.exists():
            return
        kept, foreign = [], 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                foreign += n < len(lines) and bool(line.strip())  # the last line may be one cut short by a crash
                continue
            epoch, step = (row.get("epoch", 0), row.get("step", 0)) if isinstance(row, dict) else (None, None)
            if not (_count(epoch) and _count(step)):
                foreign += 1  # not a row this project writes
                continue
            if row.get("event") == "resumed" and isinstance(row.get("after_epoch"), int) \
                    and row["after_epoch"] >= resumed_epoch:
                continue  # a resume from a later (or the same) checkpoint: this one replaces it
            if epoch <= resumed_epoch or (epoch == resumed_epoch + 1 and "step" in row and step <= resumed_step):
                kept.append(line)
        if foreign:  # -o names a file that is not this run's metrics: keep it whole, as a fresh run does
            self._keep_aside()
        if resumed_epoch or resumed_step:  # `plot` marks where the run went on
            marker = {"event": "resumed", "after_epoch": resumed_epoch, "after_step": resumed_step}
            kept.append(json.dumps({**marker, "changed": changes} if changes else marker))
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def _keep_aside(self) -> None:
        n = 1
        while self.path.with_name(f"{self.path.name}.{n}").exists():
            n += 1
        aside = self.path.with_name(f"{self.path.name}.{n}")
        os.replace(self.path, aside)
        log.info("kept the previous metrics file as %s", aside)

    def write_step(self, epoch: int, lr: float, progress) -> None:
        """A row every ``--log-every`` steps: the epoch's mean loss so far, lr, img/s."""
        self.write({"epoch": epoch, "step": progress.step, "train_loss": progress.loss_sum / max(progress.samples, 1),
                    "lr": lr, "samples": progress.samples,
                    "img_per_s": progress.samples / progress.seconds if progress.seconds else 0.0,
                    "data_wait_s": progress.data_wait_s}, durable=False)

    def write(self, record: dict, durable: bool = True) -> None:
        """Append one row; an epoch's row reaches the disk before the next epoch starts (step rows
        are not fsynced: one per --log-every steps would cost the training thread)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            end = f.tell()
            try:
                f.write(json.dumps(record) + "\n")
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            except OSError:  # a full disk: no half row left for the next one to be glued to
                with contextlib.suppress(OSError):
                    f.truncate(end)
                raise

    def close(self) -> None:
        pass


class TensorBoardLog:
    """Scalars for TensorBoard under ``log_dir`` (``--tensorboard``), on the global step axis."""

    def __init__(self, log_dir: Path, steps_per_epoch: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            from alexnet_pipe.errors import AlexnetPipeError

            raise AlexnetPipeError("--tensorboard needs the tensorboard package: "
                                   "pip install 'alexnet-pipe[tensorboard]' (or pip install tensorboard)") from exc
        self._writer_class, self.log_dir, self.steps_per_epoch = SummaryWriter, log_dir, steps_per_epoch
        self._writer = None

    def start(self, resumed_epoch: int | None, resumed_step: int = 0, changes: dict | None = None) -> None:
        # A resumed run drops the events written after its checkpoint (TensorBoard's purge_step).
        purge = None if resumed_epoch is None else resumed_epoch * self.steps_per_epoch + resumed_step + 1
        self._writer = self._writer_class(str(self.log_dir), purge_step=purge)

    def write(self, record: dict, durable: bool = True) -> None:
        if "epoch" not in record or "step" in record:
            return
        step = record["epoch"] * self.steps_per_epoch
        for key, tag in (("train_loss", "train/loss_epoch"), ("val_loss", "val/loss"), ("val_top1", "val/top1"),
                         ("val_top5", "val/top5"), ("img_per_s", "speed/img_per_s_epoch"), ("lr", "lr")):
            if record.get(key) is not None:
                self._writer.add_scalar(tag, record[key], step)
        self._writer.flush()

    def write_step(self, epoch: int, lr: float, progress) -> None:
        step = (epoch - 1) * self.steps_per_epoch + progress.step
        self._writer.add_scalar("train/loss", progress.loss_sum / max(progress.samples, 1), step)
        self._writer.add_scalar("lr", lr, step)
        if progress.seconds:
            self._writer.add_scalar("speed/img_per_s", progress.samples / progress.seconds, step)
            self._writer.add_scalar("speed/data_wait_pct", 100 * progress.data_wait_s / progress.seconds, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Loggers:
    """Several loggers behind one set of calls. A row that cannot be written (a full disk, a file
    size limit) is a warning, once until a write succeeds again: the run goes on, and its
    checkpoints, written first, keep every epoch's figures (``history``)."""

    def __init__(self, *loggers):
        self.loggers = [x for x in loggers if x is not None]
        self._failing: set[int] = set()

    def _guarded(self, x, call, *args) -> None:
        try:
            call(*args)
        except OSError as exc:
            if id(x) not in self._failing:
                self._failing.add(id(x))
                where = getattr(x, "path", None) or getattr(x, "log_dir", None)
                log.warning("could not write the metrics to %s (%s); training goes on, and the checkpoints keep "
                            "every epoch's figures", where, exc.strerror or type(exc).__name__)
        else:
            self._failing.discard(id(x))

    def start(self, resumed_epoch: int | None, resumed_step: int = 0, changes: dict | None = None) -> None:
        for x in self.loggers:
            x.start(resumed_epoch, resumed_step, changes)

    def write(self, record: dict) -> None:
        for x in self.loggers:
            self._guarded(x, x.write, record)

    def write_step(self, epoch: int, lr: float, progress) -> None:
        for x in self.loggers:
            self._guarded(x, x.write_step, epoch, lr, progress)

    def close(self) -> None:
        for x in self.loggers:
            x.close()
