"""The status server of a running gateway, over real HTTP: health, Prometheus metrics parsed
with prometheus_client's own parser and checked against the State, the JSON status, and the
credentials it asks for."""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.broker import free_port
from gateway.http.metrics import registry
from gateway.http.server import Sources, StatusServer
from gateway.http.settings import HttpSettings
from gateway.state import State
from simulators.modbus import ModbusSimulator
from tests.helpers import Mosquitto, eventually, running
from tests.pki import make_pki

TAGS = [
    {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
    {"name": "running", "table": "coil", "address": 0},
]


@pytest.fixture
async def press() -> AsyncIterator[ModbusSimulator]:
    async with ModbusSimulator(port=0, units=(1,), seed=2) as sim:
        yield sim


def config(sim: ModbusSimulator, broker: Mosquitto, outbox: Path, http: dict[str, Any]) -> str:
    return yaml.safe_dump({
        "gateway": {"id": "edge-h", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(outbox)},
        "http": http,
        "mqtt": {"url": broker.url},
        "devices": [{"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "port": sim.port,
                     "poll": "50ms", "tags": TAGS}],
    })  # fmt: skip


def families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{family name: {sorted labels: value}} of a metrics page."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_health_metrics_and_status_of_a_running_gateway(
    press: ModbusSimulator, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    text = config(press, mosquitto, tmp_path / "outbox.db", {"listen": listen})
    async with running(text, tmp_path / "gw.yaml") as gateway, aiohttp.ClientSession() as http:
        state = await _wait_for_state(gateway)
        await eventually(
            lambda: state.outputs["mqtt"].published >= 20, timeout=20, what="20 readings published"
        )
        async with http.get(f"{base}/livez") as r:
            assert (r.status, await r.text()) == (200, "ok\n")
        async with http.get(f"{base}/readyz") as r:
            assert (r.status, await r.text()) == (200, "ready\n")
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=")  # the text format
            metrics = families(await r.text())
        async with http.get(f"{base}/api/status") as r:
            status = await r.json()
        async with http.get(f"{base}/api/devices/press-1") as r:
            press_1 = await r.json()
        async with http.get(f"{base}/api/devices/nope") as r:
            assert r.status == 404
        device = state.devices["press-1"]
        # Counters only grow: what the page said is at most what the state says now.
        reads = metrics["millwright_device_reads_total"][(("device", "press-1"),)]
        assert 0 < reads <= device.reads
        readings = metrics["millwright_readings_total"][(("device", "press-1"),)]
        assert 0 < readings <= device.readings <= state.readings
        published = metrics["millwright_output_published_total"][(("output", "mqtt"),)]
        assert 20 <= published <= state.outputs["mqtt"].published
    assert metrics["millwright_device_up"] == {(("device", "press-1"), ("protocol", "modbus")): 1.0}
    assert metrics["millwright_output_connected"] == {(("output", "mqtt"),): 1.0}
    assert metrics["millwright_build_info"] == {(("version", __version__),): 1.0}
    assert (("output", "mqtt"),) in metrics["millwright_outbox_depth"]
    assert "millwright_outbox_oldest_age_seconds" in metrics
    assert [d["name"] for d in status["devices"]] == ["press-1"]
    assert status["outputs"][0]["connected"] is True
    assert status["outbox"]["last_seq"] >= 20
    assert {t["tag"] for t in press_1["tags"]} == {"temperature", "running"}
    assert all(t["quality"] == "Good" for t in press_1["tags"])


async def _wait_for_state(gateway: Any) -> State:
    await eventually(lambda: gateway.state is not None, timeout=10, what="the gateway's state")
    state: State = gateway.state
    return state


async def test_credentials_are_asked_for_everything_but_health(
    press: ModbusSimulator, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "token").write_text("t0ken\n")
    http_settings = {"listen": listen, "username": "ops", "password_file": "pw", "token_file": "token"}
    text = config(press, mosquitto, tmp_path / "outbox.db", http_settings)
    good = "Basic " + base64.b64encode(b"ops:s3cret").decode()
    wrong = "Basic " + base64.b64encode(b"ops:guess").decode()
    async with running(text, tmp_path / "gw.yaml") as gateway, aiohttp.ClientSession() as http:
        await _wait_for_state(gateway)
        for path in ("/metrics", "/api/status", "/api/devices/press-1"):
            async with http.get(base + path) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"] == 'Basic realm="millwright"'
            async with http.get(base + path, headers={"Authorization": wrong}) as r:
                assert r.status == 401, path
            async with http.get(base + path, headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 401, path
            async with http.get(base + path, headers={"Authorization": good}) as r:
                assert r.status == 200, path
            async with http.get(base + path, headers={"Authorization": "Bearer t0ken"}) as r:
                assert r.status == 200, path
        for path in ("/livez", "/readyz"):
            async with http.get(base + path) as r:
                assert r.status == 200, path
        async with http.get(base + "/api/status", headers={"Authorization": good}) as r:
            body = await r.text()
        # The page's event stream too.
        async with http.get(base + "/api/events") as r:
            assert r.status == 401
    assert "s3cret" not in body
    assert "t0ken" not in body


async def test_without_credentials_only_a_loopback_name_is_answered(
    press: ModbusSimulator, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A web page that points a name of its own at 127.0.0.1 (DNS rebinding) gets nothing."""
    port = free_port()
    text = config(press, mosquitto, tmp_path / "outbox.db", {"listen": f"127.0.0.1:{port}"})
    async with running(text, tmp_path / "gw.yaml") as gateway, aiohttp.ClientSession() as http:
        await _wait_for_state(gateway)
        url = f"http://127.0.0.1:{port}/api/status"
        async with http.get(url, headers={"Host": f"attacker.example:{port}"}) as r:
            assert r.status == 403
        async with http.get(f"http://127.0.0.1:{port}/livez", headers={"Host": "attacker.example"}) as r:
            assert r.status == 200  # health answers anyone
        for name in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            async with http.get(url, headers={"Host": name}) as r:
                assert r.status == 200, name


async def test_a_token_alone_offers_no_password_prompt(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t0ken\n")
    settings = HttpSettings(listen=f"127.0.0.1:{free_port()}", token_file=tmp_path / "token")
    server = StatusServer(settings, Sources(lambda: None, lambda: None, list), "gw")
    assert await server.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://{settings.listen}/api/status") as r:
            assert r.status == 401
            assert "WWW-Authenticate" not in r.headers  # a browser would prompt in vain
    finally:
        await server.stop()


def test_the_metrics_are_the_states_figures() -> None:
    """Each family against a State whose figures the test set: the mapping, exactly."""
    state = State([("press-1", "t"), ("oven", "t")])
    press, oven = state.device("press-1", "modbus"), state.device("oven", "opcua")
    press.connected(time.time())
    press.reads, press.read_errors, press.missed = 41, 3, 2
    oven.reads, oven.read_errors = 7, 9
    now = time.time()
    press.readings, oven.readings = 5, 2
    out = state.output("cloud")
    out.up(now)
    out.ack(120, refused=4)
    out.depth, out.dropped = 17, 6
    from prometheus_client import generate_latest

    got = families(generate_latest(registry(state)).decode())
    assert got["millwright_device_up"] == {
        (("device", "press-1"), ("protocol", "modbus")): 1.0,
        (("device", "oven"), ("protocol", "opcua")): 0.0,
    }
    assert got["millwright_device_reads_total"] == {
        (("device", "press-1"),): 41.0,
        (("device", "oven"),): 7.0,
    }
    assert got["millwright_device_read_errors_total"] == {
        (("device", "press-1"),): 3.0,
        (("device", "oven"),): 9.0,
    }
    assert got["millwright_device_missed_cycles_total"] == {
        (("device", "press-1"),): 2.0,
        (("device", "oven"),): 0.0,
    }
    assert got["millwright_readings_total"] == {(("device", "press-1"),): 5.0, (("device", "oven"),): 2.0}
    assert got["millwright_output_connected"] == {(("output", "cloud"),): 1.0}
    assert got["millwright_output_published_total"] == {(("output", "cloud"),): float(out.published)}
    assert got["millwright_output_refused_total"] == {(("output", "cloud"),): 4.0}
    assert got["millwright_outbox_depth"] == {(("output", "cloud"),): 17.0}
    assert got["millwright_outbox_dropped_total"] == {(("output", "cloud"),): 6.0}
    assert got["millwright_outbox_oldest_age_seconds"] == {(): 0.0}


def test_not_ready_until_the_outbox_is_open_and_the_pollers_run(tmp_path: Path) -> None:
    from gateway.app import Gateway
    from gateway.config import parse

    text = yaml.safe_dump({
        "gateway": {"id": "edge-h", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(tmp_path / "outbox.db")}, "mqtt": {"url": "mqtt://127.0.0.1:1"},
        "devices": [{"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "tags": TAGS}],
    })  # fmt: skip
    assert Gateway(parse(text, "gw.yaml")).not_ready() == [
        "the outbox is not open (yet)", "the pollers are not running",
    ]  # fmt: skip


GOOD_BASIC = "Basic " + base64.b64encode(b"ops:s3cret").decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> StatusServer:
    folder = tmp_path_factory.mktemp("http")
    (folder / "pw").write_text("s3cret\n")
    (folder / "token").write_text("t0ken\n")
    settings = HttpSettings(username="ops", password_file=folder / "pw", token_file=folder / "token")
    return StatusServer(settings, Sources(lambda: None, lambda: None, list), "gw")


basic = st.builds(lambda b: "Basic " + base64.b64encode(b).decode(), st.binary(max_size=40))


@given(st.one_of(st.text(max_size=80), basic, st.sampled_from([GOOD_BASIC, "Bearer t0ken", "bearer t0ken "])))
def test_any_authorization_header_is_refused_but_the_right_ones(server: StatusServer, header: str) -> None:
    """Whatever a client sends, the check answers (never raises) and lets only the
    configured credentials in."""
    scheme, _, value = header.partition(" ")
    # The scheme in any case, the credentials exact (whitespace around them aside).
    right = (scheme.lower(), value.strip()) in {("bearer", "t0ken"), ("basic", GOOD_BASIC.split()[1])}
    assert server._allowed(header) is right


async def test_https_with_the_configured_certificate(
    press: ModbusSimulator, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    listen = f"127.0.0.1:{free_port()}"
    http_settings = {"listen": listen, "cert": str(pki.server_cert), "key": str(pki.server_key)}
    text = config(press, mosquitto, tmp_path / "outbox.db", http_settings)
    trusted = ssl.create_default_context(cafile=pki.ca)
    async with running(text, tmp_path / "gw.yaml") as gateway, aiohttp.ClientSession() as http:
        await _wait_for_state(gateway)
        async with http.get(f"https://{listen}/api/status", ssl=trusted) as r:
            assert r.status == 200
            assert (await r.json())["gateway"]["id"] == "edge-h"
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # verified: the test CA, or nothing
            await http.get(f"https://{listen}/livez")
