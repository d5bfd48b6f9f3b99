"""Report by exception, unavailable() and describe(): the collector's logic without a socket."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.collectors import Collector
from gateway.collectors.deadband import Deadband
from gateway.collectors.modbus.collector import ModbusCollector
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.model import Quality, Reading, Status, Value

GOOD, UNCERTAIN, BAD = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD
EXCEEDED = Status.UNCERTAIN_ENGINEERING_UNITS_EXCEEDED


def r(value: Value, quality: Quality = GOOD, status: int = Status.GOOD, tag: str = "t") -> Reading:
    return Reading("d", tag, value, quality, status, None, 0.0)


def admitted(band: float | None, readings: list[Reading]) -> list[Value]:
    deadband = Deadband({"t": band})
    return [x.value for x in readings if deadband.admit(x)]


@pytest.mark.parametrize(
    ("band", "values", "reported"),
    [
        (None, [20.0, 20.0, 20.0], [20.0, 20.0, 20.0]),  # no deadband: every poll
        (0.5, [20.0, 20.4, 20.5, 20.6], [20.0, 20.6]),  # more than the band, not equal to it
        (0.5, [20.0, 19.4, 19.0], [20.0, 19.4]),  # downwards too
        (0.5, [20.0, 20.3, 20.6, 20.9], [20.0, 20.6]),  # drift adds up against the last reported
        (0.0, [7, 7, 8, 8, 7], [7, 8, 7]),  # zero: any change
        (10.0, [True, True, False], [True, False]),  # bools: any change, the band is no measure
        (10.0, ["A", "A", "B"], ["A", "B"]),  # strings: any change
    ],
)
def test_deadband(band: float | None, values: list[Value], reported: list[Value]) -> None:
    assert admitted(band, [r(v) for v in values]) == reported


def test_quality_or_status_change_is_always_reported() -> None:
    readings = [
        r(20.0),
        r(20.0, UNCERTAIN, EXCEEDED),
        r(None, BAD, Status.BAD_TIMEOUT),
        r(None, BAD, Status.BAD_TIMEOUT),  # same Bad again: nothing new
        r(None, BAD, Status.BAD_COMMUNICATION_ERROR),
        r(20.0),  # recovery
    ]
    assert admitted(5.0, readings) == [20.0, 20.0, None, None, 20.0]


def test_admit_state_ignores_value_changes() -> None:
    deadband = Deadband({"t": None})
    assert deadband.admit_state(r(None, BAD, Status.BAD_TIMEOUT))
    assert not deadband.admit_state(r(None, BAD, Status.BAD_TIMEOUT))
    assert deadband.admit(r(1.0))
    assert deadband.admit_state(r(None, BAD, Status.BAD_TIMEOUT))


def test_tags_are_independent() -> None:
    deadband = Deadband({"a": 1.0, "b": 1.0})
    assert deadband.admit(r(1.0, tag="a"))
    assert deadband.admit(r(1.0, tag="b"))
    assert not deadband.admit(r(1.5, tag="a"))


DEVICE: dict[str, Any] = {
    "name": "press-1",
    "protocol": "modbus",
    "host": "10.0.0.7",
    "port": 502,
    "unit": 3,
    "type": "StampingPress",
    "order": "CDAB",
    "tags": [
        {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel",
         "description": "Die temperature", "deadband": 0.5},
        {"name": "running", "table": "holding", "address": 6, "type": "bool", "bit": 0},
        {"name": "program", "table": "holding", "address": 10, "type": "string", "length": 10,
         "order": "BADC"},
        {"name": "door_open", "table": "coil", "address": 2},
    ],
}  # fmt: skip


def collector() -> ModbusCollector:
    return ModbusCollector(ModbusDevice.model_validate(DEVICE))


def test_is_a_collector() -> None:
    c: Collector = collector()
    assert c.name == "press-1"


def test_unavailable_reports_each_tag_bad_once_per_status() -> None:
    c = collector()
    first = c.unavailable(Status.BAD_TIMEOUT, 100.0)
    assert [(x.tag, x.value, x.quality, x.status, x.read_time) for x in first] == [
        ("temperature", None, BAD, 0x800A0000, 100.0),
        ("running", None, BAD, 0x800A0000, 100.0),
        ("program", None, BAD, 0x800A0000, 100.0),
        ("door_open", None, BAD, 0x800A0000, 100.0),
    ]
    assert first[0].unit == "Cel"
    assert c.unavailable(Status.BAD_TIMEOUT, 101.0) == []
    assert len(c.unavailable(Status.BAD_COMMUNICATION_ERROR, 102.0)) == 4


def test_describe_lists_tags_without_host_or_port() -> None:
    assert collector().describe() == {
        "protocol": "modbus",
        "type": "StampingPress",
        "tags": [
            {"name": "temperature", "datatype": "float32", "unit": "Cel", "description": "Die temperature",
             "address": {"table": "holding", "address": 0}, "order": "CDAB"},
            {"name": "running", "datatype": "bool", "unit": None, "description": None,
             "address": {"table": "holding", "address": 6, "bit": 0}, "order": "CDAB"},
            {"name": "program", "datatype": "string", "unit": None, "description": None,
             "address": {"table": "holding", "address": 10, "length": 10}, "order": "BADC"},
            {"name": "door_open", "datatype": "bool", "unit": None, "description": None,
             "address": {"table": "coil", "address": 2}},
        ],
    }  # fmt: skip
    assert "10.0.0.7" not in repr(collector().describe())


def test_plan_is_built_at_construction() -> None:
    assert [str(req) for req in collector().requests] == ["coil 2-2", "holding 0-19"]
