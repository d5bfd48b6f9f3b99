"""The outbox with several outputs: a durable position each, rows kept until all have them."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.model import Batch, Quality, Reading, Value
from gateway.outbox import Outbox, read_stats

TWO = ("local", "scada")


def readings(values: Sequence[Value]) -> list[Reading]:
    return [Reading("press-1", f"t{i}", v, Quality.GOOD, 0, None, 1000.0, None) for i, v in enumerate(values)]


def seqs(batch: Batch) -> list[int]:
    return [e.seq for e in batch.entries]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def rows_in_file(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [seq for (seq,) in db.execute("SELECT seq FROM reading ORDER BY seq")]


async def test_each_output_leases_every_row_and_a_row_goes_when_both_have_it(path: Path) -> None:
    box = await Outbox.open(path, outputs=TWO)
    try:
        await box.append(readings(range(5)))
        local = await box.lease("local", 3)
        scada = await box.lease("scada", 10)
        assert (seqs(local), seqs(scada)) == ([1, 2, 3], [1, 2, 3, 4, 5])
        await box.ack("scada", scada)
        assert rows_in_file(path) == [1, 2, 3, 4, 5]  # local has none of them yet
        await box.ack("local", local)
        assert rows_in_file(path) == [4, 5]
        stats = await box.stats()
        assert stats.depth == 2
        assert {name: (o.depth, o.position) for name, o in stats.outputs.items()} == {
            "local": (2, 3),
            "scada": (0, 5),
        }
    finally:
        await box.close()


async def test_a_stuck_output_does_not_hold_back_the_other(path: Path) -> None:
    box = await Outbox.open(path, outputs=TWO)
    try:
        await box.append(readings([0]))
        held = await box.lease("scada", 100)  # its broker is gone: never acked
        for n in range(1, 4):
            await box.append(readings([n]))
            await asyncio.wait_for(box.wait("local"), 5)
            batch = await box.lease("local", 100)
            assert seqs(batch) == ([1, 2] if n == 1 else [n + 1])
            await box.ack("local", batch)
        assert seqs(held) == [1]
        await box.release("scada", held)
        assert seqs(await box.lease("scada", 100)) == [1, 2, 3, 4]
    finally:
        await box.close()


async def test_positions_survive_a_restart(path: Path) -> None:
    box = await Outbox.open(path, outputs=TWO)
    await box.append(readings(range(6)))
    await box.ack("local", await box.lease("local", 4))
    await box.ack("scada", await box.lease("scada", 2))
    leased_not_acked = await box.lease("scada", 2)
    assert seqs(leased_not_acked) == [3, 4]
    await box.close()

    box = await Outbox.open(path, outputs=TWO)
    try:
        assert seqs(await box.lease("local", 100)) == [5, 6]
        assert seqs(await box.lease("scada", 100)) == [3, 4, 5, 6]  # at least once: 3-4 again
        assert read_stats(path).outputs["scada"].position == 2
    finally:
        await box.close()


async def test_an_output_removed_from_the_config_releases_its_rows(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = await Outbox.open(path, outputs=TWO)
    await box.append(readings(range(4)))
    await box.ack("local", await box.lease("local", 100))
    await box.close()
    assert rows_in_file(path) == [1, 2, 3, 4]  # scada has not had them

    with caplog.at_level(logging.WARNING, logger="gateway.outbox"):
        box = await Outbox.open(path, outputs=["local"])
    try:
        (line,) = [r.getMessage() for r in caplog.records]
        assert "output scada is no longer configured" in line
        assert "the 4 reading(s) it had not delivered" in line
        assert rows_in_file(path) == []
        assert set((await box.stats()).outputs) == {"local"}
    finally:
        await box.close()


async def test_a_new_output_starts_with_what_is_buffered(path: Path) -> None:
    box = await Outbox.open(path, outputs=["local"])
    await box.append(readings(range(5)))
    await box.ack("local", await box.lease("local", 3))
    await box.close()

    box = await Outbox.open(path, outputs=TWO)
    try:
        assert seqs(await box.lease("scada", 100)) == [4, 5]  # 1-3 were gone already
        assert seqs(await box.lease("local", 100)) == [4, 5]
    finally:
        await box.close()


async def test_a_file_of_schema_1_keeps_its_rows_for_the_output(path: Path) -> None:
    # The layout of schema 1 (one consumer, no positions), as an older gateway left it.
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE reading (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, tag TEXT NOT NULL,
                value TEXT, quality INTEGER NOT NULL, status INTEGER NOT NULL, source_time REAL,
                read_time REAL NOT NULL, unit TEXT);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            INSERT INTO meta VALUES ('dropped', 7);
            PRAGMA user_version = 1;
            """
        )
        db.executemany(
            "INSERT INTO reading (seq, device, tag, value, quality, status, read_time)"
            " VALUES (?, 'd', 't', ?, 0, 0, 1)",
            [(seq, str(seq)) for seq in (41, 42, 43)],  # 1-40 were published and deleted
        )
    box = await Outbox.open(path)
    try:
        batch = await box.lease("mqtt", 100)
        assert seqs(batch) == [41, 42, 43]
        assert [e.reading.value for e in batch.entries] == [41, 42, 43]
        await box.append(readings([1]))
        assert box.last_seq == 44
        assert (await box.stats()).dropped == 7
    finally:
        await box.close()


async def test_eviction_counts_as_dropped_for_the_output_that_had_not_sent_it(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = await Outbox.open(path, max_rows=100, outputs=TWO)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.outbox"):
            for start in range(0, 300, 50):
                await box.append(readings(range(start, start + 50)))
                await box.ack("local", await box.lease("local", 1000))  # local keeps up; scada is down
            stats = await box.stats()
            assert stats.outputs["local"].dropped == 0
            assert stats.outputs["scada"].dropped == 200
            assert stats.dropped == 200
            scada = await box.lease("scada", 1000)
            assert seqs(scada) == list(range(201, 301))
            await box.ack("scada", scada)  # back: the episode ends
        assert read_stats(path).outputs["scada"].dropped == 200
        lines = [r.getMessage() for r in caplog.records]
        assert sum("output scada is so far behind" in line for line in lines) == 1
        assert any("dropped 200 readings" in ln and "had not sent them: scada 200" in ln for ln in lines)
        assert not any("output local" in line for line in lines)
    finally:
        await box.close()


async def test_refusals_count_for_their_output_only(path: Path) -> None:
    box = await Outbox.open(path, outputs=TWO)
    try:
        await box.append(readings(range(3)))
        await box.ack("local", await box.lease("local", 100), refused=2)
        await box.ack("scada", await box.lease("scada", 100))
        stats = await box.stats()
        assert (stats.outputs["local"].dropped, stats.outputs["scada"].dropped, stats.dropped) == (2, 0, 2)
    finally:
        await box.close()


async def replaying(path: Path) -> Outbox:
    """Output "sp" in a replay: rows 1-2 are its history, 3-4 live."""
    box = await Outbox.open(path, outputs=["sp"])
    await box.append(readings([1, 2]))
    box.begin_replay("sp")
    await box.append(readings([3, 4]))
    return box


async def test_wait_returns_when_a_replay_ends_with_live_rows_waiting(path: Path) -> None:
    box = await replaying(path)
    try:
        history = await box.lease("sp", 10)  # all of it: the lanes merge
        assert seqs(history) == [1, 2]
        assert not box.replaying("sp")
        await box.ack("sp", history)
        await asyncio.wait_for(box.wait("sp"), 5)  # the live rows 3-4 are there to lease
        assert seqs(await box.lease("sp", 10)) == [3, 4]
    finally:
        await box.close()


async def test_live_rows_acked_during_a_replay_are_not_leased_again(path: Path) -> None:
    box = await replaying(path)
    try:
        await box.ack("sp", await box.lease("sp", 10, live=True))  # 3-4 delivered live
        history = await box.lease("sp", 10)
        assert seqs(history) == [1, 2]
        await box.release("sp", history)  # the connection dropped: history again, not 3-4
        assert seqs(await box.lease("sp", 10)) == [1, 2]
    finally:
        await box.close()
    assert read_stats(path).outputs["sp"].position == 0  # nothing confirmed in order yet


async def test_the_position_passes_the_live_rows_once_the_history_before_them_is_acked(path: Path) -> None:
    box = await replaying(path)
    try:
        await box.ack("sp", await box.lease("sp", 10, live=True))
        await box.ack("sp", await box.lease("sp", 10))
        assert (await box.stats()).outputs["sp"].position == 4
        assert rows_in_file(path) == []
    finally:
        await box.close()


async def test_unknown_output_is_a_clear_error(path: Path) -> None:
    box = await Outbox.open(path, outputs=TWO)
    try:
        with pytest.raises(ValueError, match="no output 'cloud'"):
            await box.lease("cloud", 1)
    finally:
        await box.close()
    with pytest.raises(ValueError, match="distinct"):
        await Outbox.open(path, outputs=["a", "a"])


async def test_releasing_a_batch_after_acking_its_prefix_leases_only_the_rest(path: Path) -> None:
    box = await Outbox.open(path, outputs=TWO)
    try:
        await box.append(readings(range(5)))
        batch = await box.lease("local", 5)
        await box.ack("local", Batch(batch.entries[:2]))  # confirmed before the connection dropped
        await box.release("local", batch)
        assert seqs(await box.lease("local", 10)) == [3, 4, 5]  # 1-2 are still in the file, for scada
    finally:
        await box.close()
