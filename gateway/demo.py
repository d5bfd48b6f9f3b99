"""`millwright demo`: simulator, gateway and broker in one process, readings shown live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway import config
from gateway.app import Gateway
from gateway.broker import LocalBroker, free_port
from simulators.modbus import ModbusSimulator
from simulators.opcua import OpcUaSimulator

# Packaged with the gateway (in the source tree a link to config/demo.yaml).
DEMO_CONFIG = Path(__file__).parent / "demo.yaml"


def _own_status_port(settings: config.Settings) -> config.Settings:
    """The demo's status page on its usual port, or on a free one when that is taken (by a
    gateway installed as a service, say): the address printed must be the demo's."""
    http = settings.http
    with socket.socket() as probe:
        try:
            probe.bind((http.host, http.port))
        except OSError:
            http = http.model_copy(update={"listen": f"{http.host}:{free_port()}"})
    return settings.model_copy(update={"http": http})


def _settings(modbus_port: int, opcua: str, broker_url: str, version: str, outbox: Path) -> config.Settings:
    settings = config.load(DEMO_CONFIG)
    devices = [
        d.model_copy(update={"endpoint": opcua} if d.protocol == "opcua" else {"port": modbus_port})
        for d in settings.devices
    ]
    outputs = tuple(o.model_copy(update={"url": broker_url, "version": version}) for o in settings.outputs)
    outbox_settings = settings.outbox.model_copy(update={"path": outbox})
    return settings.model_copy(update={"devices": devices, "outputs": outputs, "outbox": outbox_settings})


class _Watcher:
    """Subscribes to the gateway's namespace and prints each reading as it arrives."""

    def __init__(self, url: str, topic: str, loop: asyncio.AbstractEventLoop) -> None:
        host_port = url.split("://", 1)[1]
        host, _, port = host_port.partition(":")
        self.count = 0
        self._loop = loop
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"millwright-demo-{time.time_ns()}")
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.connect(host, int(port or 1883))
        self._client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._loop.call_soon_threadsafe(self._show, msg.topic, bytes(msg.payload))

    def _show(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        parts = topic.split("/")
        if parts[-1] == "status" or parts[-1] == "_meta" or not isinstance(body, dict) or "seq" not in body:
            return
        self.count += 1
        value = body["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else json.dumps(value)
        unit = body.get("unit") or ""
        where = "/".join(parts[-2:])
        clock, quality, seq = body["timestamp"][11:23], body["quality"], body["seq"]
        print(f"{clock}  {where:<28} {shown:>12} {unit:<5} {quality:<9} seq {seq}", flush=True)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


async def demo(broker: str | None, duration: float | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="millwright-demo-") as tmp:
        async with (
            ModbusSimulator(port=0) as sim,
            OpcUaSimulator(port=0, pki_dir=Path(tmp) / "simulator-pki") as opcua,
            contextlib.AsyncExitStack() as stack,
        ):
            if broker is None or broker == "embedded":
                local = await stack.enter_async_context(LocalBroker(embedded=broker == "embedded"))
                url, version, kind = local.url, local.version, f"private {local.kind} broker"
            else:
                url, version, kind = broker, "5", "broker"
            settings = _settings(sim.port, opcua.endpoint, url, version, Path(tmp) / "outbox.db")
            settings = _own_status_port(settings)
            print(f"Modbus simulator on 127.0.0.1:{sim.port}", file=sys.stderr)
            print(f"OPC UA simulator at {opcua.endpoint}", file=sys.stderr)
            print(f"{kind} at {url}", file=sys.stderr)
            if settings.http.enabled:
                print(f"Status page: http://{settings.http.listen}/", file=sys.stderr)
            print(
                f"Readings published under {settings.gateway.enterprise}/...; Ctrl-C stops.\n",
                file=sys.stderr,
            )
            gateway = Gateway(settings)
            task = asyncio.create_task(gateway.run(), name="gateway")
            watcher = _Watcher(url, f"{settings.gateway.enterprise}/#", loop)
            started = time.monotonic()
            try:
                waiters = [asyncio.create_task(stop.wait()), task]
                await asyncio.wait(waiters, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
                waiters[0].cancel()
            finally:
                gateway.stop()
                await task
                watcher.close()
            elapsed = time.monotonic() - started
            print(
                f"\n{watcher.count} readings arrived at the broker in {elapsed:.1f} s "
                f"({watcher.count / elapsed:.1f}/s)",
                file=sys.stderr,
            )
    return 0
