"""The Modbus TCP collector: one device, one connection, one request at a time.

pymodbus is used for the connection, the transaction (ids, one request in flight, the
timeout) and to encode requests. Its own retries and automatic reconnect are switched off
(`retries=0`, `reconnect_delay=0`): the poller owns the schedule and the reconnect with
backoff, and a second, hidden retry loop would fight it. Every pymodbus exception is
translated here, once, into `NotConnected` or `DeviceTimeout`.

Responses are framed and checked here, not by pymodbus, because pymodbus 3.16 takes too
much on trust and fails badly on the rest:

- its decoders accept any frame that parses: another function's registers (function 4 in
  answer to function 3), more registers than asked, a byte count shorter than the frame,
  coils whatever their byte count says;
- it accepts transaction id 0 for any request, and any unit id when the request's is 0;
  a frame with another id it skips, and waits for the timeout;
- a frame it cannot decode (unknown function code, byte count past the end, a missing
  byte) makes it raise inside `data_received`: asyncio logs "Fatal error:
  protocol.data_received() call failed" with a traceback and drops the connection, and
  the request still waits out its timeout;
- a protocol id other than 0 or an MBAP length below 2 make it wait for the timeout, and
  so does a read of more than 264 bytes, which it drops without a word.

So our client frames with `_Framer`, which never raises and hands every frame over as an
`_Answer`, and `_read` compares each answer with its request: function code, byte count,
length, transaction and unit id. An answer that does not match is Bad, never Good.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer import FramerSocket
from pymodbus.pdu import ModbusPDU

from gateway.collectors.deadband import Deadband
from gateway.collectors.modbus.codec import TagCodec
from gateway.collectors.modbus.planner import Plan, Request
from gateway.collectors.modbus.settings import BIT_TABLES, ModbusDevice, ModbusTag
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Reading, Status, bad

log = logging.getLogger(__name__)

EXCEPTIONS = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge", 6: "server device busy",
    8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}  # fmt: skip

FUNCTIONS = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}  # read function code per table
MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id
# The largest MBAP length Modbus TCP allows: a 260-byte ADU is the 7-byte header and a
# 253-byte PDU, and the length counts the unit id and the PDU.
MAX_LENGTH = 254
# asyncio hands a protocol at most this much per read (selector transports' recv size).
MAX_READ = 256 * 1024

# The bits of every byte value, least significant first: the order Modbus packs bits in.
_BYTE_BITS = tuple(tuple(bool(byte >> i & 1) for i in range(8)) for byte in range(256))


@functools.cache
def _registers(count: int) -> struct.Struct:
    """The registers of a read-registers response of `count` registers, after its 2-byte head."""
    return struct.Struct(f">{count}H")


def _bits(data: bytes) -> list[bool]:
    return list(itertools.chain.from_iterable(map(_BYTE_BITS.__getitem__, data)))


class _Answer(ModbusPDU):
    """One frame received on our connection, as `_Framer` found it; never raises.

    `pdu` is the function code and the data, cut by the MBAP length. `tid` and `unit` are
    the ids the frame carried; `transaction_id` and `dev_id` are the request's, so that
    pymodbus hands the answer to the collector instead of raising on a mismatch, and the
    collector compares the two. `lost` says why the bytes were not Modbus TCP framing at
    all (then `pdu` is empty and the stream cannot be trusted any more).
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
    """MBAP framing for our client: every complete frame becomes an `_Answer`.

    Replaces pymodbus's own `handleFrame`, which raises out of `data_received` on a frame
    it cannot decode, skips or accepts frames by their ids without saying so, and waits
    on a bad header (see the module docstring). Consumes one frame per call; pymodbus
    discards whatever is left when it sends the next request.
    """

    def handleFrame(self, data: bytes, exp_devid: int, exp_tid: int) -> tuple[int, ModbusPDU | None]:
        if len(data) < MBAP.size:
            return 0, None  # the header is not complete yet
        tid, protocol, length, unit = MBAP.unpack_from(data)
        if protocol != 0 or not 2 <= length <= MAX_LENGTH:
            # Not Modbus TCP. Nothing tells where a next frame would begin, so everything
            # received is dropped, and the collector gives the connection up.
            lost = f"bytes that are not Modbus TCP (protocol id {protocol}, MBAP length {length})"
            return len(data), _Answer(exp_devid, exp_tid, lost=lost)
        end = MBAP.size - 1 + length
        if len(data) < end:
            # The rest may come in a later segment; if it never does, the timeout ends the wait.
            return 0, None
        return end, _Answer(exp_devid, exp_tid, data[MBAP.size : end], ids=(tid, unit))


class _Client(AsyncModbusTcpClient):
    """pymodbus's TCP client, framing its responses with `_Framer`."""

    def __init__(self, device: ModbusDevice) -> None:
        super().__init__(device.host, port=device.port, name=device.name, timeout=device.timeout,
                         retries=0, reconnect_delay=0)  # fmt: skip
        self.ctx.framer = _Framer(self.ctx.framer.decoder)
        # pymodbus drops all it received, silently, once its buffer passes 264 bytes, so
        # an over-long frame would look like a timeout. Let every read reach the framer,
        # which names the fault; the same check still bounds the buffer, at one read plus
        # one frame.
        self.ctx.max_buffer_size = MAX_READ + MBAP.size - 1 + MAX_LENGTH


class ModbusCollector:
    """One Modbus TCP device. Implements `gateway.collectors.Collector`.

    A request the device answers with an exception makes exactly its tags Bad
    (BadCommunicationError); exception 02 on a merged request splits it first (see
    planner). So does an answer that is not this request's (another function code,
    transaction or unit id: BadCommunicationError) or whose length does not fit it (byte
    count or number of registers or bits: BadDecodingError); no reading ever comes from
    such a frame. A lost connection, or bytes that are not Modbus TCP framing, raise
    NotConnected (the connection is closed); no answer in time raises DeviceTimeout and
    closes the connection, since a late answer would otherwise be taken for the next
    request's. Each request's faults are logged when they begin, change and end.
    """

    def __init__(self, device: ModbusDevice, clock: Callable[[], float] = time.time) -> None:
        self.name = device.name
        self._device = device
        self._clock = clock
        self._codecs = {tag.name: TagCodec(tag, device.name, device.order) for tag in device.tags}
        self._plan = Plan(device.name, device.tags, device.max_gap)
        self._deadband = Deadband({tag.name: tag.deadband for tag in device.tags})
        # One request at a time per connection: Modbus TCP devices commonly serve one
        # transaction at a time, and a serial gateway behind them certainly does.
        self._lock = asyncio.Lock()
        self._client: _Client | None = None
        # Requests currently answered wrongly, and how ("exception 04", "wrong function"),
        # so that a warning is logged when that state begins or changes, and an info line
        # when it ends, not on every poll.
        self._faults: dict[str, str] = {}

    @property
    def requests(self) -> list[Request]:
        """The current read plan (it changes when a request has to be split)."""
        return list(self._plan.requests)

    async def connect(self) -> None:
        """Open the TCP connection. Raises NotConnected when the device cannot be reached."""
        await self.close()
        d = self._device
        client = _Client(d)
        # pymodbus returns False (and logs the cause itself) rather than raising.
        if not await client.connect():
            client.close()
            raise NotConnected(self.name, f"cannot connect to {d.host}:{d.port}")
        self._client = client

    async def close(self) -> None:
        """Close the connection; safe to call when not connected."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def read(self) -> list[Reading]:
        """Read every planned request once; deadband applied. Raises NotConnected/DeviceTimeout."""
        readings: list[Reading] = []
        async with self._lock:
            # A snapshot: splitting replaces requests in the plan while we walk it.
            for request in tuple(self._plan.requests):
                readings.extend(await self._read(request))
        admit = self._deadband.admit
        return [r for r in readings if admit(r)]

    def unavailable(self, status: int, now: float) -> list[Reading]:
        """Bad readings with `status` for every tag not already reported Bad with it."""
        admit = self._deadband.admit_state
        readings = (bad(self.name, c.name, status, now, c.unit) for c in self._codecs.values())
        return [r for r in readings if admit(r)]

    def summary(self) -> str:
        """`17 tags, 4 requests`: the tags and the requests that read them each poll."""
        return f"{_count(len(self._codecs), 'tag')}, {_count(len(self._plan.requests), 'request')}"

    def told(self) -> list[Reading]:
        """None: a Modbus tag's datatype is its config's (`ModbusProtocol.metric_types`)."""
        return []

    def describe(self) -> dict[str, Any]:
        """Metadata for the retained `_meta` message.

        Host, port and unit id are left out on purpose: plant network topology is
        sensitive and consumers of the namespace do not need it.
        """
        return {
            "protocol": "modbus",
            "type": self._device.type,
            "tags": [self._describe(tag) for tag in self._device.tags],
        }

    def _describe(self, tag: ModbusTag) -> dict[str, Any]:
        address: dict[str, Any] = {"table": tag.table, "address": tag.address}
        if tag.bit is not None:
            address["bit"] = tag.bit
        if tag.length is not None:
            address["length"] = tag.length
        entry: dict[str, Any] = {
            "name": tag.name,
            "datatype": tag.datatype,
            "unit": tag.unit,
            "description": tag.description,
            "address": address,
        }
        if tag.table not in BIT_TABLES:  # order means nothing for single bits
            entry["order"] = tag.order or self._device.order
        return entry

    async def _read(self, request: Request) -> list[Reading]:
        answer = await self._fetch(request)
        now = self._clock()
        pdu, function = answer.pdu, FUNCTIONS[request.table]
        bits = request.table in BIT_TABLES
        size = (request.count + 7) // 8 if bits else 2 * request.count  # the byte count asked for
        matches = answer.tid == answer.transaction_id and answer.unit_matches
        if matches and len(pdu) == 2 + size and pdu[0] == function and pdu[1] == size:
            if self._faults:
                self._accept(request)
            data = _bits(pdu[2:]) if bits else _registers(request.count).unpack_from(pdu, 2)
            codecs = self._codecs
            return [codecs[tag.name].reading(data, request.start, now) for tag in request.tags]
        if matches and len(pdu) == 2 and pdu[0] == function | 0x80:
            code = pdu[1]
            if code == 2 and (pieces := self._plan.split(request)):
                readings: list[Reading] = []
                for piece in pieces:  # at once, so the split costs no Bad cycle
                    readings.extend(await self._read(piece))
                return readings
            return self._reject(request, code, now)
        status, kind, detail = _mismatch(answer, function, size)
        return self._fault(request, status, kind, detail, now)

    async def _fetch(self, request: Request) -> _Answer:
        client = self._client
        # Checked here because pymodbus would otherwise try to reconnect on its own.
        if client is None or not client.connected:
            raise NotConnected(self.name, f"{self._device.host}:{self._device.port} closed the connection")
        try:
            answer = await _call(client, request, self._device.unit)
        except ConnectionException as exc:
            raise NotConnected(self.name, str(exc)) from exc
        except (TimeoutError, ModbusIOException) as exc:
            # pymodbus reports both "no answer in time" and "the connection went away
            # while we waited" as ModbusIOException; the transport state tells them apart.
            if not client.connected:
                raise NotConnected(self.name, f"connection lost during {request}") from exc
            await self.close()
            raise DeviceTimeout(
                self.name, f"no answer to {request} within {self._device.timeout:g} s"
            ) from exc
        if not isinstance(answer, _Answer):  # only _Framer makes the responses of a _Client
            raise TypeError(f"device {self.name}: unexpected response {answer}")
        if answer.lost:
            # The stream is out of step: whatever follows could be taken for an answer.
            await self.close()
            raise NotConnected(self.name, f"{request} was answered with {answer.lost}")
        return answer

    def _reject(self, request: Request, code: int, now: float) -> list[Reading]:
        reason = EXCEPTIONS.get(code, "unknown")
        log.debug("device %s: %s answered exception %02d (%s)", self.name, request, code, reason)
        key, kind = str(request), f"exception {code:02d}"
        if self._faults.get(key) != kind:
            self._faults[key] = kind
            log.warning("device %s: %s answered exception %02d (%s); its %d tags are Bad",
                        self.name, request, code, reason, len(request.tags))  # fmt: skip
        return self._bad(request, Status.BAD_COMMUNICATION_ERROR, now)

    def _fault(self, request: Request, status: int, kind: str, detail: str, now: float) -> list[Reading]:
        log.debug("device %s: %s was answered with %s", self.name, request, detail)
        key = str(request)
        if self._faults.get(key) != kind:
            self._faults[key] = kind
            log.warning("device %s: %s was answered with %s, which does not match it; its %d tags are Bad",
                        self.name, request, detail, len(request.tags))  # fmt: skip
        return self._bad(request, status, now)

    def _accept(self, request: Request) -> None:
        if self._faults.pop(str(request), None) is not None:
            log.info("device %s: %s answered normally again", self.name, request)

    def _bad(self, request: Request, status: int, now: float) -> list[Reading]:
        codecs = self._codecs
        return [bad(self.name, t.name, status, now, codecs[t.name].unit) for t in request.tags]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _mismatch(answer: _Answer, function: int, size: int) -> tuple[Status, str, str]:
    """Why `answer` is not a valid answer to a read of `function` with `size` data bytes.

    Returns (status, kind, detail). `kind` stays the same while a device keeps making the
    same mistake, so that it is logged once; `detail` describes this frame.
    """
    if answer.tid != answer.transaction_id:
        # A frame of another transaction says nothing about this request, whatever it holds.
        detail = f"transaction id {answer.tid} (expected {answer.transaction_id})"
        return Status.BAD_COMMUNICATION_ERROR, "wrong transaction id", detail
    if not answer.unit_matches:
        # Another unit's registers (a gateway mixing up its serial devices, say).
        detail = f"unit id {answer.unit} (expected {answer.dev_id})"
        return Status.BAD_COMMUNICATION_ERROR, "wrong unit id", detail
    pdu = answer.pdu
    if pdu[0] == function:
        # The device answered this request, but the length is wrong, so which register
        # is where cannot be known: a decoding error, not a communication error.
        got = f"byte count {pdu[1]} with {len(pdu) - 2} data bytes" if len(pdu) > 1 else "no byte count"
        detail = f"{got} (expected byte count {size} with as many data bytes)"
        return Status.BAD_DECODING_ERROR, "wrong length", detail
    if pdu[0] == function | 0x80:
        # An exception to this request that is not the two bytes one is: likewise a
        # decoding error; its code cannot be trusted either.
        detail = f"an exception response of length {len(pdu)} (expected 2)"
        return Status.BAD_DECODING_ERROR, "malformed exception", detail
    # Another function's answer, an exception to another function, or no Modbus function
    # at all: it may even decode (function 4 for 3 gave 9.18e-41), but it is not an
    # answer to this request.
    return Status.BAD_COMMUNICATION_ERROR, "wrong function", f"function code {pdu[0]} (expected {function})"


async def _call(client: AsyncModbusTcpClient, request: Request, unit: int) -> ModbusPDU:
    start, count = request.start, request.count
    if request.table == "holding":
        return await client.read_holding_registers(start, count=count, device_id=unit)
    if request.table == "input":
        return await client.read_input_registers(start, count=count, device_id=unit)
    if request.table == "coil":
        return await client.read_coils(start, count=count, device_id=unit)
    return await client.read_discrete_inputs(start, count=count, device_id=unit)
