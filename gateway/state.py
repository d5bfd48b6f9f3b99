"""What the gateway knows about itself right now: devices, outputs, the outbox, latest values.

The engine keeps one `State` current; the HTTP side (a later issue) reads it, and until then
`report()` logs a one-line summary of it every minute. It is fed from the readings the
pollers hand to the outbox (DESIGN §1.8) and is never a second delivery path: nothing here
is published, and losing it loses nothing but figures since the start.

Who writes what:

- the poller, through the `DeviceState` it is given: up/down, last error, reads, read
  errors, missed ticks, reconnects;
- the MQTT connection, through the `OutputState` it is given: connected or not, and since;
- the forward loop, after each ack: `OutputState.ack(settled, refused=n)`;
- the sink `State.sink()` wraps: the latest reading per tag;
- `report()`, once a minute: the outbox figures, from `Outbox.stats()`.

Everything runs on the event loop, so there are no locks. Times shown to people (`since`)
are wall-clock POSIX seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.model import EVENT, Quality, Reading

if TYPE_CHECKING:
    from gateway.outbox import Outbox, OutboxStats
    from gateway.poller import Sink

log = logging.getLogger(__name__)

# The latest value is kept for every configured tag and, beyond those, for at most this many
# (device, tag) pairs the config does not name (today every reading is of a configured tag;
# browsed OPC UA nodes may not be). Past the cap such readings still
# go to the outbox; only their latest value is not kept, and that is logged once.
UNCONFIGURED_TAGS = 1_000

# Samples kept per numeric tag for the status page's trend lines: two minutes at one a second.
HISTORY = 120

# Down devices named in the summary line; the rest are counted ("+3 more").
NAMED_DOWN = 3

REPORT_EVERY = 60.0  # seconds between two summary lines in the log


@dataclass(slots=True)
class DeviceState:
    """One device, as its poller sees it.

    `up` turns true at the first good read of a connection (an accepted TCP connection that
    then fails is no proof of life), false at the first failure after that. `since` is when
    it last changed, or when the gateway started while the device has never been up.
    `reconnects` counts the connections that read after the first one.
    """

    name: str
    protocol: str = ""
    up: bool = False
    since: float = field(default_factory=time.time)
    last_error: str | None = None  # kept after recovery: the page shows what it was
    reads: int = 0  # read cycles that succeeded
    read_errors: int = 0  # failed connects and reads
    missed: int = 0  # ticks skipped because a read overran its interval
    connections: int = 0  # connections that read
    last_read: float | None = None  # seconds the last good read took
    readings: int = 0  # readings taken in (values, and the Bad ones of an outage)

    @property
    def reconnects(self) -> int:
        return max(self.connections - 1, 0)

    def connected(self, now: float) -> None:
        """A connection's first read succeeded."""
        self.connections += 1
        if not self.up:
            self.up, self.since = True, now

    def failed(self, reason: str, now: float) -> None:
        """A connect or a read failed (the device is unreachable, timed out, or garbled)."""
        self.read_errors += 1
        self.last_error = reason
        if self.up:
            self.up, self.since = False, now


class Trend:
    """The last HISTORY values of a tag, in a flat array of doubles: 1 kB a tag (a deque of
    (time, value) tuples took 14 kB). The page draws values, not times."""

    __slots__ = ("_count", "_next", "_values", "last")

    def __init__(self) -> None:
        self._values = array("d", bytes(8 * HISTORY))
        self._next = 0
        self._count = 0
        self.last: float | None = None  # the timestamp of the newest value

    def add(self, timestamp: float, value: float) -> None:
        if timestamp == self.last:
            return  # no new value since the last sample
        self.last = timestamp
        self._values[self._next] = value
        self._next = (self._next + 1) % HISTORY
        self._count = min(self._count + 1, HISTORY)

    def values(self) -> list[float]:
        """Oldest first."""
        v, cut = self._values, self._next
        return v[:cut].tolist() if self._count < HISTORY else (v[cut:] + v[:cut]).tolist()


@dataclass(slots=True)
class OutputState:
    """One output: its broker connection and what it delivered, in readings (not messages).

    `depth` and `dropped` are the outbox's figures for this output, refreshed with the
    outbox's (`State.refresh`), not per batch.
    """

    name: str
    connected: bool = False
    since: float = field(default_factory=time.time)
    published: int = 0  # readings the broker confirmed
    refused: int = 0  # readings the broker refused for good (dropped, counted in the outbox too)
    dropped: int = 0
    depth: int = 0

    def up(self, now: float) -> None:
        """Connected (and announced): readings can flow."""
        if not self.connected:
            self.connected, self.since = True, now

    def down(self, now: float) -> None:
        if self.connected:
            self.connected, self.since = False, now

    def ack(self, settled: int, *, refused: int = 0) -> None:
        """`settled` readings are done with, `refused` of them refused: the same figures as
        the `Outbox.ack(batch, refused=...)` they go with (`settled` is `len(batch)`)."""
        self.published += settled - refused
        self.refused += refused


class State:
    """Devices, outputs, the outbox and the latest reading per tag, for display.

    `tags` are the configured (device, tag) pairs; the latest values are bounded by them plus
    `UNCONFIGURED_TAGS`.
    """

    def __init__(
        self, tags: Iterable[tuple[str, str]] = (), *, unconfigured: int = UNCONFIGURED_TAGS
    ) -> None:
        self.devices: dict[str, DeviceState] = {}
        self.outputs: dict[str, OutputState] = {}
        self.outbox: OutboxStats | None = None  # as of the last refresh()
        self.latest: dict[tuple[str, str], Reading] = {}
        # Recent numeric values per tag, sampled from `latest` (sample()).
        self.history: dict[tuple[str, str], Trend] = {}
        self.readings = 0  # taken in since the start
        self._configured = frozenset(tags)
        self._limit = len(self._configured) + unconfigured
        self._capped = False
        self.started = time.time()
        self._last: tuple[float, int] = (self.started, 0)  # (when, readings) at the last summary

    def device(self, name: str, protocol: str = "") -> DeviceState:
        """The entry of device `name`, made on first use: hand it to the device's `poll()`."""
        if (entry := self.devices.get(name)) is None:
            entry = self.devices[name] = DeviceState(name, protocol)
        return entry

    def output(self, name: str) -> OutputState:
        """The entry of output `name`, made on first use."""
        if (entry := self.outputs.get(name)) is None:
            entry = self.outputs[name] = OutputState(name)
        return entry

    def fold(self, readings: list[Reading]) -> None:
        """Keep `readings` as the latest of their tags.

        On the hot path (every reading passes here): one dict store per reading, and the
        bound checked once per batch. A batch may take the dict past the bound by its own
        size until the check trims it.
        """
        latest, taken = self.latest, 0
        for r in readings:
            if r.tag[0] == EVENT:  # a device event (tag names are never empty): the devices say it
                continue
            latest[r.device, r.tag] = r
            taken += 1
        self.readings += taken
        if len(latest) > self._limit:
            self._trim()

    def _trim(self) -> None:
        """Forget the newest unconfigured tags until back under the bound.

        A dict keeps insertion order and a store to a known key keeps its place, so the
        tags that came last are at the end: walking back from there finds the excess without
        scanning the configured tags that came first.
        """
        excess = len(self.latest) - self._limit
        doomed: list[tuple[str, str]] = []
        for key in reversed(self.latest):
            if key not in self._configured:
                doomed.append(key)
                if len(doomed) == excess:
                    break
        for key in doomed:
            del self.latest[key]
            self.history.pop(key, None)
        if not self._capped:
            self._capped = True
            device, tag = doomed[0]
            log.warning("latest values of more than %d unconfigured tags are not kept (e.g. %s/%s); "
                        "their readings are still stored and published", self._limit - len(self._configured),
                        device, tag)  # fmt: skip

    def sample(self) -> None:
        """Add each tag's latest numeric value to its history, once per value: called once a
        second by the status server, so that the cost is per tag, not per reading."""
        history = self.history
        for key, r in self.latest.items():
            value = r.value
            # (type(), not isinstance(): a bool is no trend)
            if not (type(value) is int or type(value) is float) or r.quality is Quality.BAD:
                continue
            number = float(value)
            if not math.isfinite(number):
                continue
            ring = history.get(key)
            if ring is None:
                ring = history[key] = Trend()
            ring.add(r.timestamp, number)

    def sink(self, then: Sink) -> Sink:
        """A sink for the pollers: folds each batch, then hands it to `then` (the outbox)."""

        async def take(readings: list[Reading]) -> None:
            self.fold(readings)
            await then(readings)

        return take

    def refresh(self, stats: OutboxStats) -> None:
        """Take the outbox's figures (from `Outbox.stats()`, once a minute: it is a query)."""
        self.outbox = stats
        for name, figures in stats.outputs.items():
            output = self.output(name)
            output.depth, output.dropped = figures.depth, figures.dropped

    def summary(self, now: float | None = None, *, advance: bool = True) -> str:
        """One line for the log, e.g. `state: 4/4 devices up, 12,345 readings (+6,000/min),
        outbox 0 waiting (0 dropped, 1.2 MB); output mqtt connected, 12,300 published, 0 refused`.

        The rate is over the time since the previous summary that advanced (or the start):
        the log's line advances, systemd's STATUS= (`advance=False`) does not. Down devices are
        named, with how long they have been down, a few at most; their errors were logged
        when they went down and stay in `devices`.
        """
        now = time.time() if now is None else now
        then, before = self._last
        if advance:
            self._last = (now, self.readings)
        per_min = (self.readings - before) * 60 / (now - then) if now > then else 0.0
        parts = [
            self._devices(now),
            f"{self.readings:,} readings (+{per_min:,.0f}/min)",
        ]
        if self.outbox is not None:
            parts.append(_outbox(self.outbox))
        line = "state: " + ", ".join(parts)
        several = len(self.outputs) > 1
        for output in self.outputs.values():
            line += "; " + _output(output, now, several=several)
        return line

    def _devices(self, now: float) -> str:
        down = [d for d in self.devices.values() if not d.up]
        text = f"{len(self.devices) - len(down)}/{len(self.devices)} devices up"
        if not down:
            return text
        named = [f"{d.name} {_duration(now - d.since)}" for d in down[:NAMED_DOWN]]
        if len(down) > NAMED_DOWN:
            named.append(f"+{len(down) - NAMED_DOWN} more")
        return f"{text} (down: {', '.join(named)})"


def _outbox(stats: OutboxStats) -> str:
    waiting = f"outbox {stats.depth:,} waiting"
    if stats.depth and stats.oldest_age is not None:
        waiting += f", oldest {_duration(stats.oldest_age)}"
    return f"{waiting} ({stats.dropped:,} dropped, {_size(stats.bytes)})"


def _output(o: OutputState, now: float, *, several: bool) -> str:
    link = "connected" if o.connected else f"disconnected {_duration(now - o.since)}"
    text = f"output {o.name} {link}, {o.published:,} published, {o.refused:,} refused"
    if several:  # with one output these are the outbox's own figures, shown already
        text += f", {o.depth:,} waiting, {o.dropped:,} dropped"
    return text


def _duration(seconds: float) -> str:
    """Rounded to what a person reads at a glance: 42 s, 17 min, 5 h, 3 d."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _size(n: int) -> str:
    if n < 1_000_000:
        return f"{n / 1000:.0f} kB"
    if n < 1_000_000_000:
        return f"{n / 1_000_000:.1f} MB"
    return f"{n / 1_000_000_000:.1f} GB"


async def report(state: State, outbox: Outbox, every: float = REPORT_EVERY) -> None:
    """Every `every` seconds, refresh the outbox figures and log `state.summary()` at info
    level, until cancelled. The first line comes after one interval, not at the start: by
    then every device has had its first connect."""
    while True:
        await asyncio.sleep(every)
        state.refresh(await outbox.stats())
        log.info("%s", state.summary())
