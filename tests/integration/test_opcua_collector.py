"""OpcUaCollector against the bundled OPC UA simulator over a real loopback socket."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua.ua.status_codes import StatusCodes

from gateway.collectors.opcua.buffer import Buffer
from gateway.collectors.opcua.collector import OpcUaCollector
from gateway.collectors.opcua.convert import UNCERTAIN
from gateway.collectors.opcua.security import CERT_FILE, KEY_FILE
from gateway.collectors.opcua.settings import OpcUaDevice
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Quality, Reading
from simulators.opcua import OpcUaSimulator
from simulators.opcua_model import BATCH_GUID

NS = OpcUaSimulator.NAMESPACE
UNKNOWN = 0x80340000

# One tag per kind of node and type. nsu= ids throughout: the namespace index is the server's.
TAGS: list[dict[str, Any]] = [
    {"name": "spindle_speed", "node": f"nsu={NS};s=CNC1.Spindle.Speed", "unit": "1/min"},
    {"name": "spindle_load", "node": f"nsu={NS};s=CNC1.Spindle.Load", "unit": "%"},
    {"name": "direction", "node": f"nsu={NS};s=CNC1.Spindle.Direction"},
    {"name": "revolutions", "node": f"nsu={NS};s=CNC1.Spindle.Revolutions"},
    {"name": "program", "node": f"nsu={NS};s=CNC1.Program.Name"},
    {"name": "checksum", "node": f"nsu={NS};s=CNC1.Program.Checksum"},
    {"name": "description", "node": f"nsu={NS};s=CNC1.Program.Description"},
    {"name": "part_count", "node": f"nsu={NS};s=CNC1.PartCount"},
    {"name": "alarm", "node": f"nsu={NS};s=CNC1.Alarm"},
    {"name": "tool", "node": f"nsu={NS};s=CNC1.ToolNumber"},
    {"name": "cycle_start", "node": f"nsu={NS};s=CNC1.CycleStart"},
    {"name": "positions", "node": f"nsu={NS};s=CNC1.Axis.Positions", "unit": "mm"},
    {"name": "packs", "node": f"nsu={NS};i=5001"},
    {"name": "batch", "node": f"nsu={NS};g={BATCH_GUID}"},
]
NAMES = {t["name"] for t in TAGS}
SPEED = "s=CNC1.Spindle.Speed"

MakeCollector = Callable[..., Awaitable[OpcUaCollector]]


def device(sim: OpcUaSimulator, **fields: Any) -> OpcUaDevice:
    doc = {"name": "cnc-1", "protocol": "opcua", "endpoint": sim.endpoint, "publishing_interval": "50ms",
           "poll": "50ms", "timeout": "2s", "tags": TAGS, **fields}  # fmt: skip
    return OpcUaDevice.model_validate(doc)


def secure(sim: OpcUaSimulator, mode: str = "SignAndEncrypt", **fields: Any) -> dict[str, Any]:
    return {"policy": "Basic256Sha256", "mode": mode, "server_certificate": sim.fingerprint,
            "username": sim.USERNAME, "password": sim.PASSWORD, **fields}  # fmt: skip


def latest(readings: list[Reading]) -> dict[str, Reading]:
    return {r.tag: r for r in readings}


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator(port=0, seed=7, pki_dir=tmp_path / "server-pki") as simulator:
        yield simulator


@pytest.fixture
async def make_collector(tmp_path: Path) -> AsyncIterator[MakeCollector]:
    """`await make_collector(device)` -> a connected collector; all closed at teardown."""
    made: list[OpcUaCollector] = []

    async def make(d: OpcUaDevice, connect: bool = True, **options: Any) -> OpcUaCollector:
        collector = OpcUaCollector(d, tmp_path / "client-pki", **options)
        made.append(collector)
        if connect:
            await collector.connect()
        return collector

    yield make
    for collector in made:
        await collector.close()


async def collect(
    collector: OpcUaCollector, until: Callable[[dict[str, Reading]], bool]
) -> dict[str, Reading]:
    """Read (as the poller would) until the newest readings per tag satisfy `until`."""
    seen: dict[str, Reading] = {}
    deadline = time.monotonic() + 5
    while not until(seen):
        assert time.monotonic() < deadline, f"condition not met; have {sorted(seen)}"
        seen.update(latest(await collector.read()))
        await asyncio.sleep(0.05)
    return seen


async def read_until_error(
    collector: OpcUaCollector, seconds: float, ignore: type[Exception] | tuple[()] = ()
) -> None:
    """Read as the poller would until read() raises something other than `ignore` (the
    test fails if it never does)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(ignore):
            await collector.read()
        await asyncio.sleep(0.05)


def check_values(values: dict[str, Reading], started: float) -> None:
    assert set(values) == NAMES
    for name, r in values.items():
        if name == "description":  # a LocalizedText: no JSON form
            assert (r.value, r.quality, r.status) == (None, Quality.UNCERTAIN, UNCERTAIN)
            continue
        assert (r.quality, r.status) == (Quality.GOOD, 0), name
        assert r.source_time is not None, name
        assert started - 60 < r.source_time <= time.time() + 1, name
    v = {name: r.value for name, r in values.items()}
    assert isinstance(v["spindle_speed"], float)
    assert 0 <= v["spindle_speed"] <= 24_000
    assert isinstance(v["spindle_load"], float)  # a Float
    assert v["direction"] in (-1, 0, 1)
    assert isinstance(v["revolutions"], int)
    assert v["revolutions"] > 10**8  # a UInt64
    assert isinstance(v["program"], str)
    assert v["program"].startswith("O")
    assert isinstance(v["checksum"], str)
    assert len(v["checksum"]) == 44  # base64 of a SHA-256
    assert type(v["part_count"]) is int
    assert isinstance(v["alarm"], bool)
    assert isinstance(v["tool"], int)
    assert isinstance(v["cycle_start"], str)
    assert v["cycle_start"].endswith("Z")
    datetime.fromisoformat(v["cycle_start"].replace("Z", "+00:00"))
    assert isinstance(v["positions"], list)
    assert len(v["positions"]) == 3
    assert all(isinstance(x, float) for x in v["positions"])
    assert isinstance(v["packs"], int)
    assert isinstance(v["batch"], str)
    assert v["batch"]
    assert values["spindle_speed"].unit == "1/min"


async def test_subscription_delivers_values_qualities_and_timestamps(
    sim: OpcUaSimulator, make_collector: MakeCollector
) -> None:
    started = time.time()
    collector = await make_collector(device(sim))
    assert collector.monitored == len(TAGS)
    first = await collect(collector, lambda seen: set(seen) == NAMES)
    check_values(first, started)
    # Afterwards only changes arrive; the spindle speed is noisy, so it keeps changing.
    changed = await collect(collector, lambda seen: "spindle_speed" in seen)
    assert changed["spindle_speed"].source_time > first["spindle_speed"].source_time  # type: ignore[operator]


async def test_polling_reads_every_tag_each_cycle(sim: OpcUaSimulator, make_collector: MakeCollector) -> None:
    started = time.time()
    collector = await make_collector(device(sim, mode="poll"))
    first = await collector.read()
    assert [r.tag for r in first] == [t["name"] for t in TAGS]  # one batched read, in tag order
    check_values(latest(first), started)
    await asyncio.sleep(0.2)
    second = latest(await collector.read())
    assert set(second) == NAMES  # no deadband: every tag, every poll
    assert second["spindle_speed"].source_time > latest(first)["spindle_speed"].source_time  # type: ignore[operator]


async def test_the_datatypes_the_server_tells_become_events_once(
    sim: OpcUaSimulator, make_collector: MakeCollector
) -> None:
    """The collector tells the poller each tag's datatype as the server types its first value
    (Sparkplug births announce it), once, not with every value; an array tells none."""
    collector = await make_collector(device(sim, mode="poll"))
    assert collector.told() == []
    await collector.read()
    told = {r.tag: r.value for r in collector.told()}
    assert {k: told[f"$datatype:{k}"] for k in ("spindle_speed", "spindle_load", "direction", "revolutions",
                                                   "part_count", "tool", "cycle_start", "checksum")} == {
        "spindle_speed": "float64", "spindle_load": "float32", "direction": "int8", "revolutions": "uint64",
        "part_count": "uint32", "tool": "uint8", "cycle_start": "datetime", "checksum": "bytes",
    }  # fmt: skip
    assert "$datatype:positions" not in told
    await collector.read()
    assert collector.told() == []


async def test_deadband_filters_at_the_server_and_here(
    sim: OpcUaSimulator, make_collector: MakeCollector
) -> None:
    tags = [{"name": "speed", "node": f"nsu={NS};{SPEED}", "deadband": 1e9}]
    for mode in ("subscribe", "poll"):
        collector = await make_collector(device(sim, mode=mode, tags=tags))
        readings: list[Reading] = []
        deadline = time.monotonic() + 10  # the first notification may be slow on a busy machine
        while not readings:
            assert time.monotonic() < deadline, mode
            readings += await collector.read()
            await asyncio.sleep(0.05)
        settled = time.monotonic() + 0.5
        while time.monotonic() < settled:
            readings += await collector.read()
            await asyncio.sleep(0.05)
        assert len(readings) == 1, mode  # the first value only: no change exceeds the band
        await collector.close()


async def test_sign_and_encrypt_with_username(tmp_path: Path, make_collector: MakeCollector) -> None:
    async with OpcUaSimulator(port=0, pki_dir=tmp_path / "server-pki", allow_anonymous=False) as sim:
        pin = ":".join(sim.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()  # as tools show it
        collector = await make_collector(device(sim, security=secure(sim, server_certificate=pin)))
        values = await collect(collector, lambda seen: set(seen) == NAMES)
        assert values["program"].quality is Quality.GOOD
        await collector.close()
        # The client certificate was made once, with a private key only we can read, and is reused.
        pki = tmp_path / "client-pki"
        assert stat.S_IMODE((pki / KEY_FILE).stat().st_mode) == 0o600
        cert = (pki / CERT_FILE).read_bytes()
        await collector.connect()
        assert (pki / CERT_FILE).read_bytes() == cert

        wrong = device(sim, mode="poll", security=secure(sim, "Sign", password="wrong"))
        with pytest.raises(NotConnected, match="connecting"):
            await make_collector(wrong)
        anonymous = device(sim, security=secure(sim, username=None, password=None))
        with pytest.raises(NotConnected):
            await make_collector(anonymous)


@pytest.mark.parametrize("policy", ["Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"])
async def test_other_policies(sim: OpcUaSimulator, make_collector: MakeCollector, policy: str) -> None:
    collector = await make_collector(device(sim, mode="poll", security=secure(sim, policy=policy)))
    assert latest(await collector.read())["program"].quality is Quality.GOOD


async def test_untrusted_server_certificate_is_refused(
    sim: OpcUaSimulator, make_collector: MakeCollector, tmp_path: Path
) -> None:
    pinned = device(sim, security=secure(sim, server_certificate="00" * 32))
    with pytest.raises(NotConnected) as info:
        await make_collector(pinned)
    message = str(info.value)
    assert f"server certificate of {sim.endpoint} is not trusted: SHA-256 {sim.fingerprint}" in message
    assert f"pin it with security.server_certificate: {sim.fingerprint}" in message
    rejected = tmp_path / "client-pki" / "rejected" / f"{sim.fingerprint}.der"
    assert rejected.read_bytes() == sim.certificate.read_bytes()

    trusted = tmp_path / "trusted"
    trusted.mkdir()
    in_dir = device(sim, mode="poll", security=secure(sim, server_certificate=str(trusted)))
    with pytest.raises(NotConnected, match=f"or copy {rejected} into {trusted}"):
        await make_collector(in_dir)
    shutil.copy(rejected, trusted / "simulator.der")  # what the message says to do
    collector = await make_collector(in_dir)
    assert latest(await collector.read())["program"].quality is Quality.GOOD
    file = device(sim, mode="poll", security=secure(sim, server_certificate=str(sim.certificate)))
    await make_collector(file)


async def test_nsu_ids_survive_a_namespace_shift(tmp_path: Path, make_collector: MakeCollector) -> None:
    pki = tmp_path / "server-pki"
    async with OpcUaSimulator(port=0, pki_dir=pki) as sim:
        port, index = sim.port, sim.namespace_index
        by_index = [*TAGS, {"name": "by_index", "node": f"ns={index};s=CNC1.Program.Name"}]
        collector = await make_collector(device(sim, mode="poll", tags=by_index))
        before = latest(await collector.read())
        assert before["by_index"].value == before["program"].value
    # The same server restarted with other namespaces registered first: ours moved.
    async with OpcUaSimulator(port=port, pki_dir=pki, extra_namespaces=3) as moved:
        assert moved.namespace_index == index + 3
        with pytest.raises(NotConnected):
            await collector.read()
        await collector.close()
        await collector.connect()
        after = latest(await collector.read())
        check_values({k: v for k, v in after.items() if k != "by_index"}, time.time())
        assert after["by_index"].quality is Quality.BAD  # ns=<index> now names nothing


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_restart_raises_not_connected_then_reconnects(
    sim: OpcUaSimulator, make_collector: MakeCollector, mode: str
) -> None:
    collector = await make_collector(device(sim, mode=mode))
    await collect(collector, lambda seen: set(seen) == NAMES)
    await sim.stop()
    with pytest.raises(NotConnected):
        await read_until_error(collector, 2.0)  # the socket closes at once
    await collector.close()
    with pytest.raises(NotConnected):
        await collector.connect()  # nobody listening
    await sim.start()
    await collector.connect()
    values = await collect(collector, lambda seen: set(seen) == NAMES)
    assert values["program"].quality is Quality.GOOD


async def test_stalled_connection_raises_not_connected(
    sim: OpcUaSimulator, make_collector: MakeCollector
) -> None:
    collector = await make_collector(device(sim, timeout="1s"))
    await collect(collector, lambda seen: set(seen) == NAMES)
    sim.freeze()  # the socket stays open, nothing answers: asyncua's watchdog notices
    try:
        with pytest.raises(NotConnected):
            await read_until_error(collector, 5.0)  # the watchdog: within 2 x timeout
    finally:
        sim.unfreeze()


async def test_stalled_connection_is_closed(sim: OpcUaSimulator, make_collector: MakeCollector) -> None:
    """asyncua's watchdog leaves the client DISCONNECTED with its socket open; close() closes it.

    Poll mode: with a subscription, the asyncua server would handle our CloseSession (queued
    while frozen) and the end of the connection at once, and leave the subscription's task
    running (a server-side race, not ours)."""
    collector = await make_collector(device(sim, mode="poll", timeout="1s"))
    await collector.read()
    assert sim.connections == 1
    sim.freeze()
    try:
        with pytest.raises(NotConnected):
            await read_until_error(collector, 5.0, ignore=DeviceTimeout)  # the read times out first
        await collector.close()
    finally:
        sim.unfreeze()  # a frozen server would not notice the socket closing
    deadline = time.monotonic() + 5
    while sim.connections:
        assert time.monotonic() < deadline, "the stalled connection's socket was left open"
        await asyncio.sleep(0.05)


async def test_lost_subscription_raises_not_connected_then_resubscribes(
    sim: OpcUaSimulator, make_collector: MakeCollector
) -> None:
    """The server forgets the subscription but keeps the connection and session: no
    StatusChangeNotification, no error, only silence. read() notices once the subscription's
    lifetime has passed without a notification or keep-alive."""
    d = device(sim, timeout="1s")
    collector = await make_collector(d)
    await collect(collector, lambda seen: set(seen) == NAMES)
    await sim.drop_subscriptions()
    # A keep-alive at least every `timeout`, the lifetime 3 of them: 3 s here.
    lifetime = 3 * math.ceil(d.timeout / d.publishing_interval) * d.publishing_interval
    with pytest.raises(NotConnected, match="no notification or keep-alive"):
        await read_until_error(collector, 2 * lifetime + 5)  # slack for a loaded CI machine
    assert sim.connections == 1  # the connection is still up: only the silence told
    await collector.close()
    resubscribed = time.time()
    await collector.connect()  # the new subscription's first notification may come before it returns
    values = await collect(collector, lambda seen: set(seen) == NAMES)
    check_values(values, resubscribed)
    assert all(r.read_time >= resubscribed for r in values.values())


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_removed_node_is_bad_then_good_again(
    sim: OpcUaSimulator, make_collector: MakeCollector, mode: str
) -> None:
    collector = await make_collector(device(sim, mode=mode))
    await collect(collector, lambda seen: set(seen) == NAMES)
    await sim.remove_node(SPEED)

    def speed_bad_others_flowing(seen: dict[str, Reading]) -> bool:
        speed = seen.get("spindle_speed")
        return speed is not None and speed.status == UNKNOWN and "revolutions" in seen

    gone = await collect(collector, speed_bad_others_flowing)
    assert (gone["spindle_speed"].value, gone["spindle_speed"].quality) == (None, Quality.BAD)
    assert gone["revolutions"].quality is Quality.GOOD
    await sim.restore_node(SPEED)
    back = await collect(collector, lambda seen: seen.get("spindle_speed", gone["spindle_speed"]).status == 0)
    assert isinstance(back["spindle_speed"].value, float)


async def test_node_missing_at_connect_is_bad_not_a_connect_failure(
    sim: OpcUaSimulator, make_collector: MakeCollector
) -> None:
    tags = [*TAGS, {"name": "ghost", "node": f"nsu={NS};s=CNC1.Nope"},
            {"name": "elsewhere", "node": "nsu=urn:not:there;i=1"}]  # fmt: skip
    for mode in ("subscribe", "poll"):
        collector = await make_collector(device(sim, mode=mode, tags=tags), retry_every=0.05)
        values = await collect(collector, lambda seen: len(seen) == len(tags))
        for name in ("ghost", "elsewhere"):
            assert (values[name].value, values[name].quality, values[name].status) == (
                None,
                Quality.BAD,
                UNKNOWN,
            )
        assert values["program"].quality is Quality.GOOD
        # Subscribe mode: reported once, not on every retry (several retries pass here).
        # Poll mode reports every tag on every poll.
        again: list[Reading] = []
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            again += await collector.read()
            await asyncio.sleep(0.05)
        ghosts = [r for r in again if r.tag == "ghost"]
        if mode == "subscribe":
            assert ghosts == []
        else:
            assert len(ghosts) > 1
            assert all(r.status == UNKNOWN for r in ghosts)
        await collector.close()


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_status_set_by_the_server_is_reflected(
    sim: OpcUaSimulator, make_collector: MakeCollector, mode: str
) -> None:
    collector = await make_collector(device(sim, mode=mode))
    await collect(collector, lambda seen: set(seen) == NAMES)
    sim.set_status("s=CNC1.Program.Name", StatusCodes.UncertainLastUsableValue)
    sim.set_status("s=CNC1.Spindle.Revolutions", StatusCodes.BadSensorFailure)

    def flagged(seen: dict[str, Reading]) -> bool:
        return (
            seen.get("program") is not None
            and seen["program"].quality is Quality.UNCERTAIN
            and (seen.get("revolutions") is not None and seen["revolutions"].quality is Quality.BAD)
        )

    values = await collect(collector, flagged)
    assert values["program"].status == StatusCodes.UncertainLastUsableValue
    assert isinstance(values["program"].value, str)  # Uncertain keeps its value
    assert (values["revolutions"].value, values["revolutions"].status) == (None, StatusCodes.BadSensorFailure)
    sim.set_status("s=CNC1.Program.Name", None)
    sim.set_status("s=CNC1.Spindle.Revolutions", None)
    good = {"program", "revolutions"}
    await collect(collector, lambda seen: {n for n in good if n in seen and seen[n].status == 0} == good)


async def test_unavailable_and_describe(sim: OpcUaSimulator, make_collector: MakeCollector) -> None:
    collector = await make_collector(device(sim, security=secure(sim)), connect=False)
    bad = collector.unavailable(0x80050000, 100.0)
    assert {r.tag for r in bad} == NAMES
    assert {r.quality for r in bad} == {Quality.BAD}
    assert collector.unavailable(0x80050000, 101.0) == []  # already reported with that status
    meta = collector.describe()
    assert meta["protocol"] == "opcua"
    assert meta["tags"][0] == {"name": "spindle_speed", "node": f"nsu={NS};s=CNC1.Spindle.Speed",
                               "unit": "1/min", "description": None}  # fmt: skip
    text = repr(meta)
    for secret in ("127.0.0.1", str(sim.port), sim.USERNAME, f"'{sim.PASSWORD}'", "password"):
        assert secret not in text
    with pytest.raises(NotConnected):
        await collector.read()  # never connected


def test_buffer_keeps_the_newest_per_tag_when_full(caplog: pytest.LogCaptureFixture) -> None:
    buffer = Buffer("cnc-1", capacity=4)
    for i in range(10):  # b a a b a a b a a b
        buffer.append(Reading("cnc-1", "a" if i % 3 else "b", float(i), Quality.GOOD, 0, None, 0.0))
    assert [(r.tag, r.value) for r in buffer.drain()] == [("b", 6.0), ("a", 7.0), ("a", 8.0), ("b", 9.0)]
    assert buffer.dropped == 6
    assert sum("faster than they are collected" in m for m in caplog.messages) == 1  # once per episode
    assert buffer.drain() == []


async def test_many_monitored_items(sim: OpcUaSimulator, make_collector: MakeCollector) -> None:
    """The same nodes many times over: one subscription, one CreateMonitoredItems call."""
    tags = [{"name": f"t{i}", "node": TAGS[i % len(TAGS)]["node"]} for i in range(500)]
    collector = await make_collector(device(sim, tags=tags))
    assert collector.monitored == 500
    values = await collect(collector, lambda seen: len(seen) == 500)
    assert sum(r.quality is Quality.GOOD for r in values.values()) == 500 - 500 // len(TAGS) - 1


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_requests_are_batched(sim: OpcUaSimulator, make_collector: MakeCollector, mode: str) -> None:
    """More tags than fit in one request: every tag still read, each from its own node."""
    tags = [{**TAGS[i % len(TAGS)], "name": f"t{i}"} for i in range(3 * len(TAGS) + 2)]
    collector = await make_collector(device(sim, mode=mode, tags=tags), connect=False)
    collector.batch = 3  # below the simulator's limits (10000), so ours applies
    await collector.connect()
    values = await collect(collector, lambda seen: len(seen) == len(tags))
    n = len(tags)
    if mode == "subscribe":
        assert collector.monitored == n
        assert collector.summary() == f"{n} tags, {n} monitored items"
    else:
        assert collector.summary() == f"{n} tags, {-(-n // 3)} reads per poll"
    check_values({TAGS[i]["name"]: values[f"t{i}"] for i in range(len(TAGS))}, time.time())
    for i in range(len(TAGS), len(tags)):  # every result went to its own tag: same node, same kind
        r, first = values[f"t{i}"], values[f"t{i % len(TAGS)}"]
        assert (type(r.value), r.quality, r.status) == (type(first.value), first.quality, first.status)


async def test_buffered_notifications_come_before_the_bad_readings(
    sim: OpcUaSimulator, make_collector: MakeCollector
) -> None:
    collector = await make_collector(device(sim))
    await collect(collector, lambda seen: set(seen) == NAMES)
    deadline = time.monotonic() + 5
    while not len(collector.buffer):  # a notification arrives, and is not read
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await sim.stop()
    # As the poller does once read() raised; no read() first, so nothing drains the buffer.
    readings = collector.unavailable(0x80050000, time.time())
    assert len(collector.buffer) == 0
    good = [r for r in readings if r.quality is not Quality.BAD]
    assert good, "the buffered notifications were not delivered"
    assert readings[: len(good)] == good  # before every Bad reading
    assert {r.tag for r in readings[len(good) :]} == NAMES
    with pytest.raises(NotConnected):
        await read_until_error(collector, 2.0)
    await collector.close()
    await sim.start()
    await collector.connect()
    first: list[Reading] = []
    while not first:
        first = await collector.read()
        await asyncio.sleep(0.05)
    # Nothing older than the Bad readings turns up after them.
    assert all(r.read_time >= readings[-1].read_time for r in first)
