"""The scenarios: throughput (with its ceilings), outage and scale. Each returns a result dict and
prints a short summary; `python -m bench` saves it to bench/results/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pymodbus.client import AsyncModbusTcpClient

from bench.harness import (
    OPCUA_TICK,
    Bench,
    Proc,
    merge,
    modbus_config,
    opcua_config,
    outbox_depth,
    percentile,
    ports,
)
from gateway.errors import OutboxError
from gateway.outbox import read_stats

TOPICS = {"uns": "bench/#", "batch": "bench/#", "sparkplug": "spBv1.0/bench/#"}


@dataclass(frozen=True)
class _Load:
    """The processes of a steady load: broker, simulator, counter and gateway."""

    broker: Proc
    broker_port: int
    simulator: Proc
    counter: Proc
    counter_out: Path
    outbox: Path
    gateway: Proc


def _load(b: Bench, *, devices: int, tags: int, poll: float, fmt: str, outputs: int = 1) -> _Load:
    """Start N presses polled every `poll` s, a broker, the counter, then the gateway. With
    `outputs` > 1 the gateway has that many outputs of the same format, each to a broker of its
    own; the counter counts at the first (the others' brokers have no subscriber)."""
    broker_port, sim_port = ports(2)
    broker = b.broker(broker_port)
    simulator = b.simulator(sim_port, devices)
    counter, counter_out = b.counter(broker_port, TOPICS[fmt], fmt)
    outbox = b.workdir / "outbox.db"
    config = modbus_config(
        broker_port, sim_port, outbox, devices=devices, tags=tags, poll=f"{poll * 1000:g}ms", fmt=fmt
    )
    if outputs > 1:
        first = config.pop("mqtt")
        urls = [first["url"]]
        for n, port in enumerate(ports(outputs - 1), start=2):
            b.broker(port, name=f"mosquitto-{n}")
            urls.append(f"mqtt://127.0.0.1:{port}")
        config["outputs"] = [{**first, "name": f"out{n}", "url": url} for n, url in enumerate(urls, start=1)]
    return _Load(broker, broker_port, simulator, counter, counter_out, outbox, b.gateway(config))


def _latency(counts: dict[str, Any], first: float, last: float) -> dict[str, float | None]:
    """p50/p99/max latency (ms) of the readings made between `first` and `last` (epoch s)."""
    hists = [h for second, h in counts["latency_ms"].items() if first <= int(second) < last]
    hist = merge(hists)
    return {"p50": percentile(hist, 0.5), "p99": percentile(hist, 0.99), "max": max(hist) if hist else None}


def _received(counts: dict[str, Any], first: float, last: float) -> int:
    return sum(n for second, n in counts["received"].items() if first <= int(second) < last)


def throughput(
    b: Bench, *, devices: int, tags: int, poll: float, fmt: str, warmup: float, duration: float,
    outputs: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Steady load: readings/s at the subscriber, gateway CPU per 1,000 readings, RSS, latency."""
    load = _load(b, devices=devices, tags=tags, poll=poll, fmt=fmt, outputs=outputs)
    offered = devices * tags / poll
    parameters = {"devices": devices, "tags": tags, "poll_s": poll, "format": fmt, "outputs": outputs}
    result = _steady(load, parameters, offered, fmt=fmt, warmup=warmup, duration=duration)
    what = f"{devices} x {tags} tags every {poll:g} s" + (f", {outputs} outputs" if outputs > 1 else "")
    print(f"throughput {fmt}: {what} (offered {offered:.0f}/s): {_summary(result)}")
    return result


def opcua(b: Bench, *, items: int, fmt: str, warmup: float, duration: float) -> dict[str, Any]:
    """The same over OPC UA: one server, `items` monitored items that each change every tick."""
    broker_port, sim_port = ports(2)
    broker = b.broker(broker_port)
    simulator = b.opcua_simulator(sim_port)
    counter, counter_out = b.counter(broker_port, TOPICS[fmt], fmt)
    outbox = b.workdir / "outbox.db"
    gateway = b.gateway(opcua_config(broker_port, sim_port, outbox, items=items, fmt=fmt))
    load = _Load(broker, broker_port, simulator, counter, counter_out, outbox, gateway)
    offered = items / OPCUA_TICK
    parameters = {"items": items, "publishing_interval_s": OPCUA_TICK, "format": fmt}
    result = _steady(load, parameters, offered, fmt=fmt, warmup=warmup, duration=duration)
    print(f"opcua {fmt}: {items} monitored items changing every {OPCUA_TICK:g} s (offered {offered:.0f}/s): "
          f"{_summary(result)}")  # fmt: skip
    return result


def _steady(
    load: _Load, parameters: dict[str, Any], offered: float, *, fmt: str, warmup: float, duration: float
) -> dict[str, Any]:
    """Measure a running load over a window of whole seconds after `warmup`, then stop it."""
    gateway, counter, counter_out, outbox = load.gateway, load.counter, load.counter_out, load.outbox
    time.sleep(warmup)
    # Whole seconds, so the counter's one-second buckets fall entirely inside the window.
    start = int(time.time()) + 1
    time.sleep(start - time.time())
    # The others' CPU too: it shows which process saturates first.
    others = {"broker": load.broker, "simulator": load.simulator, "counter": counter}
    others0 = {name: p.cpu() for name, p in others.items()}
    cpu0 = gateway.cpu()
    time.sleep(duration)
    cpu1 = gateway.cpu()
    shares = {name: round((p.cpu() - others0[name]) / duration, 3) for name, p in others.items()}
    rss, peak = gateway.memory()
    depth = outbox_depth(outbox)
    gateway.stop()
    counter.stop()
    counts = json.loads(counter_out.read_text())
    received = _received(counts, start, start + duration)
    cpu = cpu1 - cpu0
    return {
        "parameters": {**parameters, "warmup_s": warmup, "window_s": duration},
        "offered_per_s": offered,
        "readings_per_s": round(received / duration),
        "gateway_cpu_share": round(cpu / duration, 3),
        "gateway_cpu_ms_per_1000": round(cpu / received * 1e6, 1) if received else None,
        "gateway_rss_mb": round(rss / 2**20, 1),
        "gateway_peak_rss_mb": round(peak / 2**20, 1),
        "latency_ms": _latency(counts, start, start + duration),
        "outbox_depth_at_end": depth,
        "seq": counts["seq"] if fmt in ("uns", "batch") else None,
        "other_cpu_shares": shares,
    }


def _summary(result: dict[str, Any]) -> str:
    latency = result["latency_ms"]
    return (
        f"{result['readings_per_s']} readings/s, CPU {result['gateway_cpu_share']:.0%} of a core = "
        f"{result['gateway_cpu_ms_per_1000']} ms per 1,000 readings, RSS {result['gateway_rss_mb']} MB "
        f"(peak {result['gateway_peak_rss_mb']}), latency p50 {latency['p50']} ms p99 {latency['p99']} ms; "
        + ", ".join(f"{name} {share:.0%}" for name, share in result["other_cpu_shares"].items())
    )


def modbus_ceiling(b: Bench, *, devices: int, tags: int, duration: float) -> float:
    """Registers/s a bare pymodbus loop reads from the same simulator: one client per device,
    each reading its `tags` holding registers back to back."""
    sim_port = ports(1)[0]
    sim = b.simulator(sim_port, devices)

    async def loop(unit: int, until: float) -> int:
        client = AsyncModbusTcpClient("127.0.0.1", port=sim_port)
        await client.connect()
        n = 0
        while time.monotonic() < until:
            await client.read_holding_registers(0, count=tags, device_id=unit)
            n += tags
        client.close()
        return n

    async def run() -> int:
        until = time.monotonic() + duration
        return sum(await asyncio.gather(*(loop(u, until) for u in range(1, devices + 1))))

    total = asyncio.run(run())
    sim.stop()
    return total / duration


def mqtt_ceiling(b: Bench, *, count: int = 50_000, inflight: int = 200) -> tuple[float, float]:
    """QoS 1 messages/s a bare paho loop publishes to mosquitto (a UNS-sized payload), and its
    CPU microseconds per message. One thread, as the gateway drives paho: publish while fewer
    than `inflight` (the gateway's default window) await their PUBACK, else read PUBACKs."""
    port = ports(1)[0]
    b.broker(port)
    acked = 0

    def on_publish(*_: object) -> None:
        nonlocal acked
        acked += 1

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(0)  # the loop below is the window, as in the gateway
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    deadline = time.monotonic() + 120

    def turn(timeout: float) -> None:
        rc = client.loop(timeout)
        if rc != paho.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
            raise SystemExit(f"paho ceiling: {paho.error_string(rc)} after {acked} messages")

    while not client.is_connected():
        turn(0.1)
    payload = (
        b'{"value":21.5,"quality":"Good","timestamp":"2026-11-24T12:00:00.123Z","unit":"Cel","seq":1042}'
    )
    sent = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while acked < count:
        while sent < count and sent - acked < inflight:
            client.publish(f"bench/s/a/l/press-1/r{sent % 100}", payload, qos=1)
            sent += 1
        turn(1.0)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    client.disconnect()
    return acked / elapsed, cpu / acked * 1e6


def outage(
    b: Bench, *, devices: int, tags: int, poll: float, fmt: str, down: float, warmup: float
) -> dict[str, Any]:
    """Steady load; the broker stopped for `down` seconds and restarted. Backlog, drain time,
    drain rate against the live rate, latency of live readings during the drain, gaps."""
    load = _load(b, devices=devices, tags=tags, poll=poll, fmt=fmt)
    gateway, counter, counter_out, outbox = load.gateway, load.counter, load.counter_out, load.outbox
    broker, broker_port = load.broker, load.broker_port
    time.sleep(warmup)
    steady = outbox_depth(outbox)
    broker.stop()
    stopped = time.time()
    time.sleep(down)
    backlog = outbox_depth(outbox)
    b.broker(broker_port)  # same port, same persistence: the counter's session survives
    restarted = time.time()
    # The gateway reconnects after its backoff (up to 5 s): the drain starts when the outbox
    # starts to shrink, and ends when it is back to its steady depth (what is in flight).
    threshold = max(2 * steady, 1000)
    reconnected: float | None = None
    peak = backlog
    while (depth := outbox_depth(outbox)) > threshold:
        if reconnected is None and depth < peak - 1000:
            reconnected = time.time()
        peak = max(peak, depth)
        if time.time() - restarted > 300:
            # The gateway cannot publish faster than the live rate: report, do not wait forever.
            print("the backlog did not drain within 5 minutes")
            break
        time.sleep(0.1)
    drained = time.time()
    complete = depth <= threshold
    if reconnected is None:
        reconnected = drained
    backlog = peak
    time.sleep(3)
    gateway.stop()
    counter.stop()
    counts = json.loads(counter_out.read_text())
    live_rate = devices * tags / poll
    drain = max(drained - reconnected, 0.1)
    drain_rate = (backlog + live_rate * drain) / drain if drain > 0 else None
    latency = _latency(counts, reconnected, drained + 1)
    result = {
        "parameters": {"devices": devices, "tags": tags, "poll_s": poll, "format": fmt, "down_s": down},
        "live_per_s": live_rate,
        "backlog": backlog,
        "reconnect_after_restart_s": round(reconnected - restarted, 2),
        "drained": complete,
        "drain_s": round(drain, 2),
        "drain_per_s": round(drain_rate) if drain_rate else None,
        "drain_vs_live": round(drain_rate / live_rate, 1) if drain_rate else None,
        "live_latency_during_drain_ms": latency,
        "outage_started": stopped,
        "seq": counts["seq"] if fmt in ("uns", "batch") else None,
    }
    print(
        f"outage {fmt}: broker down {down:g} s at {live_rate:.0f} readings/s: backlog {backlog}; reconnected "
        f"{reconnected - restarted:.1f} s after the broker was back, drained in {drain:.1f} s "
        f"({result['drain_vs_live']}x live, which kept flowing), live latency during the "
        f"drain p50 {latency['p50']} ms, p99 {latency['p99']} ms; seq {result['seq']}"
    )
    return result


def scale(b: Bench, *, size: int, rate: float, fmt: str, hold: float) -> dict[str, Any]:
    """`size` configured tags (presses of 100 registers, 200 presses per simulator process),
    polled so that about `rate` readings/s flow: start-up time (process start to the first
    reading of every tag committed), RSS after one minute and at the end of `hold`, CPU."""
    devices = -(-size // 100)
    poll = size / rate
    broker_port = ports(1)[0]
    b.broker(broker_port)
    sims = [ports(1)[0] for _ in range(-(-devices // 200))]
    for i, port in enumerate(sims):
        b.simulator(port, min(200, devices - 200 * i))
    counter, counter_out = b.counter(broker_port, TOPICS[fmt], fmt)
    outbox = b.workdir / "outbox.db"
    config = modbus_config(
        broker_port, sims[0], outbox, devices=devices, tags=100, poll=f"{poll:g}s", fmt=fmt
    )
    for n, device in enumerate(config["devices"]):
        device["port"], device["unit"] = sims[n // 200], n % 200 + 1
        if n == devices - 1 and size % 100:
            device["tags"] = device["tags"][: size % 100]
    started = time.monotonic()
    gateway = b.gateway(config)
    while True:
        time.sleep(0.2)
        with contextlib.suppress(OutboxError):  # until the gateway has created it
            if read_stats(outbox).last_seq >= size:
                break
        if time.monotonic() - started > 300:
            raise SystemExit(f"{size} tags: no complete first cycle within 5 minutes")
    startup = time.monotonic() - started
    time.sleep(max(0.0, 60 - (time.monotonic() - started)))
    rss_1min, _ = gateway.memory()
    cpu0, t0, w0 = gateway.cpu(), time.monotonic(), time.time()
    time.sleep(max(0.0, hold - (time.monotonic() - started)))
    cpu = (gateway.cpu() - cpu0) / (time.monotonic() - t0)
    w1 = time.time()
    rss_end, peak = gateway.memory()
    gateway.stop()
    counter.stop()
    counts = json.loads(counter_out.read_text())
    rate_seen = _received(counts, int(w0) + 1, int(w1)) / max(1, int(w1) - int(w0) - 1)
    result = {
        "parameters": {"tags": size, "devices": devices, "poll_s": poll, "format": fmt, "hold_s": hold},
        "startup_s": round(startup, 2),
        "rss_1min_mb": round(rss_1min / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / rss_1min - 1, 3),
        "peak_rss_mb": round(peak / 2**20, 1),
        "gateway_cpu_share": round(cpu, 3),
        "readings_per_s": round(rate_seen),
    }
    print(
        f"scale {fmt}: {size} tags ({devices} devices, poll {poll:g} s): first full cycle {startup:.1f} s "
        f"after start, RSS {result['rss_1min_mb']} MB at 1 min and {result['rss_end_mb']} MB at "
        f"{hold:g} s ({result['rss_growth']:+.1%}), CPU {cpu:.0%} of a core, {rate_seen:.0f} readings/s"
    )
    return result
