"""Batch JSON publisher (`format: batch`): one message carries many readings of one device.

For platforms that count messages (AWS IoT Core and Azure Event Grid take 100 a second on
a connection): 500 readings of 5 devices go out as 5 messages rather than 500.

- topic: `{enterprise}/{site}/{area}/{line}/{device}` (or the output's `topic:` template,
  without `{tag}`); on Azure IoT Hub the device's events topic,
  `devices/{device id}/messages/events/$.ct=application%2Fjson&$.ce=utf-8`.
- payload: `{"device": ..., "path": {"enterprise", "site", "area", "line"}, "readings": [...]}`,
  each reading with `tag` and the UNS fields (`value`, `quality`, `timestamp`, `unit`,
  `seq`, and `status` when not Good), in outbox order. A message holds the readings of one
  device from one outbox batch, as many as fit in `max_message_bytes` (payload and topic);
  the rest go in the next message.
- status and `_meta` as the UNS output publishes them (see gateway.publishers.uns).

Delivery: the outbox batch counts as published up to its first reading whose message the
broker did not confirm; the rest is published again (at least once, in order per device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.errors import BrokerUnavailable, MessagesRefused
from gateway.model import AssetPath, Batch, Entry
from gateway.publishers import Published
from gateway.publishers.mqtt import MqttConnection
from gateway.publishers.session import Message
from gateway.publishers.settings import DEFAULT_BATCH_BYTES
from gateway.publishers.topics import BATCH_TOPIC
from gateway.publishers.uns import UnsPublisher, _encode, asset_levels, connect_uns, described

if TYPE_CHECKING:
    from gateway.config import GatewaySettings
    from gateway.publishers.formats import OutputContext

# A PUBLISH beyond its payload and topic: fixed header (5 bytes at most), topic length (2),
# packet id (2), MQTT 5 properties length (1).
_PACKET_OVERHEAD = 10


class BatchPublisher(UnsPublisher):
    """Publishes each outbox batch as one message per device (or a few, to fit the size)."""

    DEFAULT_TOPIC = BATCH_TOPIC

    def __init__(
        self,
        connection: MqttConnection,
        gateway: GatewaySettings,
        devices: Mapping[str, tuple[AssetPath, dict[str, Any]]],
        *,
        max_message_bytes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(connection, gateway, devices, **options)
        self._limit = max_message_bytes or DEFAULT_BATCH_BYTES
        self._heads: dict[str, tuple[str, bytes]] = {}  # device -> topic, payload up to the readings
        self._tags: dict[str, bytes] = {}  # tag name -> the start of its reading, `{"tag":"name",`

    def _head(self, device: str) -> tuple[str, bytes]:
        head = self._heads.get(device)
        if head is None:
            asset = self.asset(device)
            doc = {"device": device, "path": asset_levels(asset), "readings": []}
            start = _encode(doc)[:-2]  # without the closing `]}`
            topic = self._template.render(asset, self._gateway.id)
            head = self._heads[device] = topic, start.encode()
        return head

    def reading(self, entry: Entry) -> bytes:
        """One element of `readings`: the UNS payload with `tag` in front."""
        tag = entry.reading.tag
        start = self._tags.get(tag)
        if start is None:
            start = self._tags[tag] = f'{{"tag":{_encode(tag)},'.encode()
        return start + self.payload(entry)[1:]

    @property
    def limit(self) -> int:
        """The largest message, payload and topic: the output's, or less if the broker said so."""
        largest = self._connection.max_packet
        return self._limit if largest is None else min(self._limit, largest - _PACKET_OVERHEAD)

    def messages(self, batch: Batch, limit: int) -> tuple[list[Message], list[list[int]]]:
        """The messages of `batch`, none larger than `limit` bytes (payload and topic) unless
        one reading alone is, and for each message the indices of the entries it carries."""
        by_device: dict[str, list[int]] = {}
        for i, entry in enumerate(batch.entries):
            by_device.setdefault(entry.reading.device, []).append(i)
        messages: list[Message] = []
        carried: list[list[int]] = []
        entries = batch.entries
        for device, indices in by_device.items():
            topic, start = self._head(device)
            room = limit - len(topic.encode("utf-8")) - len(start) - 2  # the closing `]}`
            parts: list[bytes] = []
            taken: list[int] = []
            size = 0
            for i in indices:
                part = self.reading(entries[i])
                grown = size + len(part) + (1 if parts else 0)  # a comma between readings
                if parts and grown > room:
                    messages.append((topic, start + b",".join(parts) + b"]}", 1, False))
                    carried.append(taken)
                    parts, taken, grown = [], [], len(part)
                parts.append(part)
                taken.append(i)
                size = grown
            # A reading too large for any message goes alone, and the connection refuses it
            # (counted, logged): the platform would drop it, or the connection with it.
            messages.append((topic, start + b",".join(parts) + b"]}", 1, False))
            carried.append(taken)
        return messages, carried

    async def publish(self, batch: Batch) -> Published:
        """Publish the batch's messages (QoS 1); return when the broker acknowledged all."""
        messages, carried = self.messages(batch, self.limit)
        try:
            await self._connection.publish_many(messages)
        except MessagesRefused as exc:
            refused = sum(len(carried[k]) for k in exc.indices)
            return Published(len(batch), refused, exc.refused)
        except BrokerUnavailable as lost:
            raise _per_entry(lost, carried, len(batch)) from None
        return Published(len(batch))


def _per_entry(lost: BrokerUnavailable, carried: list[list[int]], count: int) -> BrokerUnavailable:
    """`lost`, which counts messages, in terms of the batch's entries (see BrokerUnavailable):
    the entries settled are those before the first one whose message was not settled."""
    settled = bytearray(count)
    for k in range(lost.settled):
        for i in carried[k]:
            settled[i] = 1
    first = settled.find(0)
    head = count if first < 0 else first
    refused: list[tuple[str, str]] = []
    refused_at: list[int] = []
    for k, (topic, why) in zip(lost.refused_at, lost.refused, strict=True):
        for i in carried[k]:
            if i < head:
                refused.append((topic, why))
                refused_at.append(i)
    # The entry blamed for a lost connection is the first one not acked: the one the engine
    # leases alone next (see gateway.app._Suspect), whose fate then says something about it.
    return BrokerUnavailable(
        str(lost),
        settled=head,
        refused=refused,
        refused_at=refused_at,
        unconfirmed=None if lost.unconfirmed is None or head == count else head,
        blames_message=lost.blames_message,
    )


def build(context: OutputContext) -> BatchPublisher:
    """The batch JSON publisher of one output (FORMATS["batch"])."""
    output = context.output
    _, publisher = connect_uns(
        output, context.settings.gateway, described(context), BatchPublisher,
        max_message_bytes=output.max_message_bytes,
    )  # fmt: skip
    assert isinstance(publisher, BatchPublisher)
    return publisher
