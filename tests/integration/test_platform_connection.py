"""What a platform's connection keeps while it runs, against real sockets: the pause between
two CONNECTs (AWS IoT Core), SNI, and announcements that wait for the rate limit without
the connect timing out."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from gateway.config import GatewaySettings
from gateway.model import AssetPath
from gateway.publishers.mqtt import MqttConnection
from gateway.publishers.settings import OutputSettings
from gateway.publishers.uns import connect_uns
from tests.conftest import Subscribe
from tests.helpers import Mosquitto, eventually
from tests.pki import make_pki

GATEWAY = GatewaySettings(id="gw-p", enterprise="acme", site="s", area="a", line="l")


@asynccontextmanager
async def running(conn: MqttConnection) -> AsyncIterator[None]:
    task = asyncio.create_task(conn.run(), name="mqtt")
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


class Refuser:
    """A TLS server that takes each client's CONNECT and hangs up: notes when each CONNECT
    arrived (monotonic) and the server name each client asked for (SNI)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.connects: list[float] = []
        self.names: list[str | None] = []
        context.sni_callback = lambda _obj, name, _ctx: self.names.append(name)  # type: ignore[assignment,func-returns-value]
        self._context = context
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Refuser:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(OSError, asyncio.IncompleteReadError):
            if (await reader.readexactly(1))[0] >> 4 == 1:  # CONNECT
                self.connects.append(time.monotonic())
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


async def test_aws_iot_core_connects_at_most_once_a_second_and_names_the_endpoint(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["thing"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    cert, key = pki.client("thing")
    async with Refuser(server) as refuser:
        url = f"mqtts://localhost:{refuser.port}"
        settings = OutputSettings(
            name="aws", platform="aws-iot-core", url=url, ca=pki.ca, cert=cert, key=key, client_id="thing"
        )
        # The reconnect backoff starts at 0.5 s: only the platform's rule spaces them a second.
        connection = MqttConnection(settings)
        async with running(connection):
            await eventually(lambda: len(refuser.connects) >= 4, timeout=20, what="four CONNECTs")
    gaps = [b - a for a, b in zip(refuser.connects, refuser.connects[1:], strict=False)]
    assert min(gaps) >= 1.0, gaps
    assert set(refuser.names) == {"localhost"}  # SNI: AWS refuses a connection without it


async def test_announcements_held_by_the_rate_limit_do_not_time_the_connect_out(
    mosquitto: Mosquitto, subscriber: Subscribe
) -> None:
    # 12 announcements at 4 a second take 3 s; the connect may take 1 s.
    settings = OutputSettings(name="slow", url=mosquitto.url, max_rate=4, connect_timeout=1.0)
    devices = {f"m{i}": (AssetPath("acme", "s", "a", "l", f"m{i}"), {}) for i in range(11)}
    sub = subscriber(mosquitto, "acme/#")
    connection, _ = connect_uns(settings, GATEWAY, devices)
    async with running(connection):
        await asyncio.wait_for(connection.wait_connected(), 20)
        assert connection.generation == 1  # connected at the first attempt
        got = await sub.received(lambda ms: any(m.topic.endswith("/status") for m in ms), timeout=10)
    assert {m.topic for m in got if m.topic.endswith("/_meta")} == {
        f"acme/s/a/l/m{i}/_meta" for i in range(11)
    }
