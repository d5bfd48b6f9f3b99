"""The bounded buffer between subscription notifications and `read()`."""

from __future__ import annotations

import logging

from gateway.model import Reading

log = logging.getLogger(__name__)


class Buffer:
    """Readings from notifications, kept until `read()` drains them. Bounded: when full,
    only the newest reading of each tag is kept; the others are counted as dropped."""

    __slots__ = ("_device", "_drained_at", "_items", "_overflowing", "capacity", "dropped")

    def __init__(self, device: str, capacity: int) -> None:
        self._device = device
        self.capacity = capacity
        self._items: list[Reading] = []
        self.dropped = 0
        self._drained_at = 0  # `dropped` at the last drain
        self._overflowing = False

    def __len__(self) -> int:
        return len(self._items)

    def append(self, r: Reading) -> None:
        if len(self._items) >= self.capacity:
            self._compact()
        self._items.append(r)

    def drain(self) -> list[Reading]:
        items, self._items = self._items, []
        if self._overflowing and self.dropped == self._drained_at:
            self._overflowing = False  # nothing dropped since the last drain: the episode is over
            log.info("device %s: collecting keeps up again (%d dropped in all)", self._device, self.dropped)
        self._drained_at = self.dropped
        return items

    def _compact(self) -> None:
        newest: dict[str, Reading] = {}
        for r in self._items:
            newest.pop(r.tag, None)  # re-insert, so the order follows the newest readings
            newest[r.tag] = r
        self.dropped += len(self._items) - len(newest)
        self._items = list(newest.values())
        if not self._overflowing:
            self._overflowing = True
            log.warning("device %s: notifications arrive faster than they are collected; keeping the "
                        "newest value per tag (%d dropped so far)", self._device, self.dropped)  # fmt: skip
