"""The gateway: collectors, outbox and publisher wired together in one TaskGroup."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from gateway.collectors import Collector
from gateway.collectors.modbus.collector import ModbusCollector
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.collectors.opcua.settings import OpcUaDevice
from gateway.config import Device, Settings
from gateway.errors import BrokerUnavailable, MessagesRefused
from gateway.model import AssetPath
from gateway.outbox import Outbox
from gateway.poller import Sink, poll
from gateway.publishers.mqtt import MqttConnection
from gateway.publishers.uns import connect_uns

if TYPE_CHECKING:
    from gateway.collectors.opcua.collector import OpcUaCollector
    from gateway.publishers.sparkplug.node import SparkplugNode, TypeHint

# The OPC UA collector and the Sparkplug node are imported only by the configurations that
# use them: asyncua alone adds 27 MB of RSS, protobuf 5 MB, which a Modbus gateway that
# publishes UNS need not carry.

log = logging.getLogger(__name__)


def make_collector(device: ModbusDevice | OpcUaDevice, pki_dir: Path) -> Collector:
    """The collector for one configured device (dispatch on its protocol)."""
    if isinstance(device, OpcUaDevice):
        from gateway.collectors.opcua.collector import OpcUaCollector

        return OpcUaCollector(device, pki_dir)
    return ModbusCollector(device)


async def forward(outbox: Outbox, publisher: Any, connection: MqttConnection, batch_size: int) -> None:
    """Move readings from the outbox to the broker forever: lease, publish, ack.

    A batch is acked only after the broker confirmed every message in it; a lost
    connection releases it, so the same readings (same `seq`) are published again, in
    order. A message the broker refuses for good (e.g. not authorised for its topic) is
    dropped and counted: retrying it would stall every device behind it.
    """
    refused_topics: set[str] = set()
    while True:
        await outbox.wait()
        await connection.wait_connected()
        batch = await outbox.lease(batch_size)
        if not batch:
            continue
        try:
            await publisher.publish(batch)
        except BrokerUnavailable:
            await outbox.release(batch)  # the connection task reconnects; wait_connected() waits for it
        except MessagesRefused as exc:
            await outbox.ack(batch, refused=len(exc.refused))
            for topic, reason in exc.refused:
                if topic not in refused_topics:  # once per topic, not once per reading
                    refused_topics.add(topic)
                    log.error("broker refused readings on %s (%s): dropping them, counted in outbox stats",
                              topic, reason)  # fmt: skip
        else:
            await outbox.ack(batch)


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait until they are done, cancelling again if need be.

    Once is not always enough on Python 3.11: its `asyncio.wait_for` (which pymodbus awaits
    every response with) drops a cancellation that arrives as the response does, and the
    poller then carries on as if nothing happened, so shutdown would wait forever.
    """
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)


class Gateway:
    """Runs one configuration until `stop()`; on the way out commits, says offline, disconnects."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        outbox = await self._open_outbox()
        if outbox is None:
            log.info("gateway %s stopped before its outbox opened", s.gateway.id)
            return
        collectors: list[tuple[Device, Collector]] = []
        try:
            collectors.extend((device, make_collector(device, s.pki_dir)) for device in s.devices)
            out = _output(s, outbox, collectors)
            async with asyncio.TaskGroup() as tasks:
                link = tasks.create_task(out.connection.run(), name="mqtt")
                fwd = tasks.create_task(out.forward, name="forward")
                pollers = [
                    tasks.create_task(poll(c, d.cycle, out.sink, on_down=out.on_down), name=f"poll {d.name}")
                    for d, c in collectors
                ]
                log.info(
                    "gateway %s running: %d device(s), outbox %s, broker %s",
                    s.gateway.id, len(collectors), s.outbox.path, s.mqtt.url,
                )  # fmt: skip
                await self._stop.wait()
                # Collectors first, so every reading they made is committed before we leave.
                await cancel(pollers)
                await cancel([fwd])
                await out.close()
                await cancel([link])
        finally:
            for _, collector in collectors:
                await collector.close()
            await outbox.close()
        log.info("gateway %s stopped", s.gateway.id)

    async def _open_outbox(self) -> Outbox | None:
        """The outbox, or None if `stop()` came first: opening waits while the disk is full."""
        s = self.settings.outbox
        opening = asyncio.create_task(
            Outbox.open(s.path, max_rows=s.max_rows, max_bytes=s.max_bytes, policy=s.policy), name="outbox"
        )
        stopping = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            await asyncio.wait([opening, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (opening, stopping):
                if not task.done():
                    task.cancel()
            await asyncio.wait([opening, stopping])
        return None if opening.cancelled() else opening.result()


@dataclass(slots=True)
class _Output:
    """The MQTT side of one configuration: UNS JSON or a Sparkplug B edge node."""

    connection: MqttConnection
    forward: Coroutine[Any, Any, None]  # moves the outbox to the broker, forever
    close: Callable[[], Awaitable[None]]  # says offline (or NDEATH) and disconnects
    sink: Sink  # where the pollers put their readings
    on_down: Callable[[str], None] | None  # told when a device stops answering


def _output(s: Settings, outbox: Outbox, collectors: list[tuple[Device, Collector]]) -> _Output:
    if s.mqtt.sparkplug is not None:
        hints = {
            c.name: cast("OpcUaCollector", c).value_type for d, c in collectors if isinstance(d, OpcUaDevice)
        }
        node = sparkplug_node(s, outbox, hints)
        return _Output(node.connection, node.run(), node.close, node.append, node.device_down)
    described: dict[str, tuple[AssetPath, dict[str, Any]]] = {
        device.name: (s.asset(device), collector.describe()) for device, collector in collectors
    }
    connection, publisher = connect_uns(s.mqtt, s.gateway, described)
    fwd = forward(outbox, publisher, connection, s.mqtt.batch)
    return _Output(connection, fwd, publisher.close, outbox.append, None)


def sparkplug_node(
    settings: Settings, outbox: Outbox, type_hints: Mapping[str, TypeHint] | None = None
) -> SparkplugNode:
    """The Sparkplug B edge node of this configuration; its bdSeq is kept beside the outbox."""
    from gateway.publishers.sparkplug.node import BdSeqFile, SparkplugNode, metric_types

    s = settings
    assert s.mqtt.sparkplug is not None
    return SparkplugNode(
        s.mqtt,
        s.mqtt.sparkplug,
        outbox,
        edge_node_id=s.edge_node_id,
        devices={device.name: metric_types(device) for device in s.devices},
        bdseq=BdSeqFile(bdseq_path(s)),
        client_id=s.mqtt.client_id or f"millwright-{s.gateway.id}",
        type_hints=type_hints,
    )


def bdseq_path(settings: Settings) -> Path:
    path = settings.outbox.path
    return path.with_name(f"{path.name}.bdseq")


async def run(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop)
    try:
        await gateway.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
