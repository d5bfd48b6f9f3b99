"""Publishers: one output format on one MQTT connection, driven by the engine's forward loop.

`Publisher` is the contract every format implements (UNS JSON in `uns`, Sparkplug B in
`sparkplug.node`); the loop that leases from the outbox, publishes and acks is the engine's
(`gateway.app.forward`), the same for each output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.model import Batch

if TYPE_CHECKING:
    from gateway.publishers.mqtt import MqttConnection


@dataclass(slots=True)
class Published:
    """What `Publisher.publish` did with a batch: its first `done` entries are delivered (the
    rest goes back to the outbox and is leased again after the announcement the publisher
    asked for); `refused` of those the broker refused for good (dropped, counted), on the
    topics in `topics` (topic, reason) for the log."""

    done: int
    refused: int = 0
    topics: list[tuple[str, str]] = field(default_factory=list)


class Publisher(Protocol):
    """One output format on its own connection. The engine runs `connection.run()`, and a
    loop that calls `announce()` whenever `due` says so (and before any batch after it),
    then leases batches from the outbox, hands each to `publish`, and acks what it returns.

    A publisher that has something to announce while the loop waits for rows (a new
    connection, a rebirth asked for) wakes it with `Outbox.wake(output)`.
    """

    @property
    def connection(self) -> MqttConnection: ...

    @property
    def due(self) -> bool:
        """Whether `announce()` must run before the next batch."""
        ...

    async def announce(self) -> None:
        """What the output says before data on a connection: births, `_meta`, status."""

    async def publish(self, batch: Batch) -> Published:
        """Publish `batch` (or its first entries: see `Published`); return once the broker
        confirmed it (QoS 1 PUBACKs, or the Sparkplug barrier).

        Raises `BrokerUnavailable` when not connected or when the connection drops meanwhile;
        its `settled` counts entries of the batch, which the caller acks (the rest it
        releases, and they are published again: delivery is at least once).
        """
        ...

    async def close(self) -> None:
        """The format's goodbye (offline status, NDEATH), then the disconnect."""
