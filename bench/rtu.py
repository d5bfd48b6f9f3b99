"""`python -m bench rtu`: units x registers on one RTU line, and how much of it the gateway uses.

The line is a virtual one (a socat pty pair) and the simulator (`millwright simulate modbus
--serial --pace`, its own process) holds each answer back by the time the request and the
answer take on the wire at the baud rate, and the silence between them: so the line is as
fast as a real one, and no faster. The gateway's collectors and pollers run in this process,
every unit polled as fast as it can be (poll 1 ms), into a sink that counts. Reported:

- readings/s and transactions/s (each unit's registers are one request);
- line use: the time the frames and the silences Modbus RTU requires (3.5 characters before
  each frame) would take for the transactions done, as a share of the window. What is left
  is the gateway's own time between frames: scheduling, framing, decoding;
- the same with one more unit that does not answer (its timeouts and backoff);
- recovery: the line unplugged (socat stopped) for a few seconds and plugged back in, the
  time from then until every unit reads again.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import Bench
from gateway.app import cancel
from gateway.backoff import Backoff
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.collectors.registry import make_collectors
from gateway.model import Reading
from gateway.poller import poll
from gateway.settings_types import RECONNECT_START
from gateway.state import DeviceState

ABSENT = 99  # a unit id the simulator does not serve


def rtu(b: Bench, *, units: int, tags: int, baudrate: int, warmup: float, duration: float) -> dict[str, Any]:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # (as `millwright run` does)
    ends = (b.workdir / "line-a", b.workdir / "line-b")
    _line(b, ends)
    b.proc(
        "simulator", sys.executable, "-m", "gateway", "simulate", "modbus", "--serial", str(ends[0]),
        "--parity", "N", "--baudrate", str(baudrate), "--pace", "--seed", "1",
        "--units", ",".join(str(u) for u in range(1, units + 1)),
    )  # fmt: skip
    devices = [_device(ends[1], unit, tags, baudrate) for unit in range(1, units + 1)]
    line = devices[0].serial
    assert line is not None
    # One transaction: the request (8 bytes) and the answer (5 + 2 per register), each after
    # the line's silence.
    ideal = (8 + 5 + 2 * tags) * line.char_time + 2 * line.frame_gap
    full = asyncio.run(_measure(devices, warmup, duration))
    absent = asyncio.run(_measure([*devices, _device(ends[1], ABSENT, tags, baudrate)], warmup, duration))
    recovery = asyncio.run(_recovery(b, ends, devices))
    a, o = _report(full, ideal, duration), _report(absent, ideal, duration)
    print(f"rtu: {units} units x {tags} registers at {baudrate} baud: {a['readings_per_s']:.0f} readings/s, "
          f"{a['transactions_per_s']:.1f} transactions/s, line use {a['line_use']:.0%} (ideal transaction "
          f"{ideal * 1000:.2f} ms, measured {a['transaction_ms']} ms, {a['cpu_us_per_transaction']} us CPU "
          f"each); with one absent unit {o['readings_per_s']:.0f} readings/s ({o['line_use']:.0%}); all "
          f"read again {recovery} s after the line came back")  # fmt: skip
    return {
        "parameters": {"units": units, "registers_per_unit": tags, "baudrate": baudrate, "parity": "N",
                       "warmup_s": warmup, "duration_s": duration},
        "ideal_transaction_ms": round(ideal * 1000, 2),
        "all_answer": a,
        "one_absent": o,
        "recovery_after_unplug_s": recovery,
    }  # fmt: skip


def _line(b: Bench, ends: tuple[Path, Path]) -> None:
    b.proc("socat", "socat", f"pty,rawer,link={ends[0]}", f"pty,rawer,link={ends[1]}")
    deadline = time.monotonic() + 10
    while not all(end.exists() for end in ends):
        if time.monotonic() > deadline:
            raise SystemExit(
                "socat did not make the virtual line (is socat installed? make test installs it)"
            )
        time.sleep(0.01)


def _device(port: Path, unit: int, tags: int, baudrate: int) -> ModbusDevice:
    return ModbusDevice.model_validate({
        "name": f"unit-{unit}", "protocol": "modbus", "unit": unit, "poll": "1ms",
        "serial": {"port": str(port), "baudrate": baudrate, "parity": "N"},
        "tags": [{"name": f"r{i}", "table": "holding", "address": i} for i in range(tags)],
    })  # fmt: skip


class _Count:
    def __init__(self) -> None:
        self.readings = 0

    async def __call__(self, readings: list[Reading]) -> None:
        self.readings += sum(1 for r in readings if not r.tag.startswith("$"))


async def _measure(devices: list[ModbusDevice], warmup: float, duration: float) -> dict[str, float]:
    sink = _Count()
    states, tasks = _pollers(devices, sink)
    try:
        await asyncio.sleep(warmup)
        reads, readings, cpu = sum(s.reads for s in states.values()), sink.readings, _cpu()
        await asyncio.sleep(duration)
        return {
            "transactions": sum(s.reads for s in states.values()) - reads,
            "readings": sink.readings - readings,
            "cpu_s": _cpu() - cpu,
        }
    finally:
        await cancel(tasks)


async def _recovery(b: Bench, ends: tuple[Path, Path], devices: list[ModbusDevice]) -> float:
    """Seconds from plugging the line back in until every unit has read again."""
    states, tasks = _pollers([d.model_copy(update={"poll": 0.05}) for d in devices], _Count())
    try:
        await _until(lambda: all(s.reads for s in states.values()))
        socat = next(p for p in b.procs if p.name == "socat")
        socat.stop()
        b.procs.remove(socat)
        await _until(lambda: not any(s.up for s in states.values()))
        await asyncio.sleep(3.0)  # unplugged for a while: the backoff has grown
        reads = {n: s.reads for n, s in states.items()}
        _line(b, ends)
        back = time.monotonic()
        await _until(lambda: all(s.reads > reads[n] for n, s in states.items()), within=60)
        return round(time.monotonic() - back, 2)
    finally:
        await cancel(tasks)


def _pollers(
    devices: list[ModbusDevice], sink: _Count
) -> tuple[dict[str, DeviceState], list[asyncio.Task[None]]]:
    """A poller per device, as the gateway runs them, into `sink`; and the devices' states."""
    states = {d.name: DeviceState(d.name) for d in devices}
    tasks = [asyncio.create_task(poll(c, d.poll, sink, state=states[d.name],
                                      backoff=Backoff(initial=RECONNECT_START, cap=d.reconnect_max)))
             for d, c in make_collectors(devices, Path())]  # fmt: skip
    return states, tasks


async def _until(condition: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("the line did not come back in time")
        await asyncio.sleep(0.01)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(m: dict[str, float], ideal: float, duration: float) -> dict[str, Any]:
    transactions = m["transactions"]
    return {
        "readings_per_s": round(m["readings"] / duration, 1),
        "transactions_per_s": round(transactions / duration, 1),
        "transaction_ms": round(duration / transactions * 1000, 2) if transactions else None,
        "line_use": round(transactions * ideal / duration, 3),
        "cpu_us_per_transaction": round(m["cpu_s"] / transactions * 1e6) if transactions else None,
    }
