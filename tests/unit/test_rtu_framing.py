"""RTU framing, from both ends of a line: what the gateway takes for an answer (`RtuFramer`)
and what the simulator takes for a request (`next_request`), fed bytes as a line delivers
them: noise, half frames, other units' frames, in pieces of any size."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU

from gateway.collectors.modbus.bus import Answer, RtuFramer
from simulators.modbus import crc16, next_request

UNIT = 7
HOLDING = 3


def framer() -> RtuFramer:
    rtu = RtuFramer(FramerRTU(DecodePDU(is_server=False)))
    rtu.function = HOLDING
    return rtu


def frame(unit: int, pdu: bytes) -> bytes:
    return bytes([unit]) + pdu + crc16(bytes([unit]) + pdu)


def valid(data: bytes) -> bool:
    return len(data) >= 4 and crc16(data[:-2]) == data[-2:]


registers = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=125)
answers = registers.map(
    lambda regs: bytes([HOLDING, 2 * len(regs)]) + b"".join(r.to_bytes(2, "big") for r in regs)
)
exceptions = st.integers(1, 11).map(lambda code: bytes([HOLDING | 0x80, code]))
pdus = st.one_of(answers, exceptions)


def feed(chunks: list[bytes]) -> tuple[Answer | None, bytes]:
    """Hand `chunks` to the framer as pymodbus does (what it did not use stays in the
    buffer); the first answer, and the buffer then."""
    rtu, buffer = framer(), b""
    for chunk in chunks:
        buffer += chunk
        used, answer = rtu.handleFrame(buffer, UNIT, 0)
        assert 0 <= used <= len(buffer)
        buffer = buffer[used:]
        if answer is not None:
            assert isinstance(answer, Answer)
            return answer, buffer
        assert len(buffer) <= 256 + len(chunk)  # noise never piles up
    return None, buffer


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_an_answer_is_always_a_whole_frame_from_the_unit_asked(noise: bytes, cuts: list[int]) -> None:
    answer, _ = feed(pieces(noise, cuts))
    if answer is not None:
        assert answer.unit == UNIT
        assert valid(frame(UNIT, answer.pdu))


@given(
    st.binary(max_size=300),
    st.lists(st.tuples(st.integers(1, 247).filter(lambda u: u != UNIT), pdus), max_size=3),
    pdus,
    st.binary(max_size=20),
    st.lists(st.integers(0, 900), max_size=8),
)
def test_the_answer_is_found_behind_noise_and_other_units_frames(
    noise: bytes, others: list[tuple[int, bytes]], pdu: bytes, tail: bytes, cuts: list[int]
) -> None:
    late = b"".join(frame(unit, other) for unit, other in others)
    data = noise + late + frame(UNIT, pdu) + tail
    answer, _ = feed(pieces(data, cuts))
    assert answer is not None
    assert answer.unit == UNIT
    assert valid(frame(UNIT, answer.pdu))
    if UNIT not in noise + late:  # (bytes of the unit's own address could pass for a frame of it)
        assert answer.pdu == pdu


@given(
    st.binary(max_size=300),
    st.sampled_from([1, 2, 3, 4, 5, 6]),
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=10),
)
def test_the_simulator_finds_a_request_behind_noise(
    noise: bytes, function: int, body: bytes, tail: bytes
) -> None:
    request = frame(1, bytes([function]) + body)
    found, rest = next_request(noise + request + tail)
    assert found is not None
    assert valid(found)
    # The request, or one that the noise happened to hold before it.
    at = (noise + request).find(found)
    assert 0 <= at <= len(noise)
    if at == len(noise):
        assert found == request
        assert rest == tail


@given(st.binary(max_size=600))
def test_the_simulator_keeps_at_most_one_frame_of_noise(noise: bytes) -> None:
    found, rest = next_request(noise)
    assert found is None or valid(found)
    assert len(rest) <= 256
