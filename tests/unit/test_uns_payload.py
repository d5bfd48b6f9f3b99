"""UNS payload bytes: the direct formatting of Good numbers against the JSON encoder."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import GatewaySettings
from gateway.model import AssetPath, Entry, Quality, Reading, Status, Value
from gateway.publishers.uns import UnsPublisher

GATEWAY = GatewaySettings(id="gw", enterprise="acme", site="s", area="a", line="l")
T0 = 1_795_000_000.123


def publisher() -> UnsPublisher:
    # The connection is never used by payload().
    return UnsPublisher(None, GATEWAY, {"press-1": (AssetPath("acme", "s", "a", "l", "press-1"), {})})  # type: ignore[arg-type]


def encoded(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


VALUES: list[Value] = [0, -1, 7, 2**70, -(2**63), 0.1, 21.5, -0.0, 1e300, 5e-324, 123456.789, 1e16, 3.0]
UNITS = [None, "Cel", "°C", 'in"ch', "m/s\\"]


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_good_numbers_are_the_bytes_json_writes(value: Value, unit: str | None) -> None:
    got = publisher().payload(Entry(42, Reading("press-1", "t", value, Quality.GOOD, 0, None, T0, unit)))
    doc = {
        "value": value,
        "quality": "Good",
        "timestamp": "2026-11-18T11:06:40.123Z",
        "unit": unit,
        "seq": 42,
    }
    assert got == encoded(doc)


def test_the_timestamp_follows_each_reading() -> None:
    uns = publisher()
    stamps = [T0, T0, T0 + 0.5, T0, T0 + 86_400]
    entries = [Entry(i, Reading("press-1", "t", 1, Quality.GOOD, 0, None, t)) for i, t in enumerate(stamps)]
    got = [json.loads(uns.payload(e))["timestamp"] for e in entries]
    assert got == [
        "2026-11-18T11:06:40.123Z", "2026-11-18T11:06:40.123Z", "2026-11-18T11:06:40.623Z",
        "2026-11-18T11:06:40.123Z", "2026-11-19T11:06:40.123Z",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "quality", "status", "expected"),
    [
        (True, Quality.GOOD, 0, {"value": True, "quality": "Good"}),
        ("run", Quality.GOOD, 0, {"value": "run", "quality": "Good"}),
        (None, Quality.BAD, Status.BAD_TIMEOUT, {"value": None, "quality": "Bad", "status": "0x800A0000"}),
        (5, Quality.UNCERTAIN, 0x40940000, {"value": 5, "quality": "Uncertain", "status": "0x40940000"}),
        (float("inf"), Quality.GOOD, 0, {"value": None, "quality": "Bad", "status": "0x803C0000"}),
    ],
)
def test_other_readings_go_through_the_encoder(
    value: Value, quality: Quality, status: int, expected: dict[str, Any]
) -> None:
    got = json.loads(
        publisher().payload(Entry(9, Reading("press-1", "t", value, quality, status, None, T0, "Cel")))
    )
    assert got == {"timestamp": "2026-11-18T11:06:40.123Z", "unit": "Cel", "seq": 9, **expected}
