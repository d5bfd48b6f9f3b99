"""Device events in the outbox: no seq of their own, each in its place among the readings for
the outputs that take them, the newest of each kept across a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.model import DOWN, UP, Batch, Quality, Reading, datatype_event, state_event
from gateway.outbox import MAX_EVENTS, Outbox

TWO = ("uns", "spark")
OUT = "mqtt"  # the one output of an outbox opened without names


def reading(tag: str, value: float) -> Reading:
    return Reading("m1", tag, value, Quality.GOOD, 0, None, 1000.0)


def placed(batch: Batch) -> list[tuple[int, str]]:
    """(after, what) of each event: `what` the state or the datatype."""
    return [(e.after, str(e.reading.value)) for e in batch.events]


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Outbox]:
    outbox = await Outbox.open(tmp_path / "outbox.db", outputs=TWO)
    yield outbox
    await outbox.close()


async def test_events_take_no_seq_and_keep_their_place(box: Outbox) -> None:
    box.begin_replay("spark")  # the births: from here on spark takes events
    await box.append([state_event("m1", UP, 1.0), reading("a", 1), reading("b", 2)])
    await box.append([datatype_event("m1", "a", "int16", 2.0), reading("a", 3), state_event("m1", DOWN, 3.0)])
    spark = await box.lease("spark", 10, live=True)
    uns = await box.lease("uns", 10, live=True)
    assert [e.seq for e in spark.entries] == [e.seq for e in uns.entries] == [1, 2, 3]
    assert placed(spark) == [(0, "up"), (2, "int16"), (3, "down")]
    assert uns.events == ()  # an output that never began a replay takes none
    assert (await box.stats()).depth == 3


async def test_a_full_lease_leaves_the_events_after_its_last_row_for_the_next(box: Outbox) -> None:
    box.begin_replay("spark")
    await box.append([reading("a", 1), reading("a", 2), state_event("m1", DOWN, 1.0), reading("a", 3)])
    first = await box.lease("spark", 2, live=True)
    assert ([e.seq for e in first.entries], first.events) == ([1, 2], ())
    await box.ack("spark", first)
    second = await box.lease("spark", 2, live=True)
    assert ([e.seq for e in second.entries], placed(second)) == ([3], [(2, "down")])


async def test_an_event_alone_wakes_the_output_and_is_leased_without_rows(box: Outbox) -> None:
    box.begin_replay("spark")
    await box.append([reading("a", 1)])
    await box.ack("spark", await box.lease("spark", 10, live=True))
    await box.append([state_event("m1", DOWN, 1.0)])  # a device down with no Bad reading left
    await box.wait("spark")  # returns: the event is there
    alone = await box.lease("spark", 10, live=True)
    assert (alone.entries, placed(alone)) == ([], [(1, "down")])
    assert alone  # a batch to publish, though it has no rows


async def test_a_released_batch_brings_its_events_again_and_an_acked_one_does_not(box: Outbox) -> None:
    box.begin_replay("spark")
    await box.append([reading("a", 1), state_event("m1", DOWN, 1.0)])
    batch = await box.lease("spark", 10, live=True)
    await box.release("spark", batch)
    again = await box.lease("spark", 10, live=True)
    assert placed(again) == [(1, "down")]
    await box.ack("spark", again)
    await box.append([reading("a", 2)])
    assert (await box.lease("spark", 10, live=True)).events == ()


async def test_the_head_of_a_batch_carries_the_events_before_the_cut(box: Outbox) -> None:
    box.begin_replay("spark")
    await box.append(
        [reading("a", 1), state_event("m1", DOWN, 1.0), reading("a", 2), state_event("m1", UP, 2.0)]
    )
    batch = await box.lease("spark", 10, live=True)
    head, tail = batch.head(1), batch.tail(1)
    assert (placed(head), [e.seq for e in tail.entries]) == ([(1, "down")], [2])
    await box.ack("spark", head)
    await box.release("spark", tail)
    rest = await box.lease("spark", 10, live=True)
    assert ([e.seq for e in rest.entries], placed(rest)) == ([2], [(2, "up")])


async def test_events_before_a_replay_are_folded_into_the_births_not_delivered(box: Outbox) -> None:
    await box.append([reading("a", 1), state_event("m1", DOWN, 1.0)])
    box.begin_replay("spark")
    live = await box.lease("spark", 10, live=True)
    history = await box.lease("spark", 10)
    assert (live.events, history.events, history.historical) == ((), (), True)
    newest = {r.tag: r.value for r in await box.newest()}
    assert newest == {"a": 1, "$state": "down"}  # what the births announce instead


# Appends device events with readings, says so, and waits to be killed.
WRITER = """
import asyncio, sys
from pathlib import Path
from gateway.model import DOWN, UP, Quality, Reading, datatype_event, state_event
from gateway.outbox import Outbox

async def main():
    box = await Outbox.open(Path(sys.argv[1]))
    await box.append([datatype_event("m1", "a", "float32", 1.0),
                      Reading("m1", "a", 1.5, Quality.GOOD, 0, None, 1.0), state_event("m1", DOWN, 2.0)])
    await box.append([state_event("m2", UP, 3.0)])
    print("committed", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_the_newest_events_survive_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path), stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), timeout=30) == b"committed\n"
    proc.send_signal(signal.SIGKILL)  # no close: the newest values were never saved at a stop
    await proc.communicate()
    box = await Outbox.open(path)
    try:
        newest = {(r.device, r.tag): r.value for r in await box.newest()}
    finally:
        await box.close()
    assert newest == {
        ("m1", "$datatype:a"): "float32", ("m1", "a"): 1.5, ("m1", "$state"): "down", ("m2", "$state"): "up",
    }  # fmt: skip


async def test_an_output_that_falls_too_far_behind_on_events_resyncs(box: Outbox) -> None:
    box.begin_replay("spark")
    await box.append([state_event("m1", DOWN if i % 2 else UP, float(i)) for i in range(MAX_EVENTS + 5)])
    behind = await box.lease("spark", 10, live=True)
    assert behind.resync  # announce the state again, rather than miss outages
    assert behind
    box.begin_replay("spark")  # the births
    assert not (await box.lease("spark", 10, live=True)).resync


# -- any interleaving ---------------------------------------------------------------------

Append = list[bool]  # True: a device event, False: a reading
Take = tuple[int, str, int]  # lease n; then "ack", "release", or "cut" (ack the first k, release the rest)

ops = st.lists(
    st.one_of(
        st.lists(st.booleans(), min_size=1, max_size=6),
        st.tuples(st.integers(1, 5), st.sampled_from(["ack", "release", "cut"]), st.integers(0, 5)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops)
async def test_an_output_taking_events_gets_the_stream_as_appended(
    tmp_path_factory: pytest.TempPathFactory, script: list[Append | Take]
) -> None:
    """Whatever the appends, lease sizes, releases and partial acks: what the output acked,
    readings and events merged by their places, is what was appended, in order, once."""
    box = await Outbox.open(tmp_path_factory.mktemp("box") / "outbox.db")
    box.begin_replay(OUT)  # (an empty outbox: nothing to replay, events from here on)
    appended: list[str] = []
    acked: list[str] = []

    def stream(batch: Batch) -> list[str]:
        out, events = [], list(batch.events)
        for entry in batch.entries:
            while events and events[0].after < entry.seq:
                out.append(str(events.pop(0).reading.value))
            out.append(str(entry.reading.value))
        return out + [str(e.reading.value) for e in events]

    async def take(n: int, then: str, k: int) -> None:
        batch = await box.lease(OUT, n, live=True)
        if then == "ack" or not batch.entries:
            await box.ack(OUT, batch)
            acked.extend(stream(batch))
        elif then == "release":
            await box.release(OUT, batch)
        else:
            await box.ack(OUT, batch.head(k))
            acked.extend(stream(batch.head(k)))
            await box.release(OUT, batch.tail(k))

    try:
        for op in script:
            if isinstance(op, list):
                batch = []
                for is_event in op:
                    name = f"{'e' if is_event else 'r'}{len(appended)}"
                    appended.append(name)
                    batch.append(state_event("m1", UP, 1.0) if is_event else reading("a", 0.0))
                    batch[-1] = replace(batch[-1], value=name)
                await box.append(batch)
            else:
                await take(*op)
        while True:  # drain
            batch = await box.lease(OUT, 100, live=True)
            if not batch:
                break
            await box.ack(OUT, batch)
            acked.extend(stream(batch))
    finally:
        await box.close()
    assert acked == appended


async def test_an_event_after_the_last_row_comes_with_the_lease_that_reaches_it(box: Outbox) -> None:
    """A device's Bad readings exactly fill a batch, its down event follows them: that lease
    reached the end of the outbox, so it carries the event (nothing else would wake the
    output for it)."""
    box.begin_replay("spark")
    await box.append([reading("a", 1), reading("b", 2), state_event("m1", DOWN, 1.0)])
    batch = await box.lease("spark", 2, live=True)
    assert ([e.seq for e in batch.entries], placed(batch)) == ([1, 2], [(2, "down")])
