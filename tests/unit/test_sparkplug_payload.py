"""Sparkplug B payload encoding: field numbers, datatypes, the Quality property, decoding.

The wire bytes below are worked out by hand from the protobuf encoding rules and the field
numbers of the Sparkplug 3.0 specification (chapter 6), not produced by the code under test.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.model import Quality
from gateway.publishers.sparkplug import sparkplug_b_pb2 as pb
from gateway.publishers.sparkplug.payload import (
    DataType,
    Decoder,
    Metric,
    Payload,
    add_properties,
    datatype_of,
    fits,
    get_value,
    parse,
    set_value,
)

PROTO_DIR = Path(__file__).parents[2] / "gateway" / "publishers" / "sparkplug"
PAYLOAD_TYPE = "org.eclipse.tahu.protobuf.Payload"


def protoc() -> str:
    found = shutil.which("protoc")
    if found is None:
        pytest.fail("protoc is not installed: run `make test`, which installs protobuf-compiler")
    return found


def test_payload_field_numbers() -> None:
    """Payload: timestamp 1, metrics 2, seq 3; Metric: name 1, int_value 10."""
    payload = Payload(timestamp=1, seq=3)
    payload.metrics.add(name="a", int_value=5)
    assert payload.SerializeToString() == bytes.fromhex("080112050a016150051803")


@pytest.mark.parametrize(
    ("fields", "wire"),
    [
        ({"alias": 2}, "1002"),  # field 2, varint
        ({"timestamp": 3}, "1803"),  # field 3
        ({"datatype": 4}, "2004"),  # field 4
        ({"is_historical": True}, "2801"),  # field 5
        ({"is_transient": True}, "3001"),  # field 6
        ({"is_null": True}, "3801"),  # field 7
        ({"long_value": 1}, "5801"),  # field 11
        ({"float_value": 1.0}, "650000803f"),  # field 12, fixed32
        ({"double_value": 1.0}, "69000000000000f03f"),  # field 13, fixed64
        ({"boolean_value": True}, "7001"),  # field 14
        ({"string_value": "x"}, "7a0178"),  # field 15, length-delimited
        ({"bytes_value": b"\x01"}, "82010101"),  # field 16: the tag takes two varint bytes, then length
    ],
)
def test_metric_field_numbers(fields: dict[str, object], wire: str) -> None:
    assert Metric(**fields).SerializeToString() == bytes.fromhex(wire)  # type: ignore[arg-type]


def test_quality_property_layout() -> None:
    """properties 9 -> PropertySet keys 1, values 2 -> PropertyValue type 1 (Int32 = 3), int_value 3."""
    m = Metric()
    add_properties(m, Quality.GOOD, 0)
    # 0x4a: field 9, length 16 = keys (2 + 7 bytes) + values (2 + 5 bytes); 192 = varint c0 01.
    assert m.SerializeToString() == bytes.fromhex("4a100a07" + b"Quality".hex() + "1205080318c001")


def test_datatype_codes_match_the_schema() -> None:
    for datatype in DataType:
        assert pb.DataType.Value(pb.DataType.Name(datatype.value)) == datatype.value
        assert pb.DataType.Name(datatype.value).upper() == datatype.name


@pytest.mark.parametrize(
    ("datatype", "value", "field", "raw"),
    [
        (DataType.INT8, -1, "int_value", 0xFFFF_FFFF),  # two's complement in 32 bits
        (DataType.INT16, -2, "int_value", 0xFFFF_FFFE),
        (DataType.INT32, -(2**31), "int_value", 0x8000_0000),
        (DataType.INT64, -1, "long_value", 0xFFFF_FFFF_FFFF_FFFF),
        (DataType.UINT16, 65535, "int_value", 65535),
        (DataType.UINT32, 2**32 - 1, "int_value", 2**32 - 1),
        (DataType.UINT64, 2**64 - 1, "long_value", 2**64 - 1),
        (DataType.BOOLEAN, True, "boolean_value", True),
        (DataType.DOUBLE, 21.5, "double_value", 21.5),
        (DataType.FLOAT, 0.5, "float_value", 0.5),
        (DataType.STRING, "P-100", "string_value", "P-100"),
        (DataType.STRING, [1, 2], "string_value", "[1,2]"),
    ],
)
def test_values_by_datatype(datatype: DataType, value: object, field: str, raw: object) -> None:
    m = Metric()
    assert fits(datatype, value)  # type: ignore[arg-type]
    set_value(m, datatype, value)  # type: ignore[arg-type]
    assert m.WhichOneof("value") == field
    assert getattr(m, field) == raw
    expected = "[1,2]" if isinstance(value, list) else value
    assert get_value(m, datatype) == expected


def test_uint32_is_read_from_either_field() -> None:
    assert get_value(Metric(int_value=7), DataType.UINT32) == 7
    assert get_value(Metric(long_value=7), DataType.UINT32) == 7


def test_null_value() -> None:
    m = Metric()
    set_value(m, DataType.DOUBLE, None)
    assert m.is_null
    assert m.WhichOneof("value") is None
    assert get_value(m, DataType.DOUBLE) is None


@pytest.mark.parametrize(
    ("datatype", "value", "ok"),
    [
        (DataType.INT8, 127, True),
        (DataType.INT8, 128, False),
        (DataType.UINT16, -1, False),
        (DataType.INT64, True, True),  # as 1: a bool-or-number value settles on the number's type
        (DataType.DOUBLE, 3, True),
        (DataType.DOUBLE, "3", False),
        (DataType.BOOLEAN, 1, False),
        (DataType.STRING, 1.5, True),
    ],
)
def test_fits(datatype: DataType, value: object, ok: bool) -> None:
    assert fits(datatype, value) is ok  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "datatype"),
    [
        (True, DataType.BOOLEAN),
        (5, DataType.INT64),
        (2**63, DataType.UINT64),
        (1.5, DataType.DOUBLE),
        ("x", DataType.STRING),
        ([1.0], DataType.STRING),
        (None, None),
    ],
)
def test_datatype_of(value: object, datatype: DataType | None) -> None:
    assert datatype_of(value) == datatype  # type: ignore[arg-type]


def test_decoder_uses_births_for_later_data() -> None:
    """A DDATA carries only aliases and raw two's complement; the DBIRTH before it tells the
    names and datatypes."""
    birth = Payload(timestamp=1000, seq=1)
    birth.metrics.add(name="delta", alias=7, datatype=DataType.INT16, int_value=0xFFFF_FFFB)
    data = Payload(timestamp=2000, seq=2)
    data.metrics.add(alias=7, timestamp=1999, int_value=0xFFFF_FFFE, is_historical=True)
    decoder = Decoder()
    topic = "spBv1.0/g/DBIRTH/n/press"
    assert decoder.decode(birth.SerializeToString(), topic)["metrics"][0]["value"] == -5
    doc = decoder.decode(data.SerializeToString(), "spBv1.0/g/DDATA/n/press")
    assert doc["seq"] == 2
    assert doc["time"] == "1970-01-01T00:00:02.000Z"
    assert doc["metrics"] == [
        {
            "name": "delta",
            "alias": 7,
            "timestamp": 1999,
            "datatype": "Int16",
            "is_historical": True,
            "value": -2,
        }
    ]
    # Without the birth the raw value is all there is.
    assert Decoder().decode(data.SerializeToString())["metrics"][0]["value"] == 0xFFFF_FFFE


def test_parse_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a Sparkplug B payload"):
        parse(b"\xff\xff\xff")


def test_protoc_decodes_our_encoding() -> None:
    """Cross-check with protoc's own (C++) decoder: names, field values, two's complement."""
    payload = Payload(timestamp=1_795_000_000_000, seq=0)
    m = payload.metrics.add(name="bdSeq", timestamp=1_795_000_000_000, datatype=DataType.INT64)
    set_value(m, DataType.INT64, 3)
    m = payload.metrics.add(name="offset", datatype=DataType.INT8)
    set_value(m, DataType.INT8, -1)
    add_properties(m, Quality.BAD, 0x800A0000)
    out = subprocess.run(
        [protoc(), f"--decode={PAYLOAD_TYPE}", "sparkplug_b.proto"],
        input=payload.SerializeToString(), capture_output=True, cwd=PROTO_DIR, check=True,
    ).stdout.decode()  # fmt: skip
    assert "timestamp: 1795000000000" in out
    assert "seq: 0" in out
    assert 'name: "bdSeq"' in out
    assert "long_value: 3" in out
    assert "int_value: 4294967295" in out  # Int8 -1
    assert 'keys: "Quality"' in out
    assert "int_value: 0" in out
    assert "int_value: 2148139008" in out  # the Status property, 0x800A0000


def test_protoc_encoding_is_what_we_decode(tmp_path: Path) -> None:
    """And the other way: protoc encodes a text payload, the gateway's decoder reads it."""
    text = 'timestamp: 5 seq: 9 metrics { name: "t" datatype: 3 int_value: 4294967295 }'
    data = subprocess.run(
        [protoc(), f"--encode={PAYLOAD_TYPE}", "sparkplug_b.proto"],
        input=text.encode(), capture_output=True, cwd=PROTO_DIR, check=True,
    ).stdout  # fmt: skip
    doc = Decoder().decode(data)
    assert doc["seq"] == 9
    assert doc["metrics"][0] == {"name": "t", "datatype": "Int32", "value": -1}


def test_generated_code_is_current(tmp_path: Path) -> None:
    """The committed sparkplug_b_pb2 module is what protoc makes of the schema (`make proto`)."""
    shutil.copy(PROTO_DIR / "sparkplug_b.proto", tmp_path)
    subprocess.run([protoc(), "--python_out=.", "--pyi_out=.", "sparkplug_b.proto"], cwd=tmp_path, check=True)
    for name in ("sparkplug_b_pb2.py", "sparkplug_b_pb2.pyi"):
        assert (tmp_path / name).read_text() == (PROTO_DIR / name).read_text(), f"{name} is stale: make proto"


def test_datetime_and_bytes_from_their_text_forms() -> None:
    """OPC UA DateTime and ByteString values reach the publisher as ISO 8601 and base64 text."""
    m = Metric()
    assert fits(DataType.DATETIME, "2026-11-24T12:00:00.123Z")
    set_value(m, DataType.DATETIME, "2026-11-24T12:00:00.123Z")
    assert m.long_value == 1_795_521_600_123  # date -u -d 2026-11-24T12:00:00Z +%s, in ms
    assert get_value(m, DataType.DATETIME) == "2026-11-24T12:00:00.123Z"
    m = Metric()
    assert fits(DataType.BYTES, "AQID")
    set_value(m, DataType.BYTES, "AQID")
    assert m.bytes_value == b"\x01\x02\x03"
    assert get_value(m, DataType.BYTES) == "AQID"
    assert not fits(DataType.DATETIME, "yesterday")
    assert not fits(DataType.BYTES, "not base64!")
    assert not fits(DataType.DATETIME, 5)


def test_a_datetime_before_1970_is_null() -> None:
    """OPC UA's "no time" is 1601-01-01; Sparkplug's DateTime is unsigned ms since 1970."""
    m = Metric()
    assert fits(DataType.DATETIME, "1601-01-01T00:00:00.000Z")
    set_value(m, DataType.DATETIME, "1601-01-01T00:00:00.000Z")
    assert m.is_null
    assert m.WhichOneof("value") is None
