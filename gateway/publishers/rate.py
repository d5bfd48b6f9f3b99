"""The publish-rate limit of a connection (`max_rate`: the platform's messages per second).

AWS IoT Core discards, without a word, the publishes of a connection above 100 a second;
Azure Event Grid throttles above 100. The limit keeps the gateway below, and the readings
wait in the outbox meanwhile, where they are safe.

A sliding log rather than a token bucket: a bucket of `rate` tokens that refills at `rate`
per second lets up to twice `rate` through in some second (a full bucket, then its refill),
which a platform counting per second would take as a breach. Here no span of WINDOW seconds
ever holds more than `rate` messages.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

# The span of the count, a little more than the platform's second: the platform counts by
# its own clock, after the network has moved packets closer together or further apart.
WINDOW = 1.05


class RateLimit:
    """At most `rate` messages in any WINDOW seconds (one per WINDOW / `rate` below 1/s)."""

    __slots__ = ("_clock", "_count", "_sent", "_window")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._count = max(1, math.floor(rate))
        self._window = WINDOW * self._count / rate
        self._sent: deque[float] = deque()  # send times of the last `count` messages
        self._clock = clock

    def delay(self) -> float:
        """0 if a message may go now (it is then counted as sent), else the seconds to wait
        before asking again."""
        now = self._clock()
        sent = self._sent
        if len(sent) == self._count:
            wait = sent[0] + self._window - now
            if wait > 0:
                return wait
            sent.popleft()
        sent.append(now)
        return 0.0
