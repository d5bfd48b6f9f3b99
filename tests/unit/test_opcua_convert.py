"""OPC UA DataValue -> Reading: each Variant type's JSON value, and the quality of each status."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime

import pytest
from asyncua import ua

from gateway.collectors.opcua.convert import UNCERTAIN, iso, posix, reading, to_value
from gateway.model import Quality, Status, Value

VT = ua.VariantType
WHEN = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)

VALUES = [
    # variant                                                JSON value
    (ua.Variant(None, VT.Null),                              None),
    (ua.Variant(True, VT.Boolean),                           True),
    (ua.Variant(False, VT.Boolean),                          False),
    (ua.Variant(-128, VT.SByte),                             -128),
    (ua.Variant(255, VT.Byte),                               255),
    (ua.Variant(-32768, VT.Int16),                           -32768),
    (ua.Variant(65535, VT.UInt16),                           65535),
    (ua.Variant(-(2**31), VT.Int32),                         -(2**31)),
    (ua.Variant(2**32 - 1, VT.UInt32),                       2**32 - 1),
    (ua.Variant(-(2**63), VT.Int64),                         -(2**63)),
    (ua.Variant(2**64 - 1, VT.UInt64),                       2**64 - 1),
    (ua.Variant(21.5, VT.Float),                             21.5),
    (ua.Variant(-1e300, VT.Double),                          -1e300),
    (ua.Variant("O1001-FLANGE", VT.String),                  "O1001-FLANGE"),
    (ua.Variant(None, VT.String),                            None),  # a null string
    (ua.Variant(WHEN, VT.DateTime),                          "2026-11-24T12:00:00.123Z"),
    (ua.Variant(datetime(2026, 1, 2, 3, 4, 5), VT.DateTime), "2026-01-02T03:04:05.000Z"),  # naive is UTC
    (ua.Variant(b"\x00\x01\xfe\xff", VT.ByteString),         "AAH+/w=="),
    (ua.Variant(None, VT.ByteString),                        None),
    (ua.Variant([1.0, 2.5, -3.0], VT.Double),                [1.0, 2.5, -3.0]),
    (ua.Variant([True, False], VT.Boolean),                  [True, False]),
    (ua.Variant(["a", None, "c"], VT.String),                ["a", None, "c"]),
    (ua.Variant([], VT.Int32),                               []),
    (ua.Variant([[1, 2], [3, 4]], VT.Int32),                 [[1, 2], [3, 4]]),  # a matrix
    (ua.Variant([WHEN], VT.DateTime),                        ["2026-11-24T12:00:00.123Z"]),
    (ua.Variant([b"\x01"], VT.ByteString),                   ["AQ=="]),
    (ua.Variant([1.0, math.nan, math.inf], VT.Double),       [1.0, None, None]),  # non-finite -> null
]  # fmt: skip


@pytest.mark.parametrize(("variant", "expected"), VALUES)
def test_variant_to_json_value(variant: ua.Variant, expected: Value) -> None:
    value = to_value(variant)
    assert value == expected
    assert type(value) is type(expected)  # True stays a bool, 1.0 a float


@pytest.mark.parametrize(("variant", "expected"), VALUES)
def test_good_value_gives_good_reading(variant: ua.Variant, expected: Value) -> None:
    dv = ua.DataValue(variant, ua.StatusCode(ua.StatusCodes.Good), SourceTimestamp=WHEN)
    r = reading("cnc-1", "tag", "1/min", dv, 1000.0)
    assert (r.value, r.quality, r.status) == (expected, Quality.GOOD, 0)
    assert (r.device, r.tag, r.unit, r.read_time) == ("cnc-1", "tag", "1/min", 1000.0)
    assert r.source_time == WHEN.timestamp()


UNSUPPORTED = [
    ua.Variant(ua.LocalizedText("Running", "en"), VT.LocalizedText),
    ua.Variant(ua.QualifiedName("Name", 2), VT.QualifiedName),
    ua.Variant(ua.NodeId(85), VT.NodeId),
    ua.Variant(uuid.UUID(int=1), VT.Guid),
    ua.Variant(ua.StatusCode(0), VT.StatusCode),
    ua.Variant(ua.XmlElement("<a/>"), VT.XmlElement),
    ua.Variant(ua.EUInformation(DisplayName=ua.LocalizedText("mm")), VT.ExtensionObject),
    ua.Variant([ua.Variant(1, VT.Int32)], VT.Variant),
]


@pytest.mark.parametrize("variant", UNSUPPORTED, ids=lambda v: v.VariantType.name)
def test_unsupported_type_is_uncertain_without_value(variant: ua.Variant) -> None:
    dv = ua.DataValue(variant, ua.StatusCode(ua.StatusCodes.Good))
    r = reading("cnc-1", "tag", None, dv, 1000.0)
    assert (r.value, r.quality, r.status) == (None, Quality.UNCERTAIN, UNCERTAIN)
    assert UNCERTAIN == 0x40000000


def test_unsupported_type_keeps_the_servers_own_uncertain_or_bad_status() -> None:
    text = ua.Variant(ua.LocalizedText("x"), VT.LocalizedText)
    uncertain = ua.StatusCodes.UncertainLastUsableValue
    r = reading("d", "t", None, ua.DataValue(text, ua.StatusCode(uncertain)), 1.0)
    assert (r.value, r.quality, r.status) == (None, Quality.UNCERTAIN, uncertain)
    bad = ua.StatusCodes.BadSensorFailure
    r = reading("d", "t", None, ua.DataValue(text, ua.StatusCode(bad)), 1.0)
    assert (r.value, r.quality, r.status) == (None, Quality.BAD, bad)


STATUSES = [
    # status code                                  quality             value kept
    (ua.StatusCodes.Good,                          Quality.GOOD,       True),
    (ua.StatusCodes.GoodClamped,                   Quality.GOOD,       True),
    (ua.StatusCodes.GoodLocalOverride,             Quality.GOOD,       True),
    (ua.StatusCodes.Uncertain,                     Quality.UNCERTAIN,  True),
    (ua.StatusCodes.UncertainLastUsableValue,      Quality.UNCERTAIN,  True),
    (ua.StatusCodes.UncertainSensorNotAccurate,    Quality.UNCERTAIN,  True),
    (ua.StatusCodes.UncertainEngineeringUnitsExceeded, Quality.UNCERTAIN, True),
    (ua.StatusCodes.Bad,                           Quality.BAD,        False),
    (ua.StatusCodes.BadNodeIdUnknown,              Quality.BAD,        False),
    (ua.StatusCodes.BadCommunicationError,         Quality.BAD,        False),
    (ua.StatusCodes.BadSensorFailure,              Quality.BAD,        False),
    (ua.StatusCodes.BadOutOfService,               Quality.BAD,        False),
    (0xC0000000,                                   Quality.BAD,        False),  # reserved severity 11
    (0x00000400,                                   Quality.GOOD,       True),   # info bits only
]  # fmt: skip


@pytest.mark.parametrize(("status", "quality", "kept"), STATUSES)
def test_status_code_to_quality(status: int, quality: Quality, kept: bool) -> None:
    dv = ua.DataValue(ua.Variant(42.0, VT.Double), ua.StatusCode(status), SourceTimestamp=WHEN)
    r = reading("d", "t", None, dv, 1.0)
    assert (r.quality, r.status) == (quality, status)
    assert r.value == (42.0 if kept else None)
    assert r.source_time == WHEN.timestamp()  # kept even when Bad: it says when it went bad


def test_non_finite_scalar_is_bad_out_of_range() -> None:
    for x in (math.nan, math.inf, -math.inf):
        r = reading("d", "t", None, ua.DataValue(ua.Variant(x, VT.Double)), 1.0)
        assert (r.value, r.quality, r.status) == (None, Quality.BAD, Status.BAD_OUT_OF_RANGE)


def test_missing_value_and_timestamps() -> None:
    r = reading("d", "t", None, ua.DataValue(), 5.0)  # no value, default Good status
    assert (r.value, r.quality, r.source_time, r.read_time) == (None, Quality.GOOD, None, 5.0)
    null_time = datetime(1601, 1, 1, tzinfo=UTC)  # OPC UA's "no timestamp"
    r = reading("d", "t", None, ua.DataValue(ua.Variant(1, VT.Int32), SourceTimestamp=null_time), 5.0)
    assert r.source_time is None
    assert r.timestamp == 5.0


def test_time_helpers() -> None:
    assert iso(WHEN) == "2026-11-24T12:00:00.123Z"
    assert posix(None) is None
    assert posix(datetime(1970, 1, 1, 0, 0, 1)) == 1.0  # naive: UTC
