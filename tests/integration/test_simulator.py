"""The Modbus TCP press simulator, over a real loopback socket, with pymodbus's client."""

import asyncio
import struct
import threading
import time
from collections.abc import AsyncIterator

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException

from simulators.modbus import Faults, ModbusSimulator

DT = AsyncModbusTcpClient.DATATYPE


async def settle(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Give closing tasks a few loop turns (pymodbus's close() only cancels its reconnect task)."""
    leftover: set[asyncio.Task[object]] = set()
    for _ in range(50):
        leftover = asyncio.all_tasks() - before - {asyncio.current_task()}
        if not leftover:
            break
        await asyncio.sleep(0.01)
    return leftover


@pytest.fixture
async def sim() -> AsyncIterator[ModbusSimulator]:
    tasks, threads = asyncio.all_tasks(), threading.active_count()
    async with ModbusSimulator(port=0, seed=42) as simulator:
        yield simulator
    assert not await settle(tasks), "simulator or client left tasks running"
    assert threading.active_count() == threads


@pytest.fixture
async def client(sim: ModbusSimulator) -> AsyncIterator[AsyncModbusTcpClient]:
    modbus = AsyncModbusTcpClient("127.0.0.1", port=sim.port, timeout=2, retries=0)
    assert await modbus.connect()
    yield modbus
    modbus.close()


async def holding(client: AsyncModbusTcpClient, address: int, count: int, unit: int = 1) -> list[int]:
    rr = await client.read_holding_registers(address, count=count, device_id=unit)
    assert not rr.isError(), rr
    return rr.registers


async def strokes(client: AsyncModbusTcpClient, unit: int = 1, address: int = 10) -> int:
    """A uint32 counter in word order CDAB: input 10-11 strokes, 12-13 good parts."""
    rr = await client.read_input_registers(address, count=2, device_id=unit)
    assert not rr.isError(), rr
    value = client.convert_from_registers(rr.registers, DT.UINT32, word_order="little")  # CDAB
    assert isinstance(value, int)
    return value


async def raw_exchange(port: int, frame: bytes) -> bytes:
    """Send one raw MBAP frame; return the reply PDU (for requests pymodbus will not send)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(frame)
        _, _, length, _ = struct.unpack(">HHHB", await asyncio.wait_for(reader.readexactly(7), 2))
        return await asyncio.wait_for(reader.readexactly(length - 1), 2)
    finally:
        writer.close()
        await writer.wait_closed()


def mbap(pdu: bytes, unit: int = 1) -> bytes:
    return struct.pack(">HHHB", 7, 0, len(pdu) + 1, unit) + pdu


# --- values --------------------------------------------------------------------------------


async def test_register_map_decodes_to_plausible_values(sim, client):
    regs = await holding(client, 0, 32)
    temperature = client.convert_from_registers(regs[0:2], DT.FLOAT32)
    oil = client.convert_from_registers(regs[2:4], DT.FLOAT32)
    pressure = client.convert_from_registers(regs[4:5], DT.INT16)
    energy = client.convert_from_registers(regs[20:24], DT.FLOAT64)
    program = client.convert_from_registers(regs[10:20], DT.STRING)
    total_be = client.convert_from_registers(regs[30:32], DT.UINT32)
    assert 20.0 <= temperature <= 80.0
    assert 20.0 <= oil <= 80.0
    assert 0 <= pressure <= 1700  # 0.1 bar: at most 170 bar
    assert regs[5] == 30  # strokes/min
    assert regs[6] & 0b11 == 0b01  # running, no fault
    assert program == "PART-4711"
    assert energy > 0
    assert regs[8:10] == [0, 0]  # unmapped inside the table reads 0
    assert total_be == await strokes(client)  # same counter, ABCD vs CDAB
    current = client.convert_from_registers(
        (await client.read_input_registers(0, count=2, device_id=1)).registers, DT.FLOAT32
    )
    assert 5.0 <= current <= 15.0
    bits = await client.read_coils(0, count=3, device_id=1)
    assert bits.bits[:3] == [True, False, False]
    inputs = await client.read_discrete_inputs(0, count=2, device_id=1)
    assert inputs.bits[:2] == [True, True]


async def test_values_change_over_time(sim, client):
    first = await holding(client, 0, 24)
    await asyncio.sleep(0.3)
    second = await holding(client, 0, 24)
    assert first[0:2] != second[0:2]  # the temperature moves (noise at least)
    assert client.convert_from_registers(second[20:24], DT.FLOAT64) > client.convert_from_registers(
        first[20:24], DT.FLOAT64
    )


async def test_counter_increases_while_running_and_stops_when_stopped(sim, client):
    assert not (await client.write_register(5, 600, device_id=1)).isError()  # 10 strokes/s
    assert await holding(client, 5, 1) == [600]
    before = await strokes(client)
    good_before = await strokes(client, address=12)
    await asyncio.sleep(0.5)
    after = await strokes(client)
    assert after - before >= 2
    good_after = await strokes(client, address=12)
    assert 0 < good_after - good_before <= after - before
    cycle = (await client.read_input_registers(20, count=1, device_id=1)).registers[0]
    assert 90 <= cycle <= 110  # ms at 600 strokes/min, +-1 %

    assert not (await client.write_coil(0, False, device_id=1)).isError()
    stopped = await strokes(client)
    await asyncio.sleep(0.3)
    assert await strokes(client) == stopped
    assert (await holding(client, 6, 1))[0] & 1 == 0
    assert (await client.read_coils(0, count=1, device_id=1)).bits[0] is False


async def test_pressure_pulses_while_running(sim, client):
    await client.write_register(5, 120, device_id=1)  # a stroke every 0.5 s
    samples = []
    for _ in range(30):
        samples.append((await holding(client, 4, 1))[0])
        await asyncio.sleep(0.04)
    assert max(samples) > 800  # 80 bar and up during the stroke
    assert min(samples) < 100


async def test_units_are_independent_presses(sim, client):
    assert await strokes(client, 1) != await strokes(client, 2)
    sim.press(1).running = False
    regs_1, regs_2 = await holding(client, 6, 1, unit=1), await holding(client, 6, 1, unit=2)
    assert (regs_1[0] & 1, regs_2[0] & 1) == (0, 1)


async def test_writes_reach_the_model(sim, client):
    name = client.convert_to_registers("PART-0815", DT.STRING)
    assert not (await client.write_registers(10, name, device_id=1)).isError()
    assert sim.press(1).program == "PART-0815"
    assert not (await client.write_coil(2, True, device_id=1)).isError()  # open the guard
    assert sim.press(1).door_open
    assert (await client.read_discrete_inputs(1, count=1, device_id=1)).bits[0] is False
    assert (await holding(client, 6, 1))[0] & 0b101 == 0b100  # door open, so stopped
    assert not (await client.write_coils(1, [True], device_id=1)).isError()  # inject a fault
    assert sim.press(1).fault


# --- protocol errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.read_holding_registers(99, count=2, device_id=1), 2),  # past the end
        (lambda c: c.read_input_registers(100, count=1, device_id=1), 2),
        (lambda c: c.read_coils(15, count=2, device_id=1), 2),
        (lambda c: c.read_discrete_inputs(16, count=1, device_id=1), 2),
        (lambda c: c.write_register(0, 1, device_id=1), 2),  # read-only register
        (lambda c: c.write_coil(3, True, device_id=1), 2),
        (lambda c: c.write_register(5, 0, device_id=1), 3),  # speed out of range
        (lambda c: c.read_holding_registers(0, count=2, device_id=9), 0x0B),  # unknown unit
    ],
)
async def test_exception_responses(sim, client, call, code):
    rr = await call(client)
    assert rr.isError()
    assert rr.exception_code == code


@pytest.mark.parametrize(
    ("pdu", "reply"),
    [
        (bytes([0x2B, 0x0E, 0x01, 0x00]), bytes([0xAB, 0x01])),  # unsupported function
        (struct.pack(">BHH", 3, 0, 126), bytes([0x83, 0x03])),  # quantity above 125
        (struct.pack(">BHH", 3, 0, 0), bytes([0x83, 0x03])),
        (struct.pack(">BHH", 5, 0, 0x1234), bytes([0x85, 0x03])),  # coil value not FF00/0000
        (struct.pack(">BHHB", 16, 5, 1, 3) + b"\0\0\0", bytes([0x90, 0x03])),  # byte count mismatch
        (struct.pack(">BHH", 3, 5, 1), bytes([0x03, 0x02, 0x00, 30])),  # a good one
    ],
)
async def test_raw_requests(sim, pdu, reply):
    assert await raw_exchange(sim.port, mbap(pdu)) == reply


# --- fault injection -----------------------------------------------------------------------


async def test_latency_is_added_to_each_response(sim, client):
    sim.faults.latency = 0.3
    began = time.monotonic()
    await holding(client, 0, 2)
    assert time.monotonic() - began >= 0.3
    sim.faults.latency = 0.0


async def test_exception_for_chosen_ranges_only(sim, client):
    sim.faults.exception = 4
    sim.faults.exception_ranges = [("holding", 4, 4)]
    assert len(await holding(client, 0, 4)) == 4  # 0-3 does not touch 4
    rr = await client.read_holding_registers(0, count=10, device_id=1)
    assert (rr.isError(), rr.exception_code) == (True, 4)
    assert not (await client.read_input_registers(4, count=1, device_id=1)).isError()  # other table

    sim.faults.exception_ranges = []  # now every request
    rr = await client.read_input_registers(0, count=2, device_id=1)
    assert (rr.isError(), rr.exception_code) == (True, 4)

    sim.faults.clear()
    assert len(await holding(client, 0, 10)) == 10


def test_faults_reject_unknown_tables():
    with pytest.raises(ValueError, match="unknown table"):
        Faults(exception=2, exception_ranges=[("holdings", 0, 1)])


async def test_drop_connections_closes_new_and_existing_clients(sim):
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    sim.faults.drop_connections = True
    writer.write(mbap(struct.pack(">BHH", 3, 0, 2)))  # answered by a close, not a reply
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    await writer.wait_closed()

    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed right after accept
    writer.close()
    await writer.wait_closed()

    sim.faults.drop_connections = False
    assert await raw_exchange(sim.port, mbap(struct.pack(">BHH", 3, 5, 1))) == bytes([3, 2, 0, 30])


async def test_drop_clients_is_seen_by_pymodbus(sim, client):
    await holding(client, 0, 2)
    sim.drop_clients()
    for _ in range(200):  # the client learns of the close on a later loop turn
        if not client.connected:
            break
        await asyncio.sleep(0.01)
    assert not client.connected
    with pytest.raises(ConnectionException):
        await client.read_holding_registers(0, count=2, device_id=1)
    assert await client.connect()  # the simulator is still listening
    assert len(await holding(client, 0, 2)) == 2


async def test_stop_closes_open_connections():
    tasks = asyncio.all_tasks()
    simulator = ModbusSimulator(port=0)
    await simulator.start()
    assert simulator.port != 0
    reader, writer = await asyncio.open_connection("127.0.0.1", simulator.port)
    simulator.faults.latency = 5.0  # a handler parked in its delay must be cancelled, not awaited
    writer.write(mbap(struct.pack(">BHH", 3, 0, 2)))
    await asyncio.sleep(0.05)
    began = time.monotonic()
    await simulator.stop()
    assert time.monotonic() - began < 2.0
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    await writer.wait_closed()
    assert not await settle(tasks)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", simulator.port)
