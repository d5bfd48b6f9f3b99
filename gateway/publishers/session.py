"""One paho client bridged to the asyncio event loop, from connect to loss.

paho's socket is registered with the event loop (`add_reader`/`add_writer`) instead of
running paho's network thread, so every paho callback runs on the loop thread and the
bookkeeping of pending publishes needs no lock. Only the blocking TCP connect and TLS
handshake run in a short-lived thread per attempt (`open_client`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.errors import BrokerUnavailable, MessagesRefused, PublishError
from gateway.publishers.rate import RateLimit
from gateway.settings_types import mqtt_text_problem

log = logging.getLogger(__name__)

Message = tuple[str, bytes, int, bool]
"""topic, payload, qos, retain"""

OnMessage = Callable[[str, bytes], None]
"""Called on the event loop with the topic and payload of each message received."""

# The topic filter of the delivery barrier (see Session.barrier); never subscribed to.
_BARRIER_FILTER = "millwright/barrier"
# MQTT 5 DISCONNECT reason: "disconnect with will message".
DISCONNECT_WITH_WILL = 0x04

_DISCONNECT_TIMEOUT = 1.0
# MQTT 5 DISCONNECT reasons that are about a packet the client sent: malformed packet,
# protocol error, implementation specific, not authorized, topic name invalid, topic alias
# invalid, packet too large, payload format invalid, retain not supported, QoS not
# supported. Not the others (server shutting down, session taken over, keepalive, quota...).
_ABOUT_A_MESSAGE = frozenset({0x81, 0x82, 0x83, 0x87, 0x90, 0x94, 0x95, 0x99, 0x9A, 0x9B})
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _Tracker:
    """The confirmations still awaited by one `publish_many` call, message by message."""

    __slots__ = ("cut", "done", "error", "handed", "refused", "remaining", "settled")

    def __init__(self, count: int) -> None:
        self.done = asyncio.Event()
        self.error: PublishError | None = None
        self.refused: list[tuple[int, str, str]] = []  # index, topic, reason
        self.remaining = count
        self.settled = bytearray(count)  # 1 for each message confirmed or refused, by index
        self.handed = 0  # messages gone to paho (or refused before it), in order
        self.cut: str | None = None  # why the messages after `handed` will not be sent

    def settle(self, index: int, topic: str, refusal: str | None = None) -> None:
        self.settled[index] = 1
        if refusal is not None:
            self.refused.append((index, topic, refusal))
        self.remaining -= 1
        if self.remaining == 0:
            self._end()

    def stop(self, reason: str) -> None:
        """Send no more: finish once the messages handed so far are settled, as a loss of
        the connection that settled those (the caller acks them and releases the rest)."""
        self.cut = reason
        self.remaining -= len(self.settled) - self.handed
        if self.remaining == 0:
            self._end()

    def _end(self) -> None:
        self.finish(None if self.cut is None else self.lost(self.cut, blames_message=False))

    def lost(self, reason: str, *, blames_message: bool) -> BrokerUnavailable:
        """The error for a connection lost meanwhile: how many messages, from the first, were
        settled (and which of those refused), and whether the first unsettled one was with
        the broker (the one a broker that drops us may have choked on)."""
        first = self.settled.find(0)
        settled = len(self.settled) if first < 0 else first
        refused = [(i, topic, why) for i, topic, why in self.refused if i < settled]
        return BrokerUnavailable(
            f"connection lost: {reason}",
            settled=settled,
            refused=[(topic, why) for _, topic, why in refused],
            refused_at=[i for i, _, _ in refused],
            unconfirmed=settled if settled < self.handed else None,
            blames_message=blames_message,
        )

    def finish(self, error: PublishError | None = None) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class Session:
    """One paho client and its socket, from connect to loss. Never reused."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: paho.Client,
        max_inflight: int,
        on_message: OnMessage | None = None,
        *,
        nodelay: bool = False,
        max_message: int | None = None,
        rate: RateLimit | None = None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.max_message = max_message  # the output's largest message, payload and topic
        self.rate = rate
        # Told each wait for the rate limit (the connect's timeout leaves that time out).
        self.on_rate_wait: Callable[[float], None] | None = None
        # Set when the connection is about to end on purpose (a token's renewal): publishes
        # hand paho nothing more, and end once what they handed is confirmed.
        self.stopping: str | None = None
        self.on_message = on_message
        self.nodelay = nodelay
        # SUBACKs and UNSUBACKs awaited, by message id.
        self.acks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self.max_inflight = max_inflight
        self.window = asyncio.Semaphore(max_inflight)
        self.pending: dict[int, tuple[_Tracker, int, str, int]] = {}  # mid -> tracker, index, topic, qos
        # PUBACKs (or QoS 0 writes) reported before publish() returned the mid.
        self.early: dict[int, ReasonCode] = {}
        self.connack: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        # Whether the way the connection ended may be the broker's answer to the message it
        # had last (see _on_disconnect), and how many QoS 1 messages it confirmed before.
        self.lost_blames_message = False
        self.confirmed = 0
        self.max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK)

    @property
    def established(self) -> bool:
        return self.connack.done() and not self.lost.done()

    def attach(self) -> None:
        """Hand paho's freshly opened socket to the event loop."""
        sock = self.client.socket()
        if sock is None:
            raise BrokerUnavailable("the connection closed while opening")
        if self.nodelay and isinstance(sock, socket.socket):
            # paho leaves Nagle on: a small packet after a QoS 0 publish (the delivery barrier)
            # then waits for the broker's delayed ACK, 40 ms on Linux. Measured: barrier after
            # QoS 0 publishes 40 ms -> 0.2 ms. Not for every connection: with Nagle, the many
            # small QoS 1 messages of UNS share TCP segments (fewer bytes on a metered link).
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = self.client
        c.on_connect, c.on_disconnect, c.on_publish = self._on_connect, self._on_disconnect, self._on_publish
        c.on_socket_close = self._on_socket_close
        c.on_subscribe = c.on_unsubscribe = self._on_ack
        c.on_message = self._on_message
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
        largest = getattr(props, "MaximumPacketSize", None)
        if isinstance(largest, int) and largest > 0:
            # paho sends a larger PUBLISH all the same, and the broker then drops the
            # connection (MQTT 5 3.1.2.24): every retry would do it again.
            self.max_packet = largest
        if not self.connack.done():
            self.connack.set_result(None)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            about = reason.value in _ABOUT_A_MESSAGE
            self.fail(f"the broker disconnected us: {reason}", blames_message=about)
        elif reason == "Keep alive timeout":
            self.fail("no answer from the broker within the keepalive")
        elif reason == "Success":
            self.fail("disconnected")
        else:
            # The socket closed, or was reset. That is how a broker without MQTT 5 reasons
            # (AWS IoT, an MQTT 3.1.1 session) refuses a message; it is also how a network
            # fails, so forward() blames a message only on repeated, isolated evidence.
            self.fail("the connection was closed", blames_message=True)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties | None
    ) -> None:
        entry = self.pending.pop(mid, None)
        if entry is None:
            self.early[mid] = reason
        else:
            self._settle(*entry, reason)

    def _on_ack(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        future = self.acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reasons)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(msg.topic, bytes(msg.payload))
        except Exception:
            # Raised into paho, it would skip the PUBACK: each such message would hold one of
            # the broker's in-flight slots for us until none is left.
            log.exception("error handling a message on %s", msg.topic)

    async def subscribe(self, filters: Sequence[tuple[str, int]]) -> None:
        """Subscribe to (filter, qos) pairs; return when the broker granted every one.
        Raises BrokerUnavailable when the connection is lost or the broker refuses one."""
        rc, mid = self.client.subscribe(list(filters))
        reasons = await self._await_ack(rc, mid)
        refused = [f"{f} ({r})" for (f, _), r in zip(filters, reasons, strict=False) if r.is_failure]
        if refused:
            raise BrokerUnavailable(f"the broker refused the subscription to {', '.join(refused)}")

    async def barrier(self) -> None:
        """Return once the broker has processed everything sent before on this connection.

        QoS 0 messages get no acknowledgement; an UNSUBSCRIBE gets one, and a broker handles
        one client's packets in order. So when the UNSUBACK of a filter nobody subscribed to
        arrives, every message written before it has reached the broker."""
        rc, mid = self.client.unsubscribe(_BARRIER_FILTER)
        await self._await_ack(rc, mid)

    async def _await_ack(self, rc: MQTTErrorCode, mid: int | None) -> list[ReasonCode]:
        if self.lost.done():
            raise BrokerUnavailable(f"connection lost: {self.lost.result()}")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            self.abort(paho.error_string(rc))
            raise BrokerUnavailable(f"connection lost: {self.lost.result()}")
        # Registered before anything is awaited: the ack is read on this loop, so not earlier.
        future = self.acks[mid] = self.loop.create_future()
        await asyncio.wait([future, self.lost], return_when=asyncio.FIRST_COMPLETED)
        if not future.done():
            self.acks.pop(mid, None)
            raise BrokerUnavailable(f"connection lost: {self.lost.result()}")
        reasons: list[ReasonCode] = future.result()
        return reasons

    def _settle(self, tracker: _Tracker, index: int, topic: str, qos: int, reason: ReasonCode) -> None:
        self.window.release()
        if qos and not reason.is_failure:
            self.confirmed += 1
        # A refusal does not stop the others: they may be accepted, and the caller must know
        # exactly which were confirmed and which refused.
        tracker.settle(index, topic, str(reason) if reason.is_failure else None)

    def fail(self, reason: str, *, blames_message: bool = False) -> None:
        """The connection is over: fail every pending publish and wake window waiters.

        `blames_message`: the broker ended it in a way that may answer the message it had
        last. Only on a connection that carried messages before (the broker confirmed some):
        one that fails before any confirmation says nothing about a message."""
        if self.lost.done():
            return
        self.lost_blames_message = blames = blames_message and self.confirmed > 0
        self.lost.set_result(reason)
        for tracker, _, _, _ in self.pending.values():
            tracker.finish(tracker.lost(reason, blames_message=blames))
        # Each pending message holds one window slot; giving them back wakes every caller
        # blocked on a full window, and each then sees the loss.
        for _ in range(len(self.pending)):
            self.window.release()
        self.pending.clear()

    def abort(self, reason: str) -> None:
        """Close the socket without DISCONNECT: the broker will publish the will. Safe to
        call again, in any state: before the socket is open, while it opens, after a loss."""
        c = self.client
        sock = c.socket()
        # paho keeps the socket object after we closed it (its fd is then -1, and the event
        # loop refuses it): a second abort, e.g. a cancel during connect followed by the
        # connection's own cleanup, must not touch it again.
        if sock is not None and sock.fileno() != -1:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
            # paho still holds the socket and closes it again when garbage-collected;
            # by then our callbacks (and perhaps the loop) are gone, so unhook them first.
            c.on_socket_close = c.on_socket_register_write = c.on_socket_unregister_write = None
            sock.close()
        self.fail(reason)

    def _refusal(self, topic: str, payload: bytes, qos: int) -> str | None:
        """Why the broker cannot take this message (it would drop the connection), or None."""
        if (problem := mqtt_text_problem(topic)) is not None:
            return f"not a valid MQTT topic: it {problem}"
        if self.max_message is not None and len(payload) + len(topic) > self.max_message:
            size = len(payload) + len(topic.encode("utf-8"))
            if size > self.max_message:
                return f"{size} bytes, more than the output's max_message_bytes ({self.max_message})"
        if self.max_packet is not None:
            # PUBLISH: topic (2 + n), packet id (QoS > 0), properties length (MQTT 5), payload,
            # after the fixed header (1 byte and the remaining length, 1 to 4 bytes).
            remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + 1 + len(payload)
            size = (
                remaining
                + 1
                + (1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2**21 else 4)
            )
            if size > self.max_packet:
                return f"{size} bytes, more than the broker's maximum packet size ({self.max_packet})"
        return None

    async def _keep_rate(self) -> None:
        """Wait until the rate limit lets the next message go, or the connection is lost."""
        assert self.rate is not None
        while (wait := self.rate.delay()) > 0 and not self.lost.done():
            if self.on_rate_wait is not None:
                self.on_rate_wait(wait)
            await asyncio.wait([self.lost], timeout=wait)

    async def disconnect(self, *, with_will: bool = False) -> None:
        """A normal DISCONNECT, so the broker discards the will (MQTT 5 and `with_will`: the
        broker publishes it); abort if it takes too long."""
        if self.lost.done():
            return
        reason = ReasonCode(PacketTypes.DISCONNECT, identifier=DISCONNECT_WITH_WILL) if with_will else None
        self.client.disconnect(reasoncode=reason)
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
        for index, (topic, payload, qos, retain) in enumerate(messages):
            refusal = self._refusal(topic, payload, qos)
            if refusal is not None:
                # A broker drops the connection on such a PUBLISH, and would again on every
                # retry: the rows behind it would never go out. Refused here instead.
                tracker.handed = index + 1
                tracker.settle(index, topic, refusal)
                continue
            window = self.window
            await window.acquire()
            if self.rate is not None:
                try:
                    await self._keep_rate()
                except BaseException:  # cancelled while waiting: the slot is not taken
                    window.release()
                    raise
            if self.lost.done() or tracker.done.is_set() or self.stopping is not None:
                window.release()
                break
            try:
                info = self.client.publish(topic, payload, qos, retain)
            except (ValueError, TypeError) as exc:  # paho's own checks: wildcards, length
                window.release()
                tracker.handed = index + 1
                tracker.settle(index, topic, f"not publishable: {exc}")
                continue
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                window.release()
                self.abort(paho.error_string(info.rc))
                break
            tracker.handed = index + 1
            early = self.early.pop(info.mid, None)
            if early is None:
                self.pending[info.mid] = (tracker, index, topic, qos)
            else:
                self._settle(tracker, index, topic, qos, early)
        if self.lost.done():
            tracker.finish(tracker.lost(self.lost.result(), blames_message=self.lost_blames_message))
        elif self.stopping is not None and tracker.handed < len(messages):
            tracker.stop(self.stopping)
        await tracker.done.wait()
        if tracker.error is not None:
            raise tracker.error
        if tracker.refused:
            raise MessagesRefused(
                [(topic, why) for _, topic, why in tracker.refused], [i for i, _, _ in tracker.refused]
            )


async def open_client(client: paho.Client, args: dict[str, Any]) -> None:
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
