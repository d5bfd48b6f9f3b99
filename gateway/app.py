"""The gateway: collectors, outbox and outputs wired together in one TaskGroup: the pollers
commit to the outbox once, and each output runs its own forwarding loop on its own place in it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.backoff import Backoff
from gateway.collectors import Collector
from gateway.collectors.registry import Device, make_collectors
from gateway.config import Settings
from gateway.errors import BrokerUnavailable
from gateway.model import Batch, Entry
from gateway.notify import Notifier, keep_alive
from gateway.outbox import DEFAULT_OUTPUT, Outbox
from gateway.poller import poll
from gateway.publishers import Publisher
from gateway.publishers.formats import FORMATS, OutputContext
from gateway.publishers.mqtt import MqttConnection
from gateway.publishers.settings import OutputSettings
from gateway.settings_types import RECONNECT_START
from gateway.state import REPORT_EVERY, State, report

# The OPC UA collector and the Sparkplug node are imported only by the configurations that
# use them (see ProtocolEntry and FORMATS): asyncua alone adds 27 MB of RSS, protobuf 5 MB,
# which a Modbus gateway that publishes UNS need not carry.

log = logging.getLogger(__name__)


# A broker that drops the connection this many times in a row on the same reading is taken
# to refuse that reading for good. The first time it was the first the broker had not
# confirmed; the next times it went alone on a connection that had carried messages before
# (the announcements): a network that fails at random does not hit it three times like that.
POISON_STRIKES = 3


class _Refusals:
    """Logs each refused topic once (the first 1,000 of them: topics are bounded by the tags,
    but a log line each for a whole denied subtree would say nothing more)."""

    LIMIT = 1000

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def log(self, refused: list[tuple[str, str]]) -> None:
        for topic, reason in refused:
            if topic in self._seen or len(self._seen) >= self.LIMIT:
                continue
            self._seen.add(topic)
            last = " (further refused topics are not logged)" if len(self._seen) == self.LIMIT else ""
            log.error("broker refused readings on %s (%s): dropping them, counted in outbox stats%s",
                      topic, reason, last)  # fmt: skip


class _Suspect:
    """The reading a broker may be dropping the connection on, and the evidence so far."""

    def __init__(self) -> None:
        self.seq = self.strikes = 0

    @property
    def isolating(self) -> bool:
        """Whether the next publish is to be the suspect alone (the head of the outbox)."""
        return self.strikes > 0

    def blame(self, batch: Batch, lost: BrokerUnavailable) -> Entry | None:
        """Note a lost connection; the entry to give up on, after POISON_STRIKES in a row."""
        if lost.unconfirmed is None:
            if lost.settled:
                self.clear()  # all it had, it confirmed
            return None
        if not lost.blames_message:
            return None  # a keepalive timeout, a server shutting down: no evidence either way
        entry = batch.entries[lost.unconfirmed]
        if entry.seq != self.seq:
            self.seq, self.strikes = entry.seq, 1
            return None
        if len(batch) == 1:  # isolated: nothing else was with the broker
            self.strikes += 1
        if self.strikes < POISON_STRIKES:
            return None
        log.error("the broker dropped the connection %d times on reading seq %d (%s/%s), sent alone: "
                  "dropping it, counted in outbox stats", self.strikes, entry.seq, entry.reading.device,
                  entry.reading.tag)  # fmt: skip
        self.clear()
        return entry

    def clear(self) -> None:
        self.seq = self.strikes = 0


# During a replay (Sparkplug's history) the loop leases this many batches of history per
# batch of live readings: each round trip (lease, publish, barrier, ack) costs about the
# same for 500 rows as for 2,000, so history drains about four times faster, and live
# readings wait for one history lease at most.
HISTORY_BATCHES = 4


async def forward(
    outbox: Outbox, publisher: Publisher, connection: MqttConnection, batch_size: int,
    output: str = DEFAULT_OUTPUT,
) -> None:  # fmt: skip
    """Move readings from the outbox to `output`'s broker forever: announce when the
    publisher is due, then lease, publish, ack. The same loop for every output format.

    A batch is acked once the broker confirmed it; a lost connection acks what was
    confirmed and releases the rest, which is published again (same `seq`), in order. What
    the publisher did not take (it cut the batch short to announce first) is released. A
    message the broker refuses for good (e.g. not authorised for its topic, or larger than
    it takes) is dropped and counted: retrying it would stall every device behind it. So is
    one the broker keeps dropping the connection on (see _Suspect). During a replay the
    loop alternates live batches and history (HISTORY_BATCHES of it per live batch).
    """
    refusals, suspect = _Refusals(), _Suspect()
    status = connection.status  # the output's figures in the State, if the engine keeps one

    async def delivered(batch: Batch, refused: int = 0) -> None:
        await outbox.ack(output, batch, refused=refused)
        if status is not None and batch.entries:
            status.ack(len(batch), refused=refused)

    async def send(batch: Batch) -> bool:
        """Publish one leased batch and ack or release it; False if it did not all go out."""
        if not batch:
            return True
        if publisher.due:  # a birth or a leave came since the lease: no data before it
            await outbox.release(output, batch)
            return False
        try:
            published = await publisher.publish(batch)
        except asyncio.CancelledError:
            # Stopping: the batch goes back (and what the cap evicted of it meanwhile is counted).
            await asyncio.shield(outbox.release(output, batch))
            raise
        except BrokerUnavailable as lost:
            # The connection task reconnects; wait_connected() waits for it.
            if lost.settled:
                await delivered(batch.head(lost.settled), len(lost.refused))
                refusals.log(lost.refused)
            if (poison := suspect.blame(batch, lost)) is not None:
                await delivered(Batch([poison]), 1)
            await outbox.release(output, batch)
            return False
        done = published.done
        await delivered(batch.head(done), published.refused)
        refusals.log(published.topics)
        suspect.clear()
        if done < len(batch):
            await outbox.release(output, batch.tail(done))
            return False
        return True

    while True:
        if not publisher.due:  # (a wake can be undone by a lease that found nothing)
            await outbox.wait(output)
        await connection.wait_connected()
        if publisher.due:
            # Lost meanwhile: the connection task reconnects, and the publisher is due again then.
            with contextlib.suppress(BrokerUnavailable):
                await publisher.announce()
            continue
        # While a reading is suspected, it goes alone: its fate then says something about it.
        n = 1 if suspect.isolating else batch_size
        if not await send(await outbox.lease(output, n, live=True)) or not outbox.replaying(output):
            continue
        await send(await outbox.lease(output, n * HISTORY_BATCHES))
        if not outbox.replaying(output):
            log.info("output %s: replay of historical readings done", output)


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

    def __init__(
        self, settings: Settings, *, report_every: float = REPORT_EVERY, config_file: str | None = None
    ) -> None:
        self.settings = settings
        self.config_file = config_file  # for the status page
        self._stop = asyncio.Event()
        self._report_every = report_every  # seconds between the state summary lines
        self.state: State | None = None  # made by run(): devices, output, latest values
        self.outbox: Outbox | None = None  # open while run() runs
        self._running: list[asyncio.Task[None]] = []  # pollers and forward loops, while they should run

    def stop(self) -> None:
        self._stop.set()

    def not_ready(self) -> list[str]:
        """Why the gateway is not ready (`/readyz`, and no watchdog ping); empty when it
        is. A broker that is away is no reason: the outbox keeps buffering meanwhile."""
        reasons = []
        if self.outbox is None:
            reasons.append("the outbox is not open (yet)")
        if not self._running:
            reasons.append("the pollers are not running")
        # A poller or a forward loop runs until the gateway stops: one that ended is a bug.
        reasons += [f"{t.get_name()} ended" for t in self._running if t.done()]
        return reasons

    async def run(self) -> None:
        s = self.settings
        outbox = self.outbox = await self._open_outbox()
        if outbox is None:
            log.info("gateway %s stopped before its outbox opened", s.gateway.id)
            return
        # The status server once the outbox is ours: a second gateway started on the same
        # outbox by mistake then says that, and nothing about a port the first one holds.
        server = None
        try:
            if s.http.enabled:
                from gateway.http.server import Sources, StatusServer  # aiohttp: only when serving

                sources = Sources(lambda: self.state, lambda: self.outbox, self.not_ready, self.config_file)
                server = StatusServer(s.http, sources, s.gateway.id)
                await server.start()
            await self._run(outbox)
        finally:
            try:
                if server is not None:
                    await server.stop()
            finally:
                self.outbox = None
                await outbox.close()
        log.info("gateway %s stopped", s.gateway.id)

    async def _run(self, outbox: Outbox) -> None:
        s = self.settings
        collectors: list[tuple[Device, Collector]] = []
        try:
            collectors.extend(make_collectors(s.devices, s.pki_dir))
            outputs = [_output(s, o, outbox, collectors) for o in s.outputs]
            self.state = state = State((d.name, t.name) for d in s.devices for t in d.tags)
            for o in outputs:
                o.connection.status = state.output(o.name)
            sink = state.sink(outbox.append)
            async with asyncio.TaskGroup() as tasks:
                links = [tasks.create_task(o.connection.run(), name=f"mqtt {o.name}") for o in outputs]
                loops = [tasks.create_task(o.forward(outbox), name=f"forward {o.name}") for o in outputs]
                pollers = [
                    tasks.create_task(
                        poll(c, d.cycle, sink, state=state.device(d.name, d.protocol),
                             backoff=Backoff(initial=RECONNECT_START, cap=d.reconnect_max)),
                        name=f"poll {d.name}",
                    )
                    for d, c in collectors
                ]  # fmt: skip
                reporter = tasks.create_task(report(state, outbox, self._report_every), name="state report")
                self._running = [*pollers, *loops]
                notifier = Notifier()
                watchdog = []
                if notifier.active:
                    status = functools.partial(state.summary, advance=False)
                    notifier.send(READY="1", STATUS=status())
                    watchdog.append(tasks.create_task(keep_alive(notifier, self.not_ready, status),
                                                      name="systemd watchdog"))  # fmt: skip
                log.info(
                    "gateway %s running: %d device(s), outbox %s, %s",
                    s.gateway.id, len(collectors), s.outbox.path,
                    ", ".join(f"output {o.name} {o.settings.format} to {o.settings.url}" for o in outputs),
                )  # fmt: skip
                await self._stop.wait()
                self._running = []
                notifier.send(STOPPING="1")
                # Collectors first, so every reading they made is committed before we leave;
                # the report with them, as it reads the outbox.
                await cancel([*pollers, reporter, *watchdog])
                await cancel(loops)
                # Each says offline (or NDEATH) and disconnects; at once, since each may wait
                # for a broker that is gone.
                await asyncio.gather(*(o.publisher.close() for o in outputs))
                await cancel(links)
        finally:
            for _, collector in collectors:
                await collector.close()

    async def _open_outbox(self) -> Outbox | None:
        """The outbox, or None if `stop()` came first: opening waits while the disk is full."""
        s = self.settings.outbox
        names = [o.name for o in self.settings.outputs]
        opening = asyncio.create_task(
            Outbox.open(s.path, max_rows=s.max_rows, max_bytes=s.max_bytes, policy=s.policy, outputs=names),
            name="outbox",
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
    """One output as the engine runs it: its publisher (UNS JSON, a Sparkplug B edge node,
    ...) on its own connection."""

    settings: OutputSettings
    publisher: Publisher

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def connection(self) -> MqttConnection:
        return self.publisher.connection

    def forward(self, outbox: Outbox) -> Coroutine[Any, Any, None]:
        return forward(outbox, self.publisher, self.connection, self.settings.batch, self.name)


def _output(
    s: Settings, output: OutputSettings, outbox: Outbox, collectors: list[tuple[Device, Collector]]
) -> _Output:
    return _Output(output, FORMATS[output.format](OutputContext(s, output, outbox, collectors)))


async def run(settings: Settings, config_file: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    gateway = Gateway(settings, config_file=config_file)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop)
    try:
        await gateway.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
