"""ModbusCollector against a hostile device: answers that do not match the request are never Good.

Every test talks to `tests.hostile_modbus.HostileModbus` over a real loopback socket. The
table-driven tests break one thing per case (function code, byte count, register count,
ids, framing) and check the readings, the log lines over several polls, and that asyncio
never logs a "Fatal error: protocol.data_received() call failed" traceback. The property
test then answers real requests with random frames.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.app import cancel
from gateway.backoff import Backoff
from gateway.collectors.modbus.collector import ModbusCollector
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Quality, Reading, Status
from gateway.poller import poll
from gateway.state import DeviceState
from tests.helpers import eventually
from tests.hostile_modbus import (
    MBAP,
    HostileModbus,
    Request,
    bits_pdu,
    exception_pdu,
    frame,
    registers_pdu,
)

COMM = Status.BAD_COMMUNICATION_ERROR
DECODING = Status.BAD_DECODING_ERROR
COLLECTOR_LOG = "gateway.collectors.modbus.collector"

# Planned as coil 0-9 (function 1, 10 bits, byte count 2) and holding 0-3 (function 3,
# 4 registers, byte count 8).
TAGS: list[dict[str, Any]] = [
    {"name": "c0", "table": "coil", "address": 0},
    {"name": "c9", "table": "coil", "address": 9},
    {"name": "h0", "table": "holding", "address": 0},
    {"name": "h1", "table": "holding", "address": 1, "type": "int16"},
    {"name": "hf", "table": "holding", "address": 2, "type": "float32"},
]
TAGS_OF = {"coil": {"c0", "c9"}, "holding": {"h0", "h1", "hf"}}
FUNCTION = {"coil": 1, "holding": 3}


def device(port: int, *, tags: list[dict[str, Any]] = TAGS, **fields: Any) -> ModbusDevice:
    return ModbusDevice.model_validate(
        {"name": "hostile", "protocol": "modbus", "host": "127.0.0.1", "port": port,
         "timeout": "300ms", "max_gap": 10, "tags": tags, **fields}
    )  # fmt: skip


def by_tag(readings: list[Reading]) -> dict[str, Reading]:
    return {r.tag: r for r in readings}


def expected_values(server: HostileModbus) -> dict[str, object]:
    """What TAGS read from the server's correct answers."""
    h, c = server.memory[3], server.memory[1]
    return {
        "c0": bool(c[0]),
        "c9": bool(c[9]),
        "h0": h[0],
        "h1": struct.unpack(">h", struct.pack(">H", h[1]))[0],
        "hf": struct.unpack(">f", struct.pack(">HH", h[2], h[3]))[0],
    }


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records that are asyncio's complaints or carry a traceback: there must be none."""
    return [
        r
        for r in caplog.records
        if r.name == "asyncio" or r.exc_info is not None or "Fatal error" in r.getMessage()
    ]


def collector_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == COLLECTOR_LOG and r.levelno == level]


@pytest.fixture
async def server() -> AsyncIterator[HostileModbus]:
    async with HostileModbus() as s:
        yield s
    assert s.errors == []


# --- the table --------------------------------------------------------------------------

Build = Callable[[HostileModbus, Request], bytes | None]


@dataclass(frozen=True)
class Case:
    table: str  # the request whose answer is broken; the other one is answered correctly
    build: Build
    # The status of that request's tags, or the exception read() raises, or None: Good.
    expect: int | type[Exception] | None
    unit: int = 1


def pdu(data: Callable[[HostileModbus, Request], bytes], *, tid: int = 0, unit: int = 0) -> Build:
    """A frame with the request's ids (shifted by `tid`/`unit`) around the PDU `data` builds."""
    return lambda s, r: frame(r.tid + tid, r.unit + unit, data(s, r))


def regs(s: HostileModbus, r: Request) -> list[int]:
    return s.values(r)


def bits(s: HostileModbus, r: Request) -> list[bool]:
    return [bool(v) for v in s.values(r)]


HTTP = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"

CASES = {
    # controls: what a correct device does
    "correct registers": Case("holding", lambda s, r: s.correct(r), None),
    "correct bits": Case("coil", lambda s, r: s.correct(r), None),
    "exception 04": Case("holding", pdu(lambda s, r: exception_pdu(3, 4)), COMM),
    # another function's answer: not an answer to this request
    "function 4 for 3": Case("holding", pdu(lambda s, r: s.correct_pdu(r, 4)), COMM),
    "function 1 for 3": Case("holding", pdu(lambda s, r: bits_pdu(1, [True] * 10)), COMM),
    "function 6 for 3": Case("holding", pdu(lambda s, r: struct.pack(">BHH", 6, 0, 0x1234)), COMM),
    "function 16 for 3": Case("holding", pdu(lambda s, r: b"\x10\x00"), COMM),
    "unknown function 0x41": Case("holding", pdu(lambda s, r: b"\x41\x08" + bytes(8)), COMM),
    "function 0x80": Case("holding", pdu(lambda s, r: b"\x80\x02"), COMM),
    "function 0": Case("holding", pdu(lambda s, r: b"\x00\x08" + bytes(8)), COMM),
    "exception of function 4": Case("holding", pdu(lambda s, r: exception_pdu(4, 2)), COMM),
    "function 2 for 1": Case("coil", pdu(lambda s, r: s.correct_pdu(r, 2)), COMM),
    "registers for bits": Case("coil", pdu(lambda s, r: registers_pdu(3, [1, 2])), COMM),
    # the right function with the wrong length
    "one register more": Case("holding", pdu(lambda s, r: registers_pdu(3, [*regs(s, r), 7])), DECODING),
    "one register fewer": Case("holding", pdu(lambda s, r: registers_pdu(3, regs(s, r)[:3])), DECODING),
    "odd byte count": Case("holding", pdu(lambda s, r: registers_pdu(3, regs(s, r))[:-1]), DECODING),
    "byte count past the end": Case(
        "holding", pdu(lambda s, r: registers_pdu(3, regs(s, r), byte_count=10)), DECODING
    ),
    "data beyond the byte count": Case(
        "holding", pdu(lambda s, r: registers_pdu(3, [*regs(s, r), 7], byte_count=8)), DECODING
    ),
    "byte count 0": Case("holding", pdu(lambda s, r: b"\x03\x00"), DECODING),
    "no byte count": Case("holding", pdu(lambda s, r: b"\x03"), DECODING),
    "exception without code": Case("holding", pdu(lambda s, r: b"\x83"), DECODING),
    "exception too long": Case("holding", pdu(lambda s, r: b"\x83\x04\x00"), DECODING),
    "one bit byte fewer": Case("coil", pdu(lambda s, r: bits_pdu(1, bits(s, r)[:8])), DECODING),
    "one bit byte more": Case("coil", pdu(lambda s, r: bits_pdu(1, bits(s, r) + [False] * 8)), DECODING),
    "bit byte count past the end": Case(
        "coil", pdu(lambda s, r: bits_pdu(1, bits(s, r), byte_count=3)), DECODING
    ),
    # the right PDU under the wrong ids
    "transaction id + 1": Case("holding", pdu(lambda s, r: s.correct_pdu(r), tid=1), COMM),
    "transaction id 0": Case("holding", lambda s, r: frame(0, r.unit, s.correct_pdu(r)), COMM),
    "unit id + 1": Case("holding", pdu(lambda s, r: s.correct_pdu(r), unit=1), COMM),
    # Unit 0 and 255 ask "the device itself" (Modbus TCP): many answer with their own id.
    "unit id 1 for unit 0": Case("holding", lambda s, r: frame(r.tid, 1, s.correct_pdu(r)), None, unit=0),
    "unit id 7 for unit 255": Case("holding", lambda s, r: frame(r.tid, 7, s.correct_pdu(r)), None, unit=255),
    # not Modbus TCP framing: the connection cannot be trusted any more
    "protocol id 1": Case(
        "holding", lambda s, r: frame(r.tid, r.unit, s.correct_pdu(r), protocol=1), NotConnected
    ),
    "MBAP length 0": Case("holding", lambda s, r: frame(r.tid, r.unit, b"", length=0), NotConnected),
    "MBAP length 1": Case("holding", lambda s, r: frame(r.tid, r.unit, b"", length=1), NotConnected),
    "MBAP length 300": Case(
        "holding", lambda s, r: frame(r.tid, r.unit, s.correct_pdu(r) + bytes(289)), NotConnected
    ),
    "garbage": Case("holding", lambda s, r: HTTP, NotConnected),
    # frames that never end: only the timeout can tell
    "truncated frame": Case("holding", lambda s, r: s.correct(r)[:-3], DeviceTimeout),
    "silence": Case("holding", lambda s, r: None, DeviceTimeout),
    # a correct answer followed by stray bytes: the answer matches; the rest is dropped
    "trailing bytes": Case("holding", lambda s, r: s.correct(r) + b"\xde\xad\xbe\xef", None),
}

BAD = [pytest.param(c, id=name) for name, c in CASES.items() if not isinstance(c.expect, type)]
LOST = [pytest.param(c, id=name) for name, c in CASES.items() if isinstance(c.expect, type)]


def targeting(server: HostileModbus, case: Case) -> Callable[[Request], bytes | None]:
    """Answer the case's request as the case says, and every other one correctly."""

    def answer(request: Request) -> bytes | None:
        if request.function == FUNCTION[case.table]:
            return case.build(server, request)
        return server.correct(request)

    return answer


@pytest.mark.parametrize("case", BAD)
async def test_an_answer_is_good_only_if_it_matches_its_request(
    case: Case, server: HostileModbus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    expected = expected_values(server)
    target = TAGS_OF[case.table]
    server.answer = targeting(server, case)
    collector = ModbusCollector(device(server.port, unit=case.unit))
    try:
        await collector.connect()
        polls = [by_tag(await collector.read()) for _ in range(3)]
        server.answer = server.correct
        healed = by_tag(await collector.read())
    finally:
        await collector.close()
    for values in polls:
        assert set(values) == set(expected)
        for name, reading in values.items():
            if name in target and case.expect is not None:
                assert (reading.quality, reading.status, reading.value) == (Quality.BAD, case.expect, None)
            else:
                assert (reading.quality, reading.value) == (Quality.GOOD, expected[name])
    assert {name: r.value for name, r in healed.items()} == expected
    assert all(r.quality is Quality.GOOD for r in healed.values())
    # the plan is unchanged: only exception 02 to this very function may split a request
    assert [str(r) for r in collector.requests] == ["coil 0-9", "holding 0-3"]
    warnings = collector_log(caplog, logging.WARNING) + [
        r.getMessage() for r in caplog.records if r.name.startswith("gateway.") and r.name != COLLECTOR_LOG
    ]
    if case.expect is None:
        assert warnings == []
    else:
        request = "coil 0-9" if case.table == "coil" else "holding 0-3"
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"device hostile: {request} ")
        assert collector_log(caplog, logging.INFO) == [f"device hostile: {request} answered normally again"]
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("case", LOST)
async def test_a_frame_out_of_step_raises_and_a_new_connection_works(
    case: Case, server: HostileModbus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    expected = expected_values(server)
    server.answer = targeting(server, case)
    collector = ModbusCollector(device(server.port))
    try:
        await collector.connect()
        assert isinstance(case.expect, type)
        with pytest.raises(case.expect) as info:
            await collector.read()
        # the connection was closed: nothing that follows can be taken for an answer
        with pytest.raises(NotConnected):
            await collector.read()
        server.answer = server.correct
        await collector.connect()
        healed = by_tag(await collector.read())
    finally:
        await collector.close()
    assert "holding 0-3" in str(info.value)
    assert {name: r.value for name, r in healed.items()} == expected
    # the poller reports the outage once; the collector itself has nothing to add
    assert collector_log(caplog, logging.WARNING) == []
    assert tracebacks(caplog) == []


# --- through the poller: one line per state change -------------------------------------


class Sink:
    """The readings the poller hands on (its device events aside: test_poller checks those)."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def __call__(self, readings: list[Reading]) -> None:
        self.readings.extend(r for r in readings if not r.tag.startswith("$"))


async def test_poller_reports_a_device_sending_garbage_once_and_keeps_reconnecting(
    server: HostileModbus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server.answer = targeting(server, CASES["garbage"])
    sink, state = Sink(), DeviceState("hostile")
    collector = ModbusCollector(device(server.port, timeout="5s"))
    task = asyncio.create_task(
        poll(collector, 0.02, sink, state=state, backoff=Backoff(initial=0.01, cap=0.02)), name="poller"
    )
    try:
        await eventually(lambda: state.read_errors >= 4, timeout=10, what="four failed reads")
        down = list(sink.readings)
        server.answer = server.correct
        await eventually(lambda: state.reads >= 2, timeout=10, what="two good cycles")
    finally:
        await cancel([task])
    # Four failures within 10 s with a 5 s timeout: the garbage was recognised as it came,
    # not by waiting for the timeout.
    assert {(r.tag, r.quality, r.status) for r in down} == {
        (t, Quality.BAD, COMM) for t in expected_values(server)
    }
    assert len(down) == len(TAGS)  # once, not per reconnect
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("gateway.")]
    assert messages[0] == (
        "device hostile unreachable: holding 0-3 was answered with bytes that are not Modbus TCP "
        "(protocol id 21584, MBAP length 12081)"
    )
    assert messages[1:] == ["device hostile connected (5 tags, 2 requests)", messages[2]]
    assert messages[2].startswith("device hostile recovered after")
    assert tracebacks(caplog) == []


async def test_poller_keeps_polling_through_frames_pymodbus_cannot_decode(
    server: HostileModbus, caplog: pytest.LogCaptureFixture
) -> None:
    # A byte count past the end of the frame made pymodbus raise inside data_received.
    caplog.set_level(logging.INFO)
    server.answer = targeting(server, CASES["byte count past the end"])
    sink, state = Sink(), DeviceState("hostile")
    collector = ModbusCollector(device(server.port))
    task = asyncio.create_task(poll(collector, 0.02, sink, state=state), name="poller")
    try:
        await eventually(lambda: state.reads >= 5, timeout=10, what="five cycles")
    finally:
        await cancel([task])
    assert state.read_errors == 0
    expected = expected_values(server)
    for r in sink.readings:
        if r.tag in TAGS_OF["holding"]:
            assert (r.quality, r.status) == (Quality.BAD, DECODING)
        else:
            assert (r.quality, r.value) == (Quality.GOOD, expected[r.tag])
    assert [r.getMessage() for r in caplog.records if r.name.startswith("gateway.")] == [
        "device hostile: holding 0-3 was answered with byte count 10 with 8 data bytes "
        "(expected byte count 8 with as many data bytes), which does not match it; its 3 tags are Bad",
        "device hostile connected (5 tags, 2 requests)",  # a read (of the coils) went through
    ]
    assert tracebacks(caplog) == []


# --- random frames ----------------------------------------------------------------------

# Ten coils (function 1, byte count 2) and four uint16 registers (function 3, byte count 8):
# every tag's value is one bit or one register, so the expected value is easy to tell.
RANDOM_TAGS = [{"name": f"c{i}", "table": "coil", "address": i} for i in range(10)] + [
    {"name": f"h{i}", "table": "holding", "address": i} for i in range(4)
]
SHAPE = {1: (10, 2), 3: (4, 8)}  # function -> (count, byte count)


@dataclass(frozen=True)
class Plan:
    """How to answer one request; the defaults make a correct answer (with `data` as values)."""

    data: bytes = b""  # the values part of the PDU
    tid: int | None = None
    protocol: int = 0
    unit: int | None = None
    function: int | None = None
    byte_count: int | None = None
    head: bytes | None = None  # function code and byte count, raw, instead of the two fields
    length: int = 0  # the MBAP length field: added to the right one if small, else as is
    trailer: bytes = b""  # bytes sent after the frame
    garbage: bytes | None = None  # sent instead of a frame

    def build(self, request: Request) -> bytes:
        if self.garbage is not None:
            return self.garbage
        function = request.function if self.function is None else self.function
        byte_count = len(self.data) if self.byte_count is None else self.byte_count
        head = bytes([function, byte_count]) if self.head is None else self.head
        tid = request.tid if self.tid is None else self.tid
        unit = request.unit if self.unit is None else self.unit
        pdu = head + self.data
        length = self.length if self.length > 254 else max(0, len(pdu) + 1 + self.length)
        return frame(tid, unit, pdu, protocol=self.protocol, length=length) + self.trailer


WRONG: dict[str, st.SearchStrategy[Any]] = {
    "data": st.binary(max_size=260),
    "tid": st.integers(0, 0xFFFF),
    "protocol": st.integers(0, 0xFFFF),
    "unit": st.integers(0, 255),
    "function": st.integers(0, 255) | st.sampled_from([0x81, 0x83, 1, 2, 3, 4]),
    "byte_count": st.integers(0, 255),
    "head": st.binary(max_size=3),
    # Mostly short of the real length (a PDU cut short, the rest left over), or past the
    # limit; one past the bytes sent waits for the timeout, so only a few of those.
    "length": st.integers(-12, 1) | st.sampled_from([255, 300, 0xFFFF]),
    "trailer": st.binary(min_size=1, max_size=16),
}


@st.composite
def plans(draw: st.DrawFn, function: int) -> Plan:
    _, size = SHAPE[function]
    plan = Plan(data=draw(st.binary(min_size=size, max_size=size)))
    mode = draw(st.sampled_from(["right"] * 3 + ["one wrong"] * 5 + ["any"] * 2 + ["garbage"]))
    if mode == "one wrong":
        field = draw(st.sampled_from(sorted(WRONG)))
        plan = replace(plan, **{field: draw(WRONG[field])})
    elif mode == "any":
        plan = replace(
            plan, **{name: value for name, s in WRONG.items() if (value := draw(st.none() | s)) is not None}
        )
    elif mode == "garbage":
        plan = Plan(garbage=draw(st.binary(min_size=MBAP.size, max_size=300)))
    return plan


def exact_values(request: Request, sent: bytes | None) -> list[int] | None:
    """The values that `sent` carries if its first frame answers `request` exactly, else None.

    Written independently of the collector: the oracle of the property test."""
    count, size = SHAPE[request.function]
    if sent is None or len(sent) < MBAP.size:
        return None
    tid, protocol, length, unit = MBAP.unpack_from(sent)
    if request.unit in (0, 255):  # "the device itself": whatever id it answers with
        unit = request.unit
    if (tid, protocol, unit, length) != (request.tid, 0, request.unit, size + 3) or len(sent) < 6 + length:
        return None
    body = sent[MBAP.size : 6 + length]
    if body[0] != request.function or body[1] != size:
        return None
    data = body[2:]
    if request.function == 1:
        return [data[i // 8] >> (i % 8) & 1 for i in range(count)]
    return list(struct.unpack(f">{count}H", data))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(coil=plans(1), holding=plans(3), unit=st.sampled_from([0, 1, 247]))
async def test_random_frames_never_pass_as_good(
    server: HostileModbus, caplog: pytest.LogCaptureFixture, coil: Plan, holding: Plan, unit: int
) -> None:
    # One server for all examples (hence the health check off); a connection per example,
    # so that no example's stray bytes reach the next one.
    answers = {1: coil, 3: holding}
    sent: dict[int, tuple[Request, bytes | None]] = {}

    def answer(request: Request) -> bytes | None:
        frame_ = answers[request.function].build(request)
        sent[request.function] = (request, frame_)
        return frame_

    server.answer = answer
    collector = ModbusCollector(device(server.port, tags=RANDOM_TAGS, unit=unit, timeout="250ms"))
    outcome: list[Reading] | NotConnected | DeviceTimeout
    try:
        await collector.connect()
        outcome = await collector.read()
    except (NotConnected, DeviceTimeout) as exc:  # anything else fails the test
        outcome = exc
    finally:
        await collector.close()
    exact = {f: exact_values(*sent[f]) for f in sent}
    assert tracebacks(caplog) == []
    if not isinstance(outcome, list):
        event(type(outcome).__name__)
        # Raising is right only when an answer was wrong; a timeout is tolerated anyway,
        # since a loaded machine may be slower than 250 ms.
        assert isinstance(outcome, DeviceTimeout) or None in exact.values(), f"{outcome} after {sent}"
        return
    event(" and ".join(sorted({r.quality.name for r in outcome})))
    assert exact.keys() == {1, 3}
    assert len(outcome) == len(RANDOM_TAGS)
    for r in outcome:
        function, index = (1 if r.tag[0] == "c" else 3), int(r.tag[1:])
        values = exact[function]
        if r.quality is Quality.GOOD:
            assert values is not None, f"{r.tag} is Good from {sent[function][1]!r}"
            assert r.value == (bool(values[index]) if function == 1 else values[index])
        else:
            assert values is None, f"{r.tag} is Bad from the exact answer {sent[function][1]!r}"
            assert r.status in (COMM, DECODING)
