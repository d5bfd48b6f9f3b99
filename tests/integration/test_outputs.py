"""Outputs built from the config through the format registry, against a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from gateway import config
from gateway.app import cancel
from gateway.model import Batch, Entry, Quality, Reading
from gateway.outbox import Outbox
from gateway.publishers.formats import FORMATS, OutputContext
from tests.conftest import Subscribe
from tests.helpers import Mosquitto


async def test_two_outputs_to_one_broker_need_no_client_ids_of_their_own(
    mosquitto: Mosquitto, subscriber: Subscribe, tmp_path: Path
) -> None:
    """Each output connects with its own default client id: neither takes the other's session
    over (the broker would disconnect the first when the second connects)."""
    doc = {
        "gateway": {"id": "gw", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": "outbox.db"},
        "outputs": [{"name": "local", "url": mosquitto.url}, {"name": "dashboards", "url": mosquitto.url}],
        "devices": [{"name": "press-1", "protocol": "modbus", "host": "127.0.0.1",
                     "tags": [{"name": "t", "table": "holding", "address": 0}]}],
    }  # fmt: skip
    settings = config.parse(yaml.safe_dump(doc), str(tmp_path / "plant.yaml"), env={})
    sub = subscriber(mosquitto, "acme/s/a/l/press-1/t")
    outbox = await Outbox.open(settings.outbox.path)
    built = [FORMATS[o.format](OutputContext(settings, o, outbox, [])) for o in settings.outputs]
    links = [asyncio.create_task(b.connection.run(), name=f"mqtt {b}") for b in built]
    try:
        for b in built:
            await asyncio.wait_for(b.connection.wait_connected(), timeout=10)
        # Each publishes after both connected: a connection taken over could not.
        for seq, b in enumerate(built, start=1):
            reading = Reading("press-1", "t", seq, Quality.GOOD, 0, None, 1.7e9)
            await asyncio.wait_for(b.publish(Batch([Entry(seq, reading)])), timeout=10)  # (a UnsPublisher)
        await sub.received(lambda ms: len(ms) == 2, timeout=10)
        assert [b.connection.generation for b in built] == [1, 1]  # connected once each
    finally:
        for b in built:
            await b.close()
        await cancel(links)
        await outbox.close()
    assert "already connected" not in mosquitto.log_text()
