"""Collectors: one protocol step against one device. The poller owns the loop."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.model import Reading


class Collector(Protocol):
    """One device (or one bus). Has no loop, no sleep and no retry of its own.

    `read()` returns the readings to report this cycle: deadband (report by exception) is
    already applied, so an unchanged value may yield no reading. A request the device
    rejects (a Modbus exception) gives Bad readings for the tags it covered; a lost
    connection or a timeout raises `NotConnected` / `DeviceTimeout`, and the poller then
    calls `unavailable()` once and reconnects.
    """

    name: str

    async def connect(self) -> None:
        """Open the connection. Raises NotConnected when the device cannot be reached."""

    async def read(self) -> list[Reading]:
        """Read every tag once. Raises NotConnected or DeviceTimeout."""

    async def close(self) -> None:
        """Close the connection; safe to call when not connected."""

    def unavailable(self, status: int, now: float) -> list[Reading]:
        """Bad readings with `status` for every tag not already reported Bad with it."""

    def describe(self) -> dict[str, Any]:
        """The device's metadata for its retained `_meta` message (no secrets)."""

    def summary(self) -> str:
        """What a connection reads, for the log line once it works: `17 tags, 4 requests`."""
