"""Exponential backoff with jitter, as a small value object."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays that grow from `initial` by `factor` up to `cap`, each varied by ±`jitter`.

    Jitter spreads reconnects of many gateways (or many devices) after a shared outage,
    so they do not hammer a broker or a PLC in lockstep.
    """

    initial: float = 0.1
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    _next: float = field(default=0.0, init=False)
    attempts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        """The delay to wait before the next attempt; each call grows the one after."""
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        self.attempts += 1
        spread = delay * self.jitter
        return max(0.0, delay + random.uniform(-spread, spread))

    def reset(self) -> None:
        """Call after a success: the next failure starts again from `initial`."""
        self._next = self.initial
        self.attempts = 0
