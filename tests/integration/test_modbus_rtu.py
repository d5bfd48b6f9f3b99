"""Modbus RTU over virtual serial lines (socat pty pairs) and RTU over TCP: the collector and
its shared Bus against the bundled simulator, a hand-driven unit, and a third-party master."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import serial

from gateway.app import cancel
from gateway.backoff import Backoff
from gateway.broker import free_port
from gateway.collectors import Collector
from gateway.collectors.modbus.collector import ModbusCollector
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.collectors.registry import make_collectors
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Quality, Reading, Status
from gateway.poller import poll
from gateway.state import DeviceState
from simulators.modbus import ModbusSimulator, SerialSimulator, crc16
from tests.conftest import MakeLine
from tests.helpers import eventually
from tests.hostile_modbus import HostileModbus
from tests.hostile_modbus import Request as HostileRequest
from tests.integration.test_modbus_collector import TAGS, by_tag
from tests.integration.test_poller import Sink
from tests.serial_line import VirtualLine


def rtu(port: str, name: str = "press-1", unit: int = 1, **fields: Any) -> ModbusDevice:
    """A device on the virtual line `port` (parity N: see tests.serial_line)."""
    return ModbusDevice.model_validate(
        {"name": name, "protocol": "modbus", "serial": {"port": port, "parity": "N"}, "unit": unit,
         "timeout": "200ms", "tags": TAGS, **fields}
    )  # fmt: skip


def collectors(*devices: ModbusDevice) -> list[ModbusCollector]:
    """The gateway's collectors of `devices` (those on one connection share its Bus)."""
    made = [c for _, c in make_collectors(list(devices), Path())]
    assert all(isinstance(c, ModbusCollector) for c in made)
    return cast(list[ModbusCollector], made)


@asynccontextmanager
async def connected(*devices: ModbusDevice) -> AsyncIterator[list[ModbusCollector]]:
    """The gateway's collectors of `devices`, connected; closed on the way out."""
    made = collectors(*devices)
    try:
        for collector in made:
            await collector.connect()
        yield made
    finally:
        for collector in made:
            await collector.close()


@pytest.fixture
def line(make_line: MakeLine) -> VirtualLine:
    return make_line()


@pytest.fixture
async def sim(line: VirtualLine) -> AsyncIterator[SerialSimulator]:
    async with SerialSimulator(line.a, units=(1, 2), seed=7, parity="N") as simulator:
        yield simulator


async def read_all(*cs: Collector) -> list[list[Reading]]:
    return list(await asyncio.gather(*(c.read() for c in cs)))


async def mbpoll(*args: str) -> str:
    """Run mbpoll (libmodbus) once as an RTU master on a virtual line; its output."""
    process = await asyncio.create_subprocess_exec(
        "mbpoll", "-m", "rtu", "-b", "19200", "-P", "none", "-1", "-o", "1", *args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    return out.decode()


async def test_a_third_party_master_reads_and_writes_the_simulator(
    line: VirtualLine, sim: SerialSimulator
) -> None:
    # mbpoll's -r is 1-based: holding 10-14 is -r 11. The program name is PART-4711.
    out = await mbpoll("-a", "1", "-t", "4:hex", "-r", "11", "-c", "5", line.b)
    words = [int(w, 16) for w in re.findall(r"^\[\d+\]:\s+(0x[0-9A-Fa-f]+)", out, re.MULTILINE)]
    assert b"".join(w.to_bytes(2, "big") for w in words) == b"PART-4711\0"
    await mbpoll("-a", "2", "-t", "4", "-r", "6", line.b, "120")  # write speed, unit 2
    assert sim.press(2).speed_setpoint == 120
    assert sim.press(1).speed_setpoint == 30


async def test_every_table_and_type_over_rtu(line: VirtualLine, sim: SerialSimulator) -> None:
    press = sim.press(1)
    press.running = False  # no strokes between the requests: the counters can be compared
    async with connected(rtu(line.b)) as (collector,):
        r = by_tag(await collector.read())
    assert all(reading.quality is Quality.GOOD for reading in r.values()), r
    assert r["program"].value == "PART-4711"
    assert r["speed_setpoint"].value == 30
    assert r["strokes"].value == r["strokes_in"].value == press.strokes  # ABCD holding, CDAB input
    assert r["good_parts"].value == press.good_parts
    assert r["running"].value is False
    assert r["status_running"].value is False
    assert r["temperature"].value == pytest.approx(press.temperature, abs=0.5)
    assert r["energy_wh"].value == pytest.approx(press.energy_wh, rel=1e-3)
    assert r["estop_ok"].value is press.estop_ok


async def test_two_units_share_one_line_one_request_at_a_time(
    line: VirtualLine, sim: SerialSimulator
) -> None:
    sim.press(2).speed_setpoint = 77
    async with connected(rtu(line.b, "press-1", 1), rtu(line.b, "press-2", 2)) as (one, two):
        # Both at once, over and over: without one request at a time their frames would
        # collide on the line, and answers go to the wrong unit or none.
        for _ in range(10):
            first, second = map(by_tag, await read_all(one, two))
            assert (first["speed_setpoint"].value, second["speed_setpoint"].value) == (30, 77)
            assert all(reading.quality is Quality.GOOD for reading in [*first.values(), *second.values()])


async def _pollers(
    devices: list[ModbusDevice], sink: Sink, backoff: Callable[[], Backoff]
) -> tuple[dict[str, DeviceState], list[asyncio.Task[None]]]:
    states = {d.name: DeviceState(d.name) for d in devices}
    tasks = [
        asyncio.create_task(poll(c, d.poll, sink, state=states[d.name], backoff=backoff()))
        for d, c in zip(devices, collectors(*devices), strict=True)
    ]
    return states, tasks


async def test_an_absent_unit_is_bad_once_and_does_not_slow_the_others(
    line: VirtualLine, sim: SerialSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.poller")
    tags = TAGS[:2]
    devices = [rtu(line.b, name, unit, poll="200ms", timeout="100ms", tags=tags)
               for name, unit in (("press-1", 1), ("press-2", 2), ("absent", 9))]  # fmt: skip
    sink = Sink()
    states, tasks = await _pollers(devices, sink, lambda: Backoff(initial=0.5, cap=2.0))
    try:
        absent, present = states["absent"], [states["press-1"], states["press-2"]]
        await eventually(lambda: absent.read_errors >= 1, timeout=10, what="the absent unit's first timeout")
        reads = [s.reads for s in present]
        await eventually(
            lambda: absent.read_errors >= 3, timeout=20, what="two more tries of the absent unit"
        )
    finally:
        await cancel(tasks)
    # Its backoff waited 0.5 s and 1 s between those tries: 7 ticks of the others at 200 ms.
    # Had its timeouts held the line for longer than they do, the others would fall behind.
    assert all(s.reads - before >= 4 for s, before in zip(present, reads, strict=True)), states
    assert [(r.tag, r.status) for r in sink.of("absent")] == [(t["name"], Status.BAD_TIMEOUT) for t in tags]
    assert all(r.quality is Quality.GOOD for name in ("press-1", "press-2") for r in sink.of(name))
    unreachable = [r for r in caplog.records if "absent unreachable" in r.getMessage()]
    assert len(unreachable) == 1


async def test_the_line_going_away_and_coming_back(
    line: VirtualLine, sim: SerialSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    devices = [rtu(line.b, "press-1", 1, poll="100ms", tags=TAGS[:2]),
               rtu(line.b, "press-2", 2, poll="100ms", tags=TAGS[:2])]  # fmt: skip
    sink = Sink()
    states, tasks = await _pollers(devices, sink, lambda: Backoff(initial=0.1, cap=0.5))
    try:
        await eventually(lambda: all(s.reads >= 2 for s in states.values()), timeout=10, what="both read")
        line.stop()  # the adapter unplugged: the port disappears
        await eventually(lambda: all(sink.states(n)[-1] == "down" for n in states), timeout=10, what="down")
        errors = {n: s.read_errors for n, s in states.items()}
        await eventually(lambda: all(s.read_errors >= errors[n] + 2 for n, s in states.items()),
                         timeout=10, what="retries while the port is gone")  # fmt: skip
        assert all(not s.up for s in states.values())
        line.start()  # plugged in again, same path
        marks = {n: len(sink.of(n)) for n in states}
        await eventually(
            lambda: all(len(sink.of(n)) > marks[n] for n in states), timeout=20, what="values again"
        )
    finally:
        await cancel(tasks)
    for name in states:
        assert sink.states(name) == ["up", "Good", "Bad", "down", "up", "Good"], (name, sink.states(name))
        bad = [r for r in sink.of(name) if r.quality is Quality.BAD]
        assert len(bad) == 2  # once per tag, however often it retried
    # One line for the line, not one per device, nor one per retry.
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("gateway")
    ]
    assert warnings == [
        f"serial port {line.b} was lost (adapter unplugged?): devices press-1, press-2 are unreachable "
        "until it is back"
    ]


async def test_units_behind_one_rtu_over_tcp_server_share_its_one_connection(make_line: MakeLine) -> None:
    port = free_port()
    # socat accepts one TCP connection and passes the bytes to the pty: a serial device
    # server. A second connection would be refused.
    server = make_line(tcp_port=port)
    async with SerialSimulator(server.a, units=(1, 2), seed=3, parity="N") as sim:
        sim.press(2).speed_setpoint = 55
        tcp = {"host": "127.0.0.1", "port": port, "framer": "rtu", "timeout": "300ms", "tags": TAGS[3:6]}
        async with connected(
            ModbusDevice.model_validate({"name": "drive-1", "protocol": "modbus", "unit": 1, **tcp}),
            ModbusDevice.model_validate({"name": "drive-2", "protocol": "modbus", "unit": 2, **tcp}),
        ) as (one, two):
            for _ in range(5):
                first, second = map(by_tag, await read_all(one, two))
                assert (first["speed_setpoint"].value, second["speed_setpoint"].value) == (30, 55)


async def test_units_behind_one_modbus_tcp_gateway_share_one_connection() -> None:
    async with ModbusSimulator(port=0, units=(1, 2), seed=5) as sim:
        sim.press(2).speed_setpoint = 44
        tcp = {"host": "127.0.0.1", "port": sim.port, "timeout": "300ms", "tags": TAGS[3:6]}
        async with connected(
            ModbusDevice.model_validate({"name": "plc-1", "protocol": "modbus", "unit": 1, **tcp}),
            ModbusDevice.model_validate({"name": "plc-2", "protocol": "modbus", "unit": 2, **tcp}),
        ) as (one, two):
            first, second = map(by_tag, await read_all(one, two))
            assert (first["speed_setpoint"].value, second["speed_setpoint"].value) == (30, 44)
            assert sim.connections == 1
            await one.close()  # one device letting go keeps the connection for the other
            assert sim.connections == 1
            assert by_tag(await two.read())["speed_setpoint"].value == 44
        await eventually(lambda: sim.connections == 0, what="the last one out closes it")


async def test_busy_is_asked_again_before_it_is_bad(line: VirtualLine, sim: SerialSimulator) -> None:
    tags = [TAGS[3]]  # speed_setpoint: one request
    async with connected(rtu(line.b, busy_retries=3, busy_wait="20ms", tags=tags)) as (patient,):
        sim.faults.busy = 2
        (reading,) = await patient.read()
        assert (reading.quality, reading.value) == (Quality.GOOD, 30)
        assert sim.faults.busy == 0
        sim.faults.busy = 10
        (reading,) = await patient.read()
        assert (reading.quality, reading.status) == (Quality.BAD, Status.BAD_COMMUNICATION_ERROR)
        assert sim.faults.busy == 10 - 4  # the request and three more tries


# --- a unit driven by hand: what a real line can deliver ---------------------------------

SPEED = [{"name": "speed", "table": "holding", "address": 5}]
REQUEST = bytes([1, 3, 0, 5, 0, 1])  # unit 1, read holding 5, one register


def frame(*body: int) -> bytes:
    data = bytes(body)
    return data + crc16(data)


def answer(value: int, unit: int = 1) -> bytes:
    return frame(unit, 3, 2, value >> 8, value & 0xFF)


class HandUnit:
    """The unit end of a line, answering each request with the next of `replies`: a list of
    writes, each (bytes, then a pause in seconds). `arrived` and `answered` keep when each
    request was read and when the last write of its reply went out (monotonic)."""

    def __init__(self, port: str) -> None:
        self.port = serial.Serial(port, 19200, timeout=0)
        self.replies: list[list[tuple[bytes, float]]] = []
        self.requests: list[bytes] = []
        self.arrived: list[float] = []
        self.answered: list[float] = []
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self.port.fileno(), readable.set)
        data = b""
        try:
            while True:
                await readable.wait()
                readable.clear()
                data += self.port.read(4096)
                while len(data) >= 8:
                    request, data = data[:8], data[8:]
                    self.requests.append(request)
                    self.arrived.append(time.monotonic())
                    for chunk, pause in self.replies.pop(0):
                        self.port.write(chunk)
                        await asyncio.sleep(pause)
                    self.answered.append(time.monotonic())
        finally:
            loop.remove_reader(self.port.fileno())

    async def close(self) -> None:
        await cancel([self._task])
        self.port.close()


async def test_noise_half_frames_and_other_units_frames_are_never_taken_for_an_answer(
    line: VirtualLine,
) -> None:
    unit = HandUnit(line.a)
    (collector,) = collectors(rtu(line.b, tags=SPEED))

    async def read() -> Reading:
        await collector.connect()
        (reading,) = await collector.read()
        return reading

    try:
        unit.replies = [
            [(b"\x00\xff\x13\x37" + answer(30), 0)],  # noise on the line, then the answer
            [(answer(99, unit=2), 0), (answer(31), 0)],  # a late answer of another unit first
            [(answer(32)[:3], 0.05), (answer(32)[3:], 0)],  # one answer in two pieces
            [(frame(1, 3, 4, 0, 33, 0, 34), 0)],  # two registers for one: the length is wrong
            [(frame(1, 0x83, 4), 0)],  # exception 04
            [(frame(1, 4, 2, 0, 35), 0)],  # another function's answer
        ]
        assert (await read()).value == 30
        assert (await read()).value == 31
        assert (await read()).value == 32
        wrong_length = await read()
        assert (wrong_length.quality, wrong_length.status) == (Quality.BAD, Status.BAD_DECODING_ERROR)
        exception = await read()
        assert (exception.quality, exception.status) == (Quality.BAD, Status.BAD_COMMUNICATION_ERROR)
        other_function = await read()
        assert (other_function.quality, other_function.status) == (
            Quality.BAD,
            Status.BAD_COMMUNICATION_ERROR,
        )
        for fault in (answer(36)[:4], answer(37)[:-1] + b"\x00"):  # half a frame; a bad CRC
            unit.replies.append([(fault, 0)])
            with pytest.raises(DeviceTimeout):
                await read()
            await collector.close()
            unit.replies.append([(answer(38), 0)])
            assert (await read()).value == 38  # and the line is usable at once
        assert all(request[:6] == REQUEST and request[6:] == crc16(REQUEST) for request in unit.requests)
    finally:
        await collector.close()
        await unit.close()


async def test_a_late_answer_of_a_unit_is_not_taken_for_its_next_request(line: VirtualLine) -> None:
    # Two requests to one unit; the second is answered late. Nothing in an RTU frame says
    # which request it answers: asked at once again, the unit's late answer would pass for
    # the answer to the next request.
    unit = HandUnit(line.a)
    tags = [{"name": "x", "table": "holding", "address": 5}, {"name": "y", "table": "holding", "address": 60}]
    (collector,) = collectors(rtu(line.b, timeout="100ms", tags=tags))
    x, y = answer(11), answer(22)  # the same function and length: only the order tells them apart
    try:
        unit.replies = [[(x, 0)], [(b"", 0.3), (y, 0)], [(x, 0)], [(y, 0)]]  # y comes 0.3 s late
        await collector.connect()
        with pytest.raises(DeviceTimeout):
            await collector.read()
        await collector.close()
        await collector.connect()  # at once, as a poller with no backoff would
        values = {r.tag: (r.quality, r.value) for r in await collector.read()}
        assert values == {"x": (Quality.GOOD, 11), "y": (Quality.GOOD, 22)}
        assert len(unit.requests) == 4  # nothing asked while the late answer could still come
    finally:
        await collector.close()
        await unit.close()


async def test_a_unit_that_needs_a_longer_silence_gets_it(line: VirtualLine) -> None:
    unit = HandUnit(line.a)
    (collector,) = collectors(rtu(line.b, frame_gap="150ms", tags=SPEED))
    try:
        unit.replies = [[(answer(n), 0)] for n in range(4)]
        await collector.connect()
        for n in range(4):
            (reading,) = await collector.read()
            assert reading.value == n
        # From the end of each answer to the next request: at least the unit's frame gap.
        silences = [
            arrived - answered for answered, arrived in zip(unit.answered, unit.arrived[1:], strict=False)
        ]
        assert len(silences) == 3
        assert all(silence >= 0.15 for silence in silences), silences
    finally:
        await collector.close()
        await unit.close()


async def test_a_port_that_is_not_there_is_named(tmp_path: Any) -> None:
    (collector,) = collectors(rtu(str(tmp_path / "ttyUSB7")))
    with pytest.raises(NotConnected, match=r"serial port .*ttyUSB7 does not exist \(adapter unplugged\?\)"):
        await collector.connect()
    await collector.close()


LateAnswer = Callable[[HostileModbus, HostileRequest], bytes | None]


async def behind_one_tcp_gateway(answer: LateAnswer) -> None:
    """Units 1 and 9 behind one Modbus TCP gateway, which `answer` plays: unit 9 times out,
    then unit 1's answer comes through as Good, on the same one connection."""
    async with HostileModbus() as server:
        server.answer = lambda request: answer(server, request)
        tcp = {
            "protocol": "modbus",
            "host": server.host,
            "port": server.port,
            "timeout": "200ms",
            "tags": SPEED,
        }
        async with connected(
            ModbusDevice.model_validate({"name": "plc", "unit": 1, **tcp}),
            ModbusDevice.model_validate({"name": "slow", "unit": 9, **tcp}),
        ) as (plc, slow):
            with pytest.raises(DeviceTimeout):
                await slow.read()
            (reading,) = await plc.read()
            assert (reading.quality, reading.value) == (Quality.GOOD, server.memory[3][5])
            assert server.connections == 1  # nobody's connection was given up


async def test_a_late_answer_on_a_shared_tcp_connection_is_not_taken_for_the_next() -> None:
    late: list[bytes] = []

    def answer(server: HostileModbus, request: HostileRequest) -> bytes | None:
        if request.unit == 9:  # answers, but only after the gateway gave up on it
            late.append(server.correct(request))
            return None
        frames = [*late, server.correct(request)]  # the late answer first, then unit 1's
        late.clear()
        return b"".join(frames)

    await behind_one_tcp_gateway(answer)


async def test_the_rest_of_a_late_answer_cut_off_by_the_next_request_is_skipped() -> None:
    # The first half of the late answer came before the next request was sent, and pymodbus
    # empties its buffer when it sends: what is left of it is no MBAP frame at all.
    rest: list[bytes] = []

    def answer(server: HostileModbus, request: HostileRequest) -> bytes | None:
        if request.unit == 9:
            whole = server.correct(request)
            rest.append(whole[5:])
            return whole[:5]
        frames = [*rest, server.correct(request)]
        rest.clear()
        return b"".join(frames)

    await behind_one_tcp_gateway(answer)
