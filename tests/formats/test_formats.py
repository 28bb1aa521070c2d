"""Byte-level codecs: protobuf wire format, Caffe Datum, MXNet RecordIO (pure round trips)."""

from __future__ import annotations

import io
import struct

import pytest

from alexnet_pipe.errors import FormatError
from alexnet_pipe.formats import protobuf as pb
from alexnet_pipe.formats.datum import Datum, decode_datum, encode_datum
from alexnet_pipe.formats.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordIOWriter,
    frame_record,
    iter_records,
    pack_payload,
    read_index,
    read_record,
    unpack_payload,
)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**63, -1, -(2**31)])
def test_varint_round_trip(value):
    encoded = pb.encode_varint(value)
    decoded, end = pb.decode_varint(encoded, 0)
    assert end == len(encoded)
    assert decoded == (value if value >= 0 else value + (1 << 64))
    if -(2**31) <= value < 2**31:
        assert pb.to_int32(decoded) == value


def test_varint_known_bytes():
    assert pb.encode_varint(300) == b"\xac\x02"
    assert pb.encode_varint(-1) == b"\xff" * 9 + b"\x01"  # int32 -1 takes 10 bytes on the wire


def test_datum_round_trip_and_known_layout():
    d = Datum(b"\xff\xd8jpeg\xff\xd9", label=7, height=256, width=341, channels=3, encoded=True)
    raw = encode_datum(d)
    # field 1 (channels) varint 3, field 2 height, field 3 width, field 4 data, field 5 label, field 7 encoded
    assert raw.startswith(b"\x08\x03\x10\x80\x02\x18\xd5\x02\x22\x08")
    assert raw.endswith(b"\x28\x07\x38\x01")
    assert decode_datum(raw) == d


def test_datum_negative_label_and_float_data():
    d = Datum(b"", label=-3, float_data=(1.5, -2.0))
    assert decode_datum(encode_datum(d)) == d


def test_datum_skips_unknown_fields_and_rejects_truncation():
    raw = encode_datum(Datum(b"abc", 1, encoded=True)) + pb.bytes_field(15, b"future")
    assert decode_datum(raw).data == b"abc"
    with pytest.raises(FormatError):
        decode_datum(raw[:3])  # inside the data field


def test_irheader_round_trip():
    payload = pack_payload(IRHeader(0, 12.0, 99, 0), b"img")
    assert payload[:24] == struct.pack("<IfQQ", 0, 12.0, 99, 0)
    header, image = unpack_payload(payload)
    assert (header.flag, header.label, header.id, image) == (0, 12.0, 99, b"img")
    multi = pack_payload(IRHeader(2, (1.0, 2.0), 5), b"x")
    header, image = unpack_payload(multi)
    assert header.flag == 2 and header.label == (1.0, 2.0) and image == b"x"


def test_record_framing_whole_record():
    framed = frame_record(b"abcde")
    magic, lrec = struct.unpack_from("<II", framed)
    assert magic == MAGIC and lrec >> 29 == 0 and lrec & ((1 << 29) - 1) == 5
    assert len(framed) == 8 + 8  # 5 bytes padded to 8
    assert framed[13:] == b"\0\0\0"


def _mxnet_reference_read(buf: bytes) -> list[bytes]:
    """dmlc-core RecordIOReader::NextRecord, transcribed independently of our reader."""
    out, pos = [], 0
    while pos < len(buf):
        rec = b""
        while True:
            magic, lrec = struct.unpack_from("<II", buf, pos)
            assert magic == MAGIC
            cflag, size = lrec >> 29, lrec & ((1 << 29) - 1)
            upper = (size + 3) // 4 * 4
            rec += buf[pos + 8 : pos + 8 + size]
            pos += 8 + upper
            if cflag in (0, 3):
                break
            rec += MAGIC_BYTES
        out.append(rec)
    return out


def test_magic_inside_payload_is_split_and_restored():
    # magic at aligned offsets 24 and 32 (two splits), and once unaligned (no split)
    payload = b"H" * 24 + MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"zz" + MAGIC_BYTES + b"tail!"
    framed = frame_record(payload)
    flags = []
    pos = 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        flags.append(lrec >> 29)
        pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4
    assert flags == [1, 2, 3]
    # No aligned magic may remain inside the framed bytes except at part starts.
    assert read_record(io.BytesIO(framed)) == payload
    assert _mxnet_reference_read(framed) == [payload]


def test_magic_at_payload_start_and_end():
    for payload in (MAGIC_BYTES + b"rest", b"abcd" + MAGIC_BYTES, MAGIC_BYTES):
        framed = frame_record(payload)
        assert read_record(io.BytesIO(framed)) == payload
        assert _mxnet_reference_read(framed) == [payload]


def test_writer_index_and_reader(tmp_path):
    w = RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx")
    payloads = [pack_payload(IRHeader(0, float(i), 100 + i), bytes([i]) * (i * 3) + MAGIC_BYTES * (i % 2))
                for i in range(6)]
    for i, p in enumerate(payloads):
        w.write(100 + i, p)
    w.close()
    records = list(iter_records(tmp_path / "a.rec"))
    assert [p for _, p in records] == payloads
    assert read_index(tmp_path / "a.idx") == [(100 + i, off) for i, (off, _) in enumerate(records)]
    assert _mxnet_reference_read((tmp_path / "a.rec").read_bytes()) == payloads


def test_framed_beforehand_writes_the_same_bytes_and_digest(tmp_path):
    """write_framed (RecordIO-only conversions frame and CRC each record as it arrives) gives
    the very file, index, digest and CRCs of write, split records included."""
    from alexnet_pipe.dataset.checksum import record_crc

    payloads = [b"", b"abc", b"H" * 24 + MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"zz" + MAGIC_BYTES + b"tail!",
                MAGIC_BYTES, MAGIC_BYTES + b"rest", b"abcd" + MAGIC_BYTES, b"x" * 4093]
    one = RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx")
    two = RecordIOWriter(tmp_path / "b.rec", tmp_path / "b.idx")
    for key, payload in enumerate(payloads):
        one.write(key, payload)
        two.write_framed(key, frame_record(payload), record_crc(payload))
    one.close()
    two.close()
    assert (tmp_path / "a.rec").read_bytes() == (tmp_path / "b.rec").read_bytes()
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert one.digest.hexdigest() == two.digest.hexdigest()
    assert list(one.digest.crcs) == list(two.digest.crcs)


def test_reader_rejects_garbage(tmp_path):
    with pytest.raises(FormatError, match="bad magic"):
        read_record(io.BytesIO(b"\0" * 16))
    with pytest.raises(FormatError, match="ends inside"):
        read_record(io.BytesIO(frame_record(b"abcdefgh")[:10]))
