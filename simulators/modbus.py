"""A stamping press served over Modbus TCP, with fault injection. Register map: MODBUS.md.

The TCP side is a small MBAP frame handler on asyncio streams rather than pymodbus's
server: pymodbus 3.16 routes every request through its own SimCore datastore (the
`ModbusDeviceContext` classes are deprecated shims), which leaves no clean place to add
latency, per-range exceptions or dropped connections, and it would need a background task
to copy model values into its blocks. Here each request advances the press model to the
current time and encodes the registers on demand, so there is no background task at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from simulators.signals import Press

log = logging.getLogger(__name__)

SPEED_RANGE = (1, 1200)  # strokes/min a write to holding 5 may set; outside -> exception 03

# --- register map (see MODBUS.md) -------------------------------------------------------

SIZES = {"coil": 16, "discrete": 16, "holding": 100, "input": 100}
PROGRAM = range(10, 20)  # holding registers of the 20-character program name


def _words(fmt: str, value: float) -> list[int]:
    data = struct.pack(">" + fmt, value)
    return list(struct.unpack(f">{len(data) // 2}H", data))


def _cdab(words: list[int]) -> list[int]:
    return [words[1], words[0]]  # low word first; each word stays big-endian


def _text(text: str, registers: int) -> list[int]:
    data = text.encode("ascii", "replace")[: registers * 2].ljust(registers * 2, b"\0")
    return list(struct.unpack(f">{registers}H", data))


def holding_registers(press: Press) -> list[int]:
    regs = [0] * SIZES["holding"]
    regs[0:2] = _words("f", press.temperature)
    regs[2:4] = _words("f", press.oil_temperature)
    regs[4] = _words("h", max(-32768, min(32767, round(press.pressure * 10))))[0]
    regs[5] = press.speed_setpoint
    regs[6] = press.status_word
    regs[7] = round(press.lube_level)
    regs[10:20] = _text(press.program, len(PROGRAM))
    regs[20:24] = _words("d", press.energy_wh)
    regs[30:32] = _words("I", press.strokes)
    return regs


def input_registers(press: Press) -> list[int]:
    regs = [0] * SIZES["input"]
    regs[0:2] = _words("f", press.motor_current)
    regs[10:12] = _cdab(_words("I", press.strokes))
    regs[12:14] = _cdab(_words("I", press.good_parts))
    regs[20] = min(press.cycle_time_ms, 0xFFFF)
    return regs


def coils(press: Press) -> list[bool]:
    return [press.running, press.fault, press.door_open] + [False] * (SIZES["coil"] - 3)


def discrete_inputs(press: Press) -> list[bool]:
    return [press.estop_ok, not press.door_open] + [False] * (SIZES["discrete"] - 2)


class ModbusError(Exception):
    """A request the press answers with a Modbus exception code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"Modbus exception {code:#04x}")
        self.code = code


def write_holding(press: Press, address: int, values: Sequence[int]) -> None:
    """Write holding registers; only the speed setpoint and the program name are writable."""
    addresses = range(address, address + len(values))
    if any(a != 5 and a not in PROGRAM for a in addresses):
        raise ModbusError(0x02)  # read-only or unmapped: refused whole, nothing written
    if 5 in addresses:
        speed = values[addresses.index(5)]
        if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise ModbusError(0x03)
        press.speed_setpoint = speed
    if any(a in PROGRAM for a in addresses):
        regs = holding_registers(press)
        regs[address : address + len(values)] = values
        raw = struct.pack(f">{len(PROGRAM)}H", *regs[PROGRAM.start : PROGRAM.stop])
        press.program = raw.decode("ascii", "replace").rstrip("\0 ")


def write_coils(press: Press, address: int, values: Sequence[bool]) -> None:
    """Coil 0 starts/stops, coil 1 injects/resets a fault, coil 2 opens/closes the guard door."""
    if address + len(values) > 3:
        raise ModbusError(0x02)
    for coil, value in enumerate(values, start=address):
        if coil == 0:
            press.running = value
        elif coil == 1:
            press.fault = value
        else:
            press.door_open = value


# --- Modbus TCP (MBAP) ---------------------------------------------------------------------

# Function code -> the table it touches; these eight are the ones the press implements.
TABLE_OF = (
    dict.fromkeys((1, 5, 15), "coil") | dict.fromkeys((3, 6, 16), "holding") | {2: "discrete", 4: "input"}
)
MAX_COUNT = {1: 2000, 2: 2000, 3: 125, 4: 125, 15: 1968, 16: 123}


@dataclass(frozen=True, slots=True)
class Request:
    function: int
    address: int
    quantity: int
    values: tuple[int, ...]  # written values; coils as 0/1

    @property
    def table(self) -> str:
        return TABLE_OF[self.function]


def parse(pdu: bytes) -> Request:
    """Decode a request PDU; raise ModbusError 01 (function) or 03 (malformed/quantity)."""
    fc = pdu[0]
    if fc not in TABLE_OF:
        raise ModbusError(0x01)
    if fc in (15, 16):
        if len(pdu) < 6:
            raise ModbusError(0x03)
        address, count, nbytes = struct.unpack(">HHB", pdu[1:6])
        expected = (count + 7) // 8 if fc == 15 else 2 * count
        if not 1 <= count <= MAX_COUNT[fc] or nbytes != expected or len(pdu) != 6 + nbytes:
            raise ModbusError(0x03)
        if fc == 16:
            return Request(fc, address, count, struct.unpack(f">{count}H", pdu[6:]))
        return Request(fc, address, count, tuple(pdu[6 + i // 8] >> (i % 8) & 1 for i in range(count)))
    if len(pdu) != 5:
        raise ModbusError(0x03)
    address, value = struct.unpack(">HH", pdu[1:5])
    if fc == 5:
        if value not in (0x0000, 0xFF00):
            raise ModbusError(0x03)
        return Request(fc, address, 1, (int(value == 0xFF00),))
    if fc == 6:
        return Request(fc, address, 1, (value,))
    if not 1 <= value <= MAX_COUNT[fc]:
        raise ModbusError(0x03)
    return Request(fc, address, value, ())


def execute(press: Press, req: Request) -> bytes:
    """Run a parsed request against the press; return the response PDU."""
    if req.address + req.quantity > SIZES[req.table]:
        raise ModbusError(0x02)
    fc, first, end = req.function, req.address, req.address + req.quantity
    if fc in (1, 2):
        bits = (coils if fc == 1 else discrete_inputs)(press)[first:end]
        packed = bytearray((len(bits) + 7) // 8)
        for i, bit in enumerate(bits):
            packed[i // 8] |= bit << (i % 8)
        return bytes([fc, len(packed)]) + packed
    if fc in (3, 4):
        regs = (holding_registers if fc == 3 else input_registers)(press)[first:end]
        return struct.pack(f">BB{len(regs)}H", fc, 2 * len(regs), *regs)
    if fc in (5, 15):
        write_coils(press, first, [bool(v) for v in req.values])
    else:
        write_holding(press, first, req.values)
    if fc in (5, 6):
        return struct.pack(">BHH", fc, first, 0xFF00 if fc == 5 and req.values[0] else req.values[0])
    return struct.pack(">BHH", fc, first, req.quantity)


# --- fault injection and the TCP server ----------------------------------------------------


@dataclass
class Faults:
    """Faults the simulator injects; mutable at run time, each takes effect on the next request."""

    latency: float = 0.0  # seconds added before each response
    exception: int | None = None  # Modbus exception code returned ...
    # ... for requests touching (table, first, last), tables "coil", "discrete", "holding",
    # "input", both ends inclusive; an empty list means every request.
    exception_ranges: list[tuple[str, int, int]] = field(default_factory=list)
    drop_connections: bool = False  # close each connection on accept and at its next request

    def __post_init__(self) -> None:
        unknown = {table for table, _, _ in self.exception_ranges} - SIZES.keys()
        if unknown:
            raise ValueError(f"exception_ranges: unknown table(s) {sorted(unknown)}, use {sorted(SIZES)}")

    def exception_for(self, req: Request) -> int | None:
        """The exception code to inject for `req`, or None to answer it normally."""
        if self.exception is None:
            return None
        if not self.exception_ranges:
            return self.exception
        last = req.address + req.quantity - 1
        hit = any(
            table == req.table and first <= last and req.address <= end
            for table, first, end in self.exception_ranges
        )
        return self.exception if hit else None

    def clear(self) -> None:
        self.latency, self.exception, self.drop_connections = 0.0, None, False
        self.exception_ranges = []


MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit + PDU), unit id


def exception_pdu(function: int, code: int) -> bytes:
    return bytes([function | 0x80, code])


class ModbusSimulator:
    """Serves one independent `Press` per unit id over Modbus TCP.

    An unknown unit id is answered with exception 0x0B (gateway target device failed to
    respond), as a Modbus TCP gateway in front of serial devices does; a client gets a fast,
    explicit error instead of waiting for its timeout.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5020,
        units: Sequence[int] = (1, 2),
        seed: int | None = None,
        tick: float = 0.1,
    ) -> None:
        self.host = host
        self.port = port
        self.faults = Faults()
        # String seeds keep each unit's press reproducible and independent of the others.
        self._presses = {
            unit: Press(seed=None if seed is None else f"{seed}/{unit}", tick=tick) for unit in units
        }
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def press(self, unit: int) -> Press:
        """The machine behind `unit`, brought up to now, so forced state applies from now."""
        press = self._presses[unit]
        press.advance(time.monotonic())
        return press

    async def start(self) -> None:
        """Bind and listen; returns once connections are accepted. `port` is then the real port."""
        now = time.monotonic()
        for press in self._presses.values():
            press.advance(now)  # time starts now, not at the first request
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("modbus simulator listening on %s:%d, units %s", self.host, self.port, sorted(self._presses))

    async def stop(self) -> None:
        """Stop listening, close every client connection and wait for their tasks to end."""
        if self._server is None:
            return
        self._server.close()
        self.drop_clients()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> ModbusSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def drop_clients(self) -> None:
        """Close every open client connection now, as a cable pull or a device reboot would."""
        for writer in self._writers:
            writer.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts our own named task: we can then cancel and await it on
        # stop (Python 3.11's streams log an error when their own handler task is cancelled).
        peer = writer.get_extra_info("peername")
        task = asyncio.create_task(self._serve_client(reader, writer), name=f"modbus-sim-client-{peer}")
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("modbus simulator client handler failed", exc_info=task.exception())

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while not self.faults.drop_connections:
                tid, protocol, length, unit = MBAP.unpack(await reader.readexactly(MBAP.size))
                if protocol != 0 or not 2 <= length <= 254:
                    return  # not Modbus TCP framing; there is no way to resync, so hang up
                pdu = await reader.readexactly(length - 1)
                if self.faults.drop_connections:
                    return
                response = await self._respond(unit, pdu)
                if writer.is_closing():
                    return  # dropped while we were delaying the answer
                writer.write(MBAP.pack(tid, 0, len(response) + 1, unit) + response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away, or drop_clients() closed us
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _respond(self, unit: int, pdu: bytes) -> bytes:
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        press = self._presses.get(unit)
        if press is None:
            return exception_pdu(pdu[0], 0x0B)
        try:
            req = parse(pdu)
            injected = self.faults.exception_for(req)
            if injected is not None:
                return exception_pdu(req.function, injected)
            press.advance(time.monotonic())
            return execute(press, req)
        except ModbusError as exc:
            return exception_pdu(pdu[0], exc.code)


async def serve(
    host: str, port: int, units: Sequence[int], seed: int | None, faults: Faults | None = None
) -> None:
    """Run the simulator, with `faults` injected from the start, until cancelled
    (`millwright simulate modbus`)."""
    async with ModbusSimulator(host, port, units, seed) as sim:
        if faults is not None:
            sim.faults = faults
        await asyncio.Event().wait()  # parked until cancelled; __aexit__ closes everything
