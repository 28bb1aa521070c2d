"""The shard writer convert drives: one shard in every requested format, in one pass.

Records may arrive in any order (the converter reads its inputs in file order, for sequential
I/O on folders and archives) and are stored in record-id order (the shuffled order, see
convert/plan.py). Each format's own writer (``Format.writer``) does the work; this one hands a
record to the format that sorts (LMDB, when requested), which passes every record on in
record-id order to the others when it closes; without one, each format orders records itself.
Nothing here is visible in the dataset: the converter renames the finished files out of the
staging directory only after ``close()``.
"""

from __future__ import annotations

from array import array
from pathlib import Path

from alexnet_pipe.formats import FORMATS
from alexnet_pipe.formats.base import Files


class ShardWriter:
    """Writes one shard (``plan``: a convert.plan.ShardPlan) in ``formats`` into ``staging``."""

    def __init__(self, staging: Path, plan, formats: tuple[str, ...], id_width: int):
        self.staging, self.plan, self.formats, self.id_width = staging, plan, formats, id_width
        self._writers = {f.name: f.writer(staging, plan.name, id_width) for f in FORMATS if f.name in formats}
        lead = [w for w in self._writers.values() if w.sorts][:1]
        self._lead = lead[0] if lead else None
        self._takers = lead or list(self._writers.values())  # who gets the records as they arrive
        self.count = 0
        self.record_sums: dict[str, array] = {}  # per format, after close(): each record's CRC-32 (checksum.py)

    def add(self, record_id: int, source, image) -> None:
        """One record: ``source`` (inputs.table.Source) gives its name and label, ``image``
        (imaging's Encoded) its JPEG bytes and size."""
        for writer in self._takers:
            writer.add(record_id, source.name, source.label, image.jpeg, image.height, image.width)
        self.count += 1

    def close(self) -> dict[str, Files]:
        """Finish every format; return the shard's entry per format (paths relative to root)."""
        done = {}
        if self._lead is not None:
            followers = [w for w in self._writers.values() if w is not self._lead]
            done[id(self._lead)] = self._lead.close(followers)
        out = {}
        for name, writer in self._writers.items():  # in the registry's order
            out[name], self.record_sums[name] = done.get(id(writer)) or writer.close([])
        return out
