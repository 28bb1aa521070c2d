"""Storage formats: the registry of shard formats, and the byte-level codecs they use.

Each shard format implements ``Format`` (formats/base.py) in a module of its own: LMDB of Caffe
Datum records (formats/lmdb.py) and MXNet RecordIO (formats/recordio_shard.py). Everything else
reaches them through ``FORMATS`` (in the order a shard's formats are written and listed) and
``get_format(name)``, by the name the manifest and ``--format`` use. The codecs are pure:
protobuf.py, datum.py (Caffe Datum), recordio.py (framing, IRHeader, .idx), blobproto.py.
formats/writer.py writes one shard in every requested format.
"""

from __future__ import annotations

from alexnet_pipe.errors import FormatError
from alexnet_pipe.formats.base import Format
from alexnet_pipe.formats.lmdb import LmdbFormat
from alexnet_pipe.formats.recordio_shard import RecordIOFormat

FORMATS: tuple[Format, ...] = (LmdbFormat(), RecordIOFormat())
_BY_NAME = {f.name: f for f in FORMATS}

__all__ = ["FORMATS", "Format", "get_format", "preferred_format"]


def get_format(name: str) -> Format:
    """The registered format called ``name``.

    Raises:
        FormatError: no format has that name.
    """
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(f.name) for f in FORMATS)
        raise FormatError(f"unknown shard format {name!r}; the formats are {known}") from None


def preferred_format(formats) -> str:
    """The format a reader uses when not told: the first registered one in ``formats`` (a
    dataset's formats), so LMDB when the dataset has it."""
    for f in FORMATS:
        if f.name in formats:
            return f.name
    raise FormatError(f"none of the formats {list(formats)} is known; the formats are "
                      + ", ".join(repr(f.name) for f in FORMATS))
