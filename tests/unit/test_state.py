"""The gateway's State: device and output entries, latest values and their bound, the summary line."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.app import cancel
from gateway.model import Quality, Reading
from gateway.outbox import Outbox, OutboxStats, OutputStats
from gateway.state import HISTORY, DeviceState, OutputState, State, report
from tests.helpers import eventually

T0 = 1_800_000_000.0


def reading(device: str, tag: str, value: float = 1.0) -> Reading:
    return Reading(device, tag, value, Quality.GOOD, 0, None, T0)


def test_a_device_is_down_until_its_first_read_then_follows_failures() -> None:
    d = DeviceState("press-1", "modbus", since=T0)
    assert (d.up, d.since, d.reconnects) == (False, T0, 0)
    d.failed("connection refused", T0 + 1)  # never up: still down since the start
    assert (d.up, d.since, d.read_errors, d.last_error) == (False, T0, 1, "connection refused")
    d.connected(T0 + 2)
    assert (d.up, d.since, d.reconnects) == (True, T0 + 2, 0)
    d.failed("timed out", T0 + 3)
    d.failed("connection refused", T0 + 4)  # down already: since stays at the first failure
    assert (d.up, d.since, d.read_errors, d.last_error) == (False, T0 + 3, 3, "connection refused")
    d.connected(T0 + 5)
    assert (d.up, d.since, d.connections, d.reconnects) == (True, T0 + 5, 2, 1)
    assert d.last_error == "connection refused"  # kept: what the last outage was


def test_an_output_counts_what_its_acks_settled() -> None:
    o = OutputState("local", since=T0)
    o.down(T0 + 1)  # not connected yet: nothing changes
    assert (o.connected, o.since) == (False, T0)
    o.up(T0 + 2)
    o.up(T0 + 3)
    assert (o.connected, o.since) == (True, T0 + 2)
    o.ack(100)
    o.ack(10, refused=3)
    assert (o.published, o.refused) == (107, 3)
    o.down(T0 + 4)
    assert (o.connected, o.since) == (False, T0 + 4)


def test_entries_are_made_once_per_name() -> None:
    state = State()
    assert state.device("press-1", "modbus") is state.device("press-1")
    assert state.output("local") is state.output("local")
    assert (list(state.devices), state.devices["press-1"].protocol) == (["press-1"], "modbus")


async def test_the_sink_keeps_the_latest_reading_per_tag_and_passes_every_batch_on() -> None:
    state = State([("press-1", "t"), ("press-1", "p")])
    passed: list[list[Reading]] = []

    async def outbox(readings: list[Reading]) -> None:
        passed.append(readings)

    sink = state.sink(outbox)
    first = [reading("press-1", "t", 1), reading("press-1", "p", 2)]
    second = [reading("press-1", "t", 3)]
    await sink(first)
    await sink(second)
    assert passed == [first, second]
    assert {key: r.value for key, r in state.latest.items()} == {("press-1", "t"): 3, ("press-1", "p"): 2}
    assert state.readings == 3


def test_latest_values_are_bounded_and_configured_tags_always_kept(caplog: pytest.LogCaptureFixture) -> None:
    configured = [("press-1", f"c{i}") for i in range(5)]
    state = State(configured, unconfigured=3)
    # Unconfigured tags first, more than the cap, then every configured one.
    state.fold([reading("browsed", f"u{i}") for i in range(8)])
    assert len(state.latest) == 8  # within configured + cap: the configured ones have room to come
    state.fold([reading(*key) for key in configured])
    assert len(state.latest) == 8
    assert set(configured) <= state.latest.keys()
    assert state.latest.keys() - set(configured) == {("browsed", "u0"), ("browsed", "u1"), ("browsed", "u2")}
    state.fold([reading("browsed", f"x{i}") for i in range(100)])  # more new ones: not kept
    state.fold([reading("browsed", "u1", 9)])  # a kept one: still updated
    assert len(state.latest) == 8
    assert state.latest["browsed", "u1"].value == 9
    assert state.readings == 8 + 5 + 100 + 1  # all counted, kept or not
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "latest values of more than 3 unconfigured tags are not kept (e.g. browsed/u7); "
        "their readings are still stored and published"
    ]


def stats(
    depth: int = 0, oldest: float | None = None, dropped: int = 0, size: int = 1_234_567
) -> OutboxStats:
    return OutboxStats(depth=depth, oldest_age=oldest, dropped=dropped, bytes=size, last_seq=depth)


def healthy(now: float) -> State:
    state = State()
    for name in ("press-1", "press-2", "press-3", "press-4"):
        state.device(name, "modbus").connected(now - 600)
    state.output("mqtt").up(now - 600)
    return state


def test_the_summary_of_a_healthy_gateway() -> None:
    state = healthy(T0)
    state.summary(T0)  # the previous line: the rate counts from here
    state.fold([reading("press-1", "t")] * 6_000)
    state.output("mqtt").ack(6_000, refused=2)
    state.refresh(stats())
    assert state.summary(T0 + 60) == (
        "state: 4/4 devices up, 6,000 readings (+6,000/min), outbox 0 waiting (0 dropped, 1.2 MB); "
        "output mqtt connected, 5,998 published, 2 refused"
    )
    state.fold([reading("press-1", "t")] * 1_500)
    assert "7,500 readings (+3,000/min)" in state.summary(T0 + 90)  # over the last 30 s


def test_the_summary_names_a_few_down_devices_and_counts_the_rest() -> None:
    state = healthy(T0)
    for i, ago in enumerate((42, 300, 7200, 86400 * 3, 5)):
        d = state.device(f"pump-{i}")
        d.connected(T0 - 900)
        d.failed("timed out", T0 - ago)
    line = state.summary(T0)
    assert line.startswith("state: 4/9 devices up (down: pump-0 42 s, pump-1 5 min, pump-2 2 h, +2 more),")


def test_the_summary_of_a_backlog_behind_a_lost_broker() -> None:
    state = healthy(T0)
    state.output("mqtt").down(T0 - 125)
    state.refresh(stats(depth=48_000, oldest=125.0, dropped=17, size=23_400_000))
    assert state.summary(T0).endswith(
        "outbox 48,000 waiting, oldest 2 min (17 dropped, 23.4 MB); "
        "output mqtt disconnected 2 min, 0 published, 0 refused"
    )


def test_the_summary_with_several_outputs_gives_each_its_own_backlog() -> None:
    state = State()
    state.output("local").up(T0)
    state.output("scada").since = T0
    places = {"local": OutputStats(depth=0, dropped=0, position=40), "scada": OutputStats(12, 3, 28)}
    state.refresh(replace(stats(depth=12, dropped=3, size=40_000), outputs=places))
    assert state.summary(T0 + 1) == (
        "state: 0/0 devices up, 0 readings (+0/min), outbox 12 waiting (3 dropped, 40 kB); "
        "output local connected, 0 published, 0 refused, 0 waiting, 0 dropped; "
        "output scada disconnected 1 s, 0 published, 0 refused, 12 waiting, 3 dropped"
    )


async def test_report_logs_the_summary_with_the_outbox_figures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.state")
    outbox = await Outbox.open(tmp_path / "outbox.db")
    state = State([("press-1", "t")])
    state.device("press-1", "modbus").connected(T0)
    task = asyncio.create_task(report(state, outbox, every=0.05), name="state report")
    try:
        await state.sink(outbox.append)([reading("press-1", "t", 1), reading("press-1", "t", 2)])
        await eventually(
            lambda: any("outbox 2 waiting" in r.getMessage() for r in caplog.records),
            timeout=10, what="a summary line with the two readings",
        )  # fmt: skip
    finally:
        await cancel([task])
        await outbox.close()
    line = next(r for r in caplog.records if "outbox 2 waiting" in r.getMessage())
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith("state: 1/1 devices up, 2 readings (")
    assert state.outbox is not None
    assert state.outbox.depth == 2
    assert state.outbox.bytes > 0


def test_the_trend_history_samples_numbers_once_per_value_and_stays_bounded() -> None:
    state = State([("p", "t"), ("p", "flag"), ("p", "text")])
    for i in range(HISTORY + 30):
        state.fold([
            replace(reading("p", "t", float(i)), read_time=1000.0 + i),
            replace(reading("p", "flag"), value=True, read_time=1000.0 + i),
            replace(reading("p", "text"), value="on", read_time=1000.0 + i),
        ])  # fmt: skip
        state.sample()
        state.sample()  # no new value meanwhile: nothing added
    ring = state.history[("p", "t")]
    assert ring.values() == [float(i) for i in range(30, HISTORY + 30)]
    assert ("p", "flag") not in state.history  # a switch, or a text, has no trend line
    assert ("p", "text") not in state.history
    # A Bad reading (no value) is a gap, not a zero.
    state.fold([replace(reading("p", "t"), value=None, quality=Quality.BAD, read_time=5000.0)])
    state.sample()
    assert ring.values()[-1] == float(HISTORY + 29)
    assert ring.last == 1000.0 + HISTORY + 29
