"""End to end with several outputs: each its own broker, subscriber and place in the outbox.

An output whose broker is away must not hold back another; each gets every `seq`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.outbox import read_stats
from simulators.modbus import ModbusSimulator
from tests.conftest import MakeMosquitto, Subscribe
from tests.e2e.conftest import RunGateway, assert_no_gap
from tests.helpers import Message, Mosquitto, eventually
from tests.sparkplug_host import Host, seq_gaps

ISA95 = {"enterprise": "acme", "site": "plant1", "area": "press-shop", "line": "line-1"}
TOPIC = "acme/plant1/press-shop/line-1/press-1"
TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "strokes", "table": "input", "address": 10, "type": "uint32", "order": "CDAB"},
]


@pytest.fixture
async def simulator() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=5) as sim:
        yield sim


def config(sim: ModbusSimulator, outbox: Path, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "gateway": {"id": "edge-2", **ISA95},
        "outbox": {"path": str(outbox)},
        "outputs": outputs,
        "devices": [
            {"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port, "unit": 1,
             "poll": "100ms", "timeout": "500ms", "tags": TAGS},
        ],
    }  # fmt: skip


def seqs(messages: list[Message]) -> set[int]:
    return {m.json()["seq"] for m in messages if m.topic.startswith(TOPIC + "/") and "_meta" not in m.topic}


def persistent(make_mosquitto: MakeMosquitto, tmp_path: Path, name: str, *lines: str) -> Mosquitto:
    folder = tmp_path / f"{name}-data"
    folder.mkdir()
    return make_mosquitto("persistence true", f"persistence_location {folder}/", *lines)


async def test_two_uns_outputs_one_broker_down_then_a_kill(
    simulator: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, run_gateway: RunGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    local, cloud = (
        persistent(make_mosquitto, tmp_path, "local"),
        persistent(make_mosquitto, tmp_path, "cloud"),
    )
    sub_local = subscriber(local, f"{TOPIC}/+", client_id="e2e-local", persistent=True)
    sub_cloud = subscriber(cloud, f"{TOPIC}/+", client_id="e2e-cloud", persistent=True)
    outbox = tmp_path / "outbox.db"
    outputs = [{"name": "local", "url": local.url}, {"name": "cloud", "url": cloud.url}]
    first = run_gateway(config(simulator, outbox, outputs))
    await sub_local.received(lambda ms: len(seqs(ms)) >= 20, timeout=20)
    await sub_cloud.received(lambda ms: len(seqs(ms)) >= 20, timeout=20)

    cloud.stop()
    # While the cloud broker is away, live readings keep reaching the local one: 50 more
    # readings (5 s of polling) while nothing can go to the cloud.
    mark = max(seqs(sub_local.messages))
    await sub_local.received(lambda ms: max(seqs(ms)) >= mark + 50, timeout=20)
    waiting = read_stats(outbox).outputs
    assert waiting["cloud"].depth >= 50, waiting
    assert waiting["local"].depth < waiting["cloud"].depth
    cloud.start()
    mark = max(seqs(sub_local.messages))
    await sub_cloud.received(lambda ms: max(seqs(ms)) >= mark, timeout=30)

    first.kill()
    before = max(seqs(sub_local.messages) | seqs(sub_cloud.messages))
    second = run_gateway(config(simulator, outbox, outputs))
    await sub_local.received(lambda ms: max(seqs(ms)) >= before + 30, timeout=30)
    await sub_cloud.received(lambda ms: max(seqs(ms)) >= before + 30, timeout=30)
    assert await second.terminate() == 0, second.text()

    stats = read_stats(outbox)
    for sub in (sub_local, sub_cloud):
        seen = seqs(sub.messages)
        assert_no_gap(seen)
        assert max(seen) >= stats.last_seq - stats.depth
    assert stats.dropped == 0
    assert set(stats.outputs) == {"local", "cloud"}
    assert "Traceback" not in first.text() + second.text()


async def test_a_uns_and_a_sparkplug_output_each_get_everything(
    simulator: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, run_gateway: RunGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    uns_broker = make_mosquitto()
    # The host keeps its session through the restart, and the broker queues Sparkplug's QoS 0
    # messages for it meanwhile: the births may go out before the host is back.
    scada = persistent(make_mosquitto, tmp_path, "scada", "queue_qos0_messages true")
    sub = subscriber(uns_broker, f"{TOPIC}/+")
    host = Host(scada, subscriber(scada, "spBv1.0/#", client_id="e2e-host", persistent=True))
    outbox = tmp_path / "outbox.db"
    outputs = [
        {"name": "uns", "url": uns_broker.url},
        {"name": "scada", "url": scada.url, "format": "sparkplug", "sparkplug": {"group_id": "g"}},
    ]
    gateway = run_gateway(config(simulator, outbox, outputs))
    await sub.received(lambda ms: len(seqs(ms)) >= 20, timeout=20)
    await host.received(lambda s: len(host.of("DDATA")) >= 5, timeout=20)
    assert [s.topic for s in host.of("NBIRTH")] == ["spBv1.0/g/NBIRTH/edge-2"]
    assert [s.topic for s in host.of("DBIRTH")] == ["spBv1.0/g/DBIRTH/edge-2/press-1"]

    # The Sparkplug broker goes away: UNS goes on; on its return the node is born again and
    # replays what it missed as history, while UNS has had every reading all along.
    stopped_at = time.time() * 1000
    scada.stop()
    mark = max(seqs(sub.messages))
    await sub.received(lambda ms: max(seqs(ms)) >= mark + 30, timeout=20)
    assert read_stats(outbox).outputs["scada"].depth >= 30
    scada.start()
    await host.received(lambda s: len(host.of("NBIRTH")) >= 2 and historical(host), timeout=30)
    await host.received(lambda s: read_stats(outbox).outputs["scada"].depth < 30, timeout=30)
    assert await gateway.terminate() == 0, gateway.text()

    assert_no_gap(seqs(sub.messages))
    sparks = host.sparks
    assert seq_gaps(sparks) == []
    # Every reading the UNS side got from the outage on, up to the newest the host has,
    # reached the host too (live or as history): the same (tag, timestamp) pairs. (Not those
    # made before: a QoS 0 DDATA the broker had taken, and so confirmed, but not yet passed
    # on to the host when it stopped is lost with it, as Sparkplug's QoS 0 allows.)
    spark_values = {(m.name, m.timestamp) for d in host.of("DDATA") for m in d.payload.metrics}
    newest = max(ts for _, ts in spark_values)
    uns_values = {(tag, ts) for tag, ts in uns_readings(sub.messages) if stopped_at <= ts <= newest}
    assert len(uns_values) >= 20  # (the outage made 30 or so: mark + 30 seqs)
    assert uns_values - spark_values == set()
    assert read_stats(outbox).dropped == 0
    assert "Traceback" not in gateway.text()


def bad_strokes(m: Message) -> bool:
    return m.topic == f"{TOPIC}/strokes" and m.json()["quality"] == "Bad"


def historical(host: Host) -> bool:
    return any(m.is_historical for d in host.of("DDATA") for m in d.payload.metrics)


def uns_readings(messages: list[Message]) -> set[tuple[str, int]]:
    """(tag, timestamp in ms) of each UNS reading."""
    out = set()
    for m in messages:
        if m.topic.startswith(TOPIC + "/") and "_meta" not in m.topic:
            stamp = datetime.fromisoformat(m.json()["timestamp"].replace("Z", "+00:00"))
            out.add((m.topic.rsplit("/", 1)[1], round(stamp.timestamp() * 1000)))
    return out


async def test_a_topic_one_broker_refuses_still_reaches_the_other(
    simulator: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, run_gateway: RunGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    acl = tmp_path / "acl"
    acl.write_text(f"pattern readwrite acme/#\npattern deny {TOPIC}/strokes\n")  # (MQTT 5: PUBACK 0x87)
    strict, open_ = make_mosquitto(f"acl_file {acl}"), make_mosquitto()
    sub_strict, sub_open = subscriber(strict, f"{TOPIC}/+"), subscriber(open_, f"{TOPIC}/+")
    outbox = tmp_path / "outbox.db"
    outputs = [{"name": "strict", "url": strict.url}, {"name": "open", "url": open_.url}]
    gateway = run_gateway(config(simulator, outbox, outputs))
    await sub_open.received(lambda ms: sum(m.topic.endswith("/strokes") for m in ms) >= 10, timeout=20)
    await sub_strict.received(lambda ms: sum(m.topic.endswith("/temperature") for m in ms) >= 10, timeout=20)
    # No new readings after the device's Bad ones, and both outputs have delivered them all.
    await simulator.stop()
    await sub_open.received(lambda ms: any(bad_strokes(m) for m in ms), timeout=20)
    await eventually(
        lambda: all(o.depth == 0 for o in read_stats(outbox).outputs.values()), timeout=20, what="caught up"
    )
    assert await gateway.terminate() == 0, gateway.text()

    assert not [m for m in sub_strict.messages if m.topic.endswith("/strokes")]
    assert_no_gap(seqs(sub_open.messages))
    stats = read_stats(outbox)
    assert stats.outputs["open"].dropped == 0
    # Every strokes reading (the open broker has them all) was refused by the strict broker,
    # and counted for that output only.
    strokes = sum(m.topic.endswith("/strokes") for m in sub_open.messages)
    assert strokes >= 10
    assert stats.outputs["strict"].dropped == strokes
    assert stats.dropped == strokes
    assert gateway.text().count(f"broker refused readings on {TOPIC}/strokes") == 1


async def test_an_output_removed_from_the_config_gives_up_its_backlog(
    simulator: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, run_gateway: RunGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    local, gone = make_mosquitto(), make_mosquitto()
    sub = subscriber(local, f"{TOPIC}/+")
    outbox = tmp_path / "outbox.db"
    gone.stop()  # its broker is away: readings pile up for it
    both = [{"name": "local", "url": local.url}, {"name": "old", "url": gone.url}]
    first = run_gateway(config(simulator, outbox, both))
    await sub.received(lambda ms: len(seqs(ms)) >= 40, timeout=20)
    assert await first.terminate() == 0, first.text()
    assert read_stats(outbox).outputs["old"].depth >= 40

    second = run_gateway(config(simulator, outbox, both[:1]))
    mark = max(seqs(sub.messages))
    await sub.received(lambda ms: max(seqs(ms)) >= mark + 20, timeout=20)
    assert await second.terminate() == 0, second.text()
    stats = read_stats(outbox)
    assert set(stats.outputs) == {"local"}
    assert stats.depth == stats.outputs["local"].depth  # nothing is kept for the removed output
    assert "output old is no longer configured" in second.text()
    assert_no_gap(seqs(sub.messages))


async def test_two_sparkplug_outputs_are_two_edge_nodes(
    simulator: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, run_gateway: RunGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    one, two = make_mosquitto(), make_mosquitto()
    host_one, host_two = Host(one, subscriber(one, "spBv1.0/#")), Host(two, subscriber(two, "spBv1.0/#"))
    outbox = tmp_path / "outbox.db"
    sparkplug = {"format": "sparkplug", "sparkplug": {"group_id": "g"}}
    outputs = [{"name": "one", "url": one.url, **sparkplug}, {"name": "two", "url": two.url, **sparkplug}]
    gateway = run_gateway(config(simulator, outbox, outputs))
    for host in (host_one, host_two):
        await host.received(lambda s, h=host: len(h.of("DDATA")) >= 10, timeout=20)
    await simulator.stop()  # each node tells its host of the outage
    for host in (host_one, host_two):
        await host.received(lambda s, h=host: len(h.of("DDEATH")) == 1, timeout=20)
    assert await gateway.terminate() == 0, gateway.text()
    for host in (host_one, host_two):
        sparks = host.sparks
        assert [s.topic for s in host.of("NBIRTH")] == ["spBv1.0/g/NBIRTH/edge-2"]
        assert seq_gaps(sparks) == []
        assert sparks[0].kind == "NBIRTH"
    # Each node counts its own bdSeq, in a file of its own.
    for name in ("one", "two"):
        assert (tmp_path / f"outbox.db.{name}.bdseq").read_text().strip() == "0"
    assert read_stats(outbox).dropped == 0
