"""MqttConnection and UnsPublisher against a real mosquitto on a free loopback port."""

from __future__ import annotations

import asyncio
import logging
import re
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from gateway import __version__
from gateway.config import GatewaySettings, MqttSettings
from gateway.errors import BrokerUnavailable, MessagesRefused
from gateway.model import AssetPath, Batch, Entry, Quality, Reading, Status
from gateway.publishers.mqtt import MqttConnection
from gateway.publishers.uns import connect_uns
from gateway.state import OutputState
from tests.helpers import MakeMosquitto, Message, Mosquitto, Subscribe, Subscriber, eventually

GATEWAY = GatewaySettings(id="gw-1", enterprise="acme", site="plant-1", area="packaging", line="line-3")
STATUS = "acme/plant-1/_gateway/gw-1/status"
STATUS_OF_PROCESS = "acme/s/_gateway/gw-1/status"  # of the gateway run as a subprocess
PRESS = AssetPath("acme", "plant-1", "packaging", "line-3", "press-1")
# An asset path overridden per device: another area and line.
OVEN = AssetPath("acme", "plant-1", "baking", "line-9", "oven-2")
DEVICES: dict[str, tuple[AssetPath, dict[str, Any]]] = {
    "press-1": (PRESS, {"type": "press", "tags": {"temp": {"datatype": "float32", "unit": "Cel"}}}),
    "oven-2": (OVEN, {"type": "oven", "tags": {}}),
}
T0 = 1795000000.123  # 2026-11-18T11:06:40.123Z


def settings(broker: Mosquitto, **overrides: Any) -> MqttSettings:
    return MqttSettings.model_validate({"url": broker.url, "connect_timeout": 3, **overrides})


@asynccontextmanager
async def running(conn: MqttConnection, *, connected: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """run() in a task; cancelled (uncleanly, unless the test closed first) at the end."""
    task = asyncio.create_task(conn.run(), name="mqtt")
    try:
        if connected:
            await asyncio.wait_for(conn.wait_connected(), 5)
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def topics(*names: str) -> Callable[[list[Message]], bool]:
    return lambda msgs: set(names) <= {m.topic for m in msgs}


def data(messages: list[Message]) -> list[Message]:
    """Readings only: `+` levels in a filter also match the `_meta` topics."""
    return [m for m in messages if not m.topic.endswith("/_meta")]


def batch(*readings: Reading, first_seq: int = 1) -> Batch:
    return Batch([Entry(first_seq + i, r) for i, r in enumerate(readings)])


async def test_publish_many_returns_after_every_puback(mosquitto: Mosquitto, subscriber: Subscribe) -> None:
    sub: Subscriber = subscriber(mosquitto, "t/#")
    conn = MqttConnection(settings(mosquitto, max_inflight=20), client_id="t-pubacks")
    async with running(conn):
        messages = [(f"t/{i}", str(i).encode(), 1, False) for i in range(300)]
        await conn.publish_many(messages)
        got = await sub.received(lambda msgs: len(msgs) >= 300)
        assert [m.payload for m in got] == [m[1] for m in messages]  # all of them, in order
        await conn.publish_many([("t/qos0", b"0", 0, False)])  # returns once written
        await sub.received(topics("t/qos0"))

        # A broker that takes the messages but answers nothing: publish_many must wait.
        mosquitto.pause()
        try:
            pending = asyncio.create_task(conn.publish_many([("t/held", b"x", 1, False)]))
            await asyncio.sleep(0.3)
            assert not pending.done()
        finally:
            mosquitto.resume()
        await asyncio.wait_for(pending, 3)


async def test_connection_dropping_during_publish_raises_broker_unavailable(mosquitto: Mosquitto) -> None:
    conn = MqttConnection(settings(mosquitto), client_id="t-drop")
    async with running(conn):
        mosquitto.pause()
        pending = asyncio.create_task(conn.publish_many([(f"t/{i}", b"x", 1, False) for i in range(50)]))
        await asyncio.sleep(0.2)
        mosquitto.stop(kill=True)
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(pending, 3)


async def test_refused_messages_are_named_and_the_rest_confirmed(
    make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n", encoding="utf-8")
    broker = make_mosquitto(f"acl_file {acl}")
    sub = subscriber(broker, "allowed/#")
    conn = MqttConnection(settings(broker), client_id="t-acl")
    async with running(conn):
        messages = [
            ("allowed/a", b"1", 1, False),
            ("denied/x", b"2", 1, False),
            ("allowed/c", b"3", 1, False),
        ]
        with pytest.raises(MessagesRefused, match=r"'denied/x'.*Not authorized") as info:
            await conn.publish_many(messages)
        assert [topic for topic, _ in info.value.refused] == ["denied/x"]
        await sub.received(topics("allowed/a", "allowed/c"))
        await conn.publish_many([("allowed/b", b"3", 1, False)])  # the connection is still fine


async def test_uns_topics_and_payloads(mosquitto: Mosquitto, subscriber: Subscribe) -> None:
    sub: Subscriber = subscriber(mosquitto, "acme/plant-1/+/+/+/+")
    conn, uns = connect_uns(settings(mosquitto), GATEWAY, DEVICES)
    async with running(conn):
        await uns.publish(
            batch(
                Reading("press-1", "temp", 21.5, Quality.GOOD, 0, T0, T0 + 1, "Cel"),
                Reading("press-1", "count", 7, Quality.GOOD, 0, None, T0 + 2),
                Reading("oven-2", "zone1", None, Quality.BAD, Status.BAD_TIMEOUT, None, T0 + 3, "Cel"),
                Reading("oven-2", "door", True, Quality.UNCERTAIN, 0x40940000, None, T0),
                Reading("press-1", "nan", float("nan"), Quality.GOOD, 0, None, T0),
                first_seq=1041,
            )
        )
        await sub.received(lambda msgs: len(data(msgs)) >= 5)
    got = data(sub.messages)
    assert [(m.topic, m.retain, m.qos) for m in got] == [
        ("acme/plant-1/packaging/line-3/press-1/temp", False, 1),
        ("acme/plant-1/packaging/line-3/press-1/count", False, 1),
        ("acme/plant-1/baking/line-9/oven-2/zone1", False, 1),
        ("acme/plant-1/baking/line-9/oven-2/door", False, 1),
        ("acme/plant-1/packaging/line-3/press-1/nan", False, 1),
    ]
    assert [m.json() for m in got] == [
        # the source timestamp when there is one, else the read time; UTC, milliseconds
        {
            "value": 21.5,
            "quality": "Good",
            "timestamp": "2026-11-18T11:06:40.123Z",
            "unit": "Cel",
            "seq": 1041,
        },
        {"value": 7, "quality": "Good", "timestamp": "2026-11-18T11:06:42.123Z", "unit": None, "seq": 1042},
        {
            "value": None,
            "quality": "Bad",
            "timestamp": "2026-11-18T11:06:43.123Z",
            "unit": "Cel",
            "seq": 1043,
            "status": "0x800A0000",
        },
        {
            "value": True,
            "quality": "Uncertain",
            "timestamp": "2026-11-18T11:06:40.123Z",
            "unit": None,
            "seq": 1044,
            "status": "0x40940000",
        },
        # JSON has no NaN: null, Bad, BadOutOfRange
        {
            "value": None,
            "quality": "Bad",
            "timestamp": "2026-11-18T11:06:40.123Z",
            "unit": None,
            "seq": 1045,
            "status": "0x803C0000",
        },
    ]


async def test_meta_and_status_are_retained_and_come_before_any_data(
    mosquitto: Mosquitto, subscriber: Subscribe
) -> None:
    early: Subscriber = subscriber(mosquitto, "acme/#")
    conn, uns = connect_uns(settings(mosquitto), GATEWAY, DEVICES)
    async with running(conn):
        await uns.publish(batch(Reading("press-1", "temp", 20.0, Quality.GOOD, 0, None, T0, "Cel")))
        seen = await early.received(topics("acme/plant-1/packaging/line-3/press-1/temp"))
        order = [m.topic for m in seen]
        data = order.index("acme/plant-1/packaging/line-3/press-1/temp")
        assert {STATUS, f"{PRESS.topic}/_meta", f"{OVEN.topic}/_meta"} <= set(order[:data])

        # A consumer arriving later gets the retained announcements.
        late: Subscriber = subscriber(mosquitto, "acme/#")
        retained = {m.topic: m for m in late.wait_for(topics(STATUS, f"{PRESS.topic}/_meta"))}
    status = retained[STATUS]
    assert status.retain
    assert status.json() == {
        "online": True,
        "id": "gw-1",
        "version": __version__,
        "started": status.json()["started"],
        "devices": ["press-1", "oven-2"],
    }
    assert status.json()["started"].endswith("Z")
    meta = retained[f"{PRESS.topic}/_meta"]
    assert meta.retain
    assert meta.json() == {
        "device": "press-1",
        "path": {"enterprise": "acme", "site": "plant-1", "area": "packaging", "line": "line-3"},
        "type": "press",
        "tags": {"temp": {"datatype": "float32", "unit": "Cel"}},
    }


async def test_graceful_close_publishes_offline_and_no_will(
    mosquitto: Mosquitto, subscriber: Subscribe
) -> None:
    sub: Subscriber = subscriber(mosquitto, STATUS)
    conn, uns = connect_uns(settings(mosquitto), GATEWAY, DEVICES)
    async with running(conn) as task:
        await sub.received(lambda msgs: any(m.json()["online"] for m in msgs))
        await uns.close()
        await asyncio.wait_for(task, 2)  # run() ends by itself after close()
    await sub.received(lambda msgs: not msgs[-1].json()["online"])
    await asyncio.sleep(0.3)  # a will would come right after the socket closed
    assert [m.json() for m in sub.messages][-1:] == [{"online": False, "id": "gw-1", "reason": "shutdown"}]
    late: Subscriber = subscriber(mosquitto, STATUS)
    assert late.wait_for(lambda msgs: len(msgs) >= 1)[0].retain


GATEWAY_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.config import GatewaySettings, MqttSettings
    from gateway.publishers.uns import connect_uns

    async def main():
        gateway = GatewaySettings(id="gw-1", enterprise="acme", site="s", area="a", line="l")
        conn, _ = connect_uns(MqttSettings(url=sys.argv[1]), gateway, {})
        task = asyncio.create_task(conn.run())
        await conn.wait_connected()
        print("connected", flush=True)
        await task

    asyncio.run(main())
    """
)


def test_will_marks_the_gateway_offline_when_it_is_killed(
    mosquitto: Mosquitto, subscriber: Subscribe
) -> None:
    sub: Subscriber = subscriber(mosquitto, STATUS_OF_PROCESS)
    proc = subprocess.Popen(
        [sys.executable, "-c", GATEWAY_PROCESS, mosquitto.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=15), "the gateway process did not connect"
        assert proc.stdout.readline() == b"connected\n", proc.stderr.read() if proc.stderr else ""
        sub.wait_for(lambda msgs: any(m.json()["online"] for m in msgs))
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT, no goodbye: only the will can tell
        proc.wait(5)
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    sub.wait_for(lambda msgs: msgs[-1].json() == {"online": False, "id": "gw-1"})
    late: Subscriber = subscriber(mosquitto, STATUS_OF_PROCESS)
    (retained,) = late.wait_for(lambda msgs: len(msgs) >= 1)
    assert retained.retain
    assert retained.json() == {"online": False, "id": "gw-1"}


async def test_broker_outage_rejects_without_queueing_and_recovers(
    mosquitto: Mosquitto, subscriber: Subscribe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.publishers.mqtt")
    sub: Subscriber = subscriber(mosquitto, "t/#")
    conn = MqttConnection(settings(mosquitto), client_id="t-outage")
    async with running(conn):
        await conn.publish_many([("t/before", b"1", 1, False)])
        mosquitto.stop()
        await eventually(lambda: not conn.connected, what="connection loss noticed")
        for _ in range(3):
            with pytest.raises(BrokerUnavailable):
                await conn.publish_many([("t/rejected", b"2", 1, False)])
            await asyncio.sleep(0.2)
        subscribed = sub.subscriptions
        mosquitto.start()
        await asyncio.wait_for(conn.wait_connected(), 5)
        await eventually(lambda: sub.subscriptions > subscribed, what="subscriber back")
        await conn.publish_many([("t/after", b"3", 1, False)])
        await sub.received(topics("t/after"))
    await asyncio.sleep(0.2)
    # Nothing rejected while the broker was down was kept in paho and sent later.
    assert [m.topic for m in sub.messages] == ["t/before", "t/after"]
    logged = [r.getMessage() for r in caplog.records]
    assert sum("lost connection to" in line for line in logged) == 1
    assert sum("reconnected to" in line for line in logged) == 1


async def test_the_output_state_follows_the_connection(mosquitto: Mosquitto) -> None:
    status = OutputState("mqtt")
    conn = MqttConnection(settings(mosquitto), client_id="t-status")
    conn.status = status
    before = time.time()
    async with running(conn):
        assert status.connected
        assert status.since >= before
        mosquitto.stop()
        await eventually(lambda: not status.connected, what="the loss noted")
        lost = status.since
        assert lost >= before
        mosquitto.start()
        await eventually(lambda: status.connected, timeout=10, what="the reconnect noted")
        assert status.since >= lost
    # Cancelled while connected (the gateway's tasks end so on a crash): down, not stuck up.
    assert not status.connected


async def test_username_and_password(
    make_mosquitto: MakeMosquitto, tmp_path: Path, subscriber: Subscribe, caplog: pytest.LogCaptureFixture
) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.fail("mosquitto_passwd is not installed: run `make test`, which installs it")
    users = tmp_path / "passwd"
    # Blocking, briefly, before anything runs on the loop.
    subprocess.run([passwd, "-b", "-c", str(users), "gateway", "s3cret"], check=True, capture_output=True)  # noqa: ASYNC221
    broker = make_mosquitto("allow_anonymous false", f"password_file {users}")
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n", encoding="utf-8")

    good = MqttConnection(settings(broker, username="gateway", password_file=secret), client_id="t-good")
    async with running(good):
        await good.publish_many([("t/auth", b"1", 1, False)])

    caplog.set_level(logging.DEBUG, logger="gateway.publishers.mqtt")
    bad = MqttConnection(settings(broker, username="gateway", password="wrong"), client_id="t-bad")
    async with running(bad, connected=False):
        retried = lambda: any("still cannot connect" in r.getMessage() for r in caplog.records)  # noqa: E731
        await eventually(retried, what="a second attempt")
        assert not bad.connected
        with pytest.raises(BrokerUnavailable):
            await bad.publish_many([("t/auth", b"2", 1, False)])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    # mosquitto 2.0 answers "Not authorized"; other brokers "Bad user name or password".
    assert re.search("Not authorized|Bad user name or password", warnings[0])
    assert "wrong" not in caplog.text


async def test_mqtt_3_1_1(mosquitto: Mosquitto, subscriber: Subscribe) -> None:
    sub: Subscriber = subscriber(mosquitto, "acme/#")
    conn, uns = connect_uns(settings(mosquitto, version="3.1.1"), GATEWAY, DEVICES)
    async with running(conn):
        await uns.publish(batch(Reading("press-1", "temp", 1.5, Quality.GOOD, 0, None, T0, "Cel")))
        await sub.received(topics(STATUS, f"{PRESS.topic}/temp"))
        await uns.close()
    # mosquitto logs its protocol number: p2 is MQTT 3.1.1 (p5 is MQTT 5); c1 a clean session.
    assert "as millwright-gw-1 (p2, c1" in mosquitto.log_text()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run `make test`, which installs it")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (d / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        encoding="utf-8",
    )
    commands = [
        [
            *ec,
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=Millwright test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        [*ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"],
    ]
    for args in commands:
        subprocess.run([openssl, "req", *args], cwd=d, check=True, capture_output=True)
    sign = ["-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
    sign += ["-days", "2", "-extfile", "server.ext", "-out", "server.pem"]
    subprocess.run([openssl, "x509", *sign], cwd=d, check=True, capture_output=True)
    return d


async def test_tls_verifies_the_broker(
    make_mosquitto: MakeMosquitto, certificates: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = make_mosquitto(
        f"cafile {certificates / 'ca.pem'}",
        f"certfile {certificates / 'server.pem'}",
        f"keyfile {certificates / 'server.key'}",
    )
    url = f"mqtts://{broker.host}:{broker.port}"
    trusted = MqttConnection(settings(broker, url=url, ca=certificates / "ca.pem"), client_id="t-tls")
    async with running(trusted):
        await trusted.publish_many([("t/tls", b"1", 1, False)])
        await trusted.close()

    # Verification is on by default: the system store does not know the test CA.
    untrusted = MqttConnection(settings(broker, url=url), client_id="t-untrusted")
    async with running(untrusted, connected=False):
        await eventually(lambda: "cannot connect" in caplog.text, what="a logged failure")
        assert not untrusted.connected
    assert "certificate verify failed" in caplog.text

    # tls_insecure: no verification, and a warning that says so, once.
    insecure = MqttConnection(settings(broker, url=url, tls_insecure=True), client_id="t-insecure")
    async with running(insecure):
        await insecure.publish_many([("t/tls", b"2", 1, False)])
    assert caplog.text.count("TLS verification is off") == 1
