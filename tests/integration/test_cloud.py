"""Each cloud example (config/<platform>.yaml, as the README has it) against its platform's
stand-in (tests.standins): only the endpoint, the /etc/millwright/ files, the device's port
and its poll are changed. Counted at a subscriber: no seq missing across a restart, the
rate held, no retained message where the platform refuses them, the SAS token renewed
before the hub drops the connection."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.broker import free_port
from simulators.modbus import ModbusSimulator
from tests.conftest import MakeMosquitto, Subscribe
from tests.examples import CLIENTS, DEVICE_KEY, HIVEMQ_PASSWORD, example, example_files
from tests.helpers import Message, eventually, running
from tests.pki import Pki, make_pki
from tests.standins import AWS_ALPN, aws_iot_core, event_grid, iot_hub

DEVICE = "acme/plant1/press-shop/line-1/press-1"
STATUS = "acme/plant1/_gateway/edge-1/status"


@pytest.fixture
async def press() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=7) as sim:
        yield sim


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The examples' files in tmp_path/etc, certificates from the stand-ins' CA."""
    (tmp_path / "etc").mkdir()
    return example_files(tmp_path / "etc", make_pki(tmp_path / "pki", CLIENTS))


def local(
    name: str, tmp_path: Path, press: ModbusSimulator, url: str, *, ca: Path | None = None, **replace: str
) -> str:
    """Example `name` pointed at a stand-in's `url` (whose certificate `ca` signs, where the
    platform's chains to a public root), its device at `press`, polled every 50 ms."""
    shipped = {
        "aws-iot-core.yaml": "mqtts://a1b2c3-ats.iot.eu-central-1.amazonaws.com:8883",
        "azure-iot-hub.yaml": "mqtts://myhub.azure-devices.net:8883",
        "azure-event-grid.yaml": "mqtts://plant-ns.westeurope-1.ts.eventgrid.azure.net:8883",
        "hivemq-cloud.yaml": "mqtts://0123456789abcdef.s1.eu.hivemq.cloud:8883",
    }
    ours = {shipped[name]: url, "port: 5020": f"port: {press.port}", "poll: 1s": "poll: 50ms"}
    text = example(name, tmp_path / "etc", **ours, **replace)
    if ca is not None:
        text = re.sub(r"^(    format: .*)$", rf"\1\n    ca: {ca}", text, count=1, flags=re.MULTILINE)
    return text


def batch_seqs(messages: list[Message], topic: str = DEVICE) -> list[int]:
    return [r["seq"] for m in messages if m.topic == topic for r in m.json()["readings"]]


def assert_no_gap(seqs: list[int]) -> None:
    missing = sorted(set(range(min(seqs), max(seqs) + 1)) - set(seqs))
    assert not missing, f"{len(missing)} seq missing, first {missing[:10]}"


async def test_aws_iot_core_as_the_readme_says_through_a_restart(
    press: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, pki: Pki
) -> None:
    aws = aws_iot_core(make_mosquitto, tmp_path / "aws", pki, persistent=True)
    sub = subscriber(aws.broker, "acme/#", client_id="aws-check", persistent=True)
    text = local("aws-iot-core.yaml", tmp_path, press, aws.url)
    async with running(text, tmp_path / "aws.yaml"):
        await sub.received(lambda ms: len(batch_seqs(ms)) >= 30, timeout=20)
        aws.broker.stop()
        aws.broker.start()
        mark = max(batch_seqs(sub.messages))
        await sub.received(lambda ms: max(batch_seqs(ms)) >= mark + 60, timeout=30)
    seqs = batch_seqs(sub.messages)
    assert_no_gap(seqs)
    # Retained where AWS keeps them: _meta and the status.
    assert all(m.retain for m in sub.on(f"{DEVICE}/_meta") + sub.on(STATUS))
    assert sub.on(f"{DEVICE}/_meta")
    assert aws.drops("press-shop-edge-1") == []


async def test_aws_iot_core_on_port_443_with_alpn(
    press: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    aws = aws_iot_core(make_mosquitto, tmp_path / "aws", pki)
    sub = subscriber(aws.broker, f"{DEVICE}")
    with aws.alpn_front() as front:
        # The stand-in's 443 is another port: the ALPN is given, as it is implied on :443.
        text = local(
            "aws-iot-core.yaml",
            tmp_path,
            press,
            front.url,
            **{"format: batch": f"format: batch\n    alpn: {AWS_ALPN}"},
        )
        async with running(text, tmp_path / "alpn.yaml"):
            await sub.received(lambda ms: len(batch_seqs(ms)) >= 10, timeout=20)
        assert front.accepted == 1
        # Without it, the front closes the connection, as AWS does.
        async with running(local("aws-iot-core.yaml", tmp_path, press, front.url), tmp_path / "plain.yaml"):
            await eventually(lambda: front.refused != [], timeout=20, what="a refused connection")
    assert front.refused[0] == f"ALPN None, not {AWS_ALPN!r}"
    assert "cannot connect to" in caplog.text


async def test_aws_iot_core_rate_limit_holds_at_the_stand_in(
    press: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, pki: Pki
) -> None:
    aws = aws_iot_core(make_mosquitto, tmp_path / "aws", pki)
    sub = subscriber(aws.broker, f"{DEVICE}/+")
    # One message per reading: 3 tags every 10 ms, 300 readings a second offered to a
    # platform that discards what comes above 100.
    text = local("aws-iot-core.yaml", tmp_path, press, aws.url, **{"format: batch": "format: uns",
                                                                    "poll: 50ms": "poll: 10ms"})  # fmt: skip
    async with running(text, tmp_path / "rate.yaml"):
        await sub.received(lambda ms: len(ms) >= 250, timeout=30)
    times = [m.at for m in sub.messages if not m.retain]
    # At most 100 in any 1.05 s as sent; at the subscriber (a thread of this process) the
    # spans may shrink by a busy machine's delay of one message: 0.15 s allowed. (Unlimited,
    # 101 messages take some 0.33 s at the offered 300 a second.)
    crowded = [i for i in range(len(times) - 100) if times[i + 100] - times[i] < 0.9]
    assert not crowded, f"{len(crowded)} spans of 101 messages shorter than 0.9 s"
    assert_no_gap([m.json()["seq"] for m in sub.messages if not m.topic.endswith("/_meta")])


async def test_azure_event_grid_gets_nothing_retained(
    press: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, pki: Pki
) -> None:
    grid = event_grid(make_mosquitto, tmp_path / "grid", pki, client="edge-1")
    sub = subscriber(grid.broker, "acme/#")
    # The namespace's certificate chains to a public root; the stand-in's to the test CA.
    text = local("azure-event-grid.yaml", tmp_path, press, grid.url, ca=pki.ca)
    async with running(text, tmp_path / "grid.yaml"):
        await sub.received(lambda ms: len(batch_seqs(ms)) >= 30, timeout=20)
    # Status and _meta went, without retain: a retained one would have closed the connection
    # (and so would a retained will: the broker refuses such a CONNECT).
    assert sub.on(f"{DEVICE}/_meta")
    assert [m.json()["online"] for m in sub.on(STATUS)] == [True, False]
    assert not any(m.retain for m in sub.messages)
    assert grid.drops("edge-1-session") == []
    assert_no_gap(batch_seqs(sub.messages))


async def test_azure_iot_hub_renews_its_sas_token_before_the_hub_drops_it(
    press: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="gateway.publishers.mqtt")
    events = "devices/edge-1/messages/events/$.ct=application%2Fjson&$.ce=utf-8"
    hub_name = "myhub.azure-devices.net"
    standin = iot_hub(make_mosquitto, tmp_path / "hub", pki, hub=hub_name, device_id="edge-1", key=DEVICE_KEY,
                      persistent=True)  # fmt: skip
    sub = subscriber(standin.broker, "#", client_id="hub-check", persistent=True)
    with standin as hub:
        # 10 s tokens: renewed 5 s before they expire.
        short = {"token_lifetime: 1h": "token_lifetime: 10s"}
        text = local("azure-iot-hub.yaml", tmp_path, press, hub.url, ca=pki.ca, **short)
        async with running(text, tmp_path / "hub.yaml"):
            await eventually(lambda: len(hub.accepted) >= 2, timeout=30, what="a second connection")
            # The hub drops the connection (a restart): the gateway connects again with a new token.
            hub.broker.stop()
            hub.broker.start()
            await eventually(lambda: len(hub.accepted) >= 3, timeout=30, what="a connection after the drop")
            mark = max(batch_seqs(sub.messages, events))
            await sub.received(lambda ms: max(batch_seqs(ms, events)) >= mark + 20, timeout=20)
    assert hub.expired == 0  # renewed first: the hub never had to drop it for its token
    assert all(r.startswith("CONNACK 3: upstream broker unavailable") for r in hub.refused), hub.refused
    first, second = hub.accepted[:2]
    assert (first.client_id, first.username) == (
        "edge-1",
        "myhub.azure-devices.net/edge-1/?api-version=2021-04-12",
    )
    assert second.expiry > first.expiry
    assert "renewing the SAS token" in caplog.text
    assert "SharedAccessSignature" not in caplog.text
    # Telemetry on the events topic only: no status, no _meta (the hub has no such topics).
    assert {m.topic for m in sub.messages} == {events}
    assert_no_gap(batch_seqs(sub.messages, events))


async def test_hivemq_cloud_with_a_verified_name_and_a_password(
    press: ModbusSimulator, make_mosquitto: MakeMosquitto, subscriber: Subscribe, tmp_path: Path, pki: Pki
) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.fail("mosquitto_passwd is not installed: run `make test`, which installs it")
    users = tmp_path / "passwd"
    made = [passwd, "-b", "-c", str(users), "edge-1", HIVEMQ_PASSWORD]
    subprocess.run(made, check=True, capture_output=True)  # noqa: ASYNC221  (briefly, before the gateway runs)
    port = free_port()
    broker = make_mosquitto(
        "per_listener_settings true", "allow_anonymous true",
        f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {users}",
        f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
    )  # fmt: skip
    sub = subscriber(broker, f"{DEVICE}/+")
    # By name, as HiveMQ Cloud must be reached (SNI): the stand-in's certificate is for localhost.
    text = local("hivemq-cloud.yaml", tmp_path, press, f"mqtts://localhost:{port}", ca=pki.ca)
    async with running(text, tmp_path / "hivemq.yaml"):
        await sub.received(lambda ms: len([m for m in ms if not m.retain]) >= 30, timeout=20)
    assert_no_gap([m.json()["seq"] for m in sub.messages if not m.retain])
