"""The MQTT connection: paho-mqtt 2.x driven by the asyncio event loop.

Decisions, and why:

- paho runs on the event loop, not on its own network thread (see `session.py`); this
  module drives its timers (`loop_misc` once a second) and owns the reconnect loop.
- A fresh paho `Client` per connection attempt, discarded when the connection ends. paho
  queues in memory whatever it is handed while disconnected; that would be a second,
  volatile buffer behind the outbox. With one client per connection, anything still queued
  or in flight dies with its client, and the outbox, which still holds the rows, re-leases
  them.
- `publish_many` keeps at most `max_inflight` messages unacknowledged (or fewer, when the
  broker's MQTT 5 Receive Maximum is lower), so paho never holds a message back either.
- The output's platform rules that apply while running live here: the publish rate
  (`max_rate`), the largest message (`max_message_bytes`), the least time between two
  CONNECTs (AWS IoT Core: 1 s), and a password that expires (Azure IoT Hub's SAS token: a
  `Tokens` source, renewed by connecting again before it expires).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from contextvars import ContextVar
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from gateway import tls
from gateway.backoff import Backoff
from gateway.config import MqttSettings
from gateway.errors import BrokerUnavailable, PublishError
from gateway.publishers.rate import RateLimit
from gateway.publishers.session import Message, OnMessage, Session, open_client
from gateway.state import OutputState

log = logging.getLogger(__name__)

# Final messages on close (the offline status) get this long for their PUBACK.
_FINAL_TIMEOUT = 2.0
# The longest wait between two attempts to connect.
_RECONNECT_CAP = 5.0
# paho's keepalive bookkeeping (PINGREQ, missing PINGRESP) runs this often.
_MISC_INTERVAL = 1.0

# True while the on_connect hook runs: its messages (births) may go out before the
# connection is reported ready, everybody else's wait.
_announcing: ContextVar[bool] = ContextVar("millwright_mqtt_announcing", default=False)
# Before renewing its password a connection waits this long at most for the confirmations of
# what it sent (it sends nothing more meanwhile): what is still unconfirmed then is published
# again on the next connection. (Within the renewal's margin: see AzureSettings.renew_after.)
_DRAIN_TIMEOUT = 2.0


class Tokens(Protocol):
    """A password that expires: a new one for each connection, replaced `renew_after`
    seconds after it was made (the broker drops the connection when it expires)."""

    renew_after: float
    what: str  # what it is, for the log: "the SAS token"

    def __call__(self) -> str: ...


class MqttConnection:
    """A connection to one broker, kept up by `run()` for as long as the gateway runs.

    `will` is set on every connection; a callable is asked for it before each connection
    attempt (the Sparkplug NDEATH carries a new bdSeq every time). `on_connect` is awaited
    after each successful connect, before `wait_connected()` returns and before
    `publish_many` accepts data: the UNS publisher uses it to publish its retained status
    and `_meta` messages first, the Sparkplug node to subscribe. `on_message` receives the
    messages of those subscriptions. `nodelay` turns Nagle off (see `Session.attach`).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str | None = None,
        will: Message | Callable[[], Message] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        on_message: OnMessage | None = None,
        nodelay: bool = False,
        tokens: Tokens | None = None,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._renew_at: float | None = None  # when the current connection's token is replaced
        # Publishes in progress, and set whenever there are none (a renewal waits for it).
        self._publishing = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Per connection in the platforms' terms, but kept across connections: a reconnect
        # must not make room for a burst the platform would still count.
        self._rate = RateLimit(settings.max_rate) if settings.max_rate is not None else None
        self._last_connect: float | None = None  # when the last CONNECT went out (monotonic)
        self._nodelay = nodelay
        self._client_id = client_id if client_id is not None else (settings.client_id or "")
        self._will = will
        self._on_connect = on_connect
        self._on_message = on_message
        self.where = f"{'mqtts' if settings.tls else 'mqtt'}://{settings.host}:{settings.port}"
        # The same context, and the same errors, as `millwright check` (the files were loaded
        # then: only one changed since can fail here).
        self._tls = tls.client_context(settings) if settings.tls else None
        if settings.tls and settings.tls_insecure:
            log.warning("TLS verification is off for %s: the broker's certificate is not checked", self.where)
        self._session: Session | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        self._down_since: float | None = None
        self._reported = False
        self._was_up = False
        self._leaving: str | None = None  # why we are ending this connection ourselves
        # Counts established connections: tells a publisher that the broker session changed.
        self.generation = 0
        # The output's entry in the gateway's State, if the engine set one: told when the
        # connection is ready and when it ends.
        self.status: OutputState | None = None
        # The will of the last attempt, and whether its CONNECT never went out (the socket or
        # TLS failed first): then the next attempt reuses it, so a Sparkplug bdSeq counts
        # CONNECT packets, not failed attempts. An attempt that timed out counts: its connect
        # thread may still send the CONNECT.
        self._last_will: Message | None = None
        self._reuse_will = False

    @property
    def max_packet(self) -> int | None:
        """The broker's Maximum Packet Size on the current connection (MQTT 5), if it said one."""
        return None if self._session is None else self._session.max_packet

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    async def wait_connected(self) -> None:
        """Return once connected and announced (the on_connect hook has completed)."""
        await self._ready.wait()

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Publish (topic, payload, qos, retain) messages in order.

        Returns when every QoS 1 message was acknowledged (QoS 0: written to the socket).
        Raises `BrokerUnavailable` at once when not connected, or when the connection drops
        before every confirmation arrived; `PublishError` when the broker refused a message
        (MQTT 5 reason code >= 0x80) or paho rejected it (bad topic).
        """
        session = self._current()
        self._publishing += 1
        self._idle.clear()
        try:
            await session.publish(messages)
        finally:
            self._publishing -= 1
            if not self._publishing:
                self._idle.set()

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Subscribe on the current connection (from the on_connect hook, typically)."""
        await self._current().subscribe(filters)

    async def barrier(self) -> None:
        """Return once the broker has processed every message published before (QoS 0
        included); raise BrokerUnavailable if the connection is lost first."""
        await self._current().barrier()

    def _current(self) -> Session:
        session = self._session
        if session is None or not (self._ready.is_set() or _announcing.get()):
            raise BrokerUnavailable(f"not connected to {self.where}")
        return session

    async def run(self) -> None:
        """Connect, and reconnect with backoff after every failure or loss, until cancelled
        or closed. Cancelling without `close()` drops the connection uncleanly (the broker
        then publishes the will)."""
        # Capped low: one broker gains little from a long wait, and every second of it after
        # the broker is back holds live readings behind the backlog (measured: 33 s with a
        # 30 s cap after a 30 s outage).
        backoff = Backoff(initial=0.5, cap=_RECONNECT_CAP)
        try:
            while not self._closing:
                await self._keep_gap()
                if self._closing:
                    return
                try:
                    session = await self._establish()
                except BrokerUnavailable as exc:
                    if self._closing:
                        return
                    reason = str(exc)
                    if self._tokens is not None and "Not authorized" in reason:
                        # A Raspberry Pi without a clock battery may boot in the past, and
                        # every token then expires before it is made.
                        reason += f" ({self._tokens.what} is valid by this machine's clock: is it right?)"
                    self._report_down(reason, lost=False)
                else:
                    backoff.reset()
                    reason = await self._serve(session)
                    if self._closing:
                        log.info("disconnected from %s", self.where)
                        return
                    if self._leaving is not None:
                        log.info("disconnected from %s (%s); connecting again", self.where, self._leaving)
                        self._leaving = None
                        self._down_since, self._was_up = time.monotonic(), False
                    else:
                        self._report_down(reason, lost=True)
                with suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next()):
                        await self._closed.wait()
        finally:
            self._ready.clear()
            self._note_down()  # cancelled while connected: _serve did not get to it
            if self._session is not None:
                self._session.abort("stopped")
                self._session = None

    async def _keep_gap(self) -> None:
        """Wait until the platform's least time between two CONNECTs has passed (AWS IoT
        Core refuses a client id that connects again within a second). An attempt that
        failed before its CONNECT (TCP, TLS) does not count."""
        gap = self._settings.profile.reconnect_gap
        if gap and self._last_connect is not None:
            wait = self._last_connect + gap - time.monotonic()
            if wait > 0:
                with suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._closed.wait()

    async def close(self, final: Sequence[Message] = (), *, with_will: bool = False) -> None:
        """Graceful stop: publish `final` (waiting ~2 s for its PUBACKs), then DISCONNECT.

        A normal DISCONNECT makes the broker discard the will, so a final offline status
        must be among `final`, unless `with_will` (MQTT 5) asks the broker to publish the
        will. `run()` returns afterwards.
        """
        self._closing = True
        self._ready.clear()
        self._closed.set()
        await self._leave(final, with_will=with_will)

    async def reconnect(self, why: str, final: Sequence[Message] = (), *, with_will: bool = False) -> None:
        """End the current connection like `close()` does, and let `run()` connect again."""
        if self._session is not None and self._session.established:
            self._leaving = why
            self._ready.clear()
            await self._leave(final, with_will=with_will)

    async def _leave(self, final: Sequence[Message], *, with_will: bool) -> None:
        session = self._session
        if session is None or not session.established:
            return
        if final:
            try:
                async with asyncio.timeout(_FINAL_TIMEOUT):
                    await session.publish(final)
            except (PublishError, TimeoutError) as exc:
                log.warning("final messages to %s not confirmed: %s", self.where, str(exc) or "timed out")
        await session.disconnect(with_will=with_will and self._settings.version == "5")

    async def _establish(self) -> Session:
        """One attempt: socket, TLS, CONNACK and the on_connect hook, within connect_timeout."""
        session = Session(
            asyncio.get_running_loop(),
            self._client(),
            self._settings.max_inflight,
            self._on_message,
            nodelay=self._nodelay,
            max_message=self._settings.max_message_bytes,
            rate=self._rate,
        )
        self._session = session
        timeout = self._settings.connect_timeout
        try:
            async with asyncio.timeout(timeout) as deadline:
                # The announcements wait for the rate limit like any message: that time is
                # the limit's, not the broker's, and does not count against the timeout.
                session.on_rate_wait = lambda wait: deadline.reschedule((deadline.when() or 0.0) + wait)
                try:
                    await open_client(session.client, self._connect_args())
                except (OSError, ValueError):
                    self._reuse_will = True
                    raise
                self._last_connect = time.monotonic()  # (the CONNECT went out in open_client)
                session.attach()
                either: list[asyncio.Future[Any]] = [session.connack, session.lost]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if session.lost.done():
                    raise BrokerUnavailable(session.lost.result())
                self.generation += 1
                await self._announce()
                session.on_rate_wait = None
        except TimeoutError:
            session.abort("timed out")
            raise BrokerUnavailable(f"no answer within {timeout:g} s") from None
        except (OSError, ValueError) as exc:
            session.abort("failed")
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        except PublishError as exc:
            session.abort("failed")
            raise BrokerUnavailable(str(exc)) from exc
        except BaseException:
            session.abort("stopped")
            raise
        if self._closing:
            # close() came while we were connecting and has no offline status to send on
            # this connection: drop it uncleanly, so the broker's will marks us offline.
            session.abort("closing")
            raise BrokerUnavailable("closing")
        self._ready.set()
        self._report_up()
        return session

    async def _announce(self) -> None:
        if self._on_connect is None:
            return
        token = _announcing.set(True)
        try:
            await self._on_connect()
        finally:
            _announcing.reset(token)

    async def _serve(self, session: Session) -> str:
        """Drive paho's timers until the connection ends; return why it ended."""
        while not session.lost.done():
            await asyncio.wait([session.lost], timeout=_MISC_INTERVAL)
            if session.lost.done():
                break
            session.client.loop_misc()
            if self._renew_at is not None and time.monotonic() >= self._renew_at and self._tokens is not None:
                await self._renew(self._tokens.what)
        self._ready.clear()
        self._note_down()
        return session.lost.result()

    async def _renew(self, what: str) -> None:
        """Connect again with a new token before this one expires: nothing more is sent,
        what was sent gets its confirmations (the rest of a publish under way goes back to
        the outbox), then a clean DISCONNECT (no will)."""
        self._renew_at = None
        self._leaving = f"renewing {what}"
        self._ready.clear()
        if self._session is not None:
            self._session.stopping = self._leaving
        with suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_TIMEOUT):
                await self._idle.wait()
        await self._leave((), with_will=False)

    def _note_down(self) -> None:
        if self.status is not None:
            self.status.down(time.time())

    def _report_up(self) -> None:
        if self._down_since is None:
            log.info("connected to %s", self.where)
        else:
            verb = "reconnected" if self._was_up else "connected"
            log.info("%s to %s after %.0f s", verb, self.where, time.monotonic() - self._down_since)
        self._down_since, self._reported, self._was_up = None, False, True
        if self.status is not None:
            self.status.up(time.time())

    def _report_down(self, reason: str, *, lost: bool) -> None:
        """Log the start of an outage once; later failed attempts only at debug level."""
        if self._down_since is None:
            self._down_since = time.monotonic()
        if lost:
            log.warning("lost connection to %s: %s; retrying", self.where, reason)
        elif not self._reported:
            log.warning("cannot connect to %s: %s; retrying", self.where, reason)
        else:
            log.debug("still cannot connect to %s: %s", self.where, reason)
        self._reported = True

    def _client(self) -> paho.Client:
        s = self._settings
        v5 = s.version == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
            # paho must never reconnect (or downgrade the protocol) by itself: run() does.
            reconnect_on_failure=False,
        )
        client.connect_timeout = s.connect_timeout
        # No limit in paho: the session's window (max_inflight, or the broker's Receive
        # Maximum) already holds messages back. With a limit, paho walks every in-flight
        # message on each PUBACK looking for queued ones to send: 8 % of the gateway's CPU.
        client.max_inflight_messages_set(0)
        # A guard, not a buffer: the window keeps us below it.
        client.max_queued_messages_set(s.max_inflight)
        if s.username is not None:
            client.username_pw_set(s.username, self._password())
        if self._tls is not None:
            client.tls_set_context(self._tls)
            if s.tls_insecure:
                client.tls_insecure_set(True)
        will = self._will
        if callable(will):
            if self._last_will is None or not self._reuse_will:
                self._last_will = will()
            will = self._last_will
        self._reuse_will = False
        if will is not None:
            client.will_set(*will)
        return client

    def _password(self) -> str | None:
        """This attempt's password: a new token, or the configured one (read again from
        password_file, so that a changed file needs no restart)."""
        if self._tokens is not None:
            self._renew_at = time.monotonic() + self._tokens.renew_after
            try:
                return self._tokens()
            except OSError as exc:
                raise BrokerUnavailable(f"cannot make {self._tokens.what}: {exc.strerror or exc}") from exc
        try:
            return self._settings.secret()
        except OSError as exc:
            raise BrokerUnavailable(f"cannot read password_file: {exc.strerror or exc}") from exc

    def _connect_args(self) -> dict[str, Any]:
        s = self._settings
        args: dict[str, Any] = {"host": s.host, "port": s.port, "keepalive": s.keepalive}
        if s.version == "5":
            # No Session Expiry Interval property means 0: nothing of the session outlives
            # the connection, because the outbox, not the broker session, is the buffer.
            args["clean_start"] = True
        return args
