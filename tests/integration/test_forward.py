"""The forwarding loop between a real outbox and a real broker: acks, releases, refusals."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from gateway.app import cancel, forward
from gateway.config import GatewaySettings, MqttSettings
from gateway.model import AssetPath, Quality, Reading
from gateway.outbox import Outbox
from gateway.publishers.uns import connect_uns
from tests.conftest import MakeMosquitto, Subscribe
from tests.helpers import Message, Mosquitto

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


class Forwarding:
    """The UNS connection and the forward loop on `outbox`, to `broker`, until `stop()`."""

    def __init__(self, broker: Mosquitto, outbox: Outbox, batch: int = 10) -> None:
        self.outbox = outbox
        self.connection, self.publisher = connect_uns(
            MqttSettings(url=broker.url, batch=batch), GATEWAY, {"press-1": (PATH, {})}
        )
        self.tasks = [
            asyncio.create_task(self.connection.run(), name="mqtt"),
            asyncio.create_task(forward(outbox, self.publisher, self.connection, batch), name="forward"),
        ]

    async def drained(self) -> None:
        deadline = time.monotonic() + 30
        while (await self.outbox.stats()).depth:
            assert time.monotonic() < deadline, "the outbox did not drain within 30 s"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await cancel(self.tasks[1:])
        await self.publisher.close()
        await cancel(self.tasks[:1])


def big(tag: str) -> Reading:
    return Reading("press-1", tag, "x" * 400, Quality.GOOD, 0, None, 1.7e9)


async def test_a_reading_the_broker_drops_the_connection_on_is_dropped_after_three_tries(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that closes the connection on a message it cannot take (here mosquitto's
    message_size_limit with MQTT 5, which it does not announce; AWS IoT does the same on a
    topic it rejects) would get it again after every reconnect, and nothing behind it would
    ever go out. After three times in a row it is dropped and counted; the rest flows, in
    order, and what the broker confirmed before each loss is not sent again."""
    broker = make_mosquitto("message_size_limit 300")
    sub = subscriber(broker, "acme/s/a/l/press-1/+")
    outbox = await Outbox.open(tmp_path / "outbox.db")
    forwarding = Forwarding(broker, outbox)
    try:
        await outbox.append(
            [reading("t", i) for i in range(15)] + [big("huge")] + [reading("t", 16 + i) for i in range(14)]
        )
        await forwarding.drained()
        stats = await outbox.stats()
        await sub.received(lambda ms: seqs(ms)[-1:] == [30], timeout=10)
    finally:
        await forwarding.stop()
        await outbox.close()
    seen = seqs(sub.messages)
    assert list(dict.fromkeys(seen)) == [s for s in range(1, 31) if s != 16]  # all, in order
    # Twice only what was in flight behind it (mosquitto took those before hanging up, and
    # their PUBACKs were lost with the connection): at least once. None from before it.
    assert all(s > 16 for s in seen if seen.count(s) > 1)
    assert stats.dropped == 1
    losses = [r for r in caplog.records if "lost connection" in r.getMessage()]
    assert len(losses) == 3
    (dropped,) = [r for r in caplog.records if "dropped the connection" in r.getMessage()]
    assert "reading seq 16 (press-1/huge)" in dropped.getMessage()


async def test_a_message_over_the_announced_maximum_packet_size_is_refused_at_once(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT 5: the broker says its maximum packet size in CONNACK; paho would send a larger
    PUBLISH anyway and be disconnected. Refused before it is sent: no reconnect at all."""
    broker = make_mosquitto("max_packet_size 300")
    sub = subscriber(broker, "acme/s/a/l/press-1/+")
    outbox = await Outbox.open(tmp_path / "outbox.db")
    forwarding = Forwarding(broker, outbox)
    try:
        await outbox.append([reading("t", 1), big("huge"), reading("t", 3)])
        await forwarding.drained()
        stats = await outbox.stats()
        await sub.received(lambda ms: seqs(ms)[-1:] == [3], timeout=10)
    finally:
        await forwarding.stop()
        await outbox.close()
    assert seqs(sub.messages) == [1, 3]
    assert stats.dropped == 1
    assert not [r for r in caplog.records if "lost connection" in r.getMessage()]
    (refusal,) = [
        r for r in caplog.records if "refused readings on acme/s/a/l/press-1/huge" in r.getMessage()
    ]
    assert "more than the broker's maximum packet size (300)" in refusal.getMessage()


async def test_rows_whose_topic_mqtt_cannot_carry_are_refused_and_the_rest_flows(
    mosquitto: Mosquitto, subscriber: Subscribe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device name with a NUL in it (buffered by a version that let the config have it, and
    no longer configured): mosquitto drops the connection on such a PUBLISH, every time.
    Refused before it is sent."""
    sub = subscriber(mosquitto, "acme/s/a/l/#")
    outbox = await Outbox.open(tmp_path / "outbox.db")
    forwarding = Forwarding(mosquitto, outbox)
    poisoned = Reading("press\0-2", "t", 1, Quality.GOOD, 0, None, 1.7e9)
    try:
        await outbox.append([reading("t", 1), poisoned, poisoned, reading("t", 4)])
        await forwarding.drained()
        stats = await outbox.stats()
        await sub.received(lambda ms: seqs(ms)[-1:] == [4], timeout=10)
    finally:
        await forwarding.stop()
        await outbox.close()
    assert seqs(sub.messages) == [1, 4]
    assert stats.dropped == 2
    assert not [r for r in caplog.records if "lost connection" in r.getMessage()]
    (refusal,) = [r for r in caplog.records if "refused readings" in r.getMessage()]
    assert "contains a control character (U+0000)" in refusal.getMessage()


async def test_a_refused_announcement_does_not_keep_readings_off_the_broker(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite acme/#\npattern deny acme/s/a/l/press-1/_meta\n")
    broker = make_mosquitto(f"acl_file {acl}")
    sub = subscriber(broker, "acme/s/a/l/press-1/+")
    status = subscriber(broker, "acme/s/_gateway/gw/status")
    outbox = await Outbox.open(tmp_path / "outbox.db")
    forwarding = Forwarding(broker, outbox)
    try:
        await outbox.append([reading("t", 1)])
        await sub.received(lambda ms: seqs(ms) == [1], timeout=10)
    finally:
        await forwarding.stop()
        await outbox.close()
    await status.received(lambda ms: len(ms) == 2)
    assert [m.json()["online"] for m in status.messages] == [True, False]
    (warning,) = [r for r in caplog.records if "refused announcements" in r.getMessage()]
    assert "acme/s/a/l/press-1/_meta" in warning.getMessage()
