"""The outbox on a disk that runs out of space for real (a small tmpfs): the disk is a cap
like max_rows, never a crash, and the outbox recovers by itself when space comes back."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

import pytest

from gateway.errors import OutboxError
from gateway.model import Batch, Quality, Reading
from gateway.outbox import DEFAULT_OUTPUT as OUT
from gateway.outbox import Outbox, read_stats
from tests.helpers import SmallDisk, eventually

MB = 1024 * 1024
VALUE = "v" * 100  # about 200 bytes a row with its names and index


def readings(n: int, start: int = 0) -> list[Reading]:
    return [Reading("press-1", f"t{start + i}", VALUE, Quality.GOOD, 0, None, 1000.0 + i) for i in range(n)]


async def fill_outbox(box: Outbox, disk: SmallDisk, batches: int) -> int:
    """Append `batches` batches of 100 readings; return how many were offered."""
    for i in range(batches):
        await box.append(readings(100, start=i * 100))
    return batches * 100


def seqs(batch: Batch) -> list[int]:
    return [e.seq for e in batch.entries]


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_low_disk_is_a_cap_not_a_crash(
    small_disk: Callable[[int], SmallDisk], policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    disk = small_disk(24 * MB)
    box = await Outbox.open(disk.path / "outbox.db", policy=policy)
    try:
        await fill_outbox(box, disk, 20)
        # Another program takes the disk down to 2 MB free: below the outbox's reserve.
        disk.fill(leave=2 * MB)
        offered = 2000 + await fill_outbox(box, disk, 50)
        stats = await box.stats()
        assert stats.dropped > 0
        assert stats.depth + stats.dropped == offered  # every reading is stored or counted
        assert disk.available() > MB  # the outbox kept off the reserve
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per episode, not per batch
        assert "the disk is full" in warnings[0]
        batch = await box.lease(OUT, 100_000)
        if policy == "drop_oldest":  # the newest kept, in order (refused rows got no seq)
            assert seqs(batch) == list(range(stats.last_seq - stats.depth + 1, stats.last_seq + 1))
        else:  # the oldest kept
            assert seqs(batch) == list(range(1, stats.depth + 1))
        await box.release(OUT, batch)

        # Space comes back: every reading is stored again, and the episode ends once.
        disk.free()
        before = (await box.stats()).dropped
        await box.append(readings(100))
        assert (await box.stats()).dropped == before
        assert any("outbox full: dropped" in r.getMessage() for r in caplog.records)
    finally:
        await box.close()


async def test_full_disk_refuses_and_counts_then_recovers(
    small_disk: Callable[[int], SmallDisk], caplog: pytest.LogCaptureFixture
) -> None:
    """Filled to the last byte (SQLite says SQLITE_FULL): appends are refused and counted, an
    ack waits for room; nothing raises. When space returns, both go on by themselves."""
    disk = small_disk(24 * MB)
    path = disk.path / "outbox.db"
    box = await Outbox.open(path)
    try:
        offered = await fill_outbox(box, disk, 10)
        leased = await box.lease(OUT, 500)
        disk.fill(leave=0)
        for i in range(30):  # the WAL fills up; from then on each append is refused
            await box.append(readings(100, start=i))
            offered += 100
        stats = await box.stats()
        assert stats.dropped > 0
        assert stats.depth + stats.dropped == offered
        ack = asyncio.create_task(box.ack(OUT, leased))
        await eventually(
            lambda: any("deleted once there is room" in r.getMessage() for r in caplog.records) or ack.done(),
            timeout=20,
            what="the ack to wait, or to go through",
        )
        disk.free()
        await asyncio.wait_for(ack, timeout=20)
        await box.append(readings(100))
        offered += 100
        stats = await box.stats()
        assert stats.depth + stats.dropped == offered - 500  # 500 acked
    finally:
        await box.close()
    # The drops counted while nothing could be written are in the file too.
    assert read_stats(path).dropped == stats.dropped


async def waiting_for_room(caplog: pytest.LogCaptureFixture) -> None:
    """Until an opening outbox has logged that it waits for the disk to have room."""
    await eventually(
        lambda: any("waiting for room" in r.getMessage() for r in caplog.records),
        timeout=20,
        what="the wait to be logged",
    )


async def test_open_on_a_full_disk_waits_for_room(
    small_disk: Callable[[int], SmallDisk], caplog: pytest.LogCaptureFixture
) -> None:
    """A restart with the disk still full must not exit (systemd would restart it into the
    same failure, in a loop): it waits, says so once, and opens when there is room."""
    disk = small_disk(24 * MB)
    path = disk.path / "outbox.db"
    box = await Outbox.open(path)
    await box.append(readings(100))
    await box.close()  # the clean close removes the -shm: a new one needs space
    disk.fill(leave=0)
    opening = asyncio.create_task(Outbox.open(path))
    try:
        await waiting_for_room(caplog)
        assert not opening.done()
        disk.free()
        box = await asyncio.wait_for(opening, timeout=30)
    finally:
        opening.cancel()
    try:
        assert (await box.stats()).depth == 100
    finally:
        await box.close()


async def test_a_corrupt_outbox_found_on_a_full_disk_keeps_its_seq(
    small_disk: Callable[[int], SmallDisk], caplog: pytest.LogCaptureFixture
) -> None:
    """The fresh database that replaces a corrupt one needs space too. While there is none,
    the damaged file stays where it is, and the fresh one, made once there is room, continues
    seq above the old file's (an empty file left in its place would start again at 1)."""
    disk = small_disk(24 * MB)
    path = disk.path / "outbox.db"
    box = await Outbox.open(path)
    await box.append(readings(500))
    await box.close()
    path.write_bytes(b"not a database any more, " * 400)  # (a failing SD card, say)
    disk.fill(leave=0)
    opening = asyncio.create_task(Outbox.open(path))
    try:
        await waiting_for_room(caplog)
        disk.free()
        box = await asyncio.wait_for(opening, timeout=30)
    finally:
        opening.cancel()
    try:
        await box.append(readings(1))
        (entry,) = (await box.lease(OUT, 10)).entries
    finally:
        await box.close()
    # Nothing readable in the old file: seq goes on from the clock in microseconds.
    assert entry.seq > time.time_ns() // 1000 - 60_000_000
    assert any("is corrupt" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_a_batch_larger_than_the_room_left_is_stored_in_part(
    small_disk: Callable[[int], SmallDisk], policy: str
) -> None:
    """One OPC UA device of 2,000 tags appends 2,000 readings at once: on a full disk the
    outbox keeps what fits (the newest of them under drop_oldest, the oldest under
    drop_newest), not nothing, and drop_oldest does not empty itself for them."""
    disk = small_disk(24 * MB)
    box = await Outbox.open(disk.path / "outbox.db", policy=policy)
    try:
        await box.append(readings(100))
        disk.fill(leave=2 * MB)  # below the reserve
        await box.append(readings(2000, start=100))
        stats = await box.stats()
        batch = await box.lease(OUT, 10_000)
    finally:
        await box.close()
    stored = [e for e in batch.entries if e.seq > 100]
    assert stored, "nothing of the batch was kept"
    assert stats.depth + stats.dropped == 2100
    if policy == "drop_oldest":
        assert len(stored) >= 100  # at least one for one with what it evicted
        assert [e.reading.tag for e in stored] == [f"t{i}" for i in range(2100 - len(stored), 2100)]
    else:
        assert len(batch) - len(stored) == 100  # the old rows stay
        assert [e.reading.tag for e in stored] == [f"t{i}" for i in range(100, 100 + len(stored))]


async def test_only_a_full_disk_is_waited_for(small_disk: Callable[[int], SmallDisk]) -> None:
    """An outbox written by a newer gateway is an error at once, full disk or not."""
    disk = small_disk(8 * MB)
    path = disk.path / "outbox.db"
    box = await Outbox.open(path)
    await box.close()
    await box.close()  # (a second close does nothing)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    disk.fill(leave=0)
    with pytest.raises(OutboxError, match="schema version 99 is newer"):
        await asyncio.wait_for(Outbox.open(path), timeout=20)
