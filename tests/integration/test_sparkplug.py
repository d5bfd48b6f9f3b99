"""The Sparkplug B edge node against a real mosquitto, Modbus simulators and a test host.

Each test names the requirement ids of `shared/reference/sparkplug-3.0-requirements.txt`
(Sparkplug 3.0) that it checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.outbox import read_stats
from gateway.publishers.sparkplug.sparkplug_b_pb2 import Payload
from simulators.modbus import ModbusSimulator
from simulators.opcua import OpcUaSimulator
from tests.conftest import MakeMosquitto, Subscribe
from tests.helpers import Mosquitto, eventually, running
from tests.sparkplug_host import REBIRTH, Host, Spark, mismatched_values, seq_gaps

GROUP, NODE = "plant1", "edge-sp"
TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "pressure", "table": "holding", "address": 4, "type": "int16", "scale": 0.1, "unit": "bar"},
    {"name": "strokes", "table": "input", "address": 10, "type": "uint32", "order": "CDAB"},
    {"name": "running", "table": "coil", "address": 0},
]
DATATYPES = {"temperature": 9, "pressure": 10, "strokes": 7, "running": 11}  # Float, Double, UInt32, Boolean


def config(
    sims: list[ModbusSimulator], broker: Mosquitto, outbox: Path, *, poll: str = "50ms", **sparkplug: Any
) -> str:
    devices = [
        {"name": f"press-{i + 1}", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port, "unit": 1,
         "poll": poll, "timeout": "300ms", "tags": TAGS}
        for i, sim in enumerate(sims)
    ]  # fmt: skip
    doc = {
        "gateway": {"id": NODE, "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(outbox)},
        "mqtt": {"url": broker.url, "format": "sparkplug", "sparkplug": {"group_id": GROUP, **sparkplug}},
        "devices": devices,
    }
    return yaml.safe_dump(doc)


@pytest.fixture
async def presses() -> AsyncIterator[list[ModbusSimulator]]:
    async with (
        ModbusSimulator(port=0, units=(1,), seed=1) as a,
        ModbusSimulator(port=0, units=(1,), seed=2) as b,
    ):
        yield [a, b]


@pytest.fixture
def host(subscriber: Subscribe) -> Callable[[Mosquitto], Host]:
    return lambda broker: Host(broker, subscriber(broker, "spBv1.0/#"))


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def births(sparks: list[Spark]) -> list[Spark]:
    return [s for s in sparks if s.kind in ("NBIRTH", "DBIRTH")]


async def test_session_births_data_and_death(
    presses: list[ModbusSimulator], make_mosquitto: MakeMosquitto, host: Any, outbox: Path, tmp_path: Path
) -> None:
    """topics-nbirth-topic, topics-nbirth-mqtt, topics-nbirth-seq-num, topics-nbirth-timestamp,
    topics-nbirth-bdseq-included, topics-nbirth-bdseq-increment, topics-nbirth-rebirth-metric,
    operational-behavior-data-commands-rebirth-name-aliases, topics-dbirth-topic, topics-dbirth-mqtt,
    topics-dbirth-metrics, payloads-dbirth-order, operational-behavior-data-publish-dbirth-values,
    payloads-propertyset-quality-value-type, topics-ddata-topic, topics-ddata-mqtt,
    payloads-metric-datatype-not-req, payloads-name-birth-data-requirement,
    payloads-sequence-num-incrementing (300+ messages, across the wrap),
    message-flow-edge-node-ncmd-subscribe (before the NBIRTH), payloads-ndeath-bdseq,
    payloads-ndeath-seq, payloads-ndeath-will-message-publisher-disconnect-mqtt50,
    principles-persistence-clean-session-50, payloads-dbirth-seq-inc, payloads-ddata-seq-inc."""
    broker = make_mosquitto("log_type all")
    h = host(broker)
    async with running(config(presses, broker, outbox, poll="20ms"), tmp_path / "c.yaml"):
        await h.received(lambda s: len(s) >= 320, timeout=30)
    sparks = await h.received(lambda s: s[-1].kind == "NDEATH")

    nbirth, dbirths = sparks[0], sparks[1:3]
    assert nbirth.topic == f"spBv1.0/{GROUP}/NBIRTH/{NODE}"
    assert (nbirth.qos, nbirth.retain, nbirth.seq) == (0, False, 0)
    assert abs(nbirth.payload.timestamp - time.time() * 1000) < 60_000
    assert nbirth.bdseq == 0  # the first CONNECT of a new node
    assert nbirth.metric("bdSeq").datatype == 4  # Int64
    rebirth = nbirth.metric(REBIRTH)
    assert (rebirth.datatype, rebirth.boolean_value, rebirth.HasField("alias")) == (11, False, False)

    assert [d.topic for d in dbirths] == [f"spBv1.0/{GROUP}/DBIRTH/{NODE}/press-{i}" for i in (1, 2)]
    for d in dbirths:
        assert (d.qos, d.retain) == (0, False)
        assert {m.name: m.datatype for m in d.payload.metrics} == DATATYPES
        for m in d.payload.metrics:
            assert m.HasField("timestamp")
            assert m.is_null or m.WhichOneof("value") is not None
            quality = dict(zip(m.properties.keys, m.properties.values, strict=True))["Quality"]
            assert quality.type == 3  # Int32
            assert quality.int_value in (0, 192)

    data = [s for s in sparks if s.kind == "DDATA"]
    assert len(data) >= 300
    assert all(s.topic.startswith(f"spBv1.0/{GROUP}/DDATA/{NODE}/press-") for s in data)
    assert all((s.qos, s.retain) == (0, False) for s in data)
    live = [m for s in data for m in s.payload.metrics if not m.is_historical]
    assert live
    assert all(not m.HasField("datatype") and m.name in DATATYPES and m.HasField("timestamp") for m in live)
    assert seq_gaps(sparks) == []
    assert mismatched_values(sparks) == []
    assert any(s.seq == 255 for s in sparks)
    assert any(s.seq == 0 and s.kind == "DDATA" for s in sparks)

    # A clean session (MQTT 5: clean start; no session expiry property means 0), and the
    # node subscribed to its commands before its NBIRTH.
    log = broker.log_text()
    client = f"millwright-{NODE}"
    assert f"as {client} (p5, c1," in log
    subscribed = log.index(f"Received SUBSCRIBE from {client}")
    assert f"spBv1.0/{GROUP}/NCMD/{NODE} (QoS 1)" in log[subscribed:]
    assert subscribed < log.index(f"Received PUBLISH from {client}")

    # Graceful stop: the broker publishes the will (DISCONNECT reason 0x04): NDEATH, same bdSeq.
    ndeath = sparks[-1]
    assert ndeath.topic == f"spBv1.0/{GROUP}/NDEATH/{NODE}"
    assert ndeath.seq is None
    assert ndeath.bdseq == nbirth.bdseq
    assert [m.name for m in ndeath.payload.metrics] == ["bdSeq"]
    assert len(h.of("NDEATH")) == 1

    assert_all_delivered(sparks, outbox)


async def test_rebirth_on_ncmd(
    presses: list[ModbusSimulator], mosquitto: Mosquitto, host: Any, outbox: Path, tmp_path: Path
) -> None:
    """operational-behavior-data-commands-rebirth-action-1..3, topics-nbirth-seq-num,
    payloads-nbirth-bdseq-repeat, payloads-dbirth-order, payloads-alias-uniqueness,
    payloads-alias-birth-requirement, payloads-alias-data-cmd-requirement: an NCMD Rebirth brings a
    new NBIRTH (seq 0, the same bdSeq) and every DBIRTH before any more DDATA."""
    h = host(mosquitto)
    async with running(config(presses, mosquitto, outbox, aliases=True), tmp_path / "c.yaml"):
        await h.received(lambda s: len(s) >= 10)
        h.rebirth(GROUP, NODE, int(time.time() * 1000))
        sparks = await h.received(lambda s: len(h.of("NBIRTH")) == 2 and s[-1].kind == "DDATA")
    second = next(i for i, s in enumerate(sparks) if s.kind == "NBIRTH" and i > 0)
    first_nbirth, nbirth = sparks[0], sparks[second]
    assert nbirth.seq == 0
    assert nbirth.bdseq == first_nbirth.bdseq
    assert [s.kind for s in sparks[second + 1 : second + 3]] == ["DBIRTH", "DBIRTH"]
    assert seq_gaps(sparks) == []
    # Aliases: unique over the node, in births with the name, alone in DDATA.
    aliases = [m.alias for s in sparks[second + 1 : second + 3] for m in s.payload.metrics]
    assert len(aliases) == len(set(aliases)) == 2 * len(TAGS)
    assert all(m.name and m.HasField("alias") for s in births(sparks)[1:3] for m in s.payload.metrics)
    data = [m for s in sparks if s.kind == "DDATA" for m in s.payload.metrics]
    assert all(not m.name and m.alias in aliases for m in data)


async def test_device_death_and_return(
    presses: list[ModbusSimulator], mosquitto: Mosquitto, host: Any, outbox: Path, tmp_path: Path
) -> None:
    """operational-behavior-device-ddeath, topics-ddeath-topic, topics-ddeath-mqtt,
    topics-ddeath-seq-num, payloads-ddeath-seq-number: a device that stops answering gets a
    DDEATH (after its Bad readings, none after); when it answers again, a DBIRTH, then DDATA."""
    h = host(mosquitto)
    stopped = presses[0]
    async with running(config(presses, mosquitto, outbox, poll="100ms"), tmp_path / "c.yaml"):
        await h.received(lambda s: len(h.of("DDATA")) >= 4)
        await stopped.stop()
        await h.received(lambda s: len(h.of("DDEATH")) == 1)
        await asyncio.sleep(0.5)  # the other device goes on meanwhile
        await stopped.start()
        sparks = await h.received(  # (the device is retried with backoff: up to 10 s apart)
            lambda s: len(h.of("DBIRTH")) == 3 and s[-1].kind == "DDATA" and s[-1].device == "press-1",
            timeout=30,
        )
    press1 = [s for s in sparks if s.device == "press-1"]
    death = next(i for i, s in enumerate(press1) if s.kind == "DDEATH")
    assert press1[death].topic == f"spBv1.0/{GROUP}/DDEATH/{NODE}/press-1"
    assert (press1[death].qos, press1[death].retain) == (0, False)
    # Its last DDATA before the death says Bad (quality 0) for every tag.
    last = press1[death - 1]
    assert last.kind == "DDATA"
    assert {m.name for m in last.payload.metrics if m.is_null} == set(DATATYPES)
    assert press1[death + 1].kind == "DBIRTH"
    assert all(s.kind == "DDATA" for s in press1[death + 2 :])
    assert not [s for s in sparks if s.device == "press-2" and s.kind == "DDEATH"]
    assert seq_gaps(sparks) == []


async def test_primary_host_wait_offline_and_historical_replay(
    presses: list[ModbusSimulator], make_mosquitto: MakeMosquitto, host: Any, outbox: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """message-flow-edge-node-birth-publish-phid-wait, -phid-wait-id, -phid-wait-online,
    -phid-wait-timestamp, operational-behavior-edge-node-birth-sequence-wait,
    message-flow-edge-node-birth-publish-phid-offline,
    operational-behavior-edge-node-termination-host-offline,
    operational-behavior-edge-node-termination-host-offline-timestamp, topics-nbirth-bdseq-increment:
    no births until the primary host is online; NDEATH and a new session when it goes offline;
    the readings made meanwhile are replayed as historical DDATA, none lost."""
    caplog.set_level(logging.DEBUG, logger="gateway.publishers.sparkplug")
    broker = make_mosquitto("log_type all")
    h = host(broker)
    t0 = int(time.time() * 1000)
    h.state(online=False, timestamp=t0)
    text = config(presses, broker, outbox, primary_host_id="scada", poll="100ms")
    client = f"millwright-{NODE}"

    def state_delivered(count: int) -> Callable[[], bool]:
        def check() -> bool:
            lines = broker.log_text().splitlines()
            sent = [x for x in lines if f"Sending PUBLISH to {client}" in x and "'spBv1.0/STATE/scada'" in x]
            return len(sent) >= count

        return check

    async with running(text, tmp_path / "c.yaml"):
        await eventually(state_delivered(1), timeout=10, what="the retained offline STATE reached the node")
        await asyncio.sleep(0.3)
        assert h.sparks == [], "published before the primary host was online"
        h.publish("spBv1.0/STATE/other-host", b'{"online": true, "timestamp": 1}', qos=1, retain=True)
        h.publish("spBv1.0/STATE/scada", b"[" * 100_000, qos=1)  # not a STATE: ignored, logged
        h.publish("spBv1.0/STATE/scada", b'{"online": true, "timestamp": NaN}', qos=1)
        await eventually(state_delivered(3), timeout=10, what="the invalid STATEs reached the node")
        await eventually(lambda: "STATE of primary host scada ignored" in caplog.text)
        await asyncio.sleep(0.3)
        assert h.sparks == [], "births for another host's STATE, or for an invalid one"

        h.state(online=True, timestamp=t0 + 1)
        await h.received(lambda s: any(m.is_historical for x in h.of("DDATA") for m in x.payload.metrics))
        first = h.of("NBIRTH")[0]
        # An offline STATE older than the last online one is ignored.
        h.state(online=False, timestamp=t0)
        await eventually(lambda: "older STATE of scada ignored" in caplog.text)
        h.state(online=True, timestamp=t0 + 1)
        await h.received(lambda s: len(h.of("DDATA")) >= 10)
        assert h.of("NDEATH") == []

        h.state(online=False, timestamp=t0 + 2)
        await h.received(lambda s: len(h.of("NDEATH")) == 1)
        # Offline: readings wait in the outbox, and the node in a new session, without births.
        await eventually(lambda: read_stats(outbox).depth >= 40, timeout=10, what="a backlog")
        assert len(h.of("NBIRTH")) == 1
        waiting = read_stats(outbox).depth
        h.state(online=True, timestamp=t0 + 3)
        await h.received(lambda s: len(h.of("NBIRTH")) == 2)

        def replayed(sparks: list[Spark]) -> list[Payload.Metric]:
            after = sparks[sparks.index(h.of("NBIRTH")[1]) :]
            return [m for s in after if s.kind == "DDATA" for m in s.payload.metrics if m.is_historical]

        await h.received(lambda s: len(replayed(s)) >= waiting)
    sparks = await h.received(lambda s: s[-1].kind == "NDEATH")
    assert h.of("NDEATH")[0].bdseq == first.bdseq
    assert h.of("NBIRTH")[1].bdseq == (first.bdseq + 1) % 256
    assert seq_gaps(sparks) == []
    assert mismatched_values(sparks) == []
    assert_all_delivered(sparks, outbox)


async def test_bdseq_across_broker_restart(
    presses: list[ModbusSimulator], make_mosquitto: MakeMosquitto, subscriber: Subscribe, outbox: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """topics-nbirth-bdseq-increment, payloads-nbirth-bdseq-repeat, principles-birth-certificates-order:
    after the broker comes back, a new session with bdSeq + 1, births first, and the readings
    made during the outage replayed as history."""
    # The host's session (and the QoS 0 messages for it) outlives the restart, so it misses
    # nothing published while it reconnects.
    mosquitto = make_mosquitto(
        "persistence true", f"persistence_location {tmp_path}/", "queue_qos0_messages true"
    )
    h = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#", client_id="scada", persistent=True))
    async with running(config(presses, mosquitto, outbox, poll="100ms"), tmp_path / "c.yaml"):
        await h.received(lambda s: len(h.of("DDATA")) >= 4)
        mosquitto.stop()
        await asyncio.sleep(1.5)
        mosquitto.start()
        await h.received(lambda s: len(h.of("NBIRTH")) == 2 and s[-1].kind == "DDATA", timeout=20)
        await asyncio.sleep(0.5)
    sparks = await h.received(lambda s: s[-1].kind == "NDEATH")
    first, second = h.of("NBIRTH")
    assert second.bdseq == first.bdseq + 1
    after = sparks[sparks.index(second) :]
    assert [s.kind for s in after[:3]] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert any(m.is_historical for s in after if s.kind == "DDATA" for m in s.payload.metrics)
    assert h.of("NDEATH")[-1].bdseq == second.bdseq
    assert_all_delivered(sparks, outbox)


def assert_all_delivered(sparks: list[Spark], outbox: Path) -> None:
    """Every reading committed to the outbox reached the host or is still in the outbox for the
    next run (the rows of a batch published as the gateway stopped, but not yet acked, are in
    both); none was dropped. Readings are told apart by device, tag and timestamp (one tag is
    read at most once per millisecond here)."""
    stats = read_stats(outbox)
    assert stats.dropped == 0
    published = {
        (s.device, m.name, m.timestamp) for s in sparks if s.kind == "DDATA" for m in s.payload.metrics
    }
    assert stats.last_seq - stats.depth <= len(published) <= stats.last_seq


async def test_opcua_datatypes_are_learned_and_announced(
    mosquitto: Mosquitto, host: Any, outbox: Path, tmp_path: Path
) -> None:
    """topics-dbirth-metrics, payloads-metric-datatype-req, operational-behavior-data-publish-dbirth-values:
    an OPC UA tag's datatype is not known before its first value; the node announces the OPC UA
    type (Int8, UInt8, Int16, UInt32, DateTime...) in a rebirth before any DDATA carries a value
    of it, and never sends a value in a field its last DBIRTH did not announce."""
    h = host(mosquitto)
    ns = "nsu=urn:millwright:simulator;"
    # The OPC UA built-in type of each node (simulators/OPCUA.md) and its Sparkplug datatype.
    tags = {
        "speed": ("s=CNC1.Spindle.Speed", 10),  # Double
        "program": ("s=CNC1.Program.Name", 12),  # String
        "parts": ("s=CNC1.PartCount", 7),  # UInt32
        "alarm": ("s=CNC1.Alarm", 11),  # Boolean
        "started": ("s=CNC1.CycleStart", 13),  # DateTime
        "tool": ("s=CNC1.ToolNumber", 5),  # Byte: UInt8
        "direction": ("s=CNC1.Spindle.Direction", 1),  # SByte: Int8
        "feed": ("s=CNC1.FeedOverride", 2),  # Int16
    }
    async with OpcUaSimulator(port=0, seed=3, pki_dir=tmp_path / "server-pki") as sim:
        doc = yaml.safe_load(config([], mosquitto, outbox))
        doc["gateway"]["pki_dir"] = str(tmp_path / "client-pki")
        nodes = [{"name": n, "node": ns + node} for n, (node, _) in tags.items()]
        doc["devices"] = [{
            "name": "cnc-1", "protocol": "opcua", "endpoint": sim.endpoint, "mode": "subscribe",
            "publishing_interval": "100ms", "tags": nodes,
        }]  # fmt: skip
        async with running(yaml.safe_dump(doc), tmp_path / "c.yaml"):

            def announced(sparks: list[Spark]) -> bool:
                dbirths = [s for s in sparks if s.kind == "DBIRTH"]
                return bool(dbirths) and {m.name: m.datatype for m in dbirths[-1].payload.metrics} == {
                    n: t for n, (_, t) in tags.items()
                }

            await h.received(announced)
            await h.received(lambda s: len([x for x in s if x.kind == "DDATA"]) >= 3)
    sparks = await h.received(lambda s: s[-1].kind == "NDEATH")
    assert mismatched_values(sparks) == []
    assert seq_gaps(sparks) == []
    # The first DBIRTH, before any value: placeholders. Then a rebirth with the datatypes,
    # and the values in the fields those prescribe.
    first_birth = next(s for s in sparks if s.kind == "DBIRTH")
    if all(m.is_null for m in first_birth.payload.metrics):
        assert {m.datatype for m in first_birth.payload.metrics} == {12}
        assert len(h.of("NBIRTH")) == 2
    speeds = [m for s in sparks if s.kind == "DDATA" for m in s.payload.metrics if m.name == "speed"]
    assert speeds
    assert all(m.WhichOneof("value") == "double_value" for m in speeds if not m.is_null)
    started = [s for s in sparks if s.kind == "DBIRTH"][-1].metric("started")
    if not started.is_null:  # a DateTime: ms since the epoch, around now
        assert abs(started.long_value - time.time() * 1000) < 86_400_000
