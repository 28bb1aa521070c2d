"""Where a run's per-epoch rows go. Only the main rank writes; the others hold a silent logger.

``MetricsLog`` keeps the ``-o`` JSON-lines file: one row per epoch (and per ``test``). A fresh
run starts the file anew; a resumed run first drops the rows after its checkpoint's epoch, so
the file never holds an epoch twice, then marks the resume: ``{"event": "resumed", "after_epoch": N}``.
More loggers (TensorBoard, ...) plug in with the same ``start``/``write``/``close`` calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .fsutil import fsync_dir


class MetricsLog:
    """JSON lines at ``path`` (None: keep nothing)."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = path if enabled else None

    def start(self, resumed_epoch: int | None) -> None:
        """Fresh run (None): begin an empty file. Resume after epoch N: keep rows up to epoch N."""
        if self.path is None:
            return
        if resumed_epoch is None:
            if self.path.exists():
                self.path.unlink()
            return
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and row.get("event") == "resumed" and \
                    isinstance(row.get("after_epoch"), int) and row["after_epoch"] >= resumed_epoch:
                continue  # a resume from a later (or the same) checkpoint: this one replaces it
            if not isinstance(row, dict) or int(row.get("epoch", 0) or 0) <= resumed_epoch:
                kept.append(line)
        if resumed_epoch:  # `plot` marks where the run went on
            kept.append(json.dumps({"event": "resumed", "after_epoch": resumed_epoch}))
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def write(self, record: dict) -> None:
        """Append one row; it reaches the disk before the next epoch starts."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        pass
