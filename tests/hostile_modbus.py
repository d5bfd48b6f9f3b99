"""A hostile Modbus TCP server for tests: it answers each request with whatever the test chose.

It parses the MBAP header and the read request of each frame it receives, then asks its
`answer` function for the bytes to send back: a correct answer, one with the wrong function
code, byte count, register count, transaction or unit id, a truncated frame, garbage, or
nothing at all. The default answer is the correct one, from a small deterministic register
map (`HostileModbus.memory`), so a test changes only what it wants to break.

The frame builders (`frame`, `registers_pdu`, `bits_pdu`, `exception_pdu`) take raw numbers
on purpose: they must be able to build every wrong frame, not only the right ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

MBAP = struct.Struct(">HHHB")  # transaction id, protocol id, length (unit id + PDU), unit id
READ_FUNCTIONS = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
SIZE = 256  # addresses per table in the default memory


@dataclass(frozen=True, slots=True)
class Request:
    """One request as received: its MBAP fields and, for a read, address and count."""

    tid: int
    protocol: int
    unit: int
    function: int
    address: int
    count: int

    @property
    def bits(self) -> bool:
        return self.function in (1, 2)


# What the server sends back to a request: raw bytes (any bytes), or None (or b"") for silence.
Answer = Callable[[Request], bytes | None]


def frame(tid: int, unit: int, pdu: bytes, *, protocol: int = 0, length: int | None = None) -> bytes:
    """An MBAP frame around `pdu`; `length` overrides the MBAP length (unit id + PDU) field."""
    if length is None:
        length = len(pdu) + 1
    return MBAP.pack(tid & 0xFFFF, protocol & 0xFFFF, length & 0xFFFF, unit & 0xFF) + pdu


def registers_pdu(function: int, registers: Sequence[int], *, byte_count: int | None = None) -> bytes:
    """A read-registers response PDU; `byte_count` overrides the byte count field."""
    if byte_count is None:
        byte_count = 2 * len(registers)
    return struct.pack(f">BB{len(registers)}H", function, byte_count & 0xFF, *registers)


def pack_bits(bits: Sequence[bool]) -> bytes:
    """Bits as Modbus packs them: the first bit is the least significant bit of the first byte."""
    packed = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        packed[i // 8] |= int(bool(bit)) << (i % 8)
    return bytes(packed)


def bits_pdu(function: int, bits: Sequence[bool], *, byte_count: int | None = None) -> bytes:
    """A read-bits response PDU; `byte_count` overrides the byte count field."""
    packed = pack_bits(bits)
    if byte_count is None:
        byte_count = len(packed)
    return bytes([function, byte_count & 0xFF]) + packed


def exception_pdu(function: int, code: int) -> bytes:
    """An exception response PDU for `function` (the 0x80 bit is set here)."""
    return bytes([(function | 0x80) & 0xFF, code & 0xFF])


def default_memory() -> dict[int, list[int]]:
    """Registers and bits by read function code: distinct values in each table, so that a
    response of the wrong table decodes to values the test can tell apart."""
    return {
        1: [int(a % 3 == 0) for a in range(SIZE)],
        2: [int(a % 2 == 1) for a in range(SIZE)],
        3: [(0x1000 + a) & 0xFFFF for a in range(SIZE)],
        4: [(0xA000 + 3 * a) & 0xFFFF for a in range(SIZE)],
    }


class HostileModbus:
    """A Modbus TCP server on a free loopback port; `answer` decides every response.

    `requests` keeps the last requests received (bounded), `connections` counts accepted
    connections, `errors` collects what a connection task raised (an `answer` that
    failed: the test should see it, not a timeout). Set `answer` at any time: it applies
    from the next request on.
    """

    host = "127.0.0.1"

    def __init__(self, answer: Answer | None = None) -> None:
        self.memory = default_memory()
        self.answer: Answer = answer or self.correct
        self.requests: deque[Request] = deque(maxlen=1000)
        self.connections = 0
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def values(self, request: Request) -> list[int]:
        """The registers (or bits, as 0/1) that a correct answer to `request` carries."""
        table = self.memory[request.function]
        return [table[(request.address + i) % SIZE] for i in range(request.count)]

    def correct_pdu(self, request: Request, function: int | None = None) -> bytes:
        """The response PDU a correct device sends, optionally under another function code."""
        function = request.function if function is None else function
        values = self.values(request)
        if request.bits:
            return bits_pdu(function, [bool(v) for v in values])
        return registers_pdu(function, values)

    def correct(self, request: Request) -> bytes:
        """The whole correct response frame to `request`."""
        return frame(request.tid, request.unit, self.correct_pdu(request))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for the connection tasks."""
        if self._server is None:
            return
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> HostileModbus:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own named task, so that stop() can cancel and await it.
        self.connections += 1
        task = asyncio.create_task(self._serve(reader, writer), name=f"hostile-modbus-{self.connections}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.errors.append(exc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                tid, protocol, length, unit = MBAP.unpack(await reader.readexactly(MBAP.size))
                if protocol != 0 or not 2 <= length <= 254:
                    return  # the client is not speaking Modbus TCP; nothing to answer
                pdu = await reader.readexactly(length - 1)
                address, count = struct.unpack(">HH", pdu[1:5]) if len(pdu) >= 5 else (0, 0)
                request = Request(tid, protocol, unit, pdu[0], address, count)
                self.requests.append(request)
                response = self.answer(request)
                if response:
                    writer.write(response)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client hung up, as it does after a timeout or a bad frame
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
