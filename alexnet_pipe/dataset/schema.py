"""The typed manifest (``manifest.json``): one frozen dataclass per JSON object, with ``from_json``
(checked: manifest_checks.py, the same one-line errors ``open_dataset`` gives) and ``to_json`` (the
JSON as written, key for key and in the same order).

A record's attributes are its JSON keys. Beside them each record keeps ``extra`` (keys this
version never writes: ``verify`` reports them, see ``Manifest.unknown_fields``) and ``key_order``
(the keys as read, in order), so ``to_json(from_json(d))`` gives ``d`` back whatever produced it:
a current conversion, an older one lacking newer fields, or an edited file. Values the checks do
not cover (``created_by``, ``resize``, the ``skipped`` entries, a format's entry when that format
is not in ``settings.formats``, ...) are kept as read, whatever their JSON type. A record made in
code (``key_order`` empty) writes its fields in the writer's order, leaving out those that are
None except the few the writer always writes (``NULLABLE``: ``"min_short_side": null``).

The shard files' entries (``LmdbFiles``, ``RecordioFiles``) are shared with the completion
records (parts.py), which is where convert first writes them.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from alexnet_pipe.dataset.manifest_checks import ManifestChecker
from alexnet_pipe.errors import DatasetError

DATASET_FORMAT = "alexnet-pipe-dataset"
DATASET_VERSION = 2
# Version 1 (before LMDB shards stored the map size of their data) is still read; `upgrade` lifts it.
READABLE_VERSIONS = (1, 2)

_RECORD_ONLY = ("extra", "key_order")  # a record's fields that are not JSON keys
# What a list-file split's ``layout`` holds (inputs/listfile.py): its names, skipped ones included,
# are paths relative to RAW, not to a split folder.
PATHS_UNDER_RAW = "paths under RAW"


def skipped_path(entry: Any, layout: str | None) -> str:
    """Where a ``skipped`` entry's input is, as a user finds it: ``split/name`` (the name is relative to
    the split's folder or archive), or the name alone for a list-file split (already relative to RAW)."""
    if not isinstance(entry, dict):
        return repr(entry)
    name = str(entry.get("name"))
    return name if PATHS_UNDER_RAW in (layout or "") else f"{entry.get('split')}/{name}"


def skipped_count(entry: Any) -> int:
    """How many inputs a ``skipped`` entry stands for: 1, or its ``count`` (one entry for the many
    skipped inputs of a list file past the first thousand, inputs/listfile.py)."""
    count = entry.get("count", 1) if isinstance(entry, dict) else 1
    return count if type(count) is int and count >= 1 else 1


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value, records turned into their JSON: what a record hands out or keeps
    can be changed by its holder without changing the other. Iterative: an edited manifest may nest
    as deep as ``json.loads`` allows, which a recursive copy, called from deeper, would not reach."""
    if isinstance(value, (JsonRecord, Settings)):
        return value.to_json()
    if not isinstance(value, (dict, list, tuple)):
        return value
    top: dict | list = {} if isinstance(value, dict) else []
    stack = [(value, top)]
    while stack:
        src, dst = stack.pop()
        for key, item in src.items() if isinstance(src, dict) else enumerate(src):
            if isinstance(item, (JsonRecord, Settings)):
                item = item.to_json()  # a record's own nesting is shallow; its raw values are copied by this loop
            elif isinstance(item, (dict, list, tuple)):
                new: dict | list = {} if isinstance(item, dict) else []
                stack.append((item, new))
                item = new
            if isinstance(dst, dict):
                dst[key] = item
            else:
                dst.append(item)
    return top


@functools.cache
def _json_keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _RECORD_ONLY)


class JsonRecord:
    """What every record of the manifest and of a completion record shares: JSON keys as attributes,
    ``extra`` and ``key_order`` (see the module docstring), and ``to_json``."""

    NULLABLE: ClassVar[frozenset[str]] = frozenset()  # written as null when None (the writer always writes them)
    extra: dict
    key_order: tuple[str, ...]

    @classmethod
    def json_keys(cls) -> tuple[str, ...]:
        """The keys this version writes, in the writer's order."""
        return _json_keys(cls)

    @classmethod
    def from_json(cls, data: dict):
        """The record of the JSON object ``data``, every key kept as read (records with typed parts
        override this)."""
        return cls._read(data)

    @classmethod
    def _read(cls, data: dict, **typed: Any):
        """The record of the JSON object ``data``: ``typed`` gives the fields already converted
        (present keys only); every other key is kept as read."""
        keys = cls.json_keys()
        values = {k: typed[k] if k in typed else copy_json(data.get(k)) for k in keys}
        extra = {k: copy_json(v) for k, v in data.items() if k not in keys}
        return cls(**values, extra=extra, key_order=tuple(data))

    def to_json(self) -> dict:
        """The JSON object, as the writer writes it (or as it was read, for a record read from a file)."""
        values = {k: getattr(self, k) for k in self.json_keys()}
        out = {}
        for k in self.key_order:  # as read: present keys stay, null included, in their order
            if k in values:
                out[k] = copy_json(values[k])
            elif k in self.extra:
                out[k] = copy_json(self.extra[k])
        for k, v in values.items():  # set in code
            if k not in out and (v is not None or (not self.key_order and k in self.NULLABLE)):
                out[k] = copy_json(v)
        for k, v in self.extra.items():
            if k not in out:
                out[k] = copy_json(v)
        return out


def _record(cls: type[JsonRecord], value: Any) -> Any:
    """A nested object as its record; a value of another JSON type (only where the checks allow it,
    or in a completion record) is kept as read."""
    return cls.from_json(value) if isinstance(value, dict) else copy_json(value)


_RECORD = {"frozen": True, "kw_only": True}


@dataclass(**_RECORD)
class LmdbFiles(JsonRecord):
    """A shard's LMDB: ``lmdb/<shard>`` (a folder holding data.mdb), the sha256 of its records
    (checksum.py) and its size on disk (absent in datasets from before sizes were recorded)."""

    path: str
    checksum: str
    bytes: int | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)


@dataclass(**_RECORD)
class RecordioFiles(JsonRecord):
    """A shard's RecordIO: ``recordio/<shard>.rec`` and its ``.idx``, the sha256 of its records and
    the .rec's size."""

    rec: str
    idx: str
    checksum: str
    bytes: int | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)


@dataclass(**_RECORD)
class ShardEntry(JsonRecord):
    """One shard of a split: its records are ids ``first_id ..`` in stored order; one entry per
    format written (``lmdb``, ``recordio``)."""

    name: str
    records: int
    first_id: int
    lmdb: LmdbFiles | None = None
    recordio: RecordioFiles | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> ShardEntry:
        typed = {k: _record(c, data[k]) for k, c in (("lmdb", LmdbFiles), ("recordio", RecordioFiles)) if k in data}
        return cls._read(data, **typed)

    def files(self, fmt: str) -> LmdbFiles | RecordioFiles | None:
        """The entry of format ``fmt`` ('lmdb' or 'recordio')."""
        return {"lmdb": self.lmdb, "recordio": self.recordio}[fmt]


@dataclass(**_RECORD)
class SplitEntry(JsonRecord):
    """One split (``train``, ``val``): its counts, how its inputs were laid out, its shards in order
    and (RecordIO) the one index over all of them.

    ``short_side_counts``: ``{"<side>": images}`` for every stored short side below 512 pixels;
    ``min_short_side``: the smallest (None when nothing was stored). Both are absent in
    conversions from before they were recorded, and so are ``inputs`` and ``passthrough``.
    ``records + skipped == inputs``; ``skipped`` counts the manifest's ``skipped`` entries of the
    split (older conversions left out what the scan skipped: ``Manifest.skipped_in`` counts those too).
    """

    NULLABLE = frozenset({"min_short_side"})

    records: int
    inputs: int | None = None
    skipped: int
    passthrough: int | None = None
    class_counts: tuple[int, ...]
    short_side_counts: dict[str, int] | None = None
    min_short_side: int | None = None
    source_short_side_counts: dict[str, int] | None = None  # the inputs' short sides before scaling, same rule
    upscaled_over_2x: int | None = None  # stored images scaled up more than 2x
    layout: str
    shards: tuple[ShardEntry, ...]
    recordio_index: str | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: dict) -> SplitEntry:
        typed = {}
        if isinstance(data.get("class_counts"), list):
            typed["class_counts"] = tuple(data["class_counts"])
        if isinstance(data.get("shards"), list):
            typed["shards"] = tuple(_record(ShardEntry, s) for s in data["shards"])
        return cls._read(data, **typed)


@dataclass(**_RECORD)
class ClassEntry(JsonRecord):
    """A class: its label (``index``), its id (the folder or synset name), a readable name
    (``""`` when none is known; absent in hand-made manifests) and, for a dataset converted with
    the ILSVRC devkit, its devkit id (``data/meta.mat``'s ILSVRC2012_ID: the row of neon's fc8)."""

    index: int
    id: str
    name: str | None = None
    devkit_id: int | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)


@dataclass(**_RECORD)
class MeanImage(JsonRecord):
    """The train split's mean image: ``mean_image.npy`` and ``mean.binaryproto`` (mean.py), its
    side and how many images it averages."""

    npy: str
    binaryproto: str
    size: int | None = None
    images: int | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Settings:
    """The conversion's settings (``ConvertConfig.settings``): free-form, kept key for key as
    recorded; the ones readers use are typed properties (checked ones: formats, short_side,
    shard_size)."""

    values: dict

    @classmethod
    def from_json(cls, data: dict) -> Settings:
        return cls(copy_json(data))

    def to_json(self) -> dict:
        return copy_json(self.values)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.values["formats"])

    @property
    def short_side(self) -> int:
        return self.values["short_side"]

    @property
    def shard_size(self) -> int | None:
        return self.values.get("shard_size")

    @property
    def squash(self) -> tuple[int, int] | None:
        """(height, width) every image was squashed to (``convert --resize squash``), or None: the short
        side rule (not recorded: conversions without the option)."""
        if self.values.get("resize", "short-side") != "squash":
            return None
        return int(self.values["resize_height"]), int(self.values["resize_width"])

    @property
    def upscale(self) -> Any:
        """Whether small images were scaled up, as recorded; True when not recorded (only a
        version 1 manifest that was not upgraded lacks it: ``upgrade`` records False)."""
        return self.values.get("upscale", True)


@dataclass(**_RECORD)
class Manifest(JsonRecord):
    """The whole ``manifest.json``: what a converted directory holds (see convert/finalize.py's ``finalize``
    for the fields about sizes). ``mean``: ``mean.json`` (None without training images)."""

    NULLABLE = frozenset({"mean", "mean_image"})

    format: str
    version: int
    created_by: str | None = None
    settings: Settings
    resize: dict | None = None
    # The libraries that wrote the bytes (imaging/codec_versions.py): {"opencv": ..., "simplejpeg": ...,
    # "pillow": ..., "numpy": ...}; absent in conversions from before they were recorded.
    codecs: dict | None = None
    classes: tuple[ClassEntry, ...]
    splits: dict[str, SplitEntry]
    mean: str | None = None
    mean_image: MeanImage | None = None
    record_id_width: int | None = None
    skipped: tuple[dict, ...]
    upgraded_from: int | None = None
    extra: dict = field(default_factory=dict)
    key_order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Any, root: Path | None = None) -> Manifest:
        """The manifest of the parsed JSON ``data``, checked field by field (manifest_checks.py).

        Args:
            data: ``json.loads`` of a manifest.json.
            root: the dataset directory: its paths must then also stay inside it on disk, and
                errors name ``root/manifest.json``; None checks the paths as text only.
        Raises:
            DatasetError: the first problem, in one line with what to run.
        """
        checker = ManifestChecker(root)
        if not isinstance(data, dict) or data.get("format") != DATASET_FORMAT:
            raise DatasetError(f"{checker.path} is not an alexnet-pipe manifest")
        if type(data.get("version")) is not int or data["version"] not in READABLE_VERSIONS:
            raise DatasetError(
                f"{checker.path} has format version {data.get('version')!r}; this alexnet-pipe reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: reconvert the dataset, or use a newer alexnet-pipe"
            )
        checker.check(data)
        return cls._read(
            data,
            settings=Settings.from_json(data["settings"]),
            classes=tuple(ClassEntry.from_json(c) for c in data["classes"]),
            splits={name: SplitEntry.from_json(split) for name, split in data["splits"].items()},
            skipped=tuple(copy_json(data["skipped"])),
            **({"mean_image": _record(MeanImage, data["mean_image"])} if "mean_image" in data else {}),
        )

    def skipped_in(self, split: str) -> int:
        """How many inputs of ``split`` the ``skipped`` list names: the one skip count (convert's summary,
        ``info``), also for conversions whose per-split count left out inputs the scan skipped."""
        return sum(skipped_count(s) for s in self.skipped if isinstance(s, dict) and s.get("split") == split)

    def skipped_total(self) -> int:
        """How many inputs the ``skipped`` list stands for, every split."""
        return sum(skipped_count(s) for s in self.skipped)

    def skipped_shown(self) -> list[tuple[str, str]]:
        """(where, reason) of every skipped input, in the list's order (see ``skipped_path``)."""
        def layout(entry: Any) -> str | None:
            split = self.splits.get(entry.get("split")) if isinstance(entry, dict) else None
            return split.layout if isinstance(split, SplitEntry) and isinstance(split.layout, str) else None

        return [(skipped_path(s, layout(s)), str(s.get("reason")) if isinstance(s, dict) else "")
                for s in self.skipped]

    def unknown_fields(self) -> list[str]:
        """Fields this version never writes, as dotted paths (``splits.train.shards[3].lmdb.x``)."""
        out = list(self.extra)
        out += [f"classes[{i}].{k}" for i, c in enumerate(self.classes) for k in c.extra]
        if isinstance(self.mean_image, MeanImage):
            out += [f"mean_image.{k}" for k in self.mean_image.extra]
        for name, split in self.splits.items():
            out += [f"splits.{name}.{k}" for k in split.extra]
            for n, shard in enumerate(split.shards):
                here = f"splits.{name}.shards[{n}]"
                out += [f"{here}.{k}" for k in shard.extra]
                for fmt in ("lmdb", "recordio"):
                    entry = shard.files(fmt)
                    if isinstance(entry, JsonRecord):
                        out += [f"{here}.{fmt}.{k}" for k in entry.extra]
        return out
