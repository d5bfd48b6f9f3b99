"""The Modbus collector: one device (one unit) on its connection, which it may share (`Bus`).

Responses are framed and checked here and in `bus`, not by pymodbus, because pymodbus 3.16
takes too much on trust and fails badly on the rest:

- its decoders accept any frame that parses: another function's registers (function 4 in
  answer to function 3), more registers than asked, a byte count shorter than the frame,
  coils whatever their byte count says;
- it accepts transaction id 0 for any request, and any unit id when the request's is 0;
  a frame with another id it skips, and waits for the timeout; an RTU frame has no
  transaction id, so a late answer passes for the next request's (pymodbus issue 2636);
- a frame it cannot decode (unknown function code, byte count past the end, a missing
  byte) makes it raise inside `data_received`: asyncio logs "Fatal error:
  protocol.data_received() call failed" with a traceback and drops the connection, and
  the request still waits out its timeout;
- a protocol id other than 0 or an MBAP length below 2 make it wait for the timeout, and
  so does a read of more than 264 bytes, which it drops without a word.

So the bus frames with its own framers, which never raise and hand every frame over as an
`Answer`, and `_read` compares each answer with its request: function code, byte count,
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

from gateway.collectors.deadband import Deadband
from gateway.collectors.modbus.bus import FUNCTIONS, Answer, Bus
from gateway.collectors.modbus.codec import TagCodec
from gateway.collectors.modbus.planner import Plan, Request
from gateway.collectors.modbus.settings import BIT_TABLES, ModbusDevice, ModbusTag
from gateway.model import Reading, Status, bad

log = logging.getLogger(__name__)

EXCEPTIONS = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge", 6: "server device busy",
    8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}  # fmt: skip
# Answers that mean "ask again shortly": the unit is busy with a long command (06), or
# accepted one that takes a while (05).
BUSY = (5, 6)

# The bits of every byte value, least significant first: the order Modbus packs bits in.
_BYTE_BITS = tuple(tuple(bool(byte >> i & 1) for i in range(8)) for byte in range(256))


@functools.cache
def _registers(count: int) -> struct.Struct:
    """The registers of a read-registers response of `count` registers, after its 2-byte head."""
    return struct.Struct(f">{count}H")


def _bits(data: bytes) -> list[bool]:
    return list(itertools.chain.from_iterable(map(_BYTE_BITS.__getitem__, data)))


class ModbusCollector:
    """One Modbus device (a unit, over TCP or RTU). Implements `gateway.collectors.Collector`.

    A request the device answers with an exception makes exactly its tags Bad
    (BadCommunicationError); exception 02 on a merged request splits it first (see
    planner). So does an answer that is not this request's (another function code,
    transaction or unit id: BadCommunicationError) or whose length does not fit it (byte
    count or number of registers or bits: BadDecodingError); no reading ever comes from
    such a frame. Exception 06 (busy) or 05 (acknowledge) sends the request again,
    `busy_wait` apart, up to `busy_retries` times, before its tags are Bad. A lost
    connection, or bytes that are not Modbus TCP framing, raise NotConnected; no answer in
    time raises DeviceTimeout (the connection is closed when no other device holds it).
    Each request's faults are logged when they begin, change and end.
    """

    def __init__(
        self, device: ModbusDevice, bus: Bus | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.name = device.name
        self._device = device
        self._clock = clock
        self._codecs = {tag.name: TagCodec(tag, device.name, device.order) for tag in device.tags}
        self._plan = Plan(device.name, device.tags, device.max_gap)
        self._deadband = Deadband({tag.name: tag.deadband for tag in device.tags})
        # One request at a time per connection: Modbus TCP devices commonly serve one
        # transaction at a time, and a serial line or a gateway in front of one must.
        self._bus = bus or Bus(device)
        self._bus.members.add(device.name)
        # Requests currently answered wrongly, and how ("exception 04", "wrong function"),
        # so that a warning is logged when that state begins or changes, and an info line
        # when it ends, not on every poll.
        self._faults: dict[str, str] = {}

    @property
    def requests(self) -> list[Request]:
        """The current read plan (it changes when a request has to be split)."""
        return list(self._plan.requests)

    async def connect(self) -> None:
        """Hold the device's connection, opening it if needed. Raises NotConnected."""
        await self._bus.open(self.name)

    async def close(self) -> None:
        """Let go of the connection (closed when no other device holds it); safe to call
        when not connected."""
        await self._bus.release(self.name)

    async def read(self) -> list[Reading]:
        """Read every planned request once; deadband applied. Raises NotConnected/DeviceTimeout."""
        readings: list[Reading] = []
        # A snapshot: splitting replaces requests in the plan while we walk it. The bus
        # takes each request in turn, so that the other units of a shared line go between.
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
        answer = await self._bus.call(self._device, request)
        busy, exception = self._device.busy_retries, FUNCTIONS[request.table] | 0x80
        while busy and len(answer.pdu) == 2 and answer.pdu[0] == exception and answer.pdu[1] in BUSY:
            busy -= 1
            log.debug("device %s: %s answered busy; asking again", self.name, request)
            await asyncio.sleep(self._device.busy_wait)
            answer = await self._bus.call(self._device, request)
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


def _mismatch(answer: Answer, function: int, size: int) -> tuple[Status, str, str]:
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
