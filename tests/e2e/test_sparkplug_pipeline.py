"""End to end, Sparkplug B: `millwright run` as a process, killed and restarted, seen by a host.

Requirement ids are those of `shared/reference/sparkplug-3.0-requirements.txt`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.outbox import read_stats
from simulators.modbus import ModbusSimulator
from tests.conftest import Subscribe
from tests.e2e.conftest import RunGateway
from tests.helpers import Mosquitto
from tests.sparkplug_host import Host, seq_gaps

TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "strokes", "table": "input", "address": 10, "type": "uint32", "order": "CDAB"},
]


@pytest.fixture
async def simulator() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=3) as sim:
        yield sim


def config(sim: ModbusSimulator, broker: Mosquitto, outbox: Path, version: str = "5") -> dict[str, Any]:
    return {
        "gateway": {"id": "edge-1", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(outbox)},
        "mqtt": {
            "url": broker.url, "version": version, "format": "sparkplug", "sparkplug": {"group_id": "g"}
        },
        "devices": [
            {"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port, "unit": 1,
             "poll": "100ms", "tags": TAGS},
        ],
    }  # fmt: skip


async def test_sigkill_delivers_the_will_and_bdseq_survives_the_restart(
    simulator: ModbusSimulator, mosquitto: Mosquitto, subscriber: Subscribe, run_gateway: RunGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    """message-flow-edge-node-birth-publish-will-message, -will-message-topic, -will-message-payload,
    -will-message-payload-bdSeq, -will-message-qos, -will-message-will-retained,
    payloads-ndeath-will-message, payloads-ndeath-will-message-qos, payloads-ndeath-will-message-retain,
    payloads-ndeath-bdseq, topics-nbirth-bdseq-matching, topics-nbirth-bdseq-increment (across a
    restart of the gateway: bdSeq is kept on disk)."""
    host = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#"))
    outbox = tmp_path / "outbox.db"
    first = run_gateway(config(simulator, mosquitto, outbox))
    await host.received(lambda s: len(host.of("DDATA")) >= 3, timeout=20)
    first.kill()
    await host.received(lambda s: len(host.of("NDEATH")) == 1, timeout=60)  # after the keepalive
    nbirth, ndeath = host.of("NBIRTH")[0], host.of("NDEATH")[0]
    assert ndeath.topic == "spBv1.0/g/NDEATH/edge-1"
    assert (ndeath.qos, ndeath.retain) == (1, False)
    assert ndeath.seq is None
    assert ndeath.bdseq == nbirth.bdseq == 0
    assert ndeath.metric("bdSeq").datatype == 4  # Int64

    second = run_gateway(config(simulator, mosquitto, outbox))
    await host.received(lambda s: len(host.of("NBIRTH")) == 2 and s[-1].kind == "DDATA", timeout=20)
    assert host.of("NBIRTH")[1].bdseq == 1
    assert await second.terminate() == 0, second.text()
    sparks = await host.received(lambda s: len(host.of("NDEATH")) == 2)
    assert host.of("NDEATH")[1].bdseq == 1
    assert seq_gaps(sparks) == []
    assert (tmp_path / "outbox.db.bdseq").read_text().strip() == "1"
    assert read_stats(outbox).dropped == 0


async def test_mqtt_311_stop_publishes_ndeath_before_disconnect(
    simulator: ModbusSimulator, mosquitto: Mosquitto, subscriber: Subscribe, run_gateway: RunGateway,
    tmp_path: Path,
) -> None:  # fmt: skip
    """principles-persistence-clean-session-311, payloads-ndeath-will-message-publisher-disconnect-mqtt311,
    operational-behavior-edge-node-intentional-disconnect-ndeath: with MQTT 3.1.1 there is no
    'disconnect with will' reason code, so the node publishes its NDEATH itself, once."""
    host = Host(mosquitto, subscriber(mosquitto, "spBv1.0/#"))
    gateway = run_gateway(config(simulator, mosquitto, tmp_path / "outbox.db", version="3.1.1"))
    await host.received(lambda s: len(host.of("DDATA")) >= 2, timeout=20)
    assert await gateway.terminate() == 0, gateway.text()
    await host.received(lambda s: len(host.of("NDEATH")) == 1)
    await asyncio.sleep(0.5)  # the process has exited: a second (the will) would be here by now
    assert len(host.of("NDEATH")) == 1
    ndeath = host.of("NDEATH")[0]
    assert ndeath.bdseq == host.of("NBIRTH")[0].bdseq
    assert ndeath.qos == 1
