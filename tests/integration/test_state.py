"""The gateway's State through a device outage and a broker outage, and its summary line, with
the real poller, a Modbus simulator and a mosquitto."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from gateway.model import Quality
from gateway.state import State
from simulators.modbus import ModbusSimulator
from tests.helpers import Mosquitto, eventually, running

TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "running", "table": "coil", "address": 0},
]


@pytest.fixture
async def press() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=1) as sim:
        yield sim


def config(sim: ModbusSimulator, broker: Mosquitto, outbox: Path) -> str:
    return yaml.safe_dump({
        "gateway": {"id": "edge-st", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(outbox)},
        "mqtt": {"url": broker.url},
        "devices": [{
            "name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port, "poll": "50ms",
            "timeout": "300ms", "reconnect_max": "1s", "tags": TAGS,
        }],
    })  # fmt: skip


class Lines:
    """The summary lines logged so far."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="gateway.state")
        self._caplog = caplog

    def all(self) -> list[str]:
        return [r.getMessage() for r in self._caplog.records if r.name == "gateway.state"]

    async def one_with(self, *texts: str) -> str:
        """Wait for a new line that holds every one of `texts`; return it."""
        seen = len(self.all())

        def found() -> list[str]:
            return [line for line in self.all()[seen:] if all(t in line for t in texts)]

        await eventually(lambda: bool(found()), timeout=20, what=f"a summary line with {texts}")
        return found()[0]


async def test_state_follows_a_device_outage_and_a_broker_outage(
    press: ModbusSimulator, mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = Lines(caplog)
    async with running(
        config(press, mosquitto, tmp_path / "outbox.db"), tmp_path / "c.yaml", report_every=0.2
    ) as gateway:
        await eventually(lambda: gateway.state is not None, what="the gateway running")
        state = gateway.state
        assert isinstance(state, State)
        device, output = state.devices["press-1"], state.outputs["mqtt"]
        await eventually(lambda: device.up and output.connected, timeout=20, what="device and broker up")
        await eventually(lambda: len(state.latest) == 2, timeout=20, what="a value of every tag")
        assert device.protocol == "modbus"
        assert state.latest["press-1", "temperature"].quality is Quality.GOOD
        line = await lines.one_with("state: 1/1 devices up", "output mqtt connected")
        counted = re.search(r", ([\d,]+) readings \(\+([\d,]+)/min\), outbox ", line)
        assert counted, line
        assert 0 < int(counted[1].replace(",", "")) <= state.readings
        assert line.count(";") == 1  # one output

        await press.stop()
        await eventually(lambda: not device.up, timeout=20, what="the device down")
        assert device.last_error
        await lines.one_with("state: 0/1 devices up (down: press-1 ")
        assert state.latest["press-1", "temperature"].quality is Quality.BAD  # reported Bad once
        await press.start()
        await eventually(lambda: device.up, timeout=20, what="the device back")
        assert device.reconnects == 1
        assert device.read_errors >= 1

        mosquitto.stop()
        await eventually(lambda: not output.connected, timeout=20, what="the broker loss noticed")
        # The readings made meanwhile wait in the outbox, and the line says so.
        await lines.one_with("state: 1/1 devices up", "output mqtt disconnected")
        await eventually(lambda: output.depth > 0, what="a backlog for the output")
        published = output.published
        assert published > 0  # what went out before the loss
        mosquitto.start()
        await eventually(lambda: output.connected, timeout=20, what="the broker back")
        # The backlog drains: what was waiting is published, and counted as it is.
        await eventually(lambda: output.published > published, timeout=20, what="the backlog published")
        await eventually(lambda: output.depth == 0 or output.published >= state.readings - output.depth,
                         timeout=20, what="the output caught up")  # fmt: skip
        assert output.refused == 0
    assert all(line.startswith("state: ") and "\n" not in line for line in lines.all())
