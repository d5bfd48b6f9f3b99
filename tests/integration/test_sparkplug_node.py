"""The edge node's decisions, driven reading by reading: a real outbox, a real mosquitto and the
test host, with the readings and device events appended to the outbox as the pollers would,
and the node run by the engine's forward loop.

Requirement ids are those of `shared/reference/sparkplug-3.0-requirements.txt`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from gateway.app import cancel, forward
from gateway.config import MqttSettings, SparkplugSettings
from gateway.model import DOWN, Quality, Reading, Status, Value, datatype_event, state_event
from gateway.outbox import Outbox
from gateway.publishers.sparkplug.node import BdSeqFile, SparkplugNode
from gateway.publishers.sparkplug.payload import DataType, Payload
from tests.conftest import MakeMosquitto, Subscribe
from tests.helpers import Mosquitto, eventually
from tests.sparkplug_host import Host, Spark, mismatched_values, seq_gaps


def reading(device: str, tag: str, value: Value, at: float | None = None) -> Reading:
    quality = Quality.GOOD if value is not None else Quality.BAD
    status = Status.GOOD if value is not None else Status.BAD_COMMUNICATION_ERROR
    return Reading(device, tag, value, quality, status, None, at if at is not None else time.time())


def down(device: str) -> Reading:
    return state_event(device, DOWN, time.time())


class Node:
    """A node and its two tasks (connection, the forward loop), stopped cleanly by `stop()`."""

    def __init__(self, node: SparkplugNode, outbox: Outbox) -> None:
        self.node = node
        self.tasks = [
            asyncio.create_task(node.connection.run(), name="mqtt"),
            asyncio.create_task(forward(outbox, node, node.connection, 500), name="forward"),
        ]

    async def stop(self) -> None:
        await cancel(self.tasks[1:])
        await self.node.close()
        await cancel(self.tasks[:1])


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = await Outbox.open(tmp_path / "outbox.db")
    yield box
    await box.close()


Specs = Mapping[str, Sequence[tuple[str, DataType | None, str | None]]]


def make_node(
    broker: Mosquitto, outbox: Outbox, tmp_path: Path, *, host: str | None = None, opcua: bool = False,
    devices: Specs | None = None, version: str = "5", max_message_bytes: int | None = None,
) -> SparkplugNode:  # fmt: skip
    """Edge node `n` of group `g`; by default devices m1 and m2 of one tag `t` each (Double, or
    untyped as an OPC UA tag is until its first value)."""
    mqtt = MqttSettings(
        url=broker.url, version=version, format="sparkplug", sparkplug=SparkplugSettings(group_id="g"),
        max_message_bytes=max_message_bytes,
    )  # fmt: skip
    datatype = None if opcua else DataType.DOUBLE
    return SparkplugNode(
        mqtt,
        SparkplugSettings(group_id="g", primary_host_id=host),
        outbox,
        edge_node_id="n",
        devices=devices or {"m1": [("t", datatype, "Cel")], "m2": [("t", datatype, None)]},
        bdseq=BdSeqFile(tmp_path / "bdseq"),
        client_id="node-under-test",
    )


def device(sparks: list[Spark], name: str) -> list[str]:
    return [s.kind for s in sparks if s.device == name]


async def test_history_of_a_dead_device_goes_between_dbirth_and_ddeath(
    mosquitto: Mosquitto, subscriber: Subscribe, outbox: Outbox, tmp_path: Path
) -> None:
    """operational-behavior-device-ddeath, payloads-dbirth-order: readings buffered while the
    broker was away, of a device that is down now, replay as history without the host ever
    getting data for a dead device."""
    # Buffered before the node ever connected: m1 had readings, then went down.
    node = make_node(mosquitto, outbox, tmp_path)
    await outbox.append([reading("m1", "t", 1.0), reading("m2", "t", 2.0)])
    await outbox.append([reading("m1", "t", None), down("m1")])
    h = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#"))
    running = Node(node, outbox)
    try:
        sparks = await h.received(lambda s: device(s, "m1").count("DDEATH") == 2)
        await outbox.append([reading("m2", "t", 3.0)])
        sparks = await h.received(lambda s: device(s, "m2")[-1:] == ["DDATA"] and len(h.of("DDATA")) >= 3)
    finally:
        await running.stop()
    # Births: m1 down at birth -> DBIRTH, DDEATH. Its history: DBIRTH, DDATA, DDEATH.
    assert device(sparks, "m1") == ["DBIRTH", "DDEATH", "DBIRTH", "DDATA", "DDEATH"]
    history = next(s for s in sparks if s.device == "m1" and s.kind == "DDATA")
    assert [m.is_historical for m in history.payload.metrics] == [True, True]
    assert [m.double_value for m in history.payload.metrics if not m.is_null] == [1.0]
    assert seq_gaps(sparks) == []


async def test_a_learned_datatype_brings_a_rebirth_before_the_value(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, outbox: Outbox, tmp_path: Path
) -> None:
    """topics-dbirth-metric-reqs, operational-behavior-data-publish-dbirth, payloads-metric-datatype-req:
    an OPC UA tag's datatype is unknown until its first value; the births announce a null
    String, and the first value makes the node rebirth with the real datatype before it is
    published. A historical value that does not fit is sent as null, with no rebirth."""
    # The host's session outlives a broker restart (see the end of the test).
    mosquitto = make_mosquitto(
        "persistence true", f"persistence_location {tmp_path}/", "queue_qos0_messages true"
    )
    h = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#", client_id="scada", persistent=True))
    node = make_node(mosquitto, outbox, tmp_path, opcua=True)
    running = Node(node, outbox)
    try:
        await h.received(lambda s: len(h.of("DBIRTH")) == 2)
        first = h.of("DBIRTH")[0].metric("t")
        assert (first.datatype, first.is_null) == (DataType.STRING, True)
        await outbox.append([reading("m1", "t", True)])
        sparks = await h.received(lambda s: len(h.of("DDATA")) == 1)
        assert len(h.of("NBIRTH")) == 2
        reborn = [s for s in sparks if s.kind == "DBIRTH" and s.device == "m1"][-1].metric("t")
        assert reborn.datatype == DataType.BOOLEAN
        assert h.of("DDATA")[0].payload.metrics[0].boolean_value is True
        # A live value that does not fit: another rebirth, as Double.
        await outbox.append([reading("m1", "t", 21.5)])
        await h.received(lambda s: len(h.of("NBIRTH")) == 3 and len(h.of("DDATA")) == 2)
        # An old value of another type (made while the broker was away, so history in the
        # next session): null, and no rebirth for it.
        mosquitto.stop()
        await outbox.append([reading("m1", "t", "abc")])
        mosquitto.start()
        await h.received(lambda s: len(h.of("NBIRTH")) == 4 and len(h.of("DDATA")) == 3, timeout=20)
        # A bool still fits the Double (as 0 or 1): no rebirth back and forth.
        await outbox.append([reading("m1", "t", False)])
        await h.received(lambda s: len(h.of("DDATA")) == 4)
    finally:
        await running.stop()
    sparks = h.sparks
    assert len(h.of("NBIRTH")) == 4
    assert h.of("DDATA")[1].payload.metrics[0].double_value == 21.5
    old = h.of("DDATA")[2].payload.metrics[0]
    assert (old.is_historical, old.is_null) == (True, True)
    assert h.of("DDATA")[3].payload.metrics[0].WhichOneof("value") == "double_value"
    assert mismatched_values(sparks) == []
    assert seq_gaps(sparks) == []


async def test_offline_state_during_a_pending_rebirth_still_ends_the_session(
    mosquitto: Mosquitto, subscriber: Subscribe, outbox: Outbox, tmp_path: Path
) -> None:
    """message-flow-edge-node-birth-publish-phid-offline: an offline STATE must end the session
    even while a rebirth is pending (asked for by NCMD and not yet sent)."""
    h = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#"))
    t0 = int(time.time() * 1000)
    h.state(online=True, timestamp=t0)
    node = make_node(mosquitto, outbox, tmp_path, host="scada")
    running = Node(node, outbox)
    try:
        await h.received(lambda s: len(h.of("DBIRTH")) == 2)
        # Both arrive back to back; the rebirth is still pending when the STATE is handled.
        h.rebirth("g", "n", t0 + 1)
        h.state(online=False, timestamp=t0 + 2)
        await h.received(lambda s: len(h.of("NDEATH")) == 1)
        await outbox.append([reading("m1", "t", 1.0)])
        await asyncio.sleep(0.5)
        assert h.of("DDATA") == []  # offline: the reading waits
        h.state(online=True, timestamp=t0 + 3)
        await h.received(lambda s: len(h.of("DDATA")) == 1)
    finally:
        await running.stop()
    sparks = h.sparks
    assert h.of("NBIRTH")[-1].bdseq == h.of("NDEATH")[0].bdseq + 1
    assert h.of("DDATA")[0].payload.metrics[0].is_historical
    assert seq_gaps(sparks) == []


async def test_after_a_restart_births_carry_the_backlogs_newest_values(
    mosquitto: Mosquitto, subscriber: Subscribe, outbox: Outbox, tmp_path: Path
) -> None:
    """operational-behavior-data-publish-dbirth-values: after a restart the DBIRTHs announce the
    newest buffered value of each metric (and the datatypes they tell), so the history of many
    untyped (OPC UA) tags brings no rebirths. When the server's type becomes known (the device
    connected), a live value corrects a datatype guessed from the backlog: one rebirth."""
    # A previous run's backlog: 20 tags of an OPC UA device that is not connected yet.
    backlog = [reading("m1", "t", float(i), at=1000.0 + i) for i in range(3)]
    backlog += [reading("m2", f"x{i}", 5, at=1000.0) for i in range(20)]
    await outbox.append(backlog)
    h = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#"))
    devices: Specs = {"m1": [("t", None, None)], "m2": [(f"x{i}", None, None) for i in range(20)]}
    node = make_node(mosquitto, outbox, tmp_path, devices=devices)
    running = Node(node, outbox)
    try:
        sparks = await h.received(
            lambda s: sum(len(x.payload.metrics) for x in h.of("DDATA")) == len(backlog)
        )
        assert len(h.of("NBIRTH")) == 1
        m1, m2 = (next(s for s in sparks if s.kind == "DBIRTH" and s.device == d) for d in ("m1", "m2"))
        assert (m1.metric("t").datatype, m1.metric("t").double_value) == (DataType.DOUBLE, 2.0)
        assert {m.datatype for m in m2.payload.metrics} == {DataType.INT64}  # guessed from 5
        # The device connects: the server says Int16.
        told = [datatype_event("m2", f"x{i}", "int16", time.time()) for i in range(20)]
        await outbox.append([*told, reading("m2", "x0", 6)])
        sparks = await h.received(lambda s: len(h.of("NBIRTH")) == 2 and s[-1].kind == "DDATA")
    finally:
        await running.stop()
    reborn = [s for s in sparks if s.kind == "DBIRTH" and s.device == "m2"][-1]
    assert {m.datatype for m in reborn.payload.metrics} == {DataType.INT16}
    assert mismatched_values(h.sparks) == []


async def test_births_after_a_restart_know_from_the_outbox_who_is_down_and_the_datatypes_told(
    mosquitto: Mosquitto, subscriber: Subscribe, tmp_path: Path
) -> None:
    """Nothing the node needs lives only in memory: the device events of a previous run are in
    the outbox, so the first births after a restart announce the datatype the server told
    (not a null String, nor one guessed from a value) and a DDEATH for the device that went
    down, before its history (DBIRTH, DDATA, DDEATH) and the readings of the other device."""
    path = tmp_path / "outbox.db"
    before = await Outbox.open(path)
    await before.append([datatype_event("m1", "t", "int16", 1000.0), reading("m1", "t", 5, at=1000.0)])
    await before.append([datatype_event("m2", "t", "float32", 1001.0), reading("m2", "t", 2.5, at=1001.0)])
    await before.append([reading("m1", "t", None, at=1002.0), down("m1")])
    await before.close()
    outbox = await Outbox.open(path)
    h = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#"))
    running = Node(make_node(mosquitto, outbox, tmp_path, opcua=True), outbox)
    try:
        sparks = await h.received(lambda s: device(s, "m1").count("DDEATH") == 2 and len(h.of("DDATA")) == 2)
        await outbox.append([reading("m2", "t", 3.5)])
        sparks = await h.received(lambda s: len(h.of("DDATA")) == 3)
    finally:
        await running.stop()
        await outbox.close()
    assert len(h.of("NBIRTH")) == 1  # the datatypes were known: no rebirth
    births = {s.device: s.metric("t") for s in sparks if s.kind == "DBIRTH"}
    assert (births["m1"].datatype, births["m2"].datatype) == (DataType.INT16, DataType.FLOAT)
    # m1 is down at the birth; its history goes between a DBIRTH and a DDEATH.
    assert device(sparks, "m1") == ["DBIRTH", "DDEATH", "DBIRTH", "DDATA", "DDEATH"]
    assert device(sparks, "m2") == ["DBIRTH", "DDATA", "DDATA"]
    assert h.of("DDATA")[-1].payload.metrics[0].float_value == 3.5
    assert seq_gaps(sparks) == []


async def test_hostile_commands_leave_the_node_working(
    mosquitto: Mosquitto, subscriber: Subscribe, outbox: Outbox, tmp_path: Path
) -> None:
    """Garbage NCMDs, an NCMD of 5,000 unknown metrics, DCMDs to 300 made-up devices: the node
    stays connected, keeps publishing, obeys the next real rebirth, and remembers nothing per
    message (its warnings are one per kind)."""
    node = make_node(mosquitto, outbox, tmp_path)
    h = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#"))
    running = Node(node, outbox)
    try:
        await h.received(lambda s: len(h.of("DBIRTH")) == 2)
        crowd = Payload()
        for i in range(5000):
            crowd.metrics.add(name=f"write/{i}", datatype=DataType.DOUBLE, double_value=i)
        h.publish("spBv1.0/g/NCMD/n", bytes(range(256)) * 4, qos=1)
        h.publish("spBv1.0/g/NCMD/n", crowd.SerializeToString(), qos=1)
        for i in range(300):
            h.publish(f"spBv1.0/g/DCMD/n/device-{i}", crowd.SerializeToString()[: i * 7], qos=1)
        h.rebirth("g", "n", int(time.time() * 1000))
        await h.received(lambda s: len(h.of("NBIRTH")) == 2)
        await outbox.append([reading("m1", "t", 7.0)])
        await h.received(
            lambda s: any(m.double_value == 7.0 for d in h.of("DDATA") for m in d.payload.metrics)
        )
        assert node.connection.connected
    finally:
        await running.stop()
    assert node._warned <= {"dcmd", "ncmd-payload", "ncmd metric"}


@pytest.mark.parametrize("whose", ["broker", "output"])
async def test_a_ddata_over_the_brokers_maximum_packet_size_is_split(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, outbox: Outbox, tmp_path: Path, whose: str
) -> None:
    """A lease carries many readings of a device (a replay leases thousands): one DDATA for
    all of them may be larger than the broker takes (MQTT 5 Maximum Packet Size), or than the
    output's max_message_bytes (a platform's limit), and would be refused whole. It goes out
    in as many DDATA as it takes, every value delivered, nothing dropped, seq unbroken."""
    broker = make_mosquitto("max_packet_size 4096") if whose == "broker" else make_mosquitto()
    limit = 4096 if whose == "output" else None
    tags = [f"temperature_{i:02}" for i in range(50)]  # a DBIRTH of about 3.3 kB: it fits
    specs = {"m1": [(t, DataType.DOUBLE, None) for t in tags]}
    node = make_node(broker, outbox, tmp_path, devices=specs, max_message_bytes=limit)
    h = Host(broker, subscriber(broker, "spBv1.0/#"))
    running = Node(node, outbox)
    try:
        await h.received(lambda s: len(h.of("DBIRTH")) == 1)
        # Ten readings of each tag in one append, so in one lease: 500 metrics, some 15 kB.
        await outbox.append(
            [reading("m1", t, float(10 * i + k)) for k in range(10) for i, t in enumerate(tags)]
        )
        sparks = await h.received(lambda s: sum(len(d.payload.metrics) for d in h.of("DDATA")) >= 500)
        stats = await outbox.stats()
    finally:
        await running.stop()
    ddata = h.of("DDATA")
    assert len(ddata) >= 4
    assert all(len(d.payload.SerializeToString()) < 4096 for d in ddata)
    assert sorted(m.double_value for d in ddata for m in d.payload.metrics) == [float(v) for v in range(500)]
    assert stats.dropped == 0
    assert seq_gaps(sparks) == []


async def test_a_connection_lost_before_the_barrier_acks_nothing_of_the_batch(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, outbox: Outbox, tmp_path: Path
) -> None:
    """A QoS 0 message counts as sent once written to the socket, not once the broker has it:
    a batch whose DDATA the broker drops the connection on (MQTT 3.1.1: the node cannot know
    the broker's size limit) is not acked in part; every reading stays in the outbox."""
    broker = make_mosquitto("max_packet_size 4096")
    node = make_node(
        broker, outbox, tmp_path, devices={"m1": [("t", DataType.DOUBLE, None)]}, version="3.1.1"
    )
    h = Host(broker, subscriber(broker, "spBv1.0/#"))
    running = Node(node, outbox)
    try:
        await h.received(lambda s: len(h.of("DBIRTH")) == 1)
        await outbox.append([down("m1")])
        await h.received(lambda s: len(h.of("DDEATH")) == 1)
        # Back, with a DDATA of some 8 kB: its DBIRTH goes out (written, so "settled"), then the
        # broker hangs up on the DDATA.
        await outbox.append([reading("m1", "t", float(i)) for i in range(400)])
        # Dropped on it three times (each session replays it):
        await eventually(lambda: node.connection.generation >= 4, timeout=30, what="three reconnects")
        stats = await outbox.stats()
    finally:
        await running.stop()
    assert h.of("DDATA") == []
    assert len(h.of("DBIRTH")) >= 2  # the one before the DDATA went out
    assert (stats.depth, stats.dropped) == (400, 0)
