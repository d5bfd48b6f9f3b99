"""End to end over a serial line: two RTU units on one virtual line -> `millwright run` ->
mosquitto -> subscriber, with overlapping tags, through an unplugged adapter, no seq missing."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from simulators.modbus import SerialSimulator
from tests.conftest import MakeLine, Subscribe
from tests.e2e.conftest import RunGateway, assert_no_gap
from tests.helpers import Message, Mosquitto

ISA95 = {"enterprise": "acme", "site": "plant1", "area": "press-shop", "line": "line-1"}
PREFIX = "acme/plant1/press-shop/line-1/"
# The same registers read more than once: raw and scaled, a 32-bit counter and its low word.
TAGS = [
    {"name": "speed", "table": "holding", "address": 5},
    {"name": "speed_half", "table": "holding", "address": 5, "scale": 0.5},
    {"name": "strokes", "table": "holding", "address": 30, "type": "uint32"},
    {"name": "strokes_low", "table": "holding", "address": 31},
    {"name": "running", "table": "coil", "address": 0},
]
NAMES = {t["name"] for t in TAGS}


def readings(messages: list[Message], device: str) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m.topic.startswith(PREFIX + device + "/") and not m.topic.endswith("/_meta"):
            out.append({**m.json(), "tag": m.topic.rsplit("/", 1)[1]})
    return out


async def test_two_units_on_one_serial_line_through_an_unplugged_adapter(
    make_line: MakeLine, mosquitto: Mosquitto, subscriber: Subscribe, run_gateway: RunGateway
) -> None:
    line = make_line()
    async with SerialSimulator(line.a, units=(1, 2), seed=11, parity="N") as sim:
        sim.press(2).speed_setpoint = 80
        serial = {"port": line.b, "baudrate": 19200, "parity": "N"}
        devices = [
            {"name": name, "protocol": "modbus", "serial": serial, "unit": unit, "poll": "100ms",
             "timeout": "200ms", "reconnect_max": "1s", "tags": TAGS}
            for name, unit in (("press-1", 1), ("press-2", 2))
        ]  # fmt: skip
        sub = subscriber(mosquitto, "acme/#")
        gateway = run_gateway({"gateway": {"id": "edge-rtu", **ISA95}, "outbox": {"path": "outbox.db"},
                               "mqtt": {"url": mosquitto.url}, "devices": devices})  # fmt: skip

        def each_tag(times: int, quality: str, since: int = 0) -> Any:
            def met(ms: list[Message]) -> bool:
                return all(
                    [r["tag"] for r in readings(ms[since:], d) if r["quality"] == quality].count(t) >= times
                    for d in ("press-1", "press-2")
                    for t in NAMES
                )

            return met

        await sub.received(each_tag(3, "Good"), timeout=30)
        line.stop()  # the USB adapter unplugged
        await sub.received(each_tag(1, "Bad"), timeout=30)
        mark = len(sub.messages)
        line.start()  # and plugged in again: the gateway reconnects by itself
        await sub.received(each_tag(3, "Good", since=mark), timeout=30)
        assert await gateway.terminate() == 0, gateway.text()

    for device, speed in (("press-1", 30), ("press-2", 80)):
        got = readings(sub.messages, device)
        bad = [r for r in got if r["quality"] == "Bad"]
        assert sorted(r["tag"] for r in bad) == sorted(NAMES), bad  # once per tag, not per retry
        good = [r for r in got if r["quality"] == "Good"]
        assert {r["value"] for r in good if r["tag"] == "speed"} == {speed}
        assert {r["value"] for r in good if r["tag"] == "speed_half"} == {speed / 2}
        by_read: dict[str, dict[str, Any]] = defaultdict(dict)  # one request: one read time
        for r in good:
            by_read[r["timestamp"]][r["tag"]] = r["value"]
        pairs = [v for v in by_read.values() if {"strokes", "strokes_low"} <= v.keys()]
        assert pairs
        assert all(v["strokes"] & 0xFFFF == v["strokes_low"] for v in pairs)
    assert_no_gap({r["seq"] for d in ("press-1", "press-2") for r in readings(sub.messages, d)})
    assert "unreachable" in gateway.text()
