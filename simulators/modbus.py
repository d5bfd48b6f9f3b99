"""A stamping press served over Modbus TCP or RTU on a serial line, with fault injection.
Register map: MODBUS.md.

The TCP side is a small MBAP frame handler on asyncio streams rather than pymodbus's
server: pymodbus 3.16 routes every request through its own SimCore datastore (the
`ModbusDeviceContext` classes are deprecated shims), which leaves no clean place to add
latency, per-range exceptions or dropped connections, and it would need a background task
to copy model values into its blocks. Here each request advances the press model to the
current time and encodes the registers on demand, so there is no background task at all.

`SerialSimulator` serves the same presses as RTU units on a serial line: a real port, or
one end of a virtual line (a socat pty pair). A request to a unit it does not serve, or
with a bad CRC, gets silence, as on a real bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

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
    # (on a serial line: answer nothing, as a unit that was switched off)
    busy: int = 0  # answer the next this many requests with exception 06 (busy), then normally

    def __post_init__(self) -> None:
        unknown = {table for table, _, _ in self.exception_ranges} - SIZES.keys()
        if unknown:
            raise ValueError(f"exception_ranges: unknown table(s) {sorted(unknown)}, use {sorted(SIZES)}")

    def exception_for(self, req: Request) -> int | None:
        """The exception code to inject for `req`, or None to answer it normally."""
        if self.busy > 0:
            self.busy -= 1
            return 0x06
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
        self.latency, self.exception, self.drop_connections, self.busy = 0.0, None, False, 0
        self.exception_ranges = []


MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit + PDU), unit id


def exception_pdu(function: int, code: int) -> bytes:
    return bytes([function | 0x80, code])


class _Presses:
    """One independent `Press` per unit id, and the faults injected into their answers."""

    def __init__(self, units: Sequence[int], seed: int | None, tick: float) -> None:
        self.faults = Faults()
        # String seeds keep each unit's press reproducible and independent of the others.
        self._presses = {
            unit: Press(seed=None if seed is None else f"{seed}/{unit}", tick=tick) for unit in units
        }

    @property
    def units(self) -> list[int]:
        return sorted(self._presses)

    def press(self, unit: int) -> Press:
        """The machine behind `unit`, brought up to now, so forced state applies from now."""
        press = self._presses[unit]
        press.advance(time.monotonic())
        return press

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _start_clocks(self) -> None:
        now = time.monotonic()
        for press in self._presses.values():
            press.advance(now)  # time starts now, not at the first request

    async def _respond(self, unit: int, pdu: bytes) -> bytes | None:
        """The answer PDU to `pdu` for `unit`; None when no press serves that unit."""
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        press = self._presses.get(unit)
        if press is None:
            return None
        try:
            req = parse(pdu)
            injected = self.faults.exception_for(req)
            if injected is not None:
                return exception_pdu(req.function, injected)
            press.advance(time.monotonic())
            return execute(press, req)
        except ModbusError as exc:
            return exception_pdu(pdu[0], exc.code)


class ModbusSimulator(_Presses):
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
        super().__init__(units, seed, tick)
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and listen; returns once connections are accepted. `port` is then the real port."""
        self._start_clocks()
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

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._writers)

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
                if response is None:
                    response = exception_pdu(pdu[0], 0x0B)
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


# --- Modbus RTU on a serial line -----------------------------------------------------------

# A partial request left on the line this long is noise: it is dropped. (Not the 3.5
# character times of the spec: a USB adapter hands bytes over in bursts up to 16 ms apart.)
STALE = 0.1
MAX_RTU = 256  # the longest RTU frame


def crc16(data: bytes) -> bytes:
    """The Modbus CRC of `data`, as it goes on the wire (low byte first)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def request_length(frame: bytes) -> int:
    """Bytes of the RTU request that `frame` begins; 0 when its function is unknown or its
    length cannot be told yet."""
    function = frame[1]
    if function in (1, 2, 3, 4, 5, 6):
        return 8  # unit, function, address, count or value, CRC
    if function in (15, 16) and len(frame) > 6:
        return 9 + frame[6]  # ... and a byte count, the values
    return 0


def next_request(data: bytes) -> tuple[bytes | None, bytes]:
    """The first complete request with a good CRC in `data`, and what is left after it; or
    None and the bytes that may still begin one. Noise before a request is skipped."""
    keep = None
    for start in range(len(data) - 3):
        length = request_length(data[start:])
        end = start + length
        if length and end <= len(data) and crc16(data[start : end - 2]) == data[end - 2 : end]:
            return data[start:end], data[end:]
        # A request still arriving: its length is known and not all there, or it is a
        # write whose byte count has not come yet.
        arriving = end > len(data) if length else data[start + 1] in (15, 16)
        if keep is None and arriving:
            keep = start
    keep = max(keep if keep is not None else len(data) - 3, len(data) - MAX_RTU, 0)
    return None, data[keep:]


class SerialSimulator(_Presses):
    """Serves one `Press` per unit id as Modbus RTU units on one serial line.

    `port` is a serial port or one end of a virtual line. A request to a unit not served,
    a broadcast (unit 0), or a frame with a bad CRC gets no answer. When the port goes away
    (an adapter unplugged, socat stopped) the simulator opens it again once it is back.
    `pace` holds each answer back by the time the request and the answer would take on
    the wire at `baudrate`, and the silence before the answer: a virtual line passes bytes
    at once, whatever its settings.
    """

    def __init__(
        self,
        port: str,
        units: Sequence[int] = (1, 2),
        seed: int | None = None,
        tick: float = 0.1,
        *,
        baudrate: int = 19200,
        parity: str = "E",
        stopbits: int = 1,
        pace: bool = False,
    ) -> None:
        super().__init__(units, seed, tick)
        self.port = port
        self.baudrate, self.parity, self.stopbits = baudrate, parity, stopbits
        self.char_time = (1 + 8 + (parity != "N") + stopbits) / baudrate
        # The silence before a frame: 3.5 characters, fixed above 19200 baud.
        self.gap = 0.00175 if baudrate > 19200 else 3.5 * self.char_time
        self.pace = pace
        self.requests = 0  # requests answered, for tests and the bench
        self._task: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()

    async def start(self) -> None:
        """Start serving; returns once the port is open."""
        self._start_clocks()
        self._task = asyncio.create_task(self._serve(), name=f"modbus-sim-serial-{self.port}")
        await self._opened.wait()
        log.info("modbus simulator on serial %s (%d baud, parity %s), units %s",
                 self.port, self.baudrate, self.parity, self.units)  # fmt: skip

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _serve(self) -> None:
        import serial  # pyserial (a dependency of the gateway's serial lines)

        missing = False
        while True:
            try:
                line = serial.Serial(self.port, self.baudrate, parity=self.parity, stopbits=self.stopbits,
                                     timeout=0, write_timeout=0)  # fmt: skip
            except (OSError, ValueError, termios.error) as exc:  # (termios: a pty whose other end is gone)
                if not missing:
                    log.warning("modbus simulator: cannot open %s (%s); waiting for it", self.port, exc)
                missing = True
                await asyncio.sleep(STALE)
                continue
            missing = False
            self._opened.set()
            try:
                await self._serve_line(line)
            except (OSError, serial.SerialException) as exc:
                log.warning("modbus simulator: %s went away (%s)", self.port, exc)
            finally:
                line.close()

    async def _serve_line(self, line: Any) -> None:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(line.fileno(), readable.set)
        data = b""
        try:
            while True:
                try:
                    async with asyncio.timeout(STALE if data else None):
                        await readable.wait()
                except TimeoutError:
                    data = b""  # a half frame, then silence: noise
                    continue
                readable.clear()
                # (The event may be stale: the bytes it announced were read with earlier ones.
                # A line whose other end is gone raises here.)
                data += line.read(4096)
                while True:
                    request, data = next_request(data)
                    if request is None:
                        break
                    if (answer := await self._answer(request)) is not None:
                        if self.pace:
                            await asyncio.sleep((len(request) + len(answer)) * self.char_time + self.gap)
                        line.write(answer)
        finally:
            loop.remove_reader(line.fileno())

    async def _answer(self, request: bytes) -> bytes | None:
        """The RTU frame answering `request`, or None for silence."""
        unit, pdu = request[0], request[1:-2]
        if unit == 0 or self.faults.drop_connections:
            return None  # (a broadcast is not answered; this press is switched off)
        response = await self._respond(unit, pdu)
        if response is None:
            return None  # not one of ours
        self.requests += 1
        frame = bytes([unit]) + response
        return frame + crc16(frame)


async def serve_serial(
    port: str, units: Sequence[int], seed: int | None, faults: Faults | None = None, **line: Any
) -> None:
    """Run the simulator on a serial line until cancelled (`millwright simulate modbus --serial`)."""
    sim = SerialSimulator(port, units, seed, **line)
    if faults is not None:
        sim.faults = faults
    async with sim:
        await asyncio.Event().wait()


async def serve(
    host: str, port: int, units: Sequence[int], seed: int | None, faults: Faults | None = None
) -> None:
    """Run the simulator, with `faults` injected from the start, until cancelled
    (`millwright simulate modbus`)."""
    async with ModbusSimulator(host, port, units, seed) as sim:
        if faults is not None:
            sim.faults = faults
        await asyncio.Event().wait()  # parked until cancelled; __aexit__ closes everything
