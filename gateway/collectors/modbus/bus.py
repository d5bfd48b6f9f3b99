"""One physical Modbus connection, shared by every device on it: a `Bus`.

A serial line carries the requests of all its units, one at a time; so does a Modbus TCP
gateway that accepts a single connection for the serial units behind it, and a serial device
server that passes RTU frames over a TCP socket. The devices on one such connection each
keep their own collector (poll interval, deadband, state, backoff) and share its Bus: one
pymodbus client, one request at a time, and on a serial line the silence between frames
that RTU needs (3.5 character times, 1.75 ms above 19200 baud, or a device's `frame_gap`).

The connection is open while any of its devices holds it (`open` / `release`): a unit that
does not answer releases it, backs off on its own and holds it again later, while the others
go on. A unit's timeout is its own (short on a serial line, where everyone waits while a
unit is silent), and the bus measures it from the request, with the time the frames take on
the wire added.

pymodbus is used for the connection (TCP socket, or the serial port through pyserial), the
transaction and to encode requests. Its own retries, reconnects and timeouts are switched
off: the poller owns the schedule, and the bus the timeouts (pymodbus would close a TCP
connection after a few unanswered requests, whichever unit they were for). Responses are
framed here, never by pymodbus (see `_Framer` and `RtuFramer`, and the collector for why),
and every frame becomes an `Answer` for the collector to compare with its request.

A late answer is not taken for another request's. On Modbus TCP each request has its own
transaction id: an answer with the id of a request that timed out is dropped (and so is a
part of one cut off when pymodbus empties its buffer for the next request). An RTU frame has
no transaction id at all (pymodbus gives it 0; pymodbus issue 2636), so an answer is taken
only from the unit asked, with the function asked, and a unit that timed out is not asked
again for a while (`LATE`): its late answer, if it comes, comes to a line that is not
waiting for that unit and is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import struct
import time
from typing import TYPE_CHECKING, Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer import FramerRTU, FramerSocket, FramerType
from pymodbus.pdu import ModbusPDU

from gateway.collectors.modbus.settings import TCP_TIMEOUT, ModbusDevice, SerialLine
from gateway.errors import DeviceTimeout, NotConnected

if TYPE_CHECKING:
    from gateway.collectors.modbus.planner import Request

log = logging.getLogger(__name__)

FUNCTIONS = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}  # read function code per table
MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id
# The largest MBAP length Modbus TCP allows: a 260-byte ADU is the 7-byte header and a
# 253-byte PDU, and the length counts the unit id and the PDU.
MAX_LENGTH = 254
# asyncio hands a protocol at most this much per read (selector transports' recv size).
MAX_READ = 256 * 1024
# pymodbus's response timeout once connected: it must never fire before the bus's (see the
# module docstring).
NEVER = 24 * 3600.0
# Transaction ids of requests that timed out on a shared TCP connection, whose answers may
# still come; a device answers late by a moment, not by eight requests.
STALE_IDS = 8

Client = AsyncModbusTcpClient | AsyncModbusSerialClient

try:
    import termios

    PORT_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, termios.error)
except ImportError:  # not a POSIX system
    PORT_ERRORS = (OSError, ValueError)

# After an RTU unit did not answer in time, it is not asked again for at least this long, nor
# for less than LATE_TIMEOUTS of its timeouts.
LATE = 1.0
LATE_TIMEOUTS = 3

RTU_REQUEST = 8  # bytes of a read request on the wire: unit, function, start, count, CRC
MAX_RTU = 256  # the longest RTU frame


class Answer(ModbusPDU):
    """One frame received on our connection, as a framer found it; never raises.

    `pdu` is the function code and the data. `tid` and `unit` are the ids the frame carried;
    `transaction_id` and `dev_id` are the request's, so that pymodbus hands the answer to
    the collector instead of raising on a mismatch, and the collector compares the two.
    `lost` says why the bytes were not Modbus TCP framing at all (then `pdu` is empty and
    the stream cannot be trusted any more).
    """

    def __init__(self, unit: int, tid: int, pdu: bytes = b"", *, ids: tuple[int, int] = (0, 0),
                 lost: str = "") -> None:  # fmt: skip
        super().__init__(dev_id=unit, transaction_id=tid)
        self.pdu = pdu
        self.tid, self.unit = ids
        self.lost = lost

    @property
    def unit_matches(self) -> bool:
        """The frame is from the unit asked. Unit 0 and 255 mean "the device itself" on
        Modbus TCP, and many such devices answer with their own id instead: any id then."""
        return self.unit == self.dev_id or self.dev_id in (0, 255)


class _Framer(FramerSocket):
    """MBAP framing for our client: every complete frame becomes an `Answer`.

    Replaces pymodbus's own `handleFrame`, which raises out of `data_received` on a frame
    it cannot decode, skips or accepts frames by their ids without saying so, and waits
    on a bad header (see the collector's docstring). Consumes one frame per call, after
    any late answers to requests that timed out (`stale`); pymodbus discards whatever is
    left when it sends the next request.
    """

    def __init__(self, framer: FramerSocket) -> None:
        super().__init__(framer.decoder)
        self.stale: collections.deque[int] = collections.deque(maxlen=STALE_IDS)

    def handleFrame(self, data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, ModbusPDU | None]:
        used = 0
        while len(data) - used >= MBAP.size:
            tid, protocol, length, unit = MBAP.unpack_from(data, used)
            if (protocol != 0 or not 2 <= length <= MAX_LENGTH) and self.stale:
                # Likely the rest of a late answer whose beginning pymodbus discarded when
                # it sent this request: look for this request's answer behind it.
                at = data.find(struct.pack(">HH", exp_tid, 0), used + 1)
                if at >= 0:
                    used = at
                    continue
                if len(data) - used <= MAX_LENGTH + MBAP.size:
                    return used, None  # (its answer may not have come yet)
            if protocol != 0 or not 2 <= length <= MAX_LENGTH:
                # Not Modbus TCP. Nothing tells where a next frame would begin, so everything
                # received is dropped, and the collector gives the connection up.
                lost = f"bytes that are not Modbus TCP (protocol id {protocol}, MBAP length {length})"
                return len(data), Answer(exp_devid, exp_tid, lost=lost)
            end = used + MBAP.size - 1 + length
            if len(data) < end:
                # The rest may come in a later segment; if it never does, the timeout ends the wait.
                return used, None
            if tid != exp_tid and tid in self.stale:
                log.debug("dropped a late answer to transaction %d", tid)
                used = end
                continue
            return end, Answer(exp_devid, exp_tid, data[used + MBAP.size : end], ids=(tid, unit))
        return used, None  # the header is not complete yet


class RtuFramer(FramerRTU):
    """RTU framing for our client: the first frame from the unit asked becomes an `Answer`.

    RTU frames carry no length and no transaction id: a frame is found by its shape (unit,
    function, byte count) and its CRC. Bytes that are no frame (noise, a half frame after a
    line fault) are skipped; a frame from another unit (a late answer) is dropped. While no
    frame from the unit asked is complete, what may be its answer still arriving is kept.
    `heard` is when the last bytes arrived (monotonic), for the silence between frames.
    """

    def __init__(self, framer: FramerRTU) -> None:
        super().__init__(framer.decoder)
        self.function = 0  # the function of the request in flight (set by the bus)
        self.heard = 0.0

    def handleFrame(self, data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, ModbusPDU | None]:
        self.heard = time.monotonic()
        size = len(data)
        start = 0
        arriving = None  # where an answer from the unit asked may be arriving
        while start + 4 < size:  # the shortest frame (an exception) is 5 bytes
            unit, function = data[start], data[start + 1]
            length = _rtu_length(function, data[start + 2])
            end = start + length
            if length and end <= size and _crc_ok(data[start:end]):
                if unit == exp_devid:
                    return end, Answer(exp_devid, exp_tid, data[start + 1 : end - 2], ids=(exp_tid, unit))
                log.debug("dropped a frame from unit %d (asked: unit %d)", unit, exp_devid)
                start = end
                continue
            if arriving is None and end > size and unit == exp_devid and function & 0x7F == self.function:
                arriving = start
            start += 1
        # Keep what may still become the answer: from where it may be arriving, but never more
        # than the longest frame, so that noise cannot fill the buffer.
        keep = start if arriving is None else max(arriving, size - MAX_RTU)
        return keep, None


def _rtu_length(function: int, third: int) -> int:
    """Bytes of an RTU response with `function` whose third byte is `third`; 0 if unknown."""
    if function & 0x80:
        return 5  # unit, function | 0x80, exception code, CRC
    if function in (1, 2, 3, 4):
        return 5 + third  # unit, function, byte count, data, CRC
    if function in (5, 6, 15, 16):
        return 8  # unit, function, address, value or count, CRC
    return 0


def _crc_ok(frame: bytes) -> bool:
    return FramerRTU.compute_CRC(frame[:-2]) == frame[-2] << 8 | frame[-1]


def _client(device: ModbusDevice) -> Client:
    """A pymodbus client for `device`'s connection, framing its responses with our framers."""
    client: Client
    # pymodbus takes `timeout` for connecting and for every answer; `Bus._connect` moves it
    # out of the way once connected (the bus times each request itself).
    common = {"name": device.where(), "timeout": max(device.response_timeout, TCP_TIMEOUT), "retries": 0,
              "reconnect_delay": 0}  # fmt: skip
    if (line := device.serial) is not None:
        client = AsyncModbusSerialClient(
            line.port, framer=FramerType.RTU, baudrate=line.baudrate, bytesize=line.bytesize,
            parity=line.parity, stopbits=line.stopbits, **common,  # type: ignore[arg-type]
        )  # fmt: skip
    else:
        assert device.host is not None
        framer = FramerType.RTU if device.rtu else FramerType.SOCKET
        client = AsyncModbusTcpClient(device.host, port=device.port, framer=framer, **common)  # type: ignore[arg-type]
    framer_ = client.ctx.framer
    client.ctx.framer = RtuFramer(framer_) if isinstance(framer_, FramerRTU) else _Framer(framer_)  # type: ignore[arg-type]
    # pymodbus drops all it received, silently, once its buffer passes a frame's size, so
    # an over-long frame would look like a timeout. Let every read reach the framer, which
    # names the fault or skips the noise; the same check still bounds the buffer.
    client.ctx.max_buffer_size = MAX_READ + MBAP.size - 1 + MAX_LENGTH
    return client


class Bus:
    """The connection of the devices that share one serial port or one `host:port`.

    `call` runs one request at a time for whichever device asks. Built from the first
    device on the connection: the config makes every other one agree with it on the
    connection's settings (`settings.check_links`).
    """

    def __init__(self, device: ModbusDevice) -> None:
        self.where = device.where()
        self._device = device
        self._line: SerialLine | None = device.serial
        self._client: Client | None = None
        self.members: set[str] = set()  # the devices on the connection (see ModbusCollector)
        self._users: set[str] = set()
        self._told_lost = False  # the loss of the connection was logged
        self._opening = asyncio.Lock()
        self._lock = asyncio.Lock()  # one request at a time
        self._quiet = 0.0  # when the last frame on the line ended (monotonic)
        self._late: dict[int, float] = {}  # RTU: unit -> not to be asked before (monotonic)

    async def open(self, device: str) -> None:
        """Hold the connection for `device`, opening it if it is not open. Raises NotConnected."""
        async with self._opening:
            client = self._client
            if client is None or not client.connected:
                if client is not None:
                    client.close()
                    self._client = None
                self._client = await self._connect(device)
            self._users.add(device)

    async def release(self, device: str) -> None:
        """Let go of the connection for `device`; the last one out closes it."""
        self._users.discard(device)
        if not self._users and self._client is not None:
            self._client.close()
            self._client = None

    async def call(self, device: ModbusDevice, request: Request) -> Answer:
        """Send `request` to `device`'s unit and return the first answer framed for it.

        Raises NotConnected when the connection is gone (or the stream is out of step:
        then it is closed) and DeviceTimeout when the unit did not answer in time.
        """
        if (wait := self._late.get(device.unit, 0.0) - time.monotonic()) > 0:
            await asyncio.sleep(wait)  # (without the line: the other units go on meanwhile)
        async with self._lock:
            if device.rtu:
                gap = max(self._line.frame_gap if self._line is not None else 0.0, device.frame_gap or 0.0)
                if (wait := max(self._quiet, self._heard()) + gap - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
            client = self._client
            # Checked here because pymodbus would otherwise try to reconnect on its own.
            if client is None or not client.connected:
                raise self._lost(device.name)
            framer = client.ctx.framer
            if isinstance(framer, RtuFramer):
                framer.function = FUNCTIONS[request.table]
            timeout = self._timeout(device, request)
            try:
                async with asyncio.timeout(timeout):
                    answer = await _call(client, request, device.unit)
            except (TimeoutError, ModbusIOException, ConnectionException) as exc:
                # pymodbus reports "the connection went away while we waited" as
                # ModbusIOException; the transport state tells it from a timeout.
                if not client.connected:
                    raise self._lost(device.name, f" during {request}") from exc
                if isinstance(exc, ConnectionException):
                    raise NotConnected(device.name, str(exc)) from exc
                await self._timed_out(client, device)
                raise DeviceTimeout(device.name, f"no answer to {request} within {timeout:.3g} s") from exc
            finally:
                self._quiet = time.monotonic()
        if not isinstance(answer, Answer):  # only our framers make the responses of our clients
            raise TypeError(f"device {device.name}: unexpected response {answer}")
        if answer.lost:
            # The stream is out of step: whatever follows could be taken for an answer.
            await self._drop(client)
            raise NotConnected(device.name, f"{request} was answered with {answer.lost}")
        return answer

    def _lost(self, device: str, when: str = "") -> NotConnected:
        """The connection went away (a serial adapter unplugged, a TCP peer gone). Where
        several devices share it, that is logged once for all of them, here."""
        if self._line is not None:
            reason = f"serial port {self.where} was lost{when} (adapter unplugged?)"
        else:
            reason = f"{self.where} closed the connection{when}"
        shared = len(self.members) > 1
        if shared and not self._told_lost:
            self._told_lost = True
            log.warning(
                "%s: devices %s are unreachable until it is back", reason, ", ".join(sorted(self.members))
            )
        return NotConnected(device, reason, logged=shared)

    def _timeout(self, device: ModbusDevice, request: Request) -> float:
        """The unit's time to answer, plus the time its request and answer take on the wire."""
        if self._line is None:
            return device.response_timeout
        bits = request.table in ("coil", "discrete")
        answer = 5 + ((request.count + 7) // 8 if bits else 2 * request.count)
        return device.response_timeout + (RTU_REQUEST + answer) * self._line.char_time

    def _heard(self) -> float:
        """When bytes last arrived on an RTU connection (0 on another)."""
        framer = self._client.ctx.framer if self._client is not None else None
        return framer.heard if isinstance(framer, RtuFramer) else 0.0

    async def _timed_out(self, client: Client, device: ModbusDevice) -> None:
        """After a request of `device` went unanswered: its answer may still come."""
        framer = client.ctx.framer
        if isinstance(framer, RtuFramer):
            # Nothing in an RTU answer tells which request of the unit it answers: ask the
            # unit nothing until a late answer has come and gone (dropped: see RtuFramer).
            self._late[device.unit] = time.monotonic() + max(LATE, LATE_TIMEOUTS * device.response_timeout)
        if self._users <= {device.name}:
            # Nobody else is on the connection: closing it is the surest way that a late
            # answer cannot be taken for the next request's.
            await self._drop(client)
        elif isinstance(framer, _Framer):
            framer.stale.append(client.ctx.request_transaction_id)

    async def _drop(self, client: Client) -> None:
        if self._client is client:
            self._client = None
        client.close()

    async def _connect(self, device: str) -> Client:
        client = _client(self._device)
        failures: list[Exception] = []
        create = client.ctx.call_create

        async def create_and_keep_the_failure() -> Any:
            # pymodbus logs why a connection failed to its own logger and returns False; the
            # reason (no such port, permission, busy) belongs in the device's error.
            try:
                return await create()
            except Exception as exc:
                failures.append(exc)
                raise

        client.ctx.call_create = create_and_keep_the_failure
        try:
            connected = await client.connect()
        except PORT_ERRORS:
            # (pymodbus catches OSError only; pyserial raises termios.error for settings the
            # port refuses.)
            connected = False
        failure = failures[-1] if failures else None
        if not connected:
            client.close()
            # pymodbus returns False (and logs the cause to its own logger) rather than raising.
            raise NotConnected(device, self._why_not(failure))
        client.ctx.comm_params.timeout_connect = NEVER  # (its response timeout: the bus has its own)
        self._told_lost = False
        return client

    def _why_not(self, failure: Exception | None) -> str:
        if self._line is None:
            return f"cannot connect to {self.where}"
        port = self._line.port
        errno_ = getattr(failure, "errno", None)
        if not os.path.exists(port):
            return f"serial port {port} does not exist (adapter unplugged?)"
        if errno_ in (errno.EACCES, errno.EPERM) or not os.access(port, os.R_OK | os.W_OK):
            return (
                f"no permission to open serial port {port} (is the gateway's user in the dialout group, "
                "and the port one the service may open?)"
            )
        if errno_ == errno.EBUSY or "exclusively lock" in str(failure):
            return f"serial port {port} is in use by another program"
        if (failure is not None and not isinstance(failure, OSError)) or errno_ == errno.EINVAL:
            # (termios.error, or pyserial's ValueError: settings the port does not take)
            return f"serial port {port} refuses {self._line}: {failure}"
        return f"cannot open serial port {port}: {failure or 'unknown error'}"


async def _call(client: Client, request: Request, unit: int) -> ModbusPDU:
    start, count = request.start, request.count
    if request.table == "holding":
        return await client.read_holding_registers(start, count=count, device_id=unit)
    if request.table == "input":
        return await client.read_input_registers(start, count=count, device_id=unit)
    if request.table == "coil":
        return await client.read_coils(start, count=count, device_id=unit)
    return await client.read_discrete_inputs(start, count=count, device_id=unit)
