"""Contract tests of the cloud platform stand-ins (tests/standins.py): each accepts what its
platform accepts and refuses what its platform refuses, as a plain paho client sees it over
real sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.helpers import MakeMosquitto, Subscribe, Subscriber
from tests.pki import make_pki
from tests.standins import (
    HUB,
    THING,
    Accepted,
    AlpnFront,
    AwsIotCore,
    CertificateEndpoint,
    Connect,
    EventGrid,
    IotHubStandIn,
    aws_alpn_standin_fixture,  # noqa: F401  (the fixture aws_alpn_standin)
    aws_iot_core,
    aws_standin_fixture,  # noqa: F401  (aws_standin)
    drop_reasons,
    event_grid,
    event_grid_standin_fixture,  # noqa: F401  (event_grid_standin)
    iot_hub_standin_fixture,  # noqa: F401  (iot_hub_standin)
    parse_connect,
    sas_token,
)

V311, V5 = MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5
PROTOCOLS = pytest.mark.parametrize("protocol", [V311, V5], ids=["mqtt3.1.1", "mqtt5"])
# Written out, not built from the stand-in's constants: the test states the contract.
USERNAME = "millwright-test.azure-devices.net/press-shop-edge-1/?api-version=2021-04-12"
EVENTS = "devices/press-shop-edge-1/messages/events/"


class Device:
    """A paho client that connects once (no reconnects: the test wants the fate of this
    connection) and records its CONNACK, its PUBACKs and how it ended."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        tls: ssl.SSLContext,
        protocol: MQTTProtocolVersion = V5,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 60,
    ) -> None:
        self.connack: ReasonCode | None = None
        self.connack_properties: Properties | None = None
        self.connected = threading.Event()  # a CONNACK came, whatever its code
        self.ended = threading.Event()
        self.ended_at = 0.0
        self.end_reason: ReasonCode | str | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id, protocol=protocol, reconnect_on_failure=False
        )
        client.tls_set_context(tls)
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        try:
            client.connect(host, port, keepalive)  # the TLS handshake happens here
        except OSError as exc:
            # A front that refuses right after the handshake may reset the socket before
            # paho has written its CONNECT: that is a refusal too.
            self._end(str(exc))
            return
        client.loop_start()

    def _on_connect(
        self, c: paho.Client, u: Any, f: paho.ConnectFlags, rc: ReasonCode, p: Properties | None
    ) -> None:
        self.connack, self.connack_properties = rc, p
        self.connected.set()

    def _on_disconnect(
        self, c: paho.Client, u: Any, f: paho.DisconnectFlags, rc: ReasonCode, p: Properties | None
    ) -> None:
        self._end(rc)

    def _on_publish(self, c: paho.Client, u: Any, mid: int, rc: ReasonCode, p: Properties | None) -> None:
        self.pubacks[mid] = rc

    def _end(self, reason: ReasonCode | str) -> None:
        self.end_reason = reason
        self.ended_at = time.time()
        self.ended.set()

    def wait_connack(self) -> ReasonCode:
        if not self.connected.wait(5):
            raise AssertionError(f"no CONNACK within 5 s; ended: {self.end_reason}")
        assert self.connack is not None
        return self.connack

    def wait_end(self) -> ReasonCode | str | None:
        if not self.ended.wait(10):
            raise AssertionError("the connection is still open after 10 s")
        return self.end_reason

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> ReasonCode:
        """Publish and wait for the broker's answer: the PUBACK's reason (QoS 1)."""
        info = self._client.publish(topic, payload, qos, retain)
        info.wait_for_publish(5)
        return self.pubacks[info.mid]

    def send(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        """Publish without waiting: for what the broker answers by closing the connection."""
        self._client.publish(topic, payload, qos, retain)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        # paho closes its sockets only in Client.__del__. Unhook the callbacks, which point
        # back at this Device, so that no cycle holds the client: it goes by reference
        # counting, sockets closed first, and not in a GC pass that may finalise the
        # sockets before the client (a ResourceWarning, an error under pytest).
        self._client.on_connect = self._client.on_disconnect = self._client.on_publish = None


MakeDevice = Callable[..., Device]


@pytest.fixture
def device() -> Iterator[MakeDevice]:
    """`device(host, port, client_id, tls=..., ...)` -> a `Device`; all closed at teardown."""
    made: list[Device] = []

    def make(*args: Any, **options: Any) -> Device:
        made.append(Device(*args, **options))
        return made[-1]

    yield make
    for d in made:
        d.close()


def tls(
    ca: Path, cert: Path | None = None, key: Path | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll `condition` (state another thread changes) until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.01)


def topics(sub: Subscriber, marker: str) -> list[str]:
    """Every topic `sub` got, once `marker` has come: a broker forwards one client's
    messages in order, so what was not delivered before the marker never will be."""
    sub.wait_for(lambda messages: any(m.topic == marker for m in messages))
    return [m.topic for m in sub.messages]


def thing(device: MakeDevice, standin: CertificateEndpoint, **options: Any) -> Device:
    """The thing connected to `standin` with its certificate; CONNACK checked."""
    d = device(standin.host, standin.port, THING, tls=tls(standin.ca, standin.cert, standin.key), **options)
    assert d.wait_connack() == "Success"
    return d


# AWS IoT Core, port 8883


def test_aws_delivers_what_the_thing_publishes_under_its_roots(
    aws_standin: AwsIotCore, subscriber: Subscribe, device: MakeDevice
) -> None:
    sub = subscriber(aws_standin.broker, "#")
    assert aws_standin.url == f"mqtts://127.0.0.1:{aws_standin.port}"
    assert thing(device, aws_standin).publish("acme/press-1/temp", b"21.5") == "Success"
    [message] = sub.wait_for(lambda messages: len(messages) == 1)
    assert (message.topic, message.payload) == ("acme/press-1/temp", b"21.5")


def test_aws_drops_what_the_acl_does_not_allow(
    aws_standin: AwsIotCore, subscriber: Subscribe, device: MakeDevice
) -> None:
    sub = subscriber(aws_standin.broker, "#")
    d = thing(device, aws_standin)
    assert d.publish("plant/press-1/temp", b"x") == "Not authorized"  # MQTT 5 PUBACK 0x87
    assert d.publish("acme/marker", b"m") == "Success"
    assert topics(sub, "acme/marker") == ["acme/marker"]
    assert not d.ended.is_set()  # denied, not disconnected


def test_aws_acl_binds_the_roots_to_the_things_certificate(
    make_mosquitto: MakeMosquitto, tmp_path: Path, device: MakeDevice
) -> None:
    pki = make_pki(tmp_path / "pki", [THING, "paint-shop-edge-2"])
    aws = aws_iot_core(make_mosquitto, tmp_path, pki)
    cert, key = pki.client("paint-shop-edge-2")
    other = device(aws.host, aws.port, "paint-shop-edge-2", tls=tls(pki.ca, cert, key))
    assert other.wait_connack() == "Success"  # the CA vouches for it, the ACL gives it nothing
    assert other.publish("acme/press-1/temp", b"x") == "Not authorized"


def test_aws_refuses_tls_without_a_client_certificate(aws_standin: AwsIotCore) -> None:
    context = tls(aws_standin.ca)
    # TLS 1.3 (what mosquitto and Python negotiate): the server checks the client's
    # certificate after the client's side of the handshake, and says so in an alert.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection((aws_standin.host, aws_standin.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=aws_standin.host) as conn,
        pytest.raises(ssl.SSLError, match="certificate required"),
    ):
        conn.recv(1)


@PROTOCOLS
def test_aws_closes_the_connection_on_qos_2(
    aws_standin: AwsIotCore, subscriber: Subscribe, device: MakeDevice, protocol: MQTTProtocolVersion
) -> None:
    sub = subscriber(aws_standin.broker, "#")
    d = thing(device, aws_standin, protocol=protocol)
    d.send("acme/qos2", b"x", qos=2)
    reason = d.wait_end()
    if protocol is V5:
        assert reason == "QoS not supported"  # DISCONNECT 0x9B, then the close
    until(lambda: aws_standin.drops(THING) != [], "the drop in the broker's log")
    assert aws_standin.drops(THING) == ["Requested QoS not supported on server."]
    assert thing(device, aws_standin).publish("acme/marker", b"m") == "Success"
    assert topics(sub, "acme/marker") == ["acme/marker"]


@pytest.mark.parametrize(
    ("standin", "keepalive", "retain", "size"),
    [("aws_standin", 1200, 1, 131072), ("event_grid_standin", 1160, 0, 524288)],
)
def test_certificate_endpoints_hold_the_platform_limits(
    request: pytest.FixtureRequest,
    subscriber: Subscribe,
    device: MakeDevice,
    standin: str,
    keepalive: int,
    retain: int,
    size: int,
) -> None:
    endpoint: CertificateEndpoint = request.getfixturevalue(standin)
    sub = subscriber(endpoint.broker, "#")
    d5 = thing(device, endpoint, keepalive=3600)
    announced = d5.connack_properties
    assert announced is not None
    assert announced.ServerKeepAlive == keepalive  # type: ignore[attr-defined]
    assert announced.MaximumQoS == 1  # type: ignore[attr-defined]
    assert getattr(announced, "RetainAvailable", 1) == retain  # absent: available
    d5.close()
    # Sizes over MQTT 3.1.1: over MQTT 5 an oversize PUBLISH ends paho's connection (below).
    d = thing(device, endpoint, protocol=V311)
    assert d.publish("acme/largest", b"x" * size) == "Success"
    assert d.publish("acme/too-large", b"x" * (size + 1)) == "Success"  # acknowledged, dropped
    d.publish("acme/marker", b"m")
    assert topics(sub, "acme/marker") == ["acme/largest", "acme/marker"]


def test_an_oversize_mqtt_5_publish_ends_the_paho_connection(
    aws_standin: AwsIotCore, device: MakeDevice
) -> None:
    # mosquitto 2.0.11 answers with PUBACK 0x95 (Packet too large), a reason MQTT 5 does not
    # allow in a PUBACK: paho takes the PUBACK for a malformed packet and closes.
    d = thing(device, aws_standin)
    d.send("acme/too-large", b"x" * 131073, qos=1)
    assert d.wait_end() == "Protocol error"


@pytest.mark.parametrize("build", [aws_iot_core, event_grid], ids=["aws", "event-grid"])
def test_a_persistent_endpoint_keeps_sessions_across_a_restart(
    make_mosquitto: MakeMosquitto,
    tmp_path: Path,
    subscriber: Subscribe,
    device: MakeDevice,
    build: Callable[..., CertificateEndpoint],
) -> None:
    endpoint = build(make_mosquitto, tmp_path, make_pki(tmp_path / "pki", [THING]), persistent=True)
    subscriber(endpoint.broker, "acme/#", client_id="check", persistent=True).close()
    endpoint.broker.stop()
    endpoint.broker.start()
    # "Success", not "No matching subscribers": the session came back, and queues this.
    assert thing(device, endpoint).publish("acme/while-away", b"1") == "Success"
    back = subscriber(endpoint.broker, "acme/#", client_id="check", persistent=True)
    [message] = back.wait_for(lambda messages: len(messages) == 1)
    assert message.topic == "acme/while-away"


# AWS IoT Core, port 443 (ALPN)


def test_alpn_front_passes_x_amzn_mqtt_ca(
    aws_standin: AwsIotCore, aws_alpn_standin: AlpnFront, subscriber: Subscribe, device: MakeDevice
) -> None:
    sub = subscriber(aws_standin.broker, "#")
    front = aws_alpn_standin
    context = tls(aws_standin.ca, aws_standin.cert, aws_standin.key, alpn=["x-amzn-mqtt-ca"])
    d = device(front.host, front.port, THING, tls=context)
    assert d.wait_connack() == "Success"
    assert d.publish("acme/press-1/temp", b"21.5") == "Success"
    # Upstream it is the thing, with the thing's ACL, as on port 8883.
    assert d.publish("plant/press-1/temp", b"x") == "Not authorized"
    assert d.publish("acme/marker", b"m") == "Success"
    assert topics(sub, "acme/marker") == ["acme/press-1/temp", "acme/marker"]
    assert (front.accepted, front.refused) == (1, [])


@pytest.mark.parametrize("alpn", [None, ["x-amzn-http-ca"]], ids=["no-alpn", "https-alpn"])
def test_alpn_front_refuses_any_other_alpn(
    aws_standin: AwsIotCore, aws_alpn_standin: AlpnFront, device: MakeDevice, alpn: list[str] | None
) -> None:
    front = aws_alpn_standin
    context = tls(aws_standin.ca, aws_standin.cert, aws_standin.key, alpn=alpn)
    d = device(front.host, front.port, THING, tls=context)
    d.wait_end()
    assert d.connack is None
    assert front.refused == ["ALPN None, not 'x-amzn-mqtt-ca'"]  # the server selected none
    assert front.accepted == 0


def test_alpn_front_refuses_a_client_without_certificate(
    aws_standin: AwsIotCore, aws_alpn_standin: AlpnFront, device: MakeDevice
) -> None:
    front = aws_alpn_standin
    d = device(front.host, front.port, THING, tls=tls(aws_standin.ca, alpn=["x-amzn-mqtt-ca"]))
    d.wait_end()
    assert d.connack is None
    [refusal] = front.refused  # recorded before the front closed the connection
    assert refusal.startswith("TLS handshake failed:")
    assert "certificate" in refusal
    assert front.accepted == 0


# Azure Event Grid MQTT broker


def test_event_grid_delivers_qos_1(
    event_grid_standin: EventGrid, subscriber: Subscribe, device: MakeDevice
) -> None:
    sub = subscriber(event_grid_standin.broker, "#")
    d = thing(device, event_grid_standin)
    assert d.publish("acme/press-1/temp", b"21.5", qos=1) == "Success"
    [message] = sub.wait_for(lambda messages: len(messages) == 1)
    assert (message.topic, message.payload, message.qos, message.retain) == (
        "acme/press-1/temp",
        b"21.5",
        1,
        False,
    )
    assert d.publish("plant/press-1/temp", b"x") == "Not authorized"


@PROTOCOLS
@pytest.mark.parametrize(
    ("qos", "retain", "v5_reason", "logged"),
    [
        pytest.param(1, True, "Retain not supported", "Unknown error.", id="retained"),
        pytest.param(2, False, "QoS not supported", "Requested QoS not supported on server.", id="qos2"),
    ],
)
def test_event_grid_closes_the_connection_on_retain_and_qos_2(
    event_grid_standin: EventGrid,
    subscriber: Subscribe,
    device: MakeDevice,
    protocol: MQTTProtocolVersion,
    qos: int,
    retain: bool,
    v5_reason: str,
    logged: str,
) -> None:
    grid = event_grid_standin
    sub = subscriber(grid.broker, "#")
    d = thing(device, grid, protocol=protocol)
    d.send("acme/refused", b"x", qos=qos, retain=retain)
    reason = d.wait_end()
    if protocol is V5:
        assert reason == v5_reason
    until(lambda: grid.drops(THING) != [], "the drop in the broker's log")
    assert grid.drops(THING) == [logged]
    assert thing(device, grid).publish("acme/marker", b"m") == "Success"
    assert topics(sub, "acme/marker") == ["acme/marker"]


# Azure IoT Hub


def hub_device(
    device: MakeDevice,
    hub: IotHubStandIn,
    *,
    lifetime: int = 3600,
    key: bytes | None = None,
    client_id: str = THING,
    username: str = USERNAME,
) -> tuple[Device, int]:
    """A device SDK's connection: MQTT 3.1.1 over TLS, a SAS token as password; and the
    token's expiry."""
    expiry = int(time.time()) + lifetime
    token = sas_token(HUB, THING, base64.b64decode(hub.device_key) if key is None else key, expiry)
    d = device(
        hub.host, hub.port, client_id, tls=tls(hub.ca), protocol=V311, username=username, password=token
    )
    return d, expiry


def test_iot_hub_passes_a_valid_token(
    iot_hub_standin: IotHubStandIn, subscriber: Subscribe, device: MakeDevice
) -> None:
    hub = iot_hub_standin
    sub = subscriber(hub.broker, "#")
    d, expiry = hub_device(device, hub)
    assert d.wait_connack() == "Success"
    assert d.publish(EVENTS + "line=3", b"{}") == "Success"
    d.publish("devices/press-shop-edge-2/messages/events/", b"x")  # another device's: the ACL drops it
    d.publish(EVENTS + "marker", b"m")
    assert topics(sub, EVENTS + "marker") == [EVENTS + "line=3", EVENTS + "marker"]
    assert hub.accepted == [Accepted(THING, USERNAME, expiry)]
    assert (hub.refused, hub.expired) == ([], 0)


@pytest.mark.parametrize(
    ("options", "connack", "refusal"),
    [
        pytest.param(
            {"key": b"not the device key"}, "Not authorized", "CONNACK 5: token signature", id="signature"
        ),
        pytest.param(
            {"client_id": "press-shop-edge-2"}, "Client identifier not valid", "CONNACK 2: client id", id="id"
        ),
        pytest.param({"lifetime": -60}, "Not authorized", "CONNACK 5: token expired", id="expired"),
        pytest.param({"username": HUB + "/" + THING}, "Not authorized", "CONNACK 5: username", id="username"),
    ],
)
def test_iot_hub_refuses_a_bad_connect(
    iot_hub_standin: IotHubStandIn, device: MakeDevice, options: dict[str, Any], connack: str, refusal: str
) -> None:
    hub = iot_hub_standin
    d, _ = hub_device(device, hub, **options)
    assert d.wait_connack() == connack  # paho's name for the 3.1.1 return code
    d.wait_end()
    [refused] = hub.refused
    assert refused.startswith(refusal)
    assert hub.accepted == []
    assert "New client connected" not in hub.broker.log_text()  # nothing reached mosquitto


def test_iot_hub_closes_the_connection_when_the_token_expires(
    iot_hub_standin: IotHubStandIn, subscriber: Subscribe, device: MakeDevice
) -> None:
    hub = iot_hub_standin
    sub = subscriber(hub.broker, "#")
    d, expiry = hub_device(device, hub, lifetime=2)
    assert d.wait_connack() == "Success"
    assert d.publish(EVENTS + "before", b"{}") == "Success"
    sub.wait_for(lambda messages: len(messages) == 1)
    d.wait_end()
    assert expiry - 0.05 <= d.ended_at < expiry + 2  # at expiry (timer resolution aside)
    assert hub.expired == 1


def test_iot_hub_closes_the_connection_on_qos_2(
    iot_hub_standin: IotHubStandIn, subscriber: Subscribe, device: MakeDevice
) -> None:
    hub = iot_hub_standin
    sub = subscriber(hub.broker, "#")
    d, _ = hub_device(device, hub)
    assert d.wait_connack() == "Success"
    d.send(EVENTS + "qos2", b"{}", qos=2)
    d.wait_end()  # mosquitto closed its side, and the front passed that on
    until(lambda: drop_reasons(hub.broker, THING) != [], "the drop in the broker's log")
    assert drop_reasons(hub.broker, THING) == ["Requested QoS not supported on server."]
    assert (hub.expired, hub.refused) == (0, [])
    again, _ = hub_device(device, hub)
    assert again.wait_connack() == "Success"
    assert again.publish(EVENTS + "marker", b"m") == "Success"
    assert topics(sub, EVENTS + "marker") == [EVENTS + "marker"]


def sign(sr: str, se: str, key: bytes) -> str:
    """A third implementation of the signature, to build tokens sas_token would not."""
    return base64.b64encode(hmac.new(key, f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()


RESOURCE = urllib.parse.quote(f"{HUB}/devices/{THING}", safe="")


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        # Any percent-encoding and case of sr, fields in any order, sig not URL-encoded.
        pytest.param(lambda sr, se, sig: f"se={se}&sig={sig}&sr={sr}", None, id="lenient-encoding"),
        pytest.param(lambda sr, se, sig: f"sr={sr}&sig={sig}&se={se}&skn=device", "skn=device", id="skn"),
        pytest.param(lambda sr, se, sig: f"sr={sr}&sig={sig}", "fields", id="no-se"),
        pytest.param(lambda sr, se, sig: f"sr={sr}&sig={sig}&se={se}&se={se}", "repeated", id="se-twice"),
    ],
)
def test_iot_hub_is_lenient_on_token_encoding_and_strict_on_content(
    iot_hub_standin: IotHubStandIn,
    device: MakeDevice,
    fields: Callable[[str, str, str], str],
    refusal: str | None,
) -> None:
    hub = iot_hub_standin
    sr, se = RESOURCE.upper().replace("%2F", "%2f"), str(int(time.time()) + 3600)
    token = "SharedAccessSignature " + fields(sr, se, sign(sr, se, hub.key))
    d = device(hub.host, hub.port, THING, tls=tls(hub.ca), protocol=V311, username=USERNAME, password=token)
    if refusal is None:
        assert d.wait_connack() == "Success"
        assert hub.refused == []
    else:
        assert d.wait_connack() == "Not authorized"
        [refused] = hub.refused
        assert refused.startswith("CONNACK 5: token")
        assert refusal in refused


def test_iot_hub_refuses_a_token_for_another_device(
    iot_hub_standin: IotHubStandIn, device: MakeDevice
) -> None:
    hub = iot_hub_standin
    expiry = int(time.time()) + 3600
    token = sas_token(HUB, "press-shop-edge-2", hub.key, expiry)  # signed by this key, but not for it
    d = device(hub.host, hub.port, THING, tls=tls(hub.ca), protocol=V311, username=USERNAME, password=token)
    assert d.wait_connack() == "Not authorized"
    [refused] = hub.refused
    assert refused.startswith("CONNACK 5: token sr=")


def connect_packet(body: bytes) -> bytes:
    assert len(body) < 128  # one byte of remaining length
    return bytes((0x10, len(body))) + body


MQTT5_CONNECT = connect_packet(b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + b"\x00\x00")  # no properties, id ""
RESERVED_FLAG = connect_packet(b"\x00\x04MQTT\x04\x03\x00\x3c" + b"\x00\x00")
PINGREQ = b"\xc0\x00"


@pytest.mark.parametrize(
    ("packet", "reply", "refusal"),
    [
        pytest.param(MQTT5_CONNECT, b"\x20\x02\x00\x01", "CONNACK 1: protocol 'MQTT' level 5", id="mqtt5"),
        pytest.param(RESERVED_FLAG, b"", "closed: CONNECT flags 0x03 are malformed", id="reserved-flag"),
        pytest.param(
            PINGREQ, b"", "closed: first packet is not a CONNECT: header byte 0xc0", id="not-connect"
        ),
    ],
)
def test_iot_hub_refuses_anything_but_mqtt_3_1_1(
    iot_hub_standin: IotHubStandIn, packet: bytes, reply: bytes, refusal: str
) -> None:
    hub = iot_hub_standin
    with (
        socket.create_connection((hub.host, hub.port), timeout=5) as raw,
        tls(hub.ca).wrap_socket(raw, server_hostname=hub.host) as conn,
    ):
        conn.sendall(packet)
        received = b""
        while chunk := conn.recv(64):  # until the front closes
            received += chunk
    assert received == reply
    [refused] = hub.refused
    assert refused.startswith(refusal)


def test_parse_connect_reads_every_field() -> None:
    # will flag, will QoS 1, clean session, username and password; keep alive 90
    body = b"\x00\x04MQTT\x04" + bytes((0xCE,)) + b"\x00\x5a"
    for field in (b"dev-1", b"will/topic", b"gone", b"user", b"secret"):
        body += len(field).to_bytes(2, "big") + field
    expected = Connect("dev-1", "user", b"secret", 90, True, ("will/topic", b"gone"))
    assert parse_connect(body) == expected
