"""Under systemd: the notify protocol on a real datagram socket, as systemd listens for it
(READY=1 once running, WATCHDOG=1 while healthy, STATUS= the summary, STOPPING=1), and the
log lines for the journal; and JSON logs for shippers."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.notify import Notifier, keep_alive
from simulators.modbus import ModbusSimulator
from tests.e2e.conftest import RunGateway
from tests.helpers import Mosquitto, eventually


@pytest.fixture
async def press() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=4) as sim:
        yield sim


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """The socket systemd would give in $NOTIFY_SOCKET, bound and non-blocking."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield path, sock
    sock.close()


def drain(sock: socket.socket, into: list[dict[str, str]]) -> list[dict[str, str]]:
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return into
        into.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


async def test_ready_watchdog_status_and_stopping(
    press: ModbusSimulator, mosquitto: Mosquitto, run_gateway: RunGateway, tmp_path: Path,
    systemd: tuple[Path, socket.socket],
) -> None:  # fmt: skip
    path, sock = systemd
    # WatchdogSec=0.4 s: a ping every 0.2 s.
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    gateway = run_gateway(_config(press, mosquitto, tmp_path), env=env)
    got: list[dict[str, str]] = []
    await eventually(lambda: sum("WATCHDOG" in m for m in drain(sock, got)) >= 3, timeout=20,
                     what="three watchdog pings")  # fmt: skip
    assert got[0]["READY"] == "1"
    assert got[0]["STATUS"].startswith("state: ")
    assert all(m["STATUS"].startswith("state: ") for m in got if "WATCHDOG" in m)
    assert await gateway.terminate() == 0
    # (A datagram is in the socket once sent: the exit came after it.)
    assert "STOPPING" in drain(sock, got)[-1]


async def test_no_watchdog_ping_while_unhealthy(systemd: tuple[Path, socket.socket]) -> None:
    """A gateway whose pollers are not running is not pinged for: systemd restarts it."""
    path, sock = systemd
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    reasons = ["the pollers are not running"]
    task = asyncio.create_task(keep_alive(notifier, lambda: reasons, lambda: "state: fine"))
    got: list[dict[str, str]] = []
    try:
        await eventually(lambda: len(drain(sock, got)) >= 3, timeout=10, what="three status updates")
        reasons.clear()  # healthy again: pinged again
        await eventually(lambda: any("WATCHDOG" in m for m in drain(sock, got)), timeout=10, what="a ping")
    finally:
        task.cancel()
    first = got[:3]
    assert all(m == {"STATUS": "the pollers are not running"} for m in first)
    assert {"WATCHDOG": "1", "STATUS": "state: fine"} in got[3:]


def test_nothing_is_sent_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.active
    assert notifier.watchdog is None
    notifier.send(READY="1")  # (nowhere to send: no error either)


def _config(press: ModbusSimulator, mosquitto: Mosquitto, tmp_path: Path) -> dict[str, Any]:
    return {
        "gateway": {"id": "edge-log", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "http": {"enabled": False},
        "mqtt": {"url": mosquitto.url},
        "devices": [{"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": press.port,
                     "poll": "100ms", "tags": [{"name": "t", "table": "holding", "address": 0}]}],
    }  # fmt: skip


async def test_journal_lines_carry_a_priority_and_no_timestamp(
    press: ModbusSimulator, mosquitto: Mosquitto, run_gateway: RunGateway, tmp_path: Path
) -> None:
    gateway = run_gateway(_config(press, mosquitto, tmp_path), env={"JOURNAL_STREAM": "8:12345"})
    await eventually(lambda: "connected to mqtt://" in gateway.text(), timeout=20, what="a connect logged")
    assert await gateway.terminate() == 0
    lines = gateway.text().splitlines()
    assert lines
    assert all(re.match(r"<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) +gateway\.", line) for line in lines), (
        lines
    )
    assert any(line.startswith("<6>INFO    gateway.app: gateway edge-log running") for line in lines)


async def test_json_logs_are_one_object_a_line(
    press: ModbusSimulator, mosquitto: Mosquitto, run_gateway: RunGateway, tmp_path: Path
) -> None:
    gateway = run_gateway(_config(press, mosquitto, tmp_path), args=("--log-format", "json"))
    await eventually(lambda: "connected to mqtt://" in gateway.text(), timeout=20, what="a connect logged")
    assert await gateway.terminate() == 0
    docs = [json.loads(line) for line in gateway.text().splitlines()]
    assert all(set(d) >= {"time", "level", "logger", "message"} for d in docs)
    running = next(d for d in docs if d["message"].startswith("gateway edge-log running"))
    assert (running["level"], running["logger"]) == ("info", "gateway.app")
    assert datetime.fromisoformat(running["time"]).utcoffset() == timedelta(0)
