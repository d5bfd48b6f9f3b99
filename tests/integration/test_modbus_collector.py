"""ModbusCollector against the bundled press simulator over a real loopback socket."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.collectors.modbus.collector import ModbusCollector
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Quality, Reading
from simulators.modbus import ModbusSimulator

# The simulator's register map (simulators/MODBUS.md). With max_gap 10 this plans as
# coil 0-2, discrete 0-1, holding 0-31 and input 0-20.
TAGS: list[dict[str, Any]] = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "oil_temperature", "table": "holding", "address": 2, "type": "float32", "unit": "Cel"},
    {"name": "pressure", "table": "holding", "address": 4, "type": "int16", "scale": 0.1, "unit": "bar"},
    {"name": "speed_setpoint", "table": "holding", "address": 5, "unit": "1/min"},
    {"name": "status_running", "table": "holding", "address": 6, "type": "bool", "bit": 0},
    {"name": "program", "table": "holding", "address": 10, "type": "string", "length": 10},
    {"name": "energy_wh", "table": "holding", "address": 20, "type": "float64", "unit": "W.h"},
    {"name": "strokes", "table": "holding", "address": 30, "type": "uint32"},
    {"name": "motor_current", "table": "input", "address": 0, "type": "float32", "unit": "A"},
    {"name": "strokes_in", "table": "input", "address": 10, "type": "uint32", "order": "CDAB"},
    {"name": "good_parts", "table": "input", "address": 12, "type": "uint32", "order": "CDAB"},
    {"name": "cycle_time", "table": "input", "address": 20, "unit": "ms"},
    {"name": "running", "table": "coil", "address": 0},
    {"name": "fault", "table": "coil", "address": 1},
    {"name": "door_open", "table": "coil", "address": 2},
    {"name": "estop_ok", "table": "discrete", "address": 0},
    {"name": "guard_closed", "table": "discrete", "address": 1},
]
HOLDING = {t["name"] for t in TAGS if t["table"] == "holding"}
INPUT = {t["name"] for t in TAGS if t["table"] == "input"}
BAD_COMMUNICATION_ERROR = 0x80050000


def device(port: int, **fields: Any) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": port,
         "timeout": "300ms", "max_gap": 10, "tags": TAGS, **fields}
    )  # fmt: skip


def by_tag(readings: list[Reading]) -> dict[str, Reading]:
    return {r.tag: r for r in readings}


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, seed=7) as simulator:
        yield simulator


@pytest.fixture
async def collector(sim: ModbusSimulator) -> AsyncIterator[ModbusCollector]:
    c = ModbusCollector(device(sim.port))
    try:
        await c.connect()
        yield c
    finally:
        await c.close()


async def test_values_decode_to_plausible_types_and_ranges(
    sim: ModbusSimulator, collector: ModbusCollector
) -> None:
    assert [str(r) for r in collector.requests] == ["coil 0-2", "discrete 0-1", "holding 0-31", "input 0-20"]
    press = sim.press(1)
    press.fault = False
    press.running = False  # no strokes while we compare the two stroke counters
    values = by_tag(await collector.read())
    assert set(values) == {t["name"] for t in TAGS}
    assert all(r.quality is Quality.GOOD for r in values.values())
    v = {name: r.value for name, r in values.items()}
    assert isinstance(v["temperature"], float)
    assert 15.0 <= v["temperature"] <= 90.0
    assert isinstance(v["oil_temperature"], float)
    assert 15.0 <= v["oil_temperature"] <= 90.0
    assert isinstance(v["pressure"], float)
    assert v["speed_setpoint"] == 30
    assert v["program"] == "PART-4711"
    assert isinstance(v["energy_wh"], float)
    assert v["energy_wh"] > 0
    # the same counter, ABCD in holding 30-31 and CDAB in input 10-11
    assert isinstance(v["strokes"], int)
    assert v["strokes"] == v["strokes_in"]
    assert isinstance(v["good_parts"], int)
    assert 0 < v["good_parts"] <= v["strokes"]
    assert v["running"] is False
    assert v["status_running"] is False
    assert values["temperature"].unit == "Cel"


async def test_strokes_increase_while_running(sim: ModbusSimulator, collector: ModbusCollector) -> None:
    press = sim.press(1)
    press.fault = False
    press.running = True
    press.speed_setpoint = 1200  # 20 strokes per second
    first = by_tag(await collector.read())
    assert first["running"].value is True
    assert first["status_running"].value is True
    await asyncio.sleep(0.3)
    second = by_tag(await collector.read())
    assert isinstance(first["strokes"].value, int)
    assert isinstance(second["strokes"].value, int)
    assert second["strokes"].value > first["strokes"].value


async def test_exception_response_makes_exactly_that_requests_tags_bad(
    sim: ModbusSimulator, collector: ModbusCollector
) -> None:
    sim.faults.exception = 4
    sim.faults.exception_ranges = [("input", 0, 20)]
    values = by_tag(await collector.read())
    bad = {name for name, r in values.items() if r.quality is Quality.BAD}
    assert bad == INPUT
    assert all(values[name].status == BAD_COMMUNICATION_ERROR for name in bad)
    assert all(values[name].value is None for name in bad)
    assert all(r.quality is Quality.GOOD for name, r in values.items() if name not in bad)
    sim.faults.clear()
    assert all(r.quality is Quality.GOOD for r in await collector.read())


async def test_exception_02_on_a_gap_splits_the_request_for_good(
    sim: ModbusSimulator, collector: ModbusCollector, caplog: pytest.LogCaptureFixture
) -> None:
    # Holding 8-9 hold no tag but lie inside the merged request holding 0-31: a device
    # that rejects them must still have every holding tag read, just in smaller requests.
    sim.faults.exception = 2
    sim.faults.exception_ranges = [("holding", 8, 9)]
    with caplog.at_level(logging.WARNING, logger="gateway"):
        first = await collector.read()
        second = await collector.read()
    for readings in (first, second):
        assert {r.tag for r in readings} == {t["name"] for t in TAGS}
        assert all(r.quality is Quality.GOOD for r in readings)
    assert [str(r) for r in collector.requests if r.table == "holding"] == [
        "holding 0-6",
        "holding 10-23",
        "holding 30-31",
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "device press-1: holding 0-31 rejected with exception 02; reading it as 3 smaller requests"
    ]


async def test_exception_02_on_a_single_tag_makes_only_that_tag_bad(
    sim: ModbusSimulator, collector: ModbusCollector
) -> None:
    sim.faults.exception = 2
    sim.faults.exception_ranges = [("holding", 30, 31)]
    values = by_tag(await collector.read())
    assert {name for name, r in values.items() if r.quality is Quality.BAD} == {"strokes"}
    assert values["strokes"].status == BAD_COMMUNICATION_ERROR
    assert all(values[name].quality is Quality.GOOD for name in HOLDING - {"strokes"})


async def test_dropped_connection_raises_and_a_fresh_connect_works(
    sim: ModbusSimulator, collector: ModbusCollector
) -> None:
    await collector.read()
    sim.drop_clients()
    with pytest.raises((NotConnected, DeviceTimeout)) as info:
        await collector.read()
    assert info.value.device == "press-1"
    await collector.connect()
    assert all(r.quality is Quality.GOOD for r in await collector.read())


async def test_latency_beyond_the_timeout_raises_device_timeout(
    sim: ModbusSimulator, collector: ModbusCollector
) -> None:
    sim.faults.latency = 1.0  # the device timeout is 300 ms
    with pytest.raises(DeviceTimeout, match=r"no answer to coil 0-2 within 0\.3 s"):
        await collector.read()
    # the connection was closed, so a late answer cannot be taken for the next request's
    with pytest.raises(NotConnected):
        await collector.read()
    sim.faults.clear()
    await collector.connect()
    assert all(r.quality is Quality.GOOD for r in await collector.read())


async def test_connect_to_a_closed_port_raises_not_connected() -> None:
    with socket.socket() as s:  # a port that was free a moment ago, and nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ModbusCollector(device(port))
    try:
        with pytest.raises(NotConnected, match="cannot connect"):
            await c.connect()
    finally:
        await c.close()


async def test_read_before_connect_raises_not_connected(sim: ModbusSimulator) -> None:
    c = ModbusCollector(device(sim.port))
    with pytest.raises(NotConnected):
        await c.read()


async def test_unknown_unit_gives_bad_readings_not_an_error(sim: ModbusSimulator) -> None:
    # The simulator answers an unknown unit with exception 0x0B, as a TCP-to-serial gateway does.
    c = ModbusCollector(device(sim.port, unit=9))
    try:
        await c.connect()
        readings = await c.read()
    finally:
        await c.close()
    assert len(readings) == len(TAGS)
    assert all(r.status == BAD_COMMUNICATION_ERROR for r in readings)


async def test_deadband_suppresses_unchanged_values(sim: ModbusSimulator) -> None:
    tags = [{**t, "deadband": 1000.0} for t in TAGS if t["name"] in ("program", "speed_setpoint")]
    c = ModbusCollector(device(sim.port, tags=tags))
    try:
        await c.connect()
        assert {r.tag for r in await c.read()} == {"program", "speed_setpoint"}
        assert await c.read() == []
    finally:
        await c.close()
