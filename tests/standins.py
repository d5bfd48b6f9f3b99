"""Local stand-ins for the cloud MQTT platforms the gateway publishes to, for tests without
internet: AWS IoT Core (port 8883 and the ALPN port 443), the Azure Event Grid MQTT broker
and Azure IoT Hub.

Each is a real mosquitto with the platform's limits, plus a TLS front in Python where
mosquitto cannot play the part (ALPN, SAS tokens). Its mosquitto keeps the main listener
(`broker.port`) plain, anonymous and unrestricted, for the test's own subscriber
(`subscriber(standin.broker, "#")`); the gateway connects to `host`, `port` (`url`).

What mosquitto 2.0.11 does, found by experiment (tests/integration/test_standins.py pins
what the stand-ins rely on):

- With `per_listener_settings true`, allow_anonymous and acl_file apply to the listener
  above them; max_qos is per listener anyway. retain_available, message_size_limit and
  max_keepalive are global: they hold on the main listener too, which a subscriber does not
  notice.
- A PUBLISH above max_qos: MQTT 5 clients get DISCONNECT 0x9B (QoS not supported), 3.1.1
  clients see the socket close. Logged: "Too high QoS in PUBLISH from <id>, disconnecting."
  then "Bad socket read/write on client <id>: Requested QoS not supported on server."
- A retained PUBLISH with `retain_available false`: MQTT 5 clients get DISCONNECT 0x9A
  (Retain not supported), 3.1.1 clients see the socket close. Logged only as "Bad socket
  read/write on client <id>: Unknown error." (2.0.11 has no message for that error code).
- A PUBLISH the ACL denies is dropped quietly: the client still gets its PUBACK (reason 0x87
  for MQTT 5) and the denial is logged at debug level, which these brokers do not log. To
  show that it was not delivered, publish an allowed marker after it and wait for that.
- A PUBLISH over message_size_limit is acknowledged and dropped. MQTT 3.1.1 clients cannot
  tell; to MQTT 5 clients the PUBACK says 0x95 (Packet too large), a reason MQTT 5 does not
  allow in a PUBACK, so paho 2.2 calls it a malformed packet and closes the connection.
- max_keepalive caps MQTT 5 clients only (server keep alive in the CONNACK); 3.1.1 clients
  asking for more, or for 0, are accepted as they are.
- ACL `pattern` lines, %c included, apply to anonymous clients as well as to named ones.

Fixtures: import them by their function name, which is not the fixture's name (so that the
import does not clash with the test's parameter), e.g.
`from tests.standins import aws_standin_fixture  # noqa: F401` for `aws_standin`.
aws_alpn_standin builds on aws_standin: import both fixtures for it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from gateway.broker import free_port
from tests.helpers import MakeMosquitto, Mosquitto
from tests.pki import Pki, make_pki

THING = "press-shop-edge-1"
HUB = "millwright-test.azure-devices.net"
IOT_HUB_API = "2021-04-12"
AWS_ALPN = "x-amzn-mqtt-ca"

# A front gives a client this long for its TLS handshake and then its CONNECT, as the
# platforms do, so that a silent client cannot hold a connection (or stop()) forever.
HANDSHAKE_TIMEOUT = 5.0


def drop_reasons(broker: Mosquitto, client_id: str) -> list[str]:
    """Why `broker` dropped `client_id`, one entry per drop, as mosquitto logged it: e.g.
    "Requested QoS not supported on server." (QoS 2 above max_qos 1) or "Unknown error." (a
    retained PUBLISH with retain_available false). A client's own DISCONNECT, or its closing
    the socket, is logged otherwise and is not a drop."""
    prefix = f"Bad socket read/write on client {client_id}: "
    return [line.split(prefix, 1)[1] for line in broker.log_text().splitlines() if prefix in line]


# The main listener, which Mosquitto writes first: it must say allow_anonymous itself, or
# Mosquitto's default line would land under the last listener instead.
_MAIN_LISTENER = ("per_listener_settings true", "allow_anonymous true")


@dataclass(frozen=True, slots=True)
class CertificateEndpoint:
    """A platform's MQTT endpoint that names each client by its certificate's CN: TLS with
    a client certificate from `pki`'s CA; `client` (a CN) may publish under `topics` only,
    at QoS 0 or 1; any other client may connect and publish nowhere."""

    broker: Mosquitto
    port: int
    client: str
    topics: tuple[str, ...]
    pki: Pki
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.pki.ca

    @property
    def cert(self) -> Path:
        return self.pki.client(self.client)[0]

    @property
    def key(self) -> Path:
        return self.pki.client(self.client)[1]

    def drops(self, client_id: str) -> list[str]:
        """`drop_reasons` of this endpoint's broker."""
        return drop_reasons(self.broker, client_id)


@dataclass(frozen=True, slots=True)
class AwsIotCore(CertificateEndpoint):
    """AWS IoT Core's port 8883, for the thing `client`: QoS 2 closes the connection (MQTT 5
    clients get DISCONNECT 0x9B first), 128 KiB a message, keep alive up to 1200 s, retain
    works. `alpn_front()` adds the port-443 way in."""

    def alpn_front(self) -> AlpnFront:
        """A front (not started: use `with`) that passes ALPN x-amzn-mqtt-ca clients on to
        this endpoint."""
        return AlpnFront(self.pki, self.host, self.port)


@dataclass(frozen=True, slots=True)
class EventGrid(CertificateEndpoint):
    """The Azure Event Grid namespace MQTT broker, for the client authentication name
    `client`: a retained PUBLISH or a QoS 2 one closes the connection (MQTT 5 clients get
    DISCONNECT 0x9A or 0x9B first, 3.1.1 clients just see it close; `drops` tells which, as
    "Unknown error." or "Requested QoS not supported on server."), 512 KiB a message, keep
    alive up to 1160 s."""


def _start_endpoint(
    make_mosquitto: MakeMosquitto,
    files: Path,
    pki: Pki,
    client: str,
    topics: Sequence[str],
    persistent: bool,
    limits: Sequence[str],
) -> tuple[Mosquitto, int]:
    """(broker, port of its TLS listener) for a `CertificateEndpoint` with the global
    `limits`; its ACL (and, if `persistent`, its sessions) in files named `files`.*."""
    pki.client(client)  # fail here, not at the first TLS handshake
    if not topics:
        raise ValueError("a stand-in that allows no topic at all is a typo")
    files.parent.mkdir(parents=True, exist_ok=True)
    acl = files.with_suffix(".acl")
    acl.write_text(f"user {client}\n" + "".join(f"topic write {t}\n" for t in topics), encoding="utf-8")
    storage = _storage(files) if persistent else []
    port = free_port()
    broker = make_mosquitto(
        *_MAIN_LISTENER,
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"cafile {pki.ca}",
        f"certfile {pki.server_cert}",
        f"keyfile {pki.server_key}",
        "require_certificate true",
        "use_identity_as_username true",  # the CN is the username the ACL's `user` line names
        f"acl_file {acl}",
        "max_qos 1",
        *limits,
        *storage,
    )
    return broker, port


def _storage(files: Path) -> list[str]:
    """Mosquitto lines that keep sessions and queued messages across broker.stop()/start(),
    as a platform's do, in a folder named `files`.db."""
    sessions = files.with_suffix(".db")
    sessions.mkdir(parents=True, exist_ok=True)
    return ["persistence true", f"persistence_location {sessions}/"]


def aws_iot_core(
    make_mosquitto: MakeMosquitto,
    directory: Path,
    pki: Pki,
    *,
    thing: str = THING,
    topics: Sequence[str] = ("acme/#",),
    persistent: bool = False,
) -> AwsIotCore:
    """Start an AWS IoT Core stand-in for `thing`, whose certificate `pki` must hold; with
    `persistent`, sessions survive a broker restart."""
    limits = ("message_size_limit 131072", "max_keepalive 1200", "retain_available true")
    broker, port = _start_endpoint(make_mosquitto, directory / "aws", pki, thing, topics, persistent, limits)
    return AwsIotCore(broker, port, thing, tuple(topics), pki)


def event_grid(
    make_mosquitto: MakeMosquitto,
    directory: Path,
    pki: Pki,
    *,
    client: str = THING,
    topics: Sequence[str] = ("acme/#",),
    persistent: bool = False,
) -> EventGrid:
    """Start an Event Grid stand-in for `client`, whose certificate `pki` must hold; with
    `persistent`, sessions survive a broker restart."""
    limits = ("message_size_limit 524288", "max_keepalive 1160", "retain_available false")
    broker, port = _start_endpoint(
        make_mosquitto, directory / "event-grid", pki, client, topics, persistent, limits
    )
    return EventGrid(broker, port, client, tuple(topics), pki)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close gracefully, so that what is buffered (a CONNACK) still goes out and TLS says
    close_notify; abort if the peer does not finish within a second: stop() must not hang."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (TimeoutError, OSError):  # ssl.SSLError is an OSError
        writer.transport.abort()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # a reset or TLS error ends this direction as EOF would: the caller closes both


async def _splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    until: float | None = None,
) -> bool:
    """Copy bytes both ways until either side closes, or until time.time() reaches `until`:
    then True. MQTT has no use for half-closed connections, so one side's end is the
    connection's end; the caller closes both."""
    tasks = [
        asyncio.create_task(_copy(client[0], upstream[1]), name="front-to-upstream"),
        asyncio.create_task(_copy(upstream[0], client[1]), name="front-to-client"),
    ]
    timeout = None if until is None else max(0.0, until - time.time())
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()  # a bug in _copy must not pass for a closed connection
    return not done


def _common_name(ssl_object: ssl.SSLObject) -> str | None:
    for rdn in (ssl_object.getpeercert() or {}).get("subject", ()):
        for attribute in rdn:
            if isinstance(attribute, tuple) and attribute[0] == "commonName":
                return str(attribute[1])
    return None


class _TlsFront:
    """A TLS server on a free loopback port, served by its own thread and event loop, so
    that it serves while a test blocks in paho calls or `Subscriber.wait_for`.

    `start()` (or `with`) returns once it accepts connections; `stop()` closes every
    connection and joins the thread, leaving no thread and no task behind, and raises what
    a connection handler raised unexpectedly, so that a bug in the front fails the test
    that met it. Refused connections are described in `refused`, oldest first.
    """

    host = "127.0.0.1"

    def __init__(self, context: ssl.SSLContext, name: str) -> None:
        self.refused: list[str] = []
        self._context = context
        # Bound now, so that `port` is known before start() and nothing can take it meanwhile.
        self._socket = socket.create_server((self.host, 0))
        self.port: int = self._socket.getsockname()[1]
        self._name = f"{name}-{self.port}"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._errors: list[Exception] = []

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name=self._name)
            self._thread.start()
            if not self._ready.wait(HANDSHAKE_TIMEOUT):
                raise RuntimeError(f"{self._name} did not start")
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            self._socket.close()
            return
        if thread.is_alive() and self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError(f"{self._name} did not stop")
        if self._errors:
            raise RuntimeError(f"{self._name} failed") from self._errors[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._connection(reader, writer)
            finally:
                connections.discard(task)

        server = await asyncio.start_server(accept, sock=self._socket)
        try:
            self._ready.set()
            await self._stopping.wait()
        finally:
            server.close()
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # TLS is started here rather than by the server, so that a failed handshake (no
        # client certificate, say) is seen, and recorded, instead of logged at debug level.
        try:
            await writer.start_tls(self._context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self.refused.append(f"TLS handshake failed: {exc}")
            writer.transport.abort()
            return
        try:
            await self._serve(reader, writer)
        except Exception as exc:  # kept for stop() to raise: this task's caller is asyncio
            self._errors.append(exc)
        finally:
            await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class AlpnFront(_TlsFront):
    """AWS IoT Core's port 443: a client that negotiates ALPN "x-amzn-mqtt-ca" and shows a
    certificate from the CA speaks MQTT there; any other ALPN (or none) is closed.

    Passed connections go on, over TLS, to the AWS stand-in's own listener, presenting the
    client's own certificate (looked up by its CN in the Pki): so the thing gets exactly the
    ACL and limits it gets on port 8883, and the broker's log names it the same way.
    `accepted` counts the connections passed on."""

    def __init__(self, pki: Pki, upstream_host: str, upstream_port: int) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.set_alpn_protocols([AWS_ALPN])
        super().__init__(context, "alpn-front")
        self.accepted = 0
        self._pki = pki
        self._upstream = (upstream_host, upstream_port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol()
        if protocol != AWS_ALPN:
            self.refused.append(f"ALPN {protocol!r}, not {AWS_ALPN!r}")
            return
        name = _common_name(ssl_object)
        if name is None or name not in self._pki.clients:
            self.refused.append(f"certificate CN {name!r} has no key in the Pki to go upstream with")
            return
        upstream_tls = ssl.create_default_context(cafile=self._pki.ca)
        upstream_tls.load_cert_chain(*self._pki.client(name))
        try:
            upstream = await asyncio.open_connection(*self._upstream, ssl=upstream_tls)
        except OSError as exc:
            self.refused.append(f"upstream unavailable: {exc}")
            return
        self.accepted += 1
        try:
            await _splice((reader, writer), upstream)
        finally:
            await _close(upstream[1])


def sas_token(hub: str, device_id: str, key: bytes, expiry: int) -> str:
    """An IoT Hub device SAS token, as a device SDK makes it: `key` is the device key's bytes
    (base64-decoded from what the portal shows), `expiry` in Unix seconds. For test clients;
    the stand-in verifies tokens with code of its own."""
    resource = urllib.parse.quote(f"{hub}/devices/{device_id}", safe="")
    digest = hmac.new(key, f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}"


class _Refusal(Exception):
    """Refuse the connection: with a CONNACK carrying `code`, or, when None (a malformed
    first packet), by closing it, as MQTT 3.1.1 says a server does."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Connect:
    """An MQTT 3.1.1 CONNECT, parsed; IoT Hub checks its client id, username and password."""

    client_id: str
    username: str | None
    password: bytes | None
    keepalive: int
    clean_session: bool
    will: tuple[str, bytes] | None


class _Fields:
    """Reads MQTT's length-prefixed fields off a packet, refusing a truncated one."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise _Refusal(None, "CONNECT is truncated")
        self._at += n
        return self._data[self._at - n : self._at]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise _Refusal(None, "CONNECT has a string that is not UTF-8") from None

    @property
    def rest(self) -> int:
        return len(self._data) - self._at


def parse_connect(body: bytes) -> Connect:
    """The CONNECT whose variable header and payload are `body`; refused if it is not MQTT
    3.1.1 (CONNACK 1) or is malformed (no CONNACK)."""
    fields = _Fields(body)
    name, level = fields.text(), fields.take(1)[0]
    if (name, level) != ("MQTT", 4):
        raise _Refusal(1, f"protocol {name!r} level {level}, not MQTT 3.1.1 (level 4)")
    flags, keepalive = fields.take(1)[0], fields.u16()
    has_username, has_password, has_will = bool(flags & 0x80), bool(flags & 0x40), bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    if (
        flags & 0x01
        or will_qos == 3
        or (not has_will and flags & 0x38)
        or (has_password and not has_username)
    ):
        raise _Refusal(None, f"CONNECT flags {flags:#04x} are malformed")
    client_id = fields.text()
    will = (fields.text(), fields.binary()) if has_will else None
    username = fields.text() if has_username else None
    password = fields.binary() if has_password else None
    if fields.rest:
        raise _Refusal(None, f"CONNECT has {fields.rest} bytes after its payload")
    return Connect(client_id, username, password, keepalive, bool(flags & 0x02), will)


async def _read_packet(reader: asyncio.StreamReader, limit: int) -> tuple[int, bytes, bytes]:
    """(first byte, whole packet, body) of the next packet, whose remaining length is an
    MQTT variable byte integer of up to 4 bytes."""
    header = bytearray(await reader.readexactly(1))
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise _Refusal(None, "remaining length runs past 4 bytes")
    if length > limit:
        raise _Refusal(None, f"first packet of {length} bytes: too long for a CONNECT")
    body = await reader.readexactly(length)
    return header[0], bytes(header) + body, body


@dataclass(frozen=True, slots=True)
class Accepted:
    """A connection the IoT Hub stand-in let through."""

    client_id: str
    username: str
    expiry: int  # the SAS token's se: the connection is closed then


class IotHubStandIn(_TlsFront):
    """Azure IoT Hub's MQTT endpoint for one device: TLS (server certificate only), then an
    MQTT 3.1.1 CONNECT checked as the hub checks it, then MQTT with mosquitto upstream.

    The CONNECT must have client id `device_id`, username
    "<hub>/<device_id>/?api-version=2021-04-12" and a device SAS token as password (see
    `_check_token`); else CONNACK 2 (wrong client id) or 5 (anything else) and the
    connection is closed, with the reason in `refused`. A passed CONNECT is forwarded as it
    came to `broker`'s upstream listener, and the connection is closed at the token's
    expiry (counted in `expired`), as the hub does.

    Upstream, the device may publish to devices/<device_id>/messages/events/# only, at QoS
    0 or 1 (QoS 2: closed, as by the hub), 256 KiB a message, keep alive up to 1767 s.
    Unlike the real hub, which passes a retained message on with an "mqtt-retain" property,
    a retained PUBLISH closes the connection (retain_available false).

    Not started by its builder: use `with`, or the `iot_hub_standin` fixture.
    """

    def __init__(
        self,
        broker: Mosquitto,
        upstream_port: int,
        pki: Pki,
        hub: str,
        device_id: str,
        key: bytes,
    ) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        super().__init__(context, "iot-hub-front")
        self.broker = broker
        self.ca = pki.ca
        self.hub = hub
        self.device_id = device_id
        self.key = key
        self.accepted: list[Accepted] = []
        self.expired = 0
        self._upstream_port = upstream_port

    @property
    def device_key(self) -> str:
        """The device key as the portal and connection strings show it (base64)."""
        return base64.b64encode(self.key).decode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            packet, connect, expiry = await self._admit(reader)
            upstream = await self._open_upstream()
        except _Refusal as refusal:
            if refusal.code is None:
                self.refused.append(f"closed: {refusal.reason}")
            else:
                self.refused.append(f"CONNACK {refusal.code}: {refusal.reason}")
                writer.write(bytes((0x20, 0x02, 0x00, refusal.code)))
            return
        assert connect.username is not None  # _admit checked it
        self.accepted.append(Accepted(connect.client_id, connect.username, expiry))
        try:
            upstream[1].write(packet)
            if await _splice((reader, writer), upstream, until=expiry):
                self.expired += 1
        finally:
            await _close(upstream[1])

    async def _admit(self, reader: asyncio.StreamReader) -> tuple[bytes, Connect, int]:
        """(the CONNECT packet, parsed, the token's expiry), or _Refusal."""
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                kind, packet, body = await _read_packet(reader, limit=65536)
        except TimeoutError:
            raise _Refusal(None, f"no CONNECT within {HANDSHAKE_TIMEOUT} s") from None
        except asyncio.IncompleteReadError:
            raise _Refusal(None, "connection closed before a whole first packet") from None
        if kind != 0x10:
            raise _Refusal(None, f"first packet is not a CONNECT: header byte {kind:#04x}")
        connect = parse_connect(body)
        if connect.client_id != self.device_id:
            raise _Refusal(2, f"client id {connect.client_id!r} is not the device id {self.device_id!r}")
        username = f"{self.hub}/{self.device_id}/?api-version={IOT_HUB_API}"
        if connect.username != username:
            raise _Refusal(5, f"username {connect.username!r} is not {username!r}")
        return packet, connect, self._check_token(connect.password)

    def _check_token(self, password: bytes | None) -> int:
        """The expiry of the device SAS token `password`, or _Refusal(5).

        "SharedAccessSignature sr=...&sig=...&se=..." with its fields in any order and no
        skn (a device key, not a hub policy): sr the resource "<hub>/devices/<device_id>"
        URL-encoded (any encoding, any case: compared decoded and case-insensitively), sig
        the URL-encoded base64 HMAC-SHA256, by the device key, of sr as sent, "\\n", se;
        se in Unix seconds, not yet passed."""
        prefix = "SharedAccessSignature "
        token = (password or b"").decode("utf-8", errors="replace")
        if not token.startswith(prefix):
            raise _Refusal(5, "password is not a SharedAccessSignature token")
        fields: dict[str, str] = {}
        for part in token.removeprefix(prefix).split("&"):
            name, equals, value = part.partition("=")
            if not equals or name in fields:
                raise _Refusal(5, f"token field {part!r} is malformed or repeated")
            fields[name] = value
        if "skn" in fields:
            raise _Refusal(5, f"token has skn={fields['skn']}: a hub policy's, not the device's")
        if set(fields) != {"sr", "sig", "se"}:
            raise _Refusal(5, f"token has fields {sorted(fields)}, not sr, sig, se")
        resource = f"{self.hub}/devices/{self.device_id}"
        if urllib.parse.unquote(fields["sr"]).casefold() != resource.casefold():
            raise _Refusal(5, f"token sr={fields['sr']} is not {urllib.parse.quote(resource, safe='')}")
        if not (fields["se"].isascii() and fields["se"].isdigit()):
            raise _Refusal(5, f"token se={fields['se']!r} is not Unix seconds")
        try:
            signature = base64.b64decode(urllib.parse.unquote(fields["sig"]), validate=True)
        except binascii.Error:
            raise _Refusal(5, "token sig is not base64") from None
        signed = f"{fields['sr']}\n{fields['se']}".encode()
        if not hmac.compare_digest(signature, hmac.new(self.key, signed, hashlib.sha256).digest()):
            raise _Refusal(5, "token signature does not match the device key")
        expiry = int(fields["se"])
        if expiry <= time.time():
            raise _Refusal(5, f"token expired at {expiry}")
        return expiry

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_connection(self.broker.host, self._upstream_port)
        except OSError as exc:
            raise _Refusal(3, f"upstream broker unavailable: {exc}") from None


def iot_hub(
    make_mosquitto: MakeMosquitto,
    directory: Path,
    pki: Pki,
    *,
    hub: str = HUB,
    device_id: str = THING,
    key: bytes | None = None,
    persistent: bool = False,
) -> IotHubStandIn:
    """An IoT Hub stand-in for `device_id` (its key random unless given), its mosquitto
    started, its front not yet: `with iot_hub(...) as hub:`; with `persistent`, sessions
    survive a restart of its mosquitto."""
    port = free_port()
    acl = directory / "iot-hub-acl"
    directory.mkdir(parents=True, exist_ok=True)
    # %c, not the device id: the front has checked that the client id is the device id,
    # and %c spares escaping device ids with ACL-special characters in them. Upstream the
    # client is not anonymous (the front forwards the hub username), so a top-of-file
    # `topic` line would not apply to it; a pattern applies to every client.
    acl.write_text("pattern write devices/%c/messages/events/#\n", encoding="utf-8")
    broker = make_mosquitto(
        *_MAIN_LISTENER,
        f"listener {port} 127.0.0.1",  # plain, reached through the front only
        "allow_anonymous true",
        f"acl_file {acl}",
        "max_qos 1",
        "retain_available false",
        "message_size_limit 262144",
        "max_keepalive 1767",
        *(_storage(directory / "iot-hub") if persistent else []),
    )
    return IotHubStandIn(broker, port, pki, hub, device_id, secrets.token_bytes(32) if key is None else key)


@pytest.fixture(name="aws_standin")
def aws_standin_fixture(make_mosquitto: MakeMosquitto, tmp_path: Path) -> AwsIotCore:
    """An `AwsIotCore` for thing "press-shop-edge-1", topics acme/#."""
    directory = tmp_path / "aws"
    return aws_iot_core(make_mosquitto, directory, make_pki(directory / "pki", [THING]))


@pytest.fixture(name="aws_alpn_standin")
def aws_alpn_standin_fixture(aws_standin: AwsIotCore) -> Iterator[AlpnFront]:
    """The started `AlpnFront` of `aws_standin`, stopped at teardown. It needs the
    `aws_standin` fixture: import aws_standin_fixture too (and use it for the broker and
    the thing's certificate)."""
    with aws_standin.alpn_front() as front:
        yield front


@pytest.fixture(name="event_grid_standin")
def event_grid_standin_fixture(make_mosquitto: MakeMosquitto, tmp_path: Path) -> EventGrid:
    """An `EventGrid` for client "press-shop-edge-1", topics acme/#."""
    directory = tmp_path / "event-grid"
    return event_grid(make_mosquitto, directory, make_pki(directory / "pki", [THING]))


@pytest.fixture(name="iot_hub_standin")
def iot_hub_standin_fixture(make_mosquitto: MakeMosquitto, tmp_path: Path) -> Iterator[IotHubStandIn]:
    """A started `IotHubStandIn` for device "press-shop-edge-1" of hub
    "millwright-test.azure-devices.net", with a random key; stopped at teardown."""
    directory = tmp_path / "iot-hub"
    with iot_hub(make_mosquitto, directory, make_pki(directory / "pki")) as hub:
        yield hub
