"""Golden vectors for the Modbus codec: every type in every order, written out by hand.

The expected registers were worked out on paper from the IEEE 754 / two's complement bit
patterns noted beside them, never produced by the code under test. pymodbus changes its
API in minor releases; these tests are what lets the pin move safely.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.collectors.modbus.codec import TagCodec, decode, encode
from gateway.collectors.modbus.settings import ModbusTag
from gateway.model import Quality, Status

# (type, order, value, registers on the wire)
VECTORS: list[tuple[str, str, Any, list[int]]] = [
    # DESIGN §5: 123456.0 = 0x47F12000
    ("float32", "ABCD", 123456.0, [0x47F1, 0x2000]),
    ("float32", "CDAB", 123456.0, [0x2000, 0x47F1]),
    ("float32", "BADC", 123456.0, [0xF147, 0x0020]),
    ("float32", "DCBA", 123456.0, [0x0020, 0xF147]),
    # -1.5 = 0xBFC00000
    ("float32", "ABCD", -1.5, [0xBFC0, 0x0000]),
    ("float32", "CDAB", -1.5, [0x0000, 0xBFC0]),
    ("float32", "BADC", -1.5, [0xC0BF, 0x0000]),
    ("float32", "DCBA", -1.5, [0x0000, 0xC0BF]),
    # 123456.0 as a double = 0x40FE240000000000
    ("float64", "ABCD", 123456.0, [0x40FE, 0x2400, 0x0000, 0x0000]),
    ("float64", "CDAB", 123456.0, [0x0000, 0x0000, 0x2400, 0x40FE]),
    ("float64", "BADC", 123456.0, [0xFE40, 0x0024, 0x0000, 0x0000]),
    ("float64", "DCBA", 123456.0, [0x0000, 0x0000, 0x0024, 0xFE40]),
    # -2 = 0xFFFE; one register: only the byte swap applies
    ("int16", "ABCD", -2, [0xFFFE]),
    ("int16", "CDAB", -2, [0xFFFE]),
    ("int16", "BADC", -2, [0xFEFF]),
    ("int16", "DCBA", -2, [0xFEFF]),
    ("int16", "ABCD", 4660, [0x1234]),
    ("int16", "CDAB", 4660, [0x1234]),
    ("int16", "BADC", 4660, [0x3412]),
    ("int16", "DCBA", 4660, [0x3412]),
    ("int16", "ABCD", -32768, [0x8000]),
    ("int16", "ABCD", 32767, [0x7FFF]),
    # 32769 = 0x8001: above the int16 range, so no sign
    ("uint16", "ABCD", 32769, [0x8001]),
    ("uint16", "CDAB", 32769, [0x8001]),
    ("uint16", "BADC", 32769, [0x0180]),
    ("uint16", "DCBA", 32769, [0x0180]),
    ("uint16", "ABCD", 65535, [0xFFFF]),
    # -123456789 = 0xF8A432EB (123456789 = 0x075BCD15)
    ("int32", "ABCD", -123456789, [0xF8A4, 0x32EB]),
    ("int32", "CDAB", -123456789, [0x32EB, 0xF8A4]),
    ("int32", "BADC", -123456789, [0xA4F8, 0xEB32]),
    ("int32", "DCBA", -123456789, [0xEB32, 0xA4F8]),
    # 305419896 = 0x12345678
    ("uint32", "ABCD", 305419896, [0x1234, 0x5678]),
    ("uint32", "CDAB", 305419896, [0x5678, 0x1234]),
    ("uint32", "BADC", 305419896, [0x3412, 0x7856]),
    ("uint32", "DCBA", 305419896, [0x7856, 0x3412]),
    ("uint32", "ABCD", 4294967295, [0xFFFF, 0xFFFF]),
    # 72623859790382856 = 0x0102030405060708
    ("int64", "ABCD", 72623859790382856, [0x0102, 0x0304, 0x0506, 0x0708]),
    ("int64", "CDAB", 72623859790382856, [0x0708, 0x0506, 0x0304, 0x0102]),
    ("int64", "BADC", 72623859790382856, [0x0201, 0x0403, 0x0605, 0x0807]),
    ("int64", "DCBA", 72623859790382856, [0x0807, 0x0605, 0x0403, 0x0201]),
    # -2 = 0xFFFFFFFFFFFFFFFE
    ("int64", "ABCD", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("int64", "CDAB", -2, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]),
    ("int64", "BADC", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF]),
    ("int64", "DCBA", -2, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    # 18364758544493064720 = 0xFEDCBA9876543210
    ("uint64", "ABCD", 18364758544493064720, [0xFEDC, 0xBA98, 0x7654, 0x3210]),
    ("uint64", "CDAB", 18364758544493064720, [0x3210, 0x7654, 0xBA98, 0xFEDC]),
    ("uint64", "BADC", 18364758544493064720, [0xDCFE, 0x98BA, 0x5476, 0x1032]),
    ("uint64", "DCBA", 18364758544493064720, [0x1032, 0x5476, 0x98BA, 0xDCFE]),
    # "PRG-01": P=50 R=52 G=47 -=2D 0=30 1=31, NUL padded. Strings ignore word order.
    ("string", "ABCD", "PRG-01", [0x5052, 0x472D, 0x3031, 0x0000]),
    ("string", "CDAB", "PRG-01", [0x5052, 0x472D, 0x3031, 0x0000]),
    ("string", "BADC", "PRG-01", [0x5250, 0x2D47, 0x3130, 0x0000]),
    ("string", "DCBA", "PRG-01", [0x5250, 0x2D47, 0x3130, 0x0000]),
    ("string", "ABCD", "ABC", [0x4142, 0x4300]),
]


@pytest.mark.parametrize(("datatype", "order", "value", "registers"), VECTORS)
def test_decode(datatype: str, order: Any, value: Any, registers: list[int]) -> None:
    got = decode(registers, datatype, order)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize(("datatype", "order", "value", "registers"), VECTORS)
def test_encode(datatype: str, order: Any, value: Any, registers: list[int]) -> None:
    length = len(registers) if datatype == "string" else None
    assert encode(value, datatype, order, length=length) == registers


@pytest.mark.parametrize(
    ("registers", "expected"),
    [
        ([0x4142, 0x2020], "AB"),  # trailing spaces
        ([0x4142, 0x0000, 0x0000], "AB"),  # trailing NUL
        ([0x2041, 0x4200], " AB"),  # leading space is content
        ([0x41FF], "A\ufffd"),  # not ASCII: replaced, the rest survives
        ([0x0000, 0x0000], ""),
    ],
)
def test_decode_string_padding_and_garbage(registers: list[int], expected: str) -> None:
    assert decode(registers, "string") == expected


@pytest.mark.parametrize(
    ("register", "order", "bit", "expected"),
    [
        (0x0001, "ABCD", 0, True),
        (0x0001, "ABCD", 1, False),
        (0x8000, "ABCD", 15, True),
        (0x0100, "ABCD", 8, True),
        (0x0100, "ABCD", 0, False),
        (0x0100, "CDAB", 8, True),  # one register: word order does not apply
        # byte-swapped: the value is 0x0001, so bit 0 is set
        (0x0100, "BADC", 0, True),
        (0x0100, "DCBA", 0, True),
        (0x0100, "BADC", 8, False),
        (0x0001, "BADC", 8, True),
    ],
)
def test_decode_bit_of_register(register: int, order: Any, bit: int, expected: bool) -> None:
    assert decode([register], "bool", order, bit=bit) is expected


@pytest.mark.parametrize(
    ("value", "datatype"),
    [
        (32768, "int16"),
        (-32769, "int16"),
        (-1, "uint16"),
        (65536, "uint16"),
        (2**31, "int32"),
        (2**32, "uint32"),
        (2**63, "int64"),
        (-1, "uint64"),
        ("12", "int16"),
    ],
)
def test_encode_rejects_values_that_do_not_fit(value: Any, datatype: str) -> None:
    with pytest.raises(ValueError, match=datatype):
        encode(value, datatype)


def test_encode_string_errors() -> None:
    with pytest.raises(ValueError, match="more than 2 registers"):
        encode("ABCDE", "string", length=2)
    with pytest.raises(ValueError, match="ascii"):
        encode("Müller", "string", length=4)
    with pytest.raises(ValueError, match="length"):
        encode("AB", "string")


def test_encode_bool() -> None:
    assert encode(True, "bool") == [1]
    assert encode(False, "bool") == [0]


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("int16", -32768), ("uint16", 0), ("int32", -1), ("int32", 2**31 - 1), ("uint32", 7),
        ("int64", -(2**63)), ("uint64", 2**64 - 1), ("float32", 0.15625), ("float64", -1e300),
    ],
)  # fmt: skip
def test_round_trip(order: Any, datatype: str, value: Any) -> None:
    assert decode(encode(value, datatype, order), datatype, order) == value


# --- TagCodec: position in a response, scaling, range, NaN -------------------------------


def tag(**fields: Any) -> ModbusTag:
    return ModbusTag.model_validate({"name": "t", "table": "holding", "address": 0, **fields})


def test_reading_takes_its_registers_from_its_place_in_the_response() -> None:
    codec = TagCodec(tag(address=12, type="float32", unit="Cel"), "press-1")
    # response of holding 10-15; the tag is at 12-13 = 0x47F12000
    reading = codec.reading([1, 2, 0x47F1, 0x2000, 5, 6], 10, now=1000.0)
    assert (reading.device, reading.tag, reading.unit) == ("press-1", "t", "Cel")
    assert reading.value == 123456.0
    assert (reading.quality, reading.status) == (Quality.GOOD, Status.GOOD)
    assert (reading.source_time, reading.read_time) == (None, 1000.0)


def test_tag_order_overrides_device_order() -> None:
    data = [0x2000, 0x47F1]
    assert TagCodec(tag(type="float32"), "d", "CDAB").reading(data, 0, 0).value == 123456.0
    assert TagCodec(tag(type="float32", order="CDAB"), "d", "ABCD").reading(data, 0, 0).value == 123456.0
    assert TagCodec(tag(type="float32"), "d", "ABCD").reading(data, 0, 0).value != 123456.0


def test_default_types() -> None:
    assert TagCodec(tag(), "d").reading([0xFFFF], 0, 0).value == 65535  # uint16
    coil = TagCodec(tag(table="coil", address=3), "d")
    assert coil.reading([False, False, True, True, False], 1, 0).value is True


@pytest.mark.parametrize(
    ("fields", "raw", "expected"),
    [
        ({"type": "int16", "scale": 0.1}, [123], 12.3),
        ({"type": "int16", "scale": 0.1}, [3], 0.3),  # not 0.30000000000000004
        ({"type": "int16", "scale": 0.01}, [0xFF9C], -1.0),  # -100
        ({"type": "uint16", "scale": 2.0, "offset": -50.0}, [100], 150.0),
        ({"type": "uint16", "offset": 0.5}, [10], 10.5),
        ({"type": "uint16", "scale": 0.5}, [3], 1.5),
        ({"type": "float32", "scale": 1000.0}, [0xBFC0, 0x0000], -1500.0),  # -1.5 kW to W
    ],
)
def test_scale_and_offset(fields: dict[str, Any], raw: list[int], expected: float) -> None:
    value = TagCodec(tag(**fields), "d").reading(raw, 0, 0).value
    assert value == expected
    assert isinstance(value, float)


def test_unscaled_integers_stay_int() -> None:
    value = TagCodec(tag(type="uint32"), "d").reading([0x1234, 0x5678], 0, 0).value
    assert value == 305419896
    assert type(value) is int


@pytest.mark.parametrize(
    ("datatype", "registers"),
    [
        ("float32", [0x7FC0, 0x0000]),  # quiet NaN
        ("float32", [0x7F80, 0x0000]),  # +inf
        ("float32", [0xFF80, 0x0000]),  # -inf
        ("float64", [0x7FF8, 0x0000, 0x0000, 0x0000]),  # NaN
    ],
)
def test_nan_and_infinity_are_bad(datatype: str, registers: list[int]) -> None:
    reading = TagCodec(tag(type=datatype), "d").reading(registers, 0, 5.0)
    assert reading.value is None
    assert reading.quality is Quality.BAD
    assert reading.status == 0x80070000  # BadDecodingError


def test_scaling_into_infinity_is_bad() -> None:
    # 3.4e38 (close to float32 max, 0x7F7FC99E) times 1e300 overflows a double
    codec = TagCodec(tag(type="float32", scale=1e300), "d")
    assert codec.reading([0x7F7F, 0xC99E], 0, 0).quality is Quality.BAD


@pytest.mark.parametrize(
    ("raw", "quality", "status"),
    [
        (200, Quality.GOOD, Status.GOOD),  # 20.0, the lower bound itself is valid
        (800, Quality.GOOD, Status.GOOD),  # 80.0, the upper bound itself is valid
        (199, Quality.UNCERTAIN, 0x40940000),  # 19.9
        (801, Quality.UNCERTAIN, 0x40940000),  # 80.1
    ],
)
def test_range_makes_values_uncertain(raw: int, quality: Quality, status: int) -> None:
    codec = TagCodec(tag(type="int16", scale=0.1, min=20.0, max=80.0), "d")
    reading = codec.reading([raw], 0, 0)
    assert (reading.quality, reading.status) == (quality, status)
    assert reading.value == raw / 10  # an Uncertain reading keeps its value


def test_range_with_only_one_bound() -> None:
    codec = TagCodec(tag(min=10.0), "d")
    assert codec.reading([9], 0, 0).quality is Quality.UNCERTAIN
    assert codec.reading([60000], 0, 0).quality is Quality.GOOD


def test_string_and_bool_tags_ignore_range() -> None:
    text = TagCodec(tag(type="string", length=1, min=0.0, max=1.0), "d")
    assert text.reading([0x4142], 0, 0).value == "AB"
    assert text.reading([0x4142], 0, 0).quality is Quality.GOOD
    flag = TagCodec(tag(type="bool", bit=0, max=0.0), "d")
    assert flag.reading([1], 0, 0).quality is Quality.GOOD


def test_nan_is_not_mistaken_for_in_range() -> None:
    # NaN compares False with everything, so a range check alone would call it Good.
    codec = TagCodec(tag(type="float32", min=0.0, max=100.0), "d")
    assert codec.reading([0x7FC0, 0x0000], 0, 0).quality is Quality.BAD
