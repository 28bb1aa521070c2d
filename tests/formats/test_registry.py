"""The shard formats behind one interface: every registered format writes, reads back and scans the
same records, through the registry alone (nothing here names a format's files or keys)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.job import run_convert
from alexnet_pipe.convert.plan import ShardPlan
from alexnet_pipe.dataset.checksum import record_crc
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.records import RecordReader, record_table
from alexnet_pipe.errors import FormatError
from alexnet_pipe.formats import FORMATS, get_format, preferred_format
from alexnet_pipe.formats.recordio import MAGIC_BYTES
from alexnet_pipe.formats.writer import ShardWriter

NAMES = [f.name for f in FORMATS]


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 10, 3), value, np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# (record id, input name, label, image bytes): arriving out of order, one holding RecordIO's magic
# at an aligned offset (framed in parts) and one with a name that needs escaping in a key.
RECORDS = [(12, "b.jpg", 1, _jpeg(40)), (10, "a.jpg", 0, _jpeg(90)), (13, "d\x01.jpg", 2, _jpeg(200)),
           (11, "c.jpg", 0, _jpeg(10)[:8] + MAGIC_BYTES + _jpeg(10)[8:])]
IN_ORDER = sorted(RECORDS)


class _Source:
    def __init__(self, name, label):
        self.name, self.label = name, label


class _Image:
    def __init__(self, jpeg):
        self.jpeg, self.height, self.width = jpeg, 6, 10


def _write(staging, formats):
    writer = ShardWriter(staging, ShardPlan("train", 0, 10, ()), formats, 8)
    for record_id, name, label, jpeg in RECORDS:
        writer.add(record_id, _Source(name, label), _Image(jpeg))
    return writer.close(), writer.record_sums


@pytest.mark.parametrize("name", NAMES)
def test_every_format_writes_and_scans_the_records_in_record_id_order(tmp_path, name):
    fmt = get_format(name)
    entries, sums = _write(tmp_path, (name,))
    entry = entries[name]
    assert all((tmp_path / rel).exists() for rel in fmt.files(entry)) and fmt.data_path(entry) == fmt.files(entry)[0]
    scanner = fmt.scanner(tmp_path, entry, 2, "to repair it, ...")
    found, readable = scanner.open()
    assert readable and found == []
    scanned = [scanner.parse(raw) for raw in scanner.records()]
    assert scanner.end(len(scanned)) == []
    assert [(r.label, r.jpeg) for r in scanned] == [(label, jpeg) for _, _, label, jpeg in IN_ORDER]
    assert all(r.problem is None and r.late_problem is None for r in scanned)
    assert list(sums[name]) == [record_crc(r.value) for r in scanned]  # the CRCs cover the stored bytes
    assert [fmt.image_and_label(r.value) for r in scanned] == [(jpeg, label) for _, _, label, jpeg in IN_ORDER]


def test_a_format_writes_the_same_files_alone_and_beside_the_others(tmp_path):
    """One shard in every format in one pass (fed in record-id order by the one that sorts) is, per
    format, byte for byte the shard that format writes alone (which orders the records itself)."""
    together, sums = _write(tmp_path / "all", tuple(NAMES))
    assert list(together) == NAMES  # the manifest lists a shard's formats in the registry's order
    for name in NAMES:
        alone, alone_sums = _write(tmp_path / name, (name,))
        assert alone[name] == together[name] and list(alone_sums[name]) == list(sums[name])
        for rel in get_format(name).files(together[name]):
            a, b = tmp_path / "all" / rel, tmp_path / name / rel
            files = sorted(p.relative_to(a) for p in a.rglob("*")) if a.is_dir() else [None]
            for f in files:
                assert (a / f if f else a).read_bytes() == (b / f if f else b).read_bytes(), (name, rel, f)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    for c in range(3):
        folder = root / "raw" / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f"{i}.jpg").write_bytes(_jpeg(30 * c + 7 * i))
    run_convert(ConvertConfig(root / "raw", root / "data", formats=tuple(NAMES), image=ImageSettings(short_side=0),
                              shard_size=4, workers=1, progress=False))
    return load_dataset(root / "data")


def test_every_format_reads_back_every_record_of_a_converted_dataset(converted):
    ds = converted
    read = {}
    for name in NAMES:
        table = record_table(ds, "train", name)
        reader = RecordReader(table)
        try:
            read[name] = [reader.read(i) for i in range(len(table))]
        finally:
            reader.close()
    first = read[NAMES[0]]
    assert len(first) == ds.split("train")["records"] == 9
    assert all(read[name] == first for name in NAMES)  # every format holds the same records, in the same order
    assert preferred_format(ds.formats) == NAMES[0]
    for name in NAMES:  # and each scans clean, every record counted
        fmt = get_format(name)
        for shard in ds.shard_entries("train"):
            scanner = fmt.scanner(ds.root, shard.files(name), ds.version, "repair")
            found, readable = scanner.open()
            records = [scanner.parse(raw) for raw in scanner.records()]
            assert readable and found == [] and scanner.end(len(records)) == [] and len(records) == shard.records


def test_an_unknown_format_name_is_one_clear_error(converted):
    message = "unknown shard format 'tfrecord'; the formats are " + ", ".join(repr(n) for n in NAMES)
    with pytest.raises(FormatError) as err:
        get_format("tfrecord")
    assert str(err.value) == message
    with pytest.raises(FormatError) as err:
        record_table(converted, "train", "tfrecord")
    assert str(err.value) == message
