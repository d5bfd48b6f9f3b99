"""SIGTERM ends the gateway cleanly (exit 0, no traceback) in every state of its broker
connection: connecting, waiting for CONNACK or for the TLS handshake, connected, backing
off after a refusal, and talking to a broker that stopped answering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import free_port
from simulators.modbus import ModbusSimulator
from tests.conftest import MakeMosquitto
from tests.e2e.conftest import GatewayProcess, RunGateway
from tests.helpers import eventually

TAGS = [{"name": "temperature", "table": "holding", "address": 0, "type": "float32"}]


class SilentPeer:
    """A TCP port that accepts connections and never says a word (a broker hung before
    CONNACK, or a TLS endpoint that never answers the handshake)."""

    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        await reader.read()  # until the gateway hangs up; answer nothing

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def silent() -> AsyncIterator[SilentPeer]:
    peer = SilentPeer()
    yield peer
    await peer.close()


@pytest.fixture
async def simulator() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=3) as sim:
        yield sim


def _config(tmp_path: Path, sim: ModbusSimulator, url: str) -> dict[str, Any]:
    return {
        "gateway": {"id": "edge-stop", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "mqtt": {"url": url, "connect_timeout": "30s", "keepalive": 5},
        "devices": [
            {"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port,
             "poll": "50ms", "tags": TAGS},
        ],
    }  # fmt: skip


async def _stops_cleanly(gateway: GatewayProcess) -> None:
    code = await gateway.terminate()
    text = gateway.text()
    assert code == 0, text
    assert "Traceback" not in text, text
    assert "gateway edge-stop stopped" in text, text


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts"])
async def test_sigterm_while_the_broker_has_not_answered(
    scheme: str, tmp_path: Path, simulator: ModbusSimulator, silent: SilentPeer, run_gateway: RunGateway
) -> None:
    """mqtt://: CONNECT sent, no CONNACK. mqtts://: the TLS handshake never completes."""
    port = await silent.start()
    gateway = run_gateway(_config(tmp_path, simulator, f"{scheme}://127.0.0.1:{port}"))
    await eventually(lambda: silent.accepted >= 1, timeout=20, what="a connection to the silent peer")
    await eventually(lambda: "running" in gateway.text(), timeout=20, what="the gateway running")
    await _stops_cleanly(gateway)


async def test_sigterm_while_backing_off_after_a_refusal(
    tmp_path: Path, simulator: ModbusSimulator, run_gateway: RunGateway
) -> None:
    gateway = run_gateway(_config(tmp_path, simulator, f"mqtt://127.0.0.1:{free_port()}"))
    await eventually(lambda: "cannot connect to" in gateway.text(), timeout=20, what="a refused connect")
    await _stops_cleanly(gateway)


@pytest.mark.parametrize("paused", [False, True], ids=["connected", "broker-stopped-answering"])
async def test_sigterm_while_connected(
    paused: bool,
    tmp_path: Path,
    simulator: ModbusSimulator,
    make_mosquitto: MakeMosquitto,
    run_gateway: RunGateway,
) -> None:
    broker = make_mosquitto()
    gateway = run_gateway(_config(tmp_path, simulator, broker.url))
    await eventually(lambda: "connected to" in gateway.text(), timeout=20, what="a connection")
    if paused:
        broker.pause()  # sockets stay open; no PUBACK, no PINGRESP, no answer to DISCONNECT
    try:
        await _stops_cleanly(gateway)
    finally:
        broker.resume()
