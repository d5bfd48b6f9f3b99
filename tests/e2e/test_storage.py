"""The gateway process and its outbox's storage: a full disk, a failing disk, and a second
gateway started on the same outbox."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.outbox import read_stats
from simulators.modbus import ModbusSimulator
from tests.conftest import MakeMosquitto, Subscribe
from tests.e2e.conftest import GatewayProcess, RunGateway
from tests.e2e.test_pipeline import TAGS
from tests.helpers import Message, Mosquitto, SmallDisk, eventually

MB = 1024 * 1024
TOPIC = "acme/s/a/l/press-1/"


@pytest.fixture
async def simulator() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=5) as sim:
        yield sim


def config(outbox: Path, sim: ModbusSimulator, broker: Mosquitto, **gateway: Any) -> dict[str, Any]:
    return {
        "gateway": {"id": "edge-disk", "enterprise": "acme", "site": "s", "area": "a", "line": "l"}
        | gateway,
        "outbox": {"path": str(outbox)},
        "mqtt": {"url": broker.url},
        "devices": [
            {"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port,
             "poll": "50ms", "tags": TAGS},
        ],
    }  # fmt: skip


def seqs(messages: list[Message]) -> list[int]:
    return [m.json()["seq"] for m in messages if m.topic.startswith(TOPIC) and not m.topic.endswith("_meta")]


def chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True)


def alive(gateway: GatewayProcess) -> bool:
    assert gateway.proc is not None
    return gateway.proc.poll() is None


async def test_a_full_disk_is_survived_and_recovered_from(
    simulator: ModbusSimulator,
    make_mosquitto: MakeMosquitto,
    subscriber: Subscribe,
    run_gateway: RunGateway,
    small_disk: Callable[[int], SmallDisk],
) -> None:
    """The disk is a cap: while the broker is away the outbox grows until the disk is down to
    its reserve, then drops the oldest readings (counted), keeps polling, and publishes when
    the broker is back. Taken to the last byte by another program, it refuses (counted) and
    waits; when space returns it goes on by itself. Every seq that did not arrive was counted."""
    disk = small_disk(24 * MB)
    outbox = disk.path / "outbox.db"
    broker = make_mosquitto()
    sub = subscriber(broker, TOPIC + "#")
    gateway = run_gateway(config(outbox, simulator, broker))
    await sub.received(lambda m: len(seqs(m)) >= 50, timeout=30)

    # Another program leaves 3 MB free, below the outbox's reserve, while the broker is away.
    broker.stop()
    disk.fill(leave=3 * MB)
    await eventually(lambda: "the disk is full" in gateway.text(), timeout=60, what="the full disk noticed")
    # (Not too often: each read holds the WAL for a moment, and the outbox's WAL must start
    # over after each write to keep within the disk.)
    await eventually(lambda: read_stats(outbox).dropped > 0, timeout=60, what="drops", every=0.25)
    broker.start()
    low_at = read_stats(outbox).last_seq
    await sub.received(lambda m: max(seqs(m)) > low_at + 100, timeout=60)  # polling and publishing
    assert disk.available() > MB  # the outbox kept off the last of the disk

    # Now the other program takes every last byte: the outbox goes on in the pages it has.
    disk.fill(leave=0)
    full_at = read_stats(outbox).last_seq
    await sub.received(lambda m: max(seqs(m)) > full_at + 100, timeout=60)
    assert alive(gateway), gateway.text()

    disk.free()
    await eventually(lambda: "outbox full: dropped" in gateway.text(), timeout=60, what="the episode's end")
    freed_at = read_stats(outbox).last_seq
    await sub.received(lambda m: max(seqs(m)) > freed_at + 100, timeout=60)
    assert await gateway.terminate() == 0, gateway.text()
    assert "Traceback" not in gateway.text()

    stats = read_stats(outbox)
    seen = set(seqs(sub.messages))
    gaps = set(range(1, max(seen) + 1)) - seen
    # The evicted readings leave gaps, all counted (the count also holds the readings that
    # were refused, which took no seq); from the moment there was room again, none.
    assert len(gaps) <= stats.dropped, f"{len(gaps)} seq missing, {stats.dropped} counted as dropped"
    assert not [s for s in gaps if s > freed_at]


async def test_a_failing_disk_ends_the_gateway_with_one_line(
    simulator: ModbusSimulator, mosquitto: Mosquitto, run_gateway: RunGateway, tmp_path: Path
) -> None:
    """An I/O error that is not a full disk (here: the WAL made immutable) cannot be handled
    in place: the gateway stops with one clear line and status 1 (systemd restarts it), not a
    traceback of the task group."""
    if os.geteuid() != 0:
        pytest.skip("making the WAL immutable (chattr +i) needs root")
    outbox = tmp_path / "outbox.db"
    gateway = run_gateway(config(outbox, simulator, mosquitto))
    wal = Path(f"{outbox}-wal")
    # Running, not still opening the outbox (which writes the WAL too, and whose errors are
    # told differently): the error must come from a write while it works.
    await eventually(lambda: " running: " in gateway.text(), timeout=30, what="the gateway to run")
    await eventually(lambda: wal.exists() and wal.stat().st_size > 0, timeout=30, what="the WAL")
    chattr("+i", wal)
    try:
        assert gateway.proc is not None
        await eventually(lambda: not alive(gateway), timeout=30, what="the gateway to stop")
    finally:
        chattr("-i", wal)
    assert gateway.proc.returncode == 1, gateway.text()
    text = gateway.text()
    assert "Traceback" not in text, text
    assert "ExceptionGroup" not in text, text
    last = text.strip().splitlines()[-1]
    expected = rf"millwright: outbox {re.escape(str(outbox))}: cannot \w+: disk I/O error"
    assert re.fullmatch(expected, last), text


async def test_a_second_gateway_on_the_same_outbox_exits_2_naming_the_first(
    simulator: ModbusSimulator, mosquitto: Mosquitto, run_gateway: RunGateway, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    first = run_gateway(config(outbox, simulator, mosquitto))
    await eventually(lambda: "running" in first.text(), timeout=30, what="the first gateway running")
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(config(outbox, simulator, mosquitto, id="edge-other")))
    second = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", str(path), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(second.communicate(), timeout=30)
    assert second.returncode == 2
    assert first.proc is not None
    assert err.decode().strip() == (
        f"millwright: outbox {outbox} is in use by millwright (pid {first.proc.pid}): one gateway per "
        "outbox (stop the other one, or give this config its own outbox.path)"
    )
    assert alive(first)
    assert await first.terminate() == 0
