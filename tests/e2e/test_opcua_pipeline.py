"""End to end over OPC UA: simulator -> gateway process -> real mosquitto -> subscriber."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from simulators.opcua import OpcUaSimulator
from tests.conftest import Subscribe
from tests.e2e.conftest import RunGateway, assert_no_gap
from tests.helpers import Message, Mosquitto

NS = "nsu=urn:millwright:simulator;"
TOPIC = "acme/plant1/machining/line-2/cnc-1"
TAGS = [
    {"name": "spindle_speed", "node": f"{NS}s=CNC1.Spindle.Speed", "unit": "1/min"},
    {"name": "program", "node": f"{NS}s=CNC1.Program.Name"},
    {"name": "part_count", "node": f"{NS}s=CNC1.PartCount"},
    {"name": "alarm", "node": f"{NS}s=CNC1.Alarm"},
    {"name": "packed", "node": f"{NS}i=5001"},
]


@pytest.fixture
async def simulator(tmp_path: Path) -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator(port=0, seed=3, pki_dir=tmp_path / "server-pki") as sim:
        yield sim


def readings(messages: list[Message]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m.topic.startswith(TOPIC + "/") and not m.topic.endswith("/_meta"):
            out.append({**m.json(), "tag": m.topic.rsplit("/", 1)[1]})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_secure_session_survives_a_server_restart_without_a_seq_gap(
    mode: str,
    simulator: OpcUaSimulator,
    mosquitto: Mosquitto,
    subscriber: Subscribe,
    run_gateway: RunGateway,
    tmp_path: Path,
) -> None:
    sub = subscriber(mosquitto, f"{TOPIC}/+")
    (tmp_path / "opcua-password").write_text(simulator.PASSWORD + "\n")
    gateway = run_gateway({
        "gateway": {"id": "edge-opcua", "enterprise": "acme", "site": "plant1", "area": "machining",
                    "line": "line-2", "pki_dir": str(tmp_path / "client-pki")},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "mqtt": {"url": mosquitto.url},
        "devices": [{
            "name": "cnc-1", "protocol": "opcua", "endpoint": simulator.endpoint, "mode": mode,
            "publishing_interval": "200ms", "poll": "200ms", "timeout": "1s",
            "security": {"policy": "Basic256Sha256", "mode": "SignAndEncrypt",
                         "server_certificate": simulator.fingerprint, "username": simulator.USERNAME,
                         "password_file": str(tmp_path / "opcua-password")},
            "tags": TAGS,
        }],
    })  # fmt: skip
    names = {t["name"] for t in TAGS}

    def every_tag(quality: str, since: int = 0) -> Any:
        return lambda ms: {r["tag"] for r in readings(ms[since:]) if r["quality"] == quality} == names

    first = await sub.received(every_tag("Good"), timeout=30)
    by_tag = {r["tag"]: r for r in readings(first)}
    assert isinstance(by_tag["spindle_speed"]["value"], float)
    assert by_tag["spindle_speed"]["unit"] == "1/min"
    assert isinstance(by_tag["program"]["value"], str)
    assert isinstance(by_tag["part_count"]["value"], int)
    assert isinstance(by_tag["alarm"]["value"], bool)

    await simulator.stop()
    outage = len(sub.messages)
    await sub.received(every_tag("Bad", outage), timeout=20)
    await asyncio.sleep(2.0)  # reconnect attempts fail meanwhile: Bad must not be repeated
    bad = [r for r in readings(sub.messages[outage:]) if r["quality"] == "Bad"]
    assert len(bad) == len(TAGS), bad
    assert all(r["value"] is None for r in bad)

    await simulator.start()
    back = len(sub.messages)
    await sub.received(every_tag("Good", back), timeout=30)
    assert await gateway.terminate() == 0
    assert_no_gap({r["seq"] for r in readings(sub.messages)})
    assert "Traceback" not in gateway.text()
