"""A device that comes back is read again soon: the reconnect backoff stops at the device's
reconnect_max (default 10 s), not at half a minute."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import MakeMosquitto
from tests.e2e.conftest import RunGateway
from tests.helpers import eventually


class HangsUp:
    """A device port that accepts each connection and closes it at once, counting them."""

    def __init__(self) -> None:
        self.accepted = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()


@pytest.fixture
async def hangs_up() -> AsyncIterator[tuple[HangsUp, int]]:
    device = HangsUp()
    server = await asyncio.start_server(device._accept, "127.0.0.1", 0)
    yield device, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_reconnect_attempts_come_every_reconnect_max_at_most(
    hangs_up: tuple[HangsUp, int], make_mosquitto: MakeMosquitto, run_gateway: RunGateway, tmp_path: Path
) -> None:
    device, port = hangs_up
    broker = make_mosquitto()
    gateway = run_gateway({
        "gateway": {"id": "edge-r", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "mqtt": {"url": broker.url},
        "devices": [{
            "name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": port, "poll": "100ms",
            "reconnect_max": "1s", "tags": [{"name": "t", "table": "holding", "address": 0}],
        }],
    })  # fmt: skip
    # 0.5 s, then 1 s each: eight attempts in about 8 s. The backoff of before (doubling to
    # 30 s) needed a minute and a half for as many.
    await eventually(lambda: device.accepted >= 8, timeout=45, what="eight reconnect attempts")
    assert await gateway.terminate() == 0
    assert gateway.text().count("device press-1 unreachable") == 1
