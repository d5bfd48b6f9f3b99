"""The schedule loop around one collector: fixed rate, reconnect with backoff, state logging."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.backoff import Backoff
from gateway.collectors import Collector
from gateway.errors import DeviceError, DeviceTimeout
from gateway.model import DOWN, UP, Reading, Status, state_event
from gateway.settings_types import RECONNECT_START
from gateway.state import DeviceState

log = logging.getLogger(__name__)

Sink = Callable[[list[Reading]], Awaitable[None]]

# The longest wait between reconnects unless the device says (reconnect_max): a device back
# after an outage is read again within this, not half a minute later.
RECONNECT_MAX = 10.0


class _Outage:
    """Whether a device is down, so that each change is logged and reported once.

    A device counts as back only after a read succeeded: one that accepts the TCP
    connection and then drops it is still down, and must not log "recovered" per retry.
    Likewise "connected" is logged after the first good read of each connection, and
    noted in the device's `state` then. The outbox is told each change as a device event:
    down after the outage's Bad readings, up before the first values of this run and of
    each recovery (so the newest event says the device's state, also after a restart).
    """

    def __init__(self, state: DeviceState) -> None:
        self.device = state.name
        self.state = state
        self.since: float | None = None
        self.announced = False  # "connected" logged for the current connection
        self.told_up = False  # the up event went out since the start or the last outage

    def begin(self, reason: str, *, logged: bool = False) -> bool:
        """Mark the device down; True if it was up until now. `logged`: its cause was logged
        already (see DeviceError)."""
        if self.since is not None:
            return False
        log.log(
            logging.DEBUG if logged else logging.WARNING, "device %s unreachable: %s", self.device, reason
        )
        self.since = time.monotonic()
        self.told_up = False
        return True

    def connected(self, collector: Collector) -> None:
        if not self.announced:
            self.announced = True
            self.state.connected(time.time())
            log.info("device %s connected (%s)", self.device, collector.summary())

    def end(self) -> None:
        if self.since is not None:
            log.info("device %s recovered after %.0f s", self.device, time.monotonic() - self.since)
            self.since = None


async def poll(
    collector: Collector,
    every: float,
    sink: Sink,
    *,
    backoff: Backoff | None = None,
    state: DeviceState | None = None,
) -> None:
    """Read `collector` every `every` seconds forever, handing readings to `sink`.

    When the device becomes unreachable its tags are reported Bad once (not on every
    retry), followed by a down event (see `gateway.model.state_event`: the Sparkplug
    DDEATH), and the poller reconnects with backoff. The first readings after that come
    after an up event. Runs until
    cancelled. `state` (the device's entry in the gateway's `State`) is kept current: up or
    down, the last error and the counters.
    """
    backoff = backoff or Backoff(initial=RECONNECT_START, cap=RECONNECT_MAX)
    state = state or DeviceState(collector.name)
    outage = _Outage(state)
    while True:
        try:
            outage.announced = False
            await collector.connect()
            await _read_forever(collector, every, sink, state=state, backoff=backoff, outage=outage)
        except DeviceError as exc:
            state.failed(exc.reason, time.time())
            if outage.begin(exc.reason, logged=exc.logged):
                timeout = isinstance(exc, DeviceTimeout)
                status = Status.BAD_TIMEOUT if timeout else Status.BAD_COMMUNICATION_ERROR
                now = time.time()
                bad = collector.unavailable(status, now)  # (buffered values first, if any)
                state.readings += len(bad)
                await sink([*collector.told(), *bad, state_event(collector.name, DOWN, now)])
        finally:
            await collector.close()
        await asyncio.sleep(backoff.next())


async def _read_forever(
    collector: Collector, every: float, sink: Sink, *, state: DeviceState, backoff: Backoff, outage: _Outage
) -> None:
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        started = loop.time()
        readings = await collector.read()
        state.last_read = loop.time() - started
        state.readings += len(readings)
        if told := collector.told():  # (before the values they type)
            readings = [*told, *readings]
        outage.connected(collector)
        outage.end()
        backoff.reset()
        state.reads += 1
        if not outage.told_up:
            outage.told_up = True
            readings = [state_event(collector.name, UP, time.time()), *readings]
        if readings:
            await sink(readings)
        now = loop.time()
        due, skipped = next_tick(due, now, every)
        state.missed += skipped
        await asyncio.sleep(due - now)


def next_tick(due: float, now: float, every: float) -> tuple[float, int]:
    """The tick to wait for after a read that was due at `due` and ended at `now`, and how
    many ticks that read overran.

    Ticks are fixed points on the monotonic clock (start + k * every), so the schedule does
    not drift by the read time, and a read that overruns skips ticks (counted) instead of
    firing a burst of reads to catch up.
    """
    due += every
    if now <= due:
        return due, 0
    skipped = int((now - due) // every) + 1
    return due + skipped * every, skipped
