"""The MQTT connection: paho-mqtt 2.x driven by the asyncio event loop.

Decisions, and why:

- paho's socket is registered with the event loop (`add_reader`/`add_writer`, `loop_misc`
  once a second) instead of running paho's network thread. Every paho callback then runs on
  the loop thread, so no lock is needed around the bookkeeping of pending publishes. Only
  the blocking TCP connect and TLS handshake run in a short-lived thread per attempt.
- A fresh paho `Client` per connection attempt, discarded when the connection ends. paho
  queues in memory whatever it is handed while disconnected; that would be a second,
  volatile buffer behind the outbox. With one client per connection, anything still queued
  or in flight dies with its client, and the outbox, which still holds the rows, re-leases
  them.
- `publish_many` keeps at most `max_inflight` messages unacknowledged (or fewer, when the
  broker's MQTT 5 Receive Maximum is lower), so paho never holds a message back either.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from contextvars import ContextVar
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.backoff import Backoff
from gateway.config import MqttSettings
from gateway.errors import BrokerUnavailable, ConfigError, PublishError

log = logging.getLogger(__name__)

Message = tuple[str, bytes, int, bool]
"""topic, payload, qos, retain"""

# Final messages on close (the offline status) get this long for their PUBACK.
_FINAL_TIMEOUT = 2.0
_DISCONNECT_TIMEOUT = 1.0
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only
# paho's keepalive bookkeeping (PINGREQ, missing PINGRESP) runs this often.
_MISC_INTERVAL = 1.0

# True while the on_connect hook runs: its messages (births) may go out before the
# connection is reported ready, everybody else's wait.
_announcing: ContextVar[bool] = ContextVar("millwright_mqtt_announcing", default=False)


class _Tracker:
    """The PUBACKs still awaited by one `publish_many` call."""

    __slots__ = ("done", "error", "remaining")

    def __init__(self, count: int) -> None:
        self.done = asyncio.Event()
        self.error: PublishError | None = None
        self.remaining = count

    def finish(self, error: PublishError | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _Session:
    """One paho client and its socket, from connect to loss. Never reused."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: paho.Client, max_inflight: int) -> None:
        self.loop = loop
        self.client = client
        self.max_inflight = max_inflight
        self.window = asyncio.Semaphore(max_inflight)
        self.pending: dict[int, tuple[_Tracker, str]] = {}
        # PUBACKs (or QoS 0 writes) reported before publish() returned the mid.
        self.early: dict[int, ReasonCode] = {}
        self.connack: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()

    @property
    def established(self) -> bool:
        return self.connack.done() and not self.lost.done()

    def attach(self) -> None:
        """Hand paho's freshly opened socket to the event loop."""
        sock = self.client.socket()
        if sock is None:
            raise BrokerUnavailable("the connection closed while opening")
        c = self.client
        c.on_connect, c.on_disconnect, c.on_publish = self._on_connect, self._on_disconnect, self._on_publish
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        self.loop.add_reader(sock, self._on_readable)
        # The CONNECT packet was written in the connect thread; the rest, if any, goes now.
        if c.want_write():
            self.loop.add_writer(sock, c.loop_write)

    def _on_readable(self) -> None:
        sock = self.client.socket()
        if _QUICKACK is not None and isinstance(sock, socket.socket):
            # Linux delays our ACKs up to 40 ms. A broker that leaves Nagle on (mosquitto's
            # default) holds its next PUBACKs until that ACK comes, so the tail of every
            # batch stalls: measured 6k -> 14k messages/s. Not sticky, hence on every read.
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        self.client.loop_read()
        # TLS decrypts whole records: bytes already in the SSL object's buffer do not wake
        # the selector again, so read until that buffer is empty.
        sock = self.client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending():
            self.client.loop_read()
            sock = self.client.socket()

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_writer(sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        if reason.is_failure:
            self.fail(f"refused by the broker: {reason}")
            return
        limit = getattr(props, "ReceiveMaximum", None)
        if isinstance(limit, int) and 0 < limit < self.max_inflight:
            # The broker takes fewer unacknowledged messages than configured: obey it,
            # or paho would queue the excess in memory.
            self.window = asyncio.Semaphore(limit)
        if not self.connack.done():
            self.connack.set_result(None)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            self.fail(f"the broker disconnected us: {reason}")
        elif reason == "Keep alive timeout":
            self.fail("no answer from the broker within the keepalive")
        elif reason == "Success":
            self.fail("disconnected")
        else:
            self.fail("the connection was closed")

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None
    ) -> None:
        entry = self.pending.pop(mid, None)
        if entry is None:
            self.early[mid] = reason
        else:
            self._settle(entry[0], entry[1], reason)

    def _settle(self, tracker: _Tracker, topic: str, reason: ReasonCode) -> None:
        self.window.release()
        if reason.is_failure:
            tracker.finish(PublishError(f"the broker refused the message to {topic!r}: {reason}"))
            return
        tracker.remaining -= 1
        if tracker.remaining == 0:
            tracker.finish()

    def fail(self, reason: str) -> None:
        """The connection is over: fail every pending publish and wake window waiters."""
        if self.lost.done():
            return
        self.lost.set_result(reason)
        error = BrokerUnavailable(f"connection lost: {reason}")
        for tracker, _ in self.pending.values():
            tracker.finish(error)
        # Each pending message holds one window slot; giving them back wakes every caller
        # blocked on a full window, and each then sees the loss.
        for _ in range(len(self.pending)):
            self.window.release()
        self.pending.clear()

    def abort(self, reason: str) -> None:
        """Close the socket without DISCONNECT: the broker will publish the will."""
        c = self.client
        sock = c.socket()
        if sock is not None:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
            # paho still holds the socket and closes it again when garbage-collected;
            # by then our callbacks (and perhaps the loop) are gone, so unhook them first.
            c.on_socket_close = c.on_socket_register_write = c.on_socket_unregister_write = None
            sock.close()
        self.fail(reason)

    async def disconnect(self) -> None:
        """A normal DISCONNECT, so the broker discards the will; abort if it takes too long."""
        if self.lost.done():
            return
        self.client.disconnect()
        with suppress(TimeoutError):
            async with asyncio.timeout(_DISCONNECT_TIMEOUT):
                await asyncio.shield(self.lost)
        self.abort("disconnected")

    async def publish(self, messages: Sequence[Message]) -> None:
        """Hand `messages` to paho within the window and wait for every confirmation."""
        if self.lost.done():
            raise BrokerUnavailable(f"connection lost: {self.lost.result()}")
        if not messages:
            return
        tracker = _Tracker(len(messages))
        for topic, payload, qos, retain in messages:
            window = self.window
            await window.acquire()
            if self.lost.done() or tracker.done.is_set():
                window.release()
                break
            try:
                info = self.client.publish(topic, payload, qos, retain)
            except (ValueError, TypeError) as exc:
                window.release()
                raise PublishError(f"cannot publish to {topic!r}: {exc}") from exc
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                window.release()
                self.abort(paho.error_string(info.rc))
                break
            early = self.early.pop(info.mid, None)
            if early is None:
                self.pending[info.mid] = (tracker, topic)
            else:
                self._settle(tracker, topic, early)
        if self.lost.done():
            tracker.finish(BrokerUnavailable(f"connection lost: {self.lost.result()}"))
        await tracker.done.wait()
        if tracker.error is not None:
            raise tracker.error


class MqttConnection:
    """A connection to one broker, kept up by `run()` for as long as the gateway runs.

    `will` is set on every connection. `on_connect` is awaited after each successful
    connect, before `wait_connected()` returns and before `publish_many` accepts data:
    the UNS publisher uses it to publish its retained status and `_meta` messages first.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str | None = None,
        will: Message | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._client_id = client_id if client_id is not None else (settings.client_id or "")
        self._will = will
        self._on_connect = on_connect
        self.where = f"{'mqtts' if settings.tls else 'mqtt'}://{settings.host}:{settings.port}"
        self._tls = _tls_context(settings) if settings.tls else None
        if settings.tls and settings.tls_insecure:
            log.warning("TLS verification is off for %s: the broker's certificate is not checked", self.where)
        self._session: _Session | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        self._down_since: float | None = None
        self._reported = False
        self._was_up = False

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
        session = self._session
        if session is None or not (self._ready.is_set() or _announcing.get()):
            raise BrokerUnavailable(f"not connected to {self.where}")
        await session.publish(messages)

    async def run(self) -> None:
        """Connect, and reconnect with backoff after every failure or loss, until cancelled
        or closed. Cancelling without `close()` drops the connection uncleanly (the broker
        then publishes the will)."""
        backoff = Backoff(initial=0.5, cap=30.0)
        try:
            while not self._closing:
                try:
                    session = await self._establish()
                except BrokerUnavailable as exc:
                    if self._closing:
                        return
                    self._report_down(str(exc), lost=False)
                else:
                    backoff.reset()
                    reason = await self._serve(session)
                    if self._closing:
                        log.info("disconnected from %s", self.where)
                        return
                    self._report_down(reason, lost=True)
                with suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next()):
                        await self._closed.wait()
        finally:
            self._ready.clear()
            if self._session is not None:
                self._session.abort("stopped")
                self._session = None

    async def close(self, final: Sequence[Message] = ()) -> None:
        """Graceful stop: publish `final` (waiting ~2 s for its PUBACKs), then DISCONNECT.

        A normal DISCONNECT makes the broker discard the will, so a final offline status
        must be among `final`. `run()` returns afterwards.
        """
        self._closing = True
        self._ready.clear()
        self._closed.set()
        session = self._session
        if session is None or not session.established:
            return
        if final:
            try:
                async with asyncio.timeout(_FINAL_TIMEOUT):
                    await session.publish(final)
            except (PublishError, TimeoutError) as exc:
                log.warning("final messages to %s not confirmed: %s", self.where, exc or "timed out")
        await session.disconnect()

    async def _establish(self) -> _Session:
        """One attempt: socket, TLS, CONNACK and the on_connect hook, within connect_timeout."""
        session = _Session(asyncio.get_running_loop(), self._client(), self._settings.max_inflight)
        self._session = session
        timeout = self._settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await _open(session.client, self._connect_args())
                session.attach()
                either: list[asyncio.Future[Any]] = [session.connack, session.lost]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if session.lost.done():
                    raise BrokerUnavailable(session.lost.result())
                await self._announce()
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

    async def _serve(self, session: _Session) -> str:
        """Drive paho's timers until the connection ends; return why it ended."""
        while not session.lost.done():
            await asyncio.wait([session.lost], timeout=_MISC_INTERVAL)
            if not session.lost.done():
                session.client.loop_misc()
        self._ready.clear()
        return session.lost.result()

    def _report_up(self) -> None:
        if self._down_since is None:
            log.info("connected to %s", self.where)
        else:
            verb = "reconnected" if self._was_up else "connected"
            log.info("%s to %s after %.0f s", verb, self.where, time.monotonic() - self._down_since)
        self._down_since, self._reported, self._was_up = None, False, True

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
        client.max_inflight_messages_set(s.max_inflight)
        # A guard, not a buffer: the window keeps us below it.
        client.max_queued_messages_set(s.max_inflight)
        if s.username is not None:
            try:
                password = s.secret()
            except OSError as exc:
                raise BrokerUnavailable(f"cannot read password_file: {exc.strerror or exc}") from exc
            client.username_pw_set(s.username, password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
            if s.tls_insecure:
                client.tls_insecure_set(True)
        if self._will is not None:
            client.will_set(*self._will)
        return client

    def _connect_args(self) -> dict[str, Any]:
        s = self._settings
        args: dict[str, Any] = {"host": s.host, "port": s.port, "keepalive": s.keepalive}
        if s.version == "5":
            # No Session Expiry Interval property means 0: nothing of the session outlives
            # the connection, because the outbox, not the broker session, is the buffer.
            args["clean_start"] = True
        return args


async def _open(client: paho.Client, args: dict[str, Any]) -> None:
    """Run paho's blocking connect (TCP, TLS handshake, CONNECT) in a short-lived thread.

    If the caller gives up (timeout, cancel), the thread is left to finish on its own
    within paho's connect_timeout, and closes the socket it opened.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def deliver(error: Exception | None) -> None:
        if done.cancelled():
            _close(client)
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    def connect() -> None:
        error: Exception | None = None
        try:
            client.connect(**args)
        except Exception as exc:  # handed to the loop and raised there
            _close_orphans(exc)
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, error)
        except RuntimeError:  # the loop is closed: nobody will take this socket
            _close(client)

    threading.Thread(target=connect, name="millwright-mqtt-connect", daemon=True).start()
    await done


def _close_orphans(exc: BaseException) -> None:
    """Close sockets that paho opened and dropped on the way to `exc`.

    paho 2.2 loses the socket when the TLS handshake fails: only the failing frames still
    reference it. Close it now rather than whenever the traceback is collected."""
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, socket.socket):
                value.close()
        tb = tb.tb_next


def _close(client: paho.Client) -> None:
    sock = client.socket()
    if sock is not None:
        sock.close()


def _tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Verification on by default: the CA file, or the system store when none is given."""
    try:
        ctx = ssl.create_default_context(cafile=str(settings.ca) if settings.ca else None)
        if settings.cert is not None and settings.key is not None:
            ctx.load_cert_chain(settings.cert, settings.key)
    except (OSError, ValueError) as exc:
        raise ConfigError("mqtt", [f"ca, cert or key: cannot load: {exc}"]) from exc
    if settings.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
