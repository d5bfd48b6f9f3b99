"""The startup scenario: how long a gateway takes to publish again when it starts on a large
outbox (a long outage's backlog), after a clean stop and after a `kill -9`.

The outbox is filled beforehand with the gateway's own Outbox code (the rows of the devices
the gateway is configured with), closed as a gateway closes it. Then `millwright run` starts
on it; the time counted is from starting the process until the broker has confirmed the
first batch (the outbox's depth drops below the backlog: rows go once delivered). Then the
gateway is killed with SIGKILL and started again, for the start-up after an unclean stop,
which checks the whole file (`quick_check`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench.harness import Bench, modbus_config, ports
from gateway.errors import OutboxError
from gateway.model import Quality, Reading
from gateway.outbox import Outbox, read_stats

DEVICES, TAGS = 4, 100


async def fill(path: Path, rows: int) -> None:
    """`rows` readings of the configured presses, appended in batches as pollers do."""
    box = await Outbox.open(path, max_rows=rows + 1_000_000)
    try:
        batch = DEVICES * TAGS
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            await box.append([
                Reading(f"press-{(start + i) // TAGS % DEVICES + 1}", f"r{(start + i) % TAGS}", start + i,
                        Quality.GOOD, 0, None, 1.7e9 + (start + i) / 8000, None)
                for i in range(n)
            ])  # fmt: skip
    finally:
        await box.close()


def _depth(path: Path) -> int | None:
    with contextlib.suppress(OutboxError, sqlite3.Error):
        return read_stats(path).depth
    return None


def _until_first_delivery(path: Path, backlog: int, gateway: Any, started: float) -> float:
    while True:
        depth = _depth(path)
        if depth is not None and depth < backlog:
            return time.monotonic() - started
        if gateway.popen.poll() is not None:
            raise SystemExit(f"the gateway exited: {gateway.log.read_text()[-2000:]}")
        if time.monotonic() - started > 300:
            raise SystemExit("no delivery within 5 minutes")
        time.sleep(0.01)


def startup(b: Bench, *, rows: int, fmt: str) -> dict[str, Any]:
    broker_port, sim_port = ports(2)
    b.broker(broker_port)
    b.simulator(sim_port, DEVICES)
    outbox = b.workdir / "outbox.db"
    built = time.monotonic()
    asyncio.run(fill(outbox, rows))
    fill_s = time.monotonic() - built
    size = outbox.stat().st_size
    config = modbus_config(broker_port, sim_port, outbox, devices=DEVICES, tags=TAGS, poll="1s", fmt=fmt)
    config["outbox"]["max_rows"] = rows + 1_000_000
    times = {}
    for name in ("clean", "after_kill"):
        backlog = read_stats(outbox).depth
        started = time.monotonic()
        gateway = b.gateway(config, name=f"gateway-{name}")
        times[name] = round(_until_first_delivery(outbox, backlog, gateway, started), 2)
        if name == "clean":
            assert gateway.popen is not None
            gateway.popen.kill()  # the next start is after an unclean stop
            gateway.popen.wait()
        else:
            gateway.stop()
    result = {
        "parameters": {"rows": rows, "format": fmt, "devices": DEVICES, "tags": TAGS},
        "outbox_mb": round(size / 2**20, 1),
        "fill_s": round(fill_s, 1),
        "first_delivery_s": times,
    }
    print(
        f"startup {fmt}: {rows} rows ({result['outbox_mb']} MB): first batch confirmed "
        f"{times['clean']} s after the start (clean stop before), {times['after_kill']} s after kill -9"
    )
    return result
