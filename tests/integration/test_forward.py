"""The forwarding loop between a real outbox and a real broker: acks, releases, refusals."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.app import forward
from gateway.config import GatewaySettings, MqttSettings
from gateway.model import AssetPath, Quality, Reading
from gateway.outbox import Outbox
from gateway.publishers.uns import connect_uns
from tests.conftest import MakeMosquitto, Subscribe
from tests.helpers import Message

GATEWAY = GatewaySettings(id="gw", enterprise="acme", site="s", area="a", line="l")
PATH = AssetPath("acme", "s", "a", "l", "press-1")


def reading(tag: str, value: int) -> Reading:
    return Reading("press-1", tag, value, Quality.GOOD, 0, None, 1.7e9)


def seqs(messages: list[Message]) -> list[int]:
    return [m.json()["seq"] for m in messages if not m.topic.endswith("/_meta")]


async def test_a_refused_topic_is_dropped_and_counted_while_the_rest_flows(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    acl = tmp_path / "acl"
    # The gateway may write everything but the pressure tag; the test reads everything.
    acl.write_text("pattern readwrite acme/#\npattern deny acme/s/a/l/press-1/pressure\n")
    broker = make_mosquitto(f"acl_file {acl}")
    sub = subscriber(broker, "acme/s/a/l/press-1/+")
    outbox = await Outbox.open(tmp_path / "outbox.db")
    connection, publisher = connect_uns(
        MqttSettings(url=broker.url, batch=10), GATEWAY, {"press-1": (PATH, {})}
    )
    tasks = [
        asyncio.create_task(connection.run()),
        asyncio.create_task(forward(outbox, publisher, connection, 10)),
    ]
    try:
        # 30 readings, every third one on the refused topic, spread over three batches
        await outbox.append([reading("pressure" if i % 3 == 0 else "temperature", i) for i in range(30)])
        await sub.received(lambda ms: len(seqs(ms)) >= 20, timeout=10)
        for _ in range(100):
            if (await outbox.stats()).depth == 0:
                break
            await asyncio.sleep(0.05)
        stats = await outbox.stats()
    finally:
        await publisher.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await outbox.close()
    delivered = seqs(sub.messages)
    assert delivered == [s for s in range(1, 31) if (s - 1) % 3 != 0]  # in order, none twice
    assert stats.depth == 0
    assert stats.dropped == 10
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1  # once per topic, not once per reading
    assert "acme/s/a/l/press-1/pressure" in refusals[0].getMessage()
    assert refusals[0].levelno == logging.ERROR
