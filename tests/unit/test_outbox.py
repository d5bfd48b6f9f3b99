"""The outbox against real SQLite files: order, leases, durability, caps, corruption."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gateway.errors import OutboxError, OutboxLocked
from gateway.model import Batch, Quality, Reading, Value
from gateway.outbox import DEFAULT_OUTPUT as OUT
from gateway.outbox import Outbox, read_stats

ROOT = Path(__file__).resolve().parents[2]


def readings(values: Sequence[Value], device: str = "press-1", read_time: float = 1000.0) -> list[Reading]:
    return [
        Reading(device, f"t{i}", v, Quality.GOOD, 0, None, read_time, "Cel") for i, v in enumerate(values)
    ]


def seqs(batch: Batch) -> list[int]:
    return [e.seq for e in batch.entries]


def values(batch: Batch) -> list[Value]:
    return [e.reading.value for e in batch.entries]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
async def outbox(path: Path) -> AsyncIterator[Outbox]:
    box = await Outbox.open(path)
    yield box
    await box.close()


async def test_append_lease_ack_in_order(outbox: Outbox) -> None:
    await outbox.append(readings([1, 2, 3]))
    await outbox.append(readings([4, 5]))
    first = await outbox.lease(OUT, 2)
    second = await outbox.lease(OUT, 10)
    assert (seqs(first), values(first)) == ([1, 2], [1, 2])
    assert (seqs(second), values(second)) == ([3, 4, 5], [3, 4, 5])
    assert len(await outbox.lease(OUT, 10)) == 0
    await outbox.ack(OUT, first)
    await outbox.ack(OUT, second)
    stats = await outbox.stats()
    assert (stats.depth, stats.last_seq, stats.oldest_age) == (0, 5, None)


async def test_reading_fields_round_trip(outbox: Outbox) -> None:
    sent = [
        Reading("press-1", "temp", 21.5, Quality.UNCERTAIN, 0x40940000, 1700000000.125, 1700000000.5, "Cel"),
        Reading("press-1", "state", None, Quality.BAD, 0x800A0000, None, 1700000001.0, None),
    ]
    await outbox.append(sent)
    assert [e.reading for e in (await outbox.lease(OUT, 10)).entries] == sent


@pytest.mark.parametrize(
    "value",
    [True, False, 0, 7, -(2**63), 2**70, 1.0, -0.5, 1e300, "", "text", "null", "Grüße °C", None,
     [1, 2.5, True, "x", None], [[1, 2], []]],
)  # fmt: skip
async def test_values_keep_their_python_type(outbox: Outbox, value: Value) -> None:
    await outbox.append(readings([value]))
    (got,) = values(await outbox.lease(OUT, 1))
    assert got == value
    assert type(got) is type(value)  # True must not come back as 1, nor 1.0 as 1
    if isinstance(value, list):
        assert [type(x) for x in got] == [type(x) for x in value]  # type: ignore[union-attr]


async def test_release_leases_the_same_seqs_again_first(outbox: Outbox) -> None:
    await outbox.append(readings(range(10)))
    first = await outbox.lease(OUT, 4)
    await outbox.release(OUT, first)
    again = await outbox.lease(OUT, 4)
    assert seqs(again) == seqs(first) == [1, 2, 3, 4]
    await outbox.ack(OUT, again)
    assert seqs(await outbox.lease(OUT, 100)) == list(range(5, 11))


async def test_release_rewinds_past_later_leases(outbox: Outbox) -> None:
    await outbox.append(readings(range(6)))
    first, second = await outbox.lease(OUT, 3), await outbox.lease(OUT, 3)
    await outbox.release(OUT, first)
    # FIFO: releasing the first batch hands out everything after it again, in order.
    assert seqs(await outbox.lease(OUT, 10)) == [*seqs(first), *seqs(second)]


async def test_seq_is_never_reused_after_delete_all_or_reopen(path: Path) -> None:
    box = await Outbox.open(path)
    await box.append(readings([1, 2, 3]))
    await box.ack(OUT, await box.lease(OUT, 10))  # the table is empty now
    await box.append(readings([4]))
    last = await box.lease(OUT, 10)
    assert seqs(last) == [4]
    await box.ack(OUT, last)
    await box.close()

    box = await Outbox.open(path)
    try:
        assert (await box.stats()).depth == 0
        await box.append(readings([5]))
        assert seqs(await box.lease(OUT, 10)) == [5]
        assert (await box.stats()).last_seq == 5
    finally:
        await box.close()


async def test_unacked_rows_are_leased_again_after_reopen(path: Path) -> None:
    box = await Outbox.open(path)
    await box.append(readings(range(5)))
    await box.ack(OUT, await box.lease(OUT, 2))
    await box.lease(OUT, 3)  # leased, never acked: the publisher died with them in flight
    await box.close()

    box = await Outbox.open(path)
    try:
        batch = await box.lease(OUT, 10)
        assert (seqs(batch), values(batch)) == ([3, 4, 5], [2, 3, 4])
    finally:
        await box.close()


async def test_concurrent_appends_with_one_consumer_deliver_every_seq_in_order(outbox: Outbox) -> None:
    async def produce(device: str) -> None:
        for i in range(20):
            await outbox.append(readings([i] * 10, device=device))

    delivered: list[int] = []

    async def consume() -> None:
        releases = 0
        while len(delivered) < 1000:
            await outbox.wait(OUT)
            batch = await outbox.lease(OUT, 7)
            if len(batch) and releases < 30 and batch.last_seq % 4 == 0:
                releases += 1
                await outbox.release(OUT, batch)  # as on a broker failure: the same rows come again
                continue
            delivered.extend(seqs(batch))
            await outbox.ack(OUT, batch)

    async with asyncio.TaskGroup() as tasks:
        for n in range(5):
            tasks.create_task(produce(f"dev-{n}"))
        tasks.create_task(consume())
    assert delivered == list(range(1, 1001))
    assert (await outbox.stats()).depth == 0


async def test_a_cancelled_append_keeps_the_counters_true(outbox: Outbox) -> None:
    task = asyncio.create_task(outbox.append(readings(range(500))))
    await asyncio.sleep(0)  # inside the transaction
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await outbox.append(readings([1]))  # waits for the shielded write to finish
    assert (await outbox.stats()).depth == read_stats(outbox.path).depth == 501


WRITER = """
import asyncio, sys
from pathlib import Path
from gateway.model import Quality, Reading
from gateway.outbox import Outbox

async def main():
    box = await Outbox.open(Path(sys.argv[1]))
    n = 0
    while True:
        await box.append([Reading("d", "t", n + i, Quality.GOOD, 0, None, 1.0) for i in range(50)])
        n += 50
        print(n, flush=True)  # only after append returned: these are committed

asyncio.run(main())
"""


async def kill_writer(path: Path, after: int) -> int:
    """Run WRITER on `path` and SIGKILL it once it said it committed `after` readings or more
    (mid-stream: no close(), no checkpoint, no cleanup); what it said last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path), stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    committed = 0
    while committed < after:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line, "the writer exited early"
        committed = int(line)
    proc.send_signal(signal.SIGKILL)
    await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return committed


async def test_committed_rows_survive_kill_9(path: Path) -> None:
    committed = await kill_writer(path, 2000)
    box = await Outbox.open(path)
    try:
        batch = await box.lease(OUT, 1_000_000)
        assert len(batch) >= committed  # the writer may have committed more after its last line
        assert seqs(batch) == list(range(1, len(batch) + 1))
        assert values(batch) == list(range(len(batch)))
    finally:
        await box.close()


@pytest.mark.parametrize("then", ["ack", "release"])
async def test_drop_oldest_keeps_the_newest_and_counts_exactly(path: Path, then: str) -> None:
    box = await Outbox.open(path, max_rows=10, policy="drop_oldest")
    try:
        await box.append(readings(range(8)))
        leased = await box.lease(OUT, 3)  # in flight while evicted: delivered if acked
        await box.append(readings(range(8, 15)))  # 15 > 10: seqs 1-5 evicted, of which 4-5 unleased
        stats = await box.stats()
        assert (stats.depth, stats.dropped, stats.last_seq) == (10, 2, 15)
        if then == "ack":
            await box.ack(OUT, leased)  # the broker has seqs 1-3: not dropped
            assert (await box.stats()).dropped == 2
        else:
            await box.release(OUT, leased)  # they are gone: they will never be published
            assert (await box.stats()).dropped == 5
        assert values(await box.lease(OUT, 100)) == list(range(5, 15))
        assert (await box.stats()).outputs[OUT].dropped == (await box.stats()).dropped
    finally:
        await box.close()


async def test_drop_newest_keeps_the_oldest_and_counts_exactly(path: Path) -> None:
    box = await Outbox.open(path, max_rows=10, policy="drop_newest")
    try:
        await box.append(readings(range(8)))
        await box.append(readings(range(8, 15)))  # 2 fit, 5 are refused
        await box.append(readings([99]))  # still full: refused
        stats = await box.stats()
        assert (stats.depth, stats.dropped, stats.last_seq) == (10, 6, 10)
        assert values(await box.lease(OUT, 100)) == list(range(10))
    finally:
        await box.close()


async def test_dropped_total_persists_across_reopen(path: Path) -> None:
    box = await Outbox.open(path, max_rows=5)
    await box.append(readings(range(9)))
    await box.close()
    box = await Outbox.open(path, max_rows=5)
    try:
        await box.append(readings(range(3)))
        assert (await box.stats()).dropped == 7
    finally:
        await box.close()
    assert read_stats(path).dropped == 7


async def test_full_episode_is_logged_once_and_summed_at_the_end(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.outbox")
    box = await Outbox.open(path, max_rows=20, clock=lambda: 1_700_000_000.0)
    try:
        for _ in range(5):
            await box.append(readings(range(8)))  # 40 in, 20 dropped
        assert len(caplog.records) == 1
        assert "is full" in caplog.records[0].getMessage()
        # 19 left: under the cap, not yet under the low-water mark
        await box.ack(OUT, await box.lease(OUT, 1))
        assert len(caplog.records) == 1
        await box.ack(OUT, await box.lease(OUT, 1))
        assert caplog.records[-1].getMessage() == (
            "outbox full: dropped 20 readings (policy drop_oldest) since 2023-11-14T22:13:20.000Z"
        )
        assert len(caplog.records) == 2
    finally:
        await box.close()


BIG = "x" * 1000


def on_disk(path: Path) -> int:
    """What the outbox's files take: the database and its WAL."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_max_bytes_caps_the_file_and_its_wal(path: Path, policy: str) -> None:
    cap = 1_000_000  # about 240 pages: ~850 readings of 1 kB, with an eighth kept for the WAL
    box = await Outbox.open(path, max_bytes=cap, policy=policy)
    try:
        largest = 0
        for _ in range(80):
            await box.append(readings([BIG] * 50))
            largest = max(largest, on_disk(path))
        stats = await box.stats()
        assert stats.dropped > 0
        assert stats.depth + stats.dropped == 4000  # every reading is stored or counted
        assert stats.bytes == on_disk(path)
        # The files may pass the cap by one append: new rows go in before the old ones go
        # out, and its WAL frames stay until the next checkpoint. 50 readings of 1 kB fill
        # about 17 pages; their eviction writes as many again.
        assert largest <= cap + 40 * 4096
        batch = await box.lease(OUT, 10_000)
        expected = (
            list(range(4001 - stats.depth, 4001))
            if policy == "drop_oldest"
            else list(range(1, stats.depth + 1))
        )
        assert seqs(batch) == expected
    finally:
        await box.close()


GARBAGE = b"this is not a database, " * 400


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def read(path: Path) -> bytes:
    return path.read_bytes()


def smash_pages(path: Path) -> None:
    """Overwrite b-tree pages in the middle and keep the header: "database disk image is malformed"."""
    data = bytearray(path.read_bytes())
    data[4096 * 2 : 4096 * 4] = b"\xff" * 8192
    path.write_bytes(bytes(data))


def smash_newest_pages(path: Path) -> None:
    """Overwrite the pages of the newest rows, which opening the file does not read."""
    data = bytearray(path.read_bytes())
    data[-4096 * 3 : -4096] = b"\xff" * 8192
    path.write_bytes(bytes(data))


def smash_middle_pages(path: Path) -> None:
    """Overwrite pages in the middle of the reading table, which the first reads do not touch
    (the schema, the meta table) but counting the rows does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 4096 // 2 * 4096
    data[middle : middle + 8192] = b"\xff" * 8192
    path.write_bytes(bytes(data))


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_corrupt_file_is_moved_aside(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(path, GARBAGE)
    box = await Outbox.open(path, clock=lambda: 1_700_000_000.0)
    try:
        await box.append(readings([1]))
        assert values(await box.lease(OUT, 10)) == [1]
    finally:
        await box.close()
    moved = path.with_name("outbox.db.corrupt-20231114T221320Z")
    assert files(path.parent) == ["outbox.db", "outbox.db.corrupt-20231114T221320Z", "outbox.db.lock"]
    assert read(moved) == GARBAGE
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(path) in record.getMessage()
    assert str(moved) in record.getMessage()


async def test_malformed_database_is_moved_aside(path: Path) -> None:
    box = await Outbox.open(path)
    await box.append(readings([BIG] * 200))
    await box.close()
    smash_pages(path)
    box = await Outbox.open(path, clock=lambda: 1_700_000_000.0)
    try:
        assert (await box.stats()).depth == 0
    finally:
        await box.close()
    # (reading the last seq from the damaged file may leave its -wal and -shm beside it)
    assert [
        name for name in files(path.parent) if ".corrupt-" in name and name[-4:] not in ("-wal", "-shm")
    ] == ["outbox.db.corrupt-20231114T221320Z"]


async def test_unusable_path_is_an_error_not_corruption(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutboxError, match="cannot create its directory"):
        await Outbox.open(tmp_path / "a-file" / "outbox.db")
    assert files(tmp_path) == ["a-file"]


async def test_missing_directory_is_created(tmp_path: Path) -> None:
    box = await Outbox.open(tmp_path / "data" / "state" / "outbox.db")
    await box.close()
    assert (tmp_path / "data" / "state" / "outbox.db").is_file()


async def test_seq_continues_after_a_malformed_file_is_replaced(path: Path) -> None:
    box = await Outbox.open(path)
    await box.append(readings([BIG] * 200))
    last = (await box.stats()).last_seq
    await box.close()
    assert last == 200
    smash_pages(path)
    box = await Outbox.open(path)
    try:
        await box.append(readings([1]))
        (entry,) = (await box.lease(OUT, 10)).entries
    finally:
        await box.close()
    # Never 1 again: a consumer that drops seqs it has seen would discard new data.
    assert entry.seq == last + 1


async def test_seq_continues_above_any_old_seq_when_nothing_is_readable(path: Path) -> None:
    write(path, GARBAGE)
    box = await Outbox.open(path)
    try:
        await box.append(readings([1]))
        (entry,) = (await box.lease(OUT, 10)).entries
    finally:
        await box.close()
    assert entry.seq > time.time_ns() // 1000 - 60_000_000  # the clock in microseconds


async def test_wait_wakes_on_append(outbox: Outbox) -> None:
    waiter = asyncio.create_task(outbox.wait(OUT))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await outbox.append(readings([1]))
    await asyncio.wait_for(waiter, timeout=1)
    await outbox.wait(OUT)  # unleased rows: returns at once
    await outbox.lease(OUT, 10)
    waiter = asyncio.create_task(outbox.wait(OUT))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # everything is leased
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_wait_wakes_on_release(outbox: Outbox) -> None:
    await outbox.append(readings([1]))
    batch = await outbox.lease(OUT, 10)
    waiter = asyncio.create_task(outbox.wait(OUT))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await outbox.release(OUT, batch)
    await asyncio.wait_for(waiter, timeout=1)


async def test_oldest_age_uses_the_first_row(path: Path) -> None:
    box = await Outbox.open(path, clock=lambda: 1_000.0)
    try:
        await box.append(readings([1], read_time=990.0))
        await box.append(readings([2], read_time=995.0))
        assert (await box.stats()).oldest_age == 10.0
    finally:
        await box.close()


async def test_read_stats_beside_a_running_outbox(outbox: Outbox) -> None:
    await outbox.append(readings(range(4)))
    stats = read_stats(outbox.path)
    assert (stats.depth, stats.dropped, stats.last_seq) == (4, 0, 4)
    assert stats.bytes == (await outbox.stats()).bytes
    await outbox.append(readings([5]))  # the reader did not lock the writer out
    assert read_stats(outbox.path).depth == 5


def test_read_stats_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="no such outbox file"):
        read_stats(tmp_path / "outbox.db")
    assert list(tmp_path.iterdir()) == []


def test_read_stats_of_a_file_that_is_not_an_outbox(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    path.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(OutboxError, match="cannot read"):
        read_stats(path)


async def test_replay_splits_history_and_live_lanes(outbox: Outbox) -> None:
    await outbox.append(readings([1, 2, 3]))
    boundary = outbox.begin_replay(OUT)
    assert boundary == 3
    assert outbox.replaying(OUT)
    await outbox.append(readings([4, 5]))
    live = await outbox.lease(OUT, 10, live=True)
    assert seqs(live) == [4, 5]
    history = await outbox.lease(OUT, 2)
    assert seqs(history) == [1, 2]  # never past the boundary
    await outbox.ack(OUT, live)
    await outbox.ack(OUT, history)
    await outbox.append(readings([6]))
    assert seqs(await outbox.lease(OUT, 10, live=True)) == [6]
    last = await outbox.lease(OUT, 10)
    assert seqs(last) == [3]
    assert not outbox.replaying(OUT)  # history ran dry: one FIFO again, after the live lane
    assert len(await outbox.lease(OUT, 10)) == 0


async def test_release_goes_back_to_its_own_lane(outbox: Outbox) -> None:
    await outbox.append(readings([1, 2]))
    outbox.begin_replay(OUT)
    await outbox.append(readings([3, 4]))
    live = await outbox.lease(OUT, 1, live=True)
    history = await outbox.lease(OUT, 1)
    await outbox.release(OUT, live)
    await outbox.release(OUT, history)
    assert seqs(await outbox.lease(OUT, 10, live=True)) == [3, 4]
    assert seqs(await outbox.lease(OUT, 10)) == [1, 2]


async def test_a_new_replay_extends_history_without_leasing_twice(outbox: Outbox) -> None:
    await outbox.append(readings([1, 2, 3]))
    outbox.begin_replay(OUT)
    await outbox.append(readings([4, 5]))
    live = await outbox.lease(OUT, 1, live=True)  # 4, published and acked
    await outbox.ack(OUT, live)
    history = await outbox.lease(OUT, 1)  # 1, acked
    await outbox.ack(OUT, history)
    assert outbox.begin_replay(OUT) == 5  # a rebirth: everything not yet published is history now
    await outbox.append(readings([6]))
    assert seqs(await outbox.lease(OUT, 10)) == [2, 3, 5]
    assert seqs(await outbox.lease(OUT, 10, live=True)) == [6]


async def test_replay_with_nothing_pending_keeps_one_lane(outbox: Outbox) -> None:
    await outbox.append(readings([1]))
    await outbox.ack(OUT, await outbox.lease(OUT, 10))
    outbox.begin_replay(OUT)
    assert not outbox.replaying(OUT)
    await outbox.append(readings([2]))
    assert seqs(await outbox.lease(OUT, 10, live=True)) == [2]


async def test_one_process_per_outbox(path: Path) -> None:
    box = await Outbox.open(path)
    try:
        with pytest.raises(OutboxLocked, match=rf"in use by millwright \(pid {os.getpid()}\)") as info:
            await Outbox.open(path)
        assert info.value.holder == os.getpid()
    finally:
        await box.close()
    box = await Outbox.open(path)  # released at close
    await box.close()


async def test_the_lock_goes_with_a_killed_process(path: Path) -> None:
    """kill -9 leaves the lock file, not the lock: the next gateway opens the outbox."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD, str(path), stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), timeout=20) == b"open\n"
        with pytest.raises(OutboxLocked, match=rf"pid {holder.pid}\)"):
            await Outbox.open(path)
    finally:
        holder.kill()
        await holder.wait()
    assert path.with_name("outbox.db.lock").exists()
    box = await Outbox.open(path)
    await box.close()


HOLD = """
import asyncio, sys, time
from pathlib import Path
from gateway.outbox import Outbox

async def main():
    await Outbox.open(Path(sys.argv[1]))
    print("open", flush=True)
    time.sleep(60)

asyncio.run(main())
"""


def meta(path: Path, key: str) -> int:
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(value)


async def test_the_file_says_whether_it_was_closed_cleanly(path: Path) -> None:
    box = await Outbox.open(path)
    await box.append(readings([1, 2]))
    assert meta(path, "clean") == 0  # open: a kill now leaves it at 0, and the next open checks the file
    await box.close()
    assert meta(path, "clean") == 1
    box = await Outbox.open(path)
    try:
        assert meta(path, "clean") == 0
    finally:
        await box.close()


async def test_a_killed_gateways_damaged_file_is_found_at_the_next_open(path: Path) -> None:
    await kill_writer(path, 5000)
    with contextlib.closing(sqlite3.connect(path)) as db:  # fold the WAL in, so the pages hold it all
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    smash_newest_pages(path)
    box = await Outbox.open(path, clock=lambda: 1_700_000_000.0)
    try:
        assert (await box.stats()).depth == 0  # checked, found damaged, moved aside
    finally:
        await box.close()
    assert path.with_name("outbox.db.corrupt-20231114T221320Z").exists()


async def test_newest_values_outlive_their_publication_and_a_restart(path: Path) -> None:
    box = await Outbox.open(path)
    await box.append(readings([1, 2]))
    await box.append(readings([3]))  # t0 again: newer
    await box.ack(OUT, await box.lease(OUT, 10))  # published: the rows are deleted
    await box.close()
    box = await Outbox.open(path)
    try:
        assert (await box.stats()).depth == 0
        assert {(r.tag, r.value) for r in await box.newest()} == {("t0", 3), ("t1", 2)}
        await box.append(readings([4]))
        assert {(r.tag, r.value) for r in await box.newest()} == {("t0", 4), ("t1", 2)}
    finally:
        await box.close()


async def test_newest_values_after_a_kill_come_from_the_rows_left(path: Path) -> None:
    await kill_writer(path, 500)
    box = await Outbox.open(path)
    try:
        (newest,) = await box.newest()
        last = await box.lease(OUT, 1_000_000)
        assert (newest.device, newest.tag, newest.value) == ("d", "t", last.entries[-1].reading.value)
    finally:
        await box.close()


async def test_a_cleanly_closed_file_found_damaged_is_checked_and_moved_aside(path: Path) -> None:
    box = await Outbox.open(path)
    for _ in range(20):
        await box.append(readings([BIG] * 50))
    await box.close()
    smash_middle_pages(path)  # after a clean stop: opening skips the whole check, then meets this
    box = await Outbox.open(path, clock=lambda: 1_700_000_000.0)
    try:
        assert (await box.stats()).depth == 0
        await box.append(readings([1]))
        assert (await box.stats()).last_seq > 1000  # seq goes on above the damaged file's
    finally:
        await box.close()
    assert path.with_name("outbox.db.corrupt-20231114T221320Z").exists()
