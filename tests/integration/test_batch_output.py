"""`format: batch` and `max_rate` through the whole gateway, to a mosquitto that enforces a
message size: batches split to fit, every seq arrives once in order, the rate holds at the
subscriber."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.outbox import read_stats
from simulators.modbus import ModbusSimulator
from tests.conftest import MakeMosquitto, Subscribe
from tests.helpers import Message, Mosquitto, eventually, running

GATEWAY = {"id": "edge-b", "enterprise": "acme", "site": "s", "area": "a", "line": "l"}
# 40 tags: one poll's readings of a device make a batch message of some 4.5 kB.
TAGS = [{"name": f"r{i}", "table": "holding", "address": i, "type": "int16"} for i in range(40)]


@pytest.fixture
async def press() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1, 2), seed=3) as sim:
        yield sim


def config(sim: ModbusSimulator, broker: Mosquitto, outbox: Path, **output: Any) -> str:
    devices = [
        {"name": f"press-{unit}", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port, "unit": unit,
         "poll": "100ms", "timeout": "500ms", "tags": TAGS}
        for unit in (1, 2)
    ]  # fmt: skip
    return yaml.safe_dump({
        "gateway": GATEWAY, "outbox": {"path": str(outbox)},
        "outputs": [{"name": "cloud", "url": broker.url, **output}], "devices": devices,
    })  # fmt: skip


DATA = ("acme/s/a/l/press-1", "acme/s/a/l/press-2")


def readings(messages: list[Message]) -> list[tuple[str, dict[str, Any]]]:
    """(device, reading) of every batch message, in arrival order."""
    return [(m.json()["device"], r) for m in messages if m.topic in DATA for r in m.json()["readings"]]


async def test_batches_split_to_the_size_the_broker_takes(
    press: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path
) -> None:
    # mosquitto drops a larger PUBLISH without a word to an MQTT 3.1.1 client: a batch that
    # did not fit would be a gap in the seqs.
    broker = make_mosquitto("message_size_limit 8192")
    sub = subscriber(broker, "acme/#")
    outbox = tmp_path / "outbox.db"
    text = config(press, broker, outbox, format="batch", max_message_bytes=8192, version="3.1.1")
    # A backlog first, so that leases are full (500 readings, some 28 kB a device): the broker
    # answers nothing until it is resumed, and the gateway's CONNECT waits for it.
    broker.pause()
    async with running(text, tmp_path / "gw.yaml"):
        await eventually(lambda: outbox.exists() and read_stats(outbox).last_seq >= 1500, timeout=30,
                         what="a backlog of 1,500 readings")  # fmt: skip
        broker.resume()
        await sub.received(lambda ms: len(readings(ms)) >= 1500, timeout=30)
    data = [m for m in sub.messages if m.topic in DATA]
    assert not any(m.retain for m in data)
    assert max(len(m.payload) + len(m.topic) for m in data) <= 8192
    # Split: a lease of 500 readings made more than one message per device.
    assert max(len(m.payload) for m in data) > 6000
    assert len(data) > 2 * len(readings(data)) / 500
    seen = [r["seq"] for _, r in readings(data)]
    # Every seq from the first to the last, once, in order per device.
    assert sorted(seen) == list(range(min(seen), max(seen) + 1))
    for device in ("press-1", "press-2"):
        mine = [r["seq"] for d, r in readings(data) if d == device]
        assert mine == sorted(mine)
    first = data[0].json()
    assert first["path"] == {"enterprise": "acme", "site": "s", "area": "a", "line": "l"}
    assert {"tag", "value", "quality", "timestamp", "unit", "seq"} <= set(first["readings"][0])
    # _meta and status went as before: retained, on the UNS topics.
    (meta,) = sub.on("acme/s/a/l/press-1/_meta")
    assert meta.retain
    assert [t["name"] for t in meta.json()["tags"]] == [t["name"] for t in TAGS]
    online, offline = sub.on("acme/s/_gateway/edge-b/status")  # (offline: the gateway stopped)
    assert online.retain
    assert offline.retain
    assert [online.json()["online"], offline.json()["online"]] == [True, False]


async def test_the_rate_limit_holds_at_the_subscriber(
    press: ModbusSimulator, mosquitto: Mosquitto, subscriber: Subscribe, tmp_path: Path
) -> None:
    # 80 readings every 100 ms offered, one UNS message each; 50 a second let through.
    sub = subscriber(mosquitto, "acme/s/a/l/+/+")
    async with running(config(press, mosquitto, tmp_path / "outbox.db", max_rate=50), tmp_path / "gw.yaml"):
        await sub.received(lambda ms: len(ms) >= 200, timeout=30)
    times = [m.at for m in sub.messages]
    # The limiter lets no more than 50 go in any 1.05 s. At the subscriber, a thread of this
    # process, the spans may shrink by what a busy machine delays one message and not the
    # next: 0.15 s allowed. (Unlimited, 51 messages take some 0.06 s here.)
    crowded = [i for i in range(len(times) - 50) if times[i + 50] - times[i] < 0.9]
    assert not crowded, f"{len(crowded)} spans of 51 messages shorter than 0.9 s"
