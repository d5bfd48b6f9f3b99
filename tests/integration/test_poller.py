"""The poller around real collectors: isolation between devices, state changes logged once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from gateway.app import cancel
from gateway.backoff import Backoff
from gateway.collectors.modbus.collector import ModbusCollector
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.model import STATE_EVENT, Quality, Reading
from gateway.poller import poll
from gateway.state import DeviceState
from simulators.modbus import ModbusSimulator
from tests.helpers import eventually

TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32"},
    {"name": "running", "table": "coil", "address": 0},
]


def device(name: str, port: int) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {
            "name": name,
            "protocol": "modbus",
            "host": "127.0.0.1",
            "port": port,
            "timeout": "200ms",
            "tags": TAGS,
        }
    )


@pytest.fixture
async def sims() -> AsyncIterator[tuple[ModbusSimulator, ModbusSimulator]]:
    async with (
        ModbusSimulator(port=0, units=(1,), seed=1) as a,
        ModbusSimulator(port=0, units=(1,), seed=2) as b,
    ):
        yield a, b


class Sink:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def __call__(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)

    def of(self, device: str) -> list[Reading]:
        """The device's readings (not its events)."""
        return [r for r in self.readings if r.device == device and not r.tag.startswith("$")]

    def states(self, device: str) -> list[str]:
        """What the device's readings and state events said, in order: up, Good, Bad, down."""
        said = [
            str(r.value) if r.tag == STATE_EVENT else r.quality.value
            for r in self.readings
            if r.device == device
        ]
        return [s for i, s in enumerate(said) if i == 0 or s != said[i - 1]]


async def run_for(seconds: float, *pollers: Coroutine[Any, Any, None]) -> None:
    tasks = [asyncio.create_task(p) for p in pollers]
    await asyncio.sleep(seconds)
    await cancel(tasks)


async def test_a_hanging_device_does_not_slow_another(
    sims: tuple[ModbusSimulator, ModbusSimulator], caplog: pytest.LogCaptureFixture
) -> None:
    hung, healthy = sims
    hung.faults.latency = 5.0  # answers far beyond the 200 ms timeout
    sink = Sink()
    slow, fast = DeviceState("hung"), DeviceState("healthy")
    caplog.set_level(logging.INFO, logger="gateway.poller")
    await run_for(
        2.0,
        poll(ModbusCollector(device("hung", hung.port)), 0.1, sink, state=slow,
             backoff=Backoff(initial=0.1, cap=0.2)),
        poll(ModbusCollector(device("healthy", healthy.port)), 0.1, sink, state=fast),
    )  # fmt: skip
    # 2 s at 100 ms is 20 ticks. Were the healthy device held up by the hung one (5 s per
    # answer, 200 ms timeout), it would manage a handful at most.
    assert fast.reads >= 10, fast
    assert all(r.quality is Quality.GOOD for r in sink.of("healthy"))
    assert slow.reads == 0
    assert slow.read_errors >= 3  # it kept retrying ...
    bad = sink.of("hung")
    assert [r.tag for r in bad] == ["temperature", "running"]  # ... but reported Bad once
    assert all(r.quality is Quality.BAD and r.status == 0x800A0000 for r in bad)
    unreachable = [r for r in caplog.records if "hung unreachable" in r.getMessage()]
    assert len(unreachable) == 1


async def test_recovery_is_reported_once_and_values_resume(
    sims: tuple[ModbusSimulator, ModbusSimulator], caplog: pytest.LogCaptureFixture
) -> None:
    sim, _ = sims
    sink = Sink()
    caplog.set_level(logging.INFO, logger="gateway.poller")
    task = asyncio.create_task(
        poll(ModbusCollector(device("press", sim.port)), 0.1, sink, backoff=Backoff(initial=0.1, cap=0.2))
    )
    try:
        await asyncio.sleep(0.5)
        sim.faults.drop_connections = True  # accepts, then hangs up: looks up, is not
        sim.drop_clients()
        await asyncio.sleep(1.5)
        sim.faults.drop_connections = False
        await asyncio.sleep(1.0)
    finally:
        await cancel([task])
    qualities = [r.quality for r in sink.of("press") if r.tag == "temperature"]
    first_bad = qualities.index(Quality.BAD)
    assert qualities[:first_bad] == [Quality.GOOD] * first_bad
    assert first_bad >= 2
    assert qualities.count(Quality.BAD) == 1
    assert qualities[first_bad + 1 :]
    assert set(qualities[first_bad + 1 :]) == {Quality.GOOD}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("recovered" in m for m in messages) == 1, messages
    # The outbox (and so each output) is told in order: up before the first values, down
    # after the outage's Bad readings, up again before the values that follow it.
    assert sink.states("press") == ["up", "Good", "Bad", "down", "up", "Good"]


async def test_a_read_that_overruns_skips_ticks_and_counts_them(
    sims: tuple[ModbusSimulator, ModbusSimulator],
) -> None:
    sim, _ = sims
    state = DeviceState("press")
    # Two requests per read (holding, coil) at 70 ms each outlast the 100 ms interval.
    sim.faults.latency = 0.07
    await run_for(1.2, poll(ModbusCollector(device("press", sim.port)), 0.1, Sink(), state=state))
    assert state.read_errors == 0
    assert state.reads >= 1
    assert state.missed >= 1
    assert state.reads < 12  # no burst of catch-up reads after each slow one


async def test_connected_is_logged_once_per_connection_that_reads(
    sims: tuple[ModbusSimulator, ModbusSimulator], caplog: pytest.LogCaptureFixture
) -> None:
    """A user reads in the log that the PLCs are being read: once per connection, after its
    first good read, so a device that accepts and hangs up at once logs it no more."""
    sim, _ = sims
    state = DeviceState("press")
    caplog.set_level(logging.INFO, logger="gateway.poller")
    connected = "device press connected (2 tags, 2 requests)"

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    task = asyncio.create_task(
        poll(ModbusCollector(device("press", sim.port)), 0.05, Sink(), state=state,
             backoff=Backoff(initial=0.05, cap=0.1))
    )  # fmt: skip
    try:
        await eventually(lambda: said(connected) == 1, timeout=10, what="the first connect")
        sim.faults.drop_connections = True  # accepts, then hangs up
        sim.drop_clients()
        await eventually(lambda: state.read_errors >= 5, timeout=20, what="several reconnects")
        sim.faults.drop_connections = False
        await eventually(lambda: said("press recovered") == 1, timeout=20, what="the recovery")
    finally:
        await cancel([task])
    assert said(connected) == 2, [r.getMessage() for r in caplog.records]
    # The connections that hung up at once are no reconnects: only the one that read is.
    assert (state.connections, state.reconnects) == (2, 1)


async def test_a_stopped_device_goes_down_in_its_state_and_comes_back(
    sims: tuple[ModbusSimulator, ModbusSimulator],
) -> None:
    """The device's entry in the gateway's State follows a real outage: the simulator
    stops listening (connections refused), then listens again on the same port."""
    sim, _ = sims
    state = DeviceState("press", "modbus")
    started = time.time()
    task = asyncio.create_task(
        poll(ModbusCollector(device("press", sim.port)), 0.05, Sink(), state=state,
             backoff=Backoff(initial=0.05, cap=0.1))
    )  # fmt: skip
    try:
        await eventually(lambda: state.up and state.reads >= 3, timeout=10, what="three good reads")
        assert state.since >= started
        assert (state.read_errors, state.last_error) == (0, None)
        assert (state.connections, state.reconnects) == (1, 0)
        stopped = time.time()
        await sim.stop()
        await eventually(lambda: not state.up, timeout=10, what="the device down")
        assert state.since >= stopped
        assert state.last_error  # whatever pymodbus said, there is something to show
        await eventually(lambda: state.read_errors >= 3, timeout=10, what="failed reconnects")
        reads, down_since = state.reads, state.since
        assert state.reconnects == 0
        restarted = time.time()
        await sim.start()
        await eventually(lambda: state.up, timeout=10, what="the device back")
    finally:
        await cancel([task])
    assert state.since >= restarted > down_since
    assert (state.connections, state.reconnects) == (2, 1)
    assert state.reads > reads
    assert state.last_error is not None  # kept after the recovery: the page shows what it was
