"""The request planner: which tags share a request, within the protocol limits, and splits."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway.collectors.modbus.planner import Plan, Request, plan, split
from gateway.collectors.modbus.settings import ModbusTag


def tag(address: int, table: str = "holding", **fields: Any) -> ModbusTag:
    name = fields.pop("name", f"{table}{address}")
    return ModbusTag.model_validate({"name": name, "table": table, "address": address, **fields})


def spans(requests: list[Request]) -> list[tuple[str, int, int]]:
    """(table, first, last) of each request: easy to write out by hand."""
    return [(r.table, r.start, r.start + r.count - 1) for r in requests]


@pytest.mark.parametrize(
    ("tags", "max_gap", "expected"),
    [
        # float32 0-1, float32 2-3, uint16 10: gap 4..9 is 6 registers
        ([tag(0, type="float32"), tag(2, type="float32"), tag(10)], 10, [("holding", 0, 10)]),
        ([tag(0, type="float32"), tag(2, type="float32"), tag(10)], 6, [("holding", 0, 10)]),
        (
            [tag(0, type="float32"), tag(2, type="float32"), tag(10)],
            5,
            [("holding", 0, 3), ("holding", 10, 10)],
        ),
        # max_gap 0: adjacent tags merge, a single unused register separates
        ([tag(0), tag(1)], 0, [("holding", 0, 1)]),
        ([tag(0), tag(2)], 0, [("holding", 0, 0), ("holding", 2, 2)]),
        # input order does not matter
        ([tag(10), tag(0), tag(5)], 4, [("holding", 0, 10)]),
        # a string is one tag of `length` registers
        ([tag(10, type="string", length=10), tag(20)], 0, [("holding", 10, 20)]),
    ],
)
def test_merge_by_gap(tags: list[ModbusTag], max_gap: int, expected: list[tuple[str, int, int]]) -> None:
    assert spans(plan(tags, max_gap)) == expected


def test_every_tag_is_in_exactly_one_request() -> None:
    tags = [tag(0, type="float32", name="a"), tag(2, name="b"), tag(40, name="c")]
    requests = plan(tags, 10)
    assert [[t.name for t in r.tags] for r in requests] == [["a", "b"], ["c"]]


def test_tables_never_merge() -> None:
    tags = [tag(0, "holding"), tag(1, "input"), tag(0, "coil"), tag(1, "discrete"), tag(2, "input")]
    assert spans(plan(tags, 10)) == [
        ("coil", 0, 0),
        ("discrete", 1, 1),
        ("holding", 0, 0),
        ("input", 1, 2),
    ]


def test_bits_of_one_register_share_its_request() -> None:
    tags = [
        tag(6, name="word"),
        tag(6, type="bool", bit=0, name="running"),
        tag(6, type="bool", bit=4, name="estop"),
        tag(7, name="next"),
    ]
    (request,) = plan(tags, 0)
    assert spans([request]) == [("holding", 6, 7)]
    assert {t.name for t in request.tags} == {"word", "running", "estop", "next"}


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        # 0 and 124: exactly 125 registers
        ([tag(0), tag(124)], [("holding", 0, 124)]),
        # 0 and 125: the gap (124) is allowed, the size (126) is not
        ([tag(0), tag(125)], [("holding", 0, 0), ("holding", 125, 125)]),
        # a float32 at 123-124 fits, at 124-125 it would straddle: it starts the next request
        ([tag(0), tag(123, type="float32")], [("holding", 0, 124)]),
        ([tag(0), tag(124, type="float32")], [("holding", 0, 0), ("holding", 124, 125)]),
        # a chain of small gaps is cut at 125 registers
        (
            [tag(a, "input") for a in range(0, 300, 50)],
            [("input", 0, 100), ("input", 150, 250)],
        ),
    ],
)
def test_register_requests_stay_within_125(
    tags: list[ModbusTag], expected: list[tuple[str, int, int]]
) -> None:
    assert spans(plan(tags, 124)) == expected


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        # every 100th coil, gaps of 99: 0..1900 is 1901 bits, 2000 would make it 2001
        ([*range(0, 2001, 100)], [("coil", 0, 1900), ("coil", 2000, 2000)]),
        # ... while 1999 makes exactly 2000 bits
        ([*range(0, 2000, 100), 1999], [("coil", 0, 1999)]),
    ],
)
def test_bit_requests_stay_within_2000(addresses: list[int], expected: list[tuple[str, int, int]]) -> None:
    assert spans(plan([tag(a, "coil") for a in addresses], 99)) == expected


def test_split_goes_to_runs_of_adjacent_tags_then_to_single_tags() -> None:
    # holding 0-1, 2-3 (adjacent), 10 and 11 (adjacent), merged across the gap 4..9
    tags = [tag(0, type="float32"), tag(2, type="float32"), tag(10), tag(11)]
    (merged,) = plan(tags, 10)
    runs = split(merged)
    assert spans(runs) == [("holding", 0, 3), ("holding", 10, 11)]
    assert spans(split(runs[0])) == [("holding", 0, 1), ("holding", 2, 3)]
    assert spans(split(runs[1])) == [("holding", 10, 10), ("holding", 11, 11)]
    assert split(split(runs[0])[0]) == []  # one tag: nothing left to split


def test_bits_of_one_register_cannot_be_split() -> None:
    (request,) = plan([tag(6, type="bool", bit=0, name="a"), tag(6, type="bool", bit=1, name="b")], 0)
    assert split(request) == []


def test_plan_remembers_a_split_and_logs_it_once(caplog: pytest.LogCaptureFixture) -> None:
    tags = [tag(0, "coil"), tag(0, type="float32"), tag(2), tag(30, type="uint32")]
    device_plan = Plan("press-1", tags, max_gap=30)
    assert spans(device_plan.requests) == [("coil", 0, 0), ("holding", 0, 31)]
    with caplog.at_level(logging.WARNING):
        pieces = device_plan.split(device_plan.requests[1])
    assert spans(pieces) == [("holding", 0, 2), ("holding", 30, 31)]
    # the pieces take the place of the rejected request, for the life of the plan
    assert spans(device_plan.requests) == [("coil", 0, 0), ("holding", 0, 2), ("holding", 30, 31)]
    assert [r.getMessage() for r in caplog.records] == [
        "device press-1: holding 0-31 rejected with exception 02; reading it as 2 smaller requests"
    ]


def test_plan_split_of_a_single_tag_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    device_plan = Plan("press-1", [tag(0)], max_gap=10)
    before = list(device_plan.requests)
    with caplog.at_level(logging.WARNING):
        assert device_plan.split(device_plan.requests[0]) == []
    assert device_plan.requests == before
    assert caplog.records == []
