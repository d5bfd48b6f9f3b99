"""Publishers: deliver leased outbox batches to a broker.

The outbox forwarder only knows the `Publisher` protocol; the MQTT connection, the UNS JSON
format and (later) Sparkplug B live in the modules beside this one.
"""

from __future__ import annotations

from typing import Protocol

from gateway.model import Batch


class Publisher(Protocol):
    """Delivers one batch, all or nothing from the caller's point of view."""

    async def publish(self, batch: Batch) -> None:
        """Return only after the broker confirmed every message of `batch`.

        Raises `BrokerUnavailable` when not connected or when the connection drops
        meanwhile, `PublishError` when the broker refused a message. Either way the caller
        releases the batch back to the outbox and tries again later: delivery is
        at-least-once, so a message may reach the broker twice, never zero times.
        """
        ...
