"""End to end: simulator -> gateway process -> real mosquitto -> subscriber.

The gateway runs as `python -m gateway run CONFIG`, as it does in production, so these
tests also cover the CLI, signal handling and the on-disk outbox. Fault tests assert that
the subscriber sees every `seq` with no gap.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.outbox import read_stats
from simulators.modbus import ModbusSimulator
from tests.conftest import MakeMosquitto, Subscribe
from tests.e2e.conftest import GatewayProcess, RunGateway, assert_no_gap
from tests.helpers import Message, Mosquitto

ISA95 = {"enterprise": "acme", "site": "plant1", "area": "press-shop", "line": "line-1"}
TOPIC = "acme/plant1/press-shop/line-1/press-1"
STATUS = "acme/plant1/_gateway/edge-e2e/status"
ISO_MILLIS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "pressure", "table": "holding", "address": 4, "type": "int16", "scale": 0.1, "unit": "bar"},
    {"name": "program", "table": "holding", "address": 10, "type": "string", "length": 10},
    {"name": "strokes", "table": "input", "address": 10, "type": "uint32", "order": "CDAB"},
    {"name": "running", "table": "coil", "address": 0},
]


@pytest.fixture
async def simulator() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=7) as sim:
        yield sim


@pytest.fixture
def gateway_process(run_gateway: RunGateway, tmp_path: Path) -> Any:
    """Start `millwright run` on the simulated press, publishing to `broker`."""

    def make(
        sim: ModbusSimulator, broker: Mosquitto, *, poll: str = "200ms", outbox: Path | None = None
    ) -> GatewayProcess:
        device = {
            "name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port, "unit": 1,
            "poll": poll, "timeout": "500ms", "tags": TAGS,
        }  # fmt: skip
        outbox_path = str(outbox or tmp_path / "outbox.db")
        return run_gateway(
            {
                "gateway": {"id": "edge-e2e", **ISA95},
                "outbox": {"path": outbox_path},
                "mqtt": {"url": broker.url},
                "devices": [device],
            }
        )

    return make


def readings(messages: list[Message]) -> list[dict[str, Any]]:
    """The reading payloads (not _meta or status), each with its topic's tag added."""
    out = []
    for m in messages:
        if m.topic.startswith(TOPIC + "/") and not m.topic.endswith("/_meta"):
            body = m.json()
            body["tag"] = m.topic.rsplit("/", 1)[1]
            out.append(body)
    return out


def seqs(messages: list[Message]) -> set[int]:
    return {r["seq"] for r in readings(messages)}


async def test_readings_reach_the_broker_with_topic_unit_quality_and_seq(
    simulator: ModbusSimulator, mosquitto: Mosquitto, subscriber: Subscribe, gateway_process: Any
) -> None:
    sub = subscriber(mosquitto, "acme/#")
    gateway = gateway_process(simulator, mosquitto)

    def every_tag_twice(messages: list[Message]) -> bool:
        got = [r["tag"] for r in readings(messages)]
        return all(got.count(t["name"]) >= 2 for t in TAGS)

    messages = await sub.received(every_tag_twice, timeout=20)
    now = datetime.now(UTC)
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for r in readings(messages):
        by_tag.setdefault(r["tag"], []).append(r)
        assert r["quality"] == "Good", r
        assert "status" not in r, r
        assert ISO_MILLIS.match(r["timestamp"]), r
        age = (now - datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00"))).total_seconds()
        assert 0 <= age < 20, r
    temperature = by_tag["temperature"][0]
    assert temperature["unit"] == "Cel"
    assert isinstance(temperature["value"], float)
    assert 15 < temperature["value"] < 90
    assert by_tag["pressure"][0]["unit"] == "bar"
    assert 0 <= by_tag["pressure"][0]["value"] <= 400
    assert by_tag["program"][0] == {**by_tag["program"][0], "value": "PART-4711", "unit": None}
    assert isinstance(by_tag["running"][0]["value"], bool)
    strokes = [r["value"] for r in by_tag["strokes"]]
    assert all(isinstance(v, int) for v in strokes)
    assert strokes == sorted(strokes)
    # seq is the gateway's own counter: strictly increasing in publish order, from 1
    order = [r["seq"] for r in readings(messages)]
    assert order == sorted(order)
    assert len(set(order)) == len(order)
    assert order[0] == 1

    meta = [m for m in messages if m.topic == f"{TOPIC}/_meta"]
    assert meta
    assert meta[0].retain
    described = meta[0].json()
    assert [t["name"] for t in described["tags"]] == [t["name"] for t in TAGS]
    assert "127.0.0.1" not in meta[0].payload.decode()  # no host names in metadata
    status = [m for m in messages if m.topic == STATUS]
    assert status
    assert status[-1].retain
    assert status[-1].json()["online"] is True

    assert await gateway.terminate() == 0
    final = await sub.received(lambda ms: any(m.topic == STATUS and not m.json()["online"] for m in ms))
    offline = [m for m in final if m.topic == STATUS][-1]
    assert offline.retain
    assert offline.json()["online"] is False


async def test_unreachable_device_is_reported_bad_once_then_recovers(
    simulator: ModbusSimulator, mosquitto: Mosquitto, subscriber: Subscribe, gateway_process: Any
) -> None:
    sub = subscriber(mosquitto, f"{TOPIC}/+")
    gateway_process(simulator, mosquitto, poll="100ms")
    await sub.received(lambda ms: len(readings(ms)) >= 10, timeout=20)

    simulator.faults.drop_connections = True
    simulator.drop_clients()
    bad = await sub.received(
        lambda ms: {r["tag"] for r in readings(ms) if r["quality"] == "Bad"} == {t["name"] for t in TAGS},
        timeout=20,
    )
    await asyncio.sleep(2.0)  # several failed reconnects: the Bad state must not be re-published
    during = [r for r in readings(sub.messages) if r["quality"] == "Bad"]
    assert len(during) == len(TAGS), during
    assert all(r["value"] is None and r["status"] in ("0x80050000", "0x800A0000") for r in during), during
    before_recovery = len(sub.messages)
    assert len(bad) <= before_recovery

    simulator.faults.drop_connections = False
    await sub.received(
        lambda ms: (
            {r["tag"] for r in readings(ms[before_recovery:]) if r["quality"] == "Good"}
            == {t["name"] for t in TAGS}
        ),
        timeout=30,
    )


@pytest.mark.slow
async def test_broker_outage_loses_no_seq(
    simulator: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, gateway_process: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    # A persistent broker and a persistent subscriber session: what the gateway publishes
    # right after the restart must reach the subscriber even if it reconnects later.
    broker = make_mosquitto("persistence true", f"persistence_location {tmp_path}/")
    sub = subscriber(broker, f"{TOPIC}/+", client_id="e2e-outage", persistent=True)
    gateway = gateway_process(simulator, broker, poll="100ms")
    await sub.received(lambda ms: len(readings(ms)) >= 20, timeout=20)

    broker.stop()
    await asyncio.sleep(4.0)  # readings pile up in the outbox meanwhile
    backlog = read_stats(gateway.config.parent / "outbox.db").depth
    assert backlog >= 20, "the outbox should hold what was read while the broker was down"
    broker.start()

    high_water = max(seqs(sub.messages))
    await sub.received(lambda ms: max(seqs(ms)) >= high_water + backlog + 20, timeout=30)
    assert await gateway.terminate() == 0
    stats = read_stats(gateway.config.parent / "outbox.db")
    seen = seqs(sub.messages)
    assert_no_gap(seen)
    assert max(seen) >= stats.last_seq - stats.depth


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_no_seq(
    simulator: ModbusSimulator,
    mosquitto: Mosquitto,
    subscriber: Subscribe,
    gateway_process: Any,
    tmp_path: Path,
) -> None:
    sub = subscriber(mosquitto, "acme/#")
    outbox = tmp_path / "kill.db"
    first = gateway_process(simulator, mosquitto, poll="100ms", outbox=outbox)
    await sub.received(lambda ms: len(readings(ms)) >= 30, timeout=20)

    first.kill()
    # The broker notices the dead connection and publishes the last will.
    await sub.received(
        lambda ms: any(m.topic == STATUS and m.json()["online"] is False for m in ms), timeout=10
    )
    before = max(seqs(sub.messages))

    second = gateway_process(simulator, mosquitto, poll="100ms", outbox=outbox)
    await sub.received(lambda ms: max(seqs(ms)) >= before + 30, timeout=30)
    assert await second.terminate() == 0
    stats = read_stats(outbox)
    seen = seqs(sub.messages)
    assert_no_gap(seen)
    assert max(seen) >= stats.last_seq - stats.depth
    assert "Traceback" not in first.text() + second.text()


def test_gateway_exits_2_on_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("gateway: {id: x}\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", str(config)], capture_output=True, text=True, check=False,
        env={**os.environ},
    )  # fmt: skip
    assert result.returncode == 2
    assert "gateway.enterprise: required key is missing" in result.stderr
    assert "outbox: required key is missing" in result.stderr
