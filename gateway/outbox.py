"""The outbox: a durable, bounded FIFO of readings in SQLite (store and forward).

Pollers append; one publisher leases the oldest rows, publishes them, and acks them once the
broker has confirmed, or releases them to be leased again. A reading is safe from the moment
`append` returns: it survives a broker outage and `kill -9`.

Delivery is at-least-once: leases live in memory only, so after a restart every unacked row
is leased again. `seq` is an AUTOINCREMENT row id, never reused, not even after every row was
deleted, so a consumer can detect gaps and duplicates.

For a Sparkplug replay the consumer can split the rows in two lanes (`begin_replay`): the
rows committed so far (history) and those committed later (live), leased separately so that
a long backlog does not hold up live values.

A full disk is a cap like `max_rows`, not a crash. The outbox keeps a reserve of free space
(`_reserve`): below it, new rows must fit in pages the database already has (freed by acks or
by evicting the oldest rows, per the policy), or they are refused and counted. The reserve is
what lets SQLite keep working: a checkpoint may have to grow the file by up to one WAL, and
without a checkpoint the WAL cannot start over, so no row could be written, not even deleted.
If the disk fills up anyway (another program), a write that fails is retried once after a
checkpoint, and then refused (appends) or retried until there is room (acks).

One process per file: `open` takes an exclusive lock on `<path>.lock`, so a second gateway
started on the same config cannot publish the same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.backoff import Backoff
from gateway.errors import OutboxError, OutboxLocked
from gateway.model import Batch, Entry, Quality, Reading, iso_millis

log = logging.getLogger(__name__)

POLICIES = ("drop_oldest", "drop_newest")
SCHEMA_VERSION = 1

# The quality as a small int in the row; the tuple index is the stored code.
_QUALITIES = (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD)
_QUALITY_CODE = {quality: code for code, quality in enumerate(_QUALITIES)}

# JSON keeps the value's Python type across the round trip (True stays True, 1.0 stays a
# float), which SQLite's column affinity would not. Bound methods skip json.dumps' kwargs work.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode

# Between file-size measurements an estimate is trusted only below this share of max_bytes
# (room for rows up to twice the measured average), and for at most _MEASURE_EVERY appends.
_MARGIN = 0.5
_MEASURE_EVERY = 32
# A full episode ends when the outbox drains below this share of the cap: ending it at the cap
# would log two lines per batch while the publisher is slower than the pollers.
_LOW_WATER = 0.9

# The WAL is checkpointed (and truncated back) at this size: SQLite's default of 1,000 pages,
# or an eighth of max_bytes (which counts the WAL too), at least 64 KiB.
_WAL_LIMIT = 4 * 1024 * 1024
_WAL_MIN = 64 * 1024
# Free disk space kept beyond two WALs (see the module docstring): room for the -shm and
# for one more batch, so that the reserve is not eaten by the write that crosses it.
_RESERVE_MARGIN = 1024 * 1024
# Below this much free space an outbox that fails to open is taken to be on a full disk:
# start-up then waits for room instead of exiting (systemd would restart it into the same).
_OPEN_ROOM = 1024 * 1024
# What SQLite says when opening on a full disk: full, an I/O error (the -shm could not be
# grown), cannot open (no room for the file).
_FULL_DISK_CODES = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)
# What a row is taken to need before the file has been measured (value, names, index).
_ROW_GUESS = 200

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS reading (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a deleted seq is never handed out again
    device TEXT NOT NULL,
    tag TEXT NOT NULL,
    value TEXT,                             -- JSON; NULL for a Bad reading
    quality INTEGER NOT NULL,               -- 0 Good, 1 Uncertain, 2 Bad
    status INTEGER NOT NULL,
    source_time REAL,
    read_time REAL NOT NULL,
    unit TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('dropped', 0);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_INSERT = (
    "INSERT INTO reading (device, tag, value, quality, status, source_time, read_time, unit)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = "SELECT seq, device, tag, value, quality, status, source_time, read_time, unit FROM reading"
_LEASE = f"{_COLUMNS} WHERE seq > ? ORDER BY seq LIMIT ?"
_LEASE_UPTO = f"{_COLUMNS} WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
_NEWEST = f"{_COLUMNS} WHERE seq IN (SELECT max(seq) FROM reading GROUP BY device, tag) ORDER BY seq"
_ACK = "DELETE FROM reading WHERE seq BETWEEN ? AND ?"
_DROP_OLDEST = "DELETE FROM reading WHERE seq IN (SELECT seq FROM reading ORDER BY seq LIMIT ?)"
_ADD_DROPPED = "UPDATE meta SET value = value + ? WHERE key = 'dropped'"
# Pages in use: what the rows occupy. Pages freed by deletes stay in the file for reuse.
_USED_PAGES = (
    "SELECT (SELECT page_count FROM pragma_page_count())"
    " - (SELECT freelist_count FROM pragma_freelist_count())"
)
_STATE = (
    "SELECT (SELECT COUNT(*) FROM reading), (SELECT value FROM meta WHERE key = 'dropped'),"
    " (SELECT seq FROM sqlite_sequence WHERE name = 'reading'), (SELECT page_size FROM pragma_page_size())"
)
_OLDEST_AND_PAGES = (
    "SELECT (SELECT read_time FROM reading ORDER BY seq LIMIT 1),"
    " (SELECT page_count FROM pragma_page_count())"
)

_SEED_SEQ = "INSERT INTO sqlite_sequence (name, seq) VALUES ('reading', ?)"
_LAST_SEQ_SOURCES = (
    "SELECT seq FROM sqlite_sequence WHERE name = 'reading'",
    "SELECT max(seq) FROM reading",
)

_Row = tuple[str, str, str | None, int, int, float | None, float, str | None]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox. `bytes` is what its files take: the database (page count x
    page size) and its WAL."""

    depth: int
    oldest_age: float | None
    dropped: int
    bytes: int
    last_seq: int


class _Corrupt(Exception):
    """The file is damaged: not a database, malformed, or quick_check failed."""


class _DiskFull(Exception):
    """SQLite could not write: the disk is full (SQLITE_FULL). The transaction was rolled back."""


class Outbox:
    """Durable bounded FIFO of readings, for many appenders and one consumer."""

    def __init__(
        self, db: aiosqlite.Connection, path: Path, *, state: tuple[int, int, int, int], lock: int,
        max_rows: int, max_bytes: int | None, policy: str, clock: Callable[[], float],
    ) -> None:  # fmt: skip
        """Use `Outbox.open`."""
        self._db = db
        self.path = path
        self._wal = Path(f"{path}-wal")
        self._lock_fd = lock  # held (flock) until close
        self.wal_limit = _wal_limit(max_bytes)
        # max_bytes counts the WAL too: the rows get what its limit leaves (checkpoints keep the
        # WAL there; one large transaction may pass it until the next checkpoint).
        row_bytes = None if max_bytes is None else max_bytes - self.wal_limit
        self._max_rows, self._max_bytes, self._policy, self._clock = max_rows, row_bytes, policy, clock
        # In-memory mirrors of the database (no COUNT(*) per append), changed only after a commit.
        self._count, self._dropped, self._last_seq, self._page_size = state
        # One connection, so one transaction at a time: every use of it takes this lock.
        self._lock = asyncio.Lock()
        # Lease bookkeeping: every row up to this seq has been handed to the consumer.
        self._cursor = 0
        # During a replay (see begin_replay): the last history row, and the live lane's cursor.
        self._split: int | None = None
        self._live_cursor = 0
        self._ready = asyncio.Event()  # set while there may be unleased rows
        if self._count:
            self._ready.set()
        # File-size estimate between measurements (see _used_bytes).
        self._used = 0
        self._measured_count = 0
        self._row_bytes: float | None = None  # unknown until enough rows were measured
        self._appends_since_measure = 0
        # The current "outbox full" episode, if any.
        self._full_since: float | None = None
        self._full_dropped = 0
        # Drops counted while the disk was too full to store the count: saved with the next write.
        self._unsaved_dropped = 0
        self._reserve = 2 * self.wal_limit + _RESERVE_MARGIN
        self._low_disk = False  # free space was below the reserve at the last append
        self._stuck = False  # the disk was too full for SQLite to write at all

    @classmethod
    async def open(
        cls,
        path: Path,
        max_rows: int = 1_000_000,
        max_bytes: int | None = None,
        policy: str = "drop_oldest",
        clock: Callable[[], float] = time.time,
    ) -> Outbox:
        """Open (or create) the outbox at `path`; a corrupt file is moved aside, not fatal.

        Raises OutboxError when the file cannot be used at all (missing directory, no
        permission, locked, or written by a newer schema).
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        lock = _lock(path)
        try:
            db = await _connect_when_there_is_room(path, clock)
        except BaseException:
            os.close(lock)
            raise
        try:
            count, dropped, last_seq, page_size = next(iter(await db.execute_fetchall(_STATE)))
            state = (count, dropped, last_seq or 0, page_size)
            outbox = cls(
                db, path, state=state, lock=lock, max_rows=max_rows, max_bytes=max_bytes, policy=policy,
                clock=clock,
            )  # fmt: skip
            # Checkpoint at the WAL's limit, and truncate it back to the limit after a burst.
            await db.execute(f"PRAGMA wal_autocheckpoint = {max(outbox.wal_limit // page_size, 1)}")
            await db.execute(f"PRAGMA journal_size_limit = {outbox.wal_limit}")
            if max_bytes is not None:
                await outbox._measure(count)
        except BaseException as exc:
            await db.close()
            os.close(lock)
            if isinstance(exc, sqlite3.Error):
                raise OutboxError(f"outbox {path}: {exc}") from exc
            raise
        return outbox

    async def append(self, readings: Sequence[Reading]) -> None:
        """Store readings in one transaction; when this returns they survive a process kill.

        When the outbox is full the policy applies: drop_oldest deletes the oldest rows (even
        leased ones: their ack then deletes nothing), drop_newest refuses the readings beyond
        the cap. Every drop is counted in `stats().dropped` and logged once per episode.
        """
        if not readings:
            return
        rows: list[_Row] = [
            (r.device, r.tag, None if r.value is None else _encode(r.value), _QUALITY_CODE[r.quality],
             r.status, r.source_time, r.read_time, r.unit)
            for r in readings
        ]  # fmt: skip
        # Shielded: a caller cancelled mid-commit must not leave the transaction done but the
        # in-memory counters that mirror it stale; close() waits for it through the lock.
        await asyncio.shield(self._append(rows))

    async def _append(self, rows: list[_Row]) -> None:
        async with self._lock:
            try:
                stored, evicted, refused, disk_full = await self._write(
                    "append", lambda retry: self._insert(rows, disk_full=retry)
                )
            except _DiskFull as exc:
                # Nothing of this batch could be written, even after a checkpoint: refused,
                # counted, and the pollers go on (the next append may find room).
                self._dropped += len(rows)
                self._unsaved_dropped += len(rows)
                self._note_dropped(len(rows), self._disk_reason())
                if not self._stuck:
                    self._stuck = True
                    log.error("outbox %s: SQLite cannot write (%s): new readings are refused and counted "
                              "until the disk has room", self.path, exc)  # fmt: skip
                return
            # Committed. One writer and AUTOINCREMENT: the new rows took the next `stored` seqs.
            self._count += stored - evicted
            self._last_seq += stored
            self._dropped += refused + evicted
            if stored:
                self._ready.set()
            if refused or evicted:
                self._note_dropped(refused + evicted, self._disk_reason() if disk_full else None)
            elif self._full_since is not None and await self._has_room():
                self._end_episode()

    async def _insert(self, rows: list[_Row], *, disk_full: bool) -> tuple[int, int, int, bool]:
        """Inside a transaction: insert `rows` under the caps, by the policy. Returns the rows
        stored, evicted and refused, and whether the disk counted as full. `disk_full` says so
        up front (a retry after SQLite found the disk full)."""
        refused = evicted = 0
        if disk_full:
            self._low_disk = True  # (a retry: SQLite found the disk full)
        else:
            disk_full = not self._disk_has_room(len(rows))
        if self._policy == "drop_newest":
            room = max(self._max_rows - self._count, 0)
            if self._max_bytes is not None and await self._used_bytes(self._count) > self._max_bytes:
                room = 0
            refused = max(len(rows) - room, 0)
            rows = rows[:room]
        if disk_full:
            stored, evicted = await self._fit(rows)
            refused += len(rows) - stored
            rows = rows[:stored]
        elif rows:
            await self._db.executemany(_INSERT, rows)
        if self._policy == "drop_oldest":
            evicted += await self._evict(self._count - evicted + len(rows))
        if refused or evicted:
            await self._db.execute(_ADD_DROPPED, (refused + evicted,))
        return len(rows), evicted, refused, disk_full

    async def _fit(self, rows: list[_Row]) -> tuple[int, int]:
        """Insert what of `rows` fits without growing the database (a disk below its
        reserve): into its free pages and the room left in others. Under drop_oldest, the
        oldest rows make room first, one for one, and the newest of `rows` are kept; under
        drop_newest, the oldest of `rows`. Returns the rows stored and evicted."""
        db = self._db
        if not db.in_transaction:
            # sqlite3 opens its implicit transaction at the first INSERT, not at a SAVEPOINT, and
            # a savepoint outside a transaction commits when released.
            await db.execute("BEGIN")
        pages = await self._page_count()
        if await self._fits(rows, pages, keep=True):
            return len(rows), 0
        evicted = 0
        if self._policy == "drop_oldest" and self._count:
            evicted = await self._delete_oldest(len(rows))
            if await self._fits(rows, pages, keep=True):
                return len(rows), evicted
        # The most rows that fit, found by halving (a dozen tries for thousands of rows).
        newest = self._policy == "drop_oldest"
        fits, fails = 0, len(rows)
        while fails - fits > 1:
            n = (fits + fails) // 2
            if await self._fits(rows[-n:] if newest else rows[:n], pages, keep=False):
                fits = n
            else:
                fails = n
        if fits:
            await db.executemany(_INSERT, rows[-fits:] if newest else rows[:fits])
        return fits, evicted

    async def _fits(self, rows: list[_Row], pages: int, *, keep: bool) -> bool:
        """Whether inserting `rows` leaves the database at most `pages` long; the insert is
        kept when it does and `keep`, else undone (its seqs too: sqlite_sequence rolls back)."""
        db = self._db
        await db.execute("SAVEPOINT fit")
        await db.executemany(_INSERT, rows)
        fits = await self._page_count() <= pages
        if not (fits and keep):
            await db.execute("ROLLBACK TO fit")
        await db.execute("RELEASE fit")
        return fits

    async def _page_count(self) -> int:
        (pages,) = next(iter(await self._db.execute_fetchall("PRAGMA page_count")))
        return int(pages)

    async def _write(self, what: str, work: Callable[[bool], Awaitable[_T]]) -> _T:
        """Run `work` in one transaction, with the drop count an earlier full disk kept from
        being saved. If SQLite finds the disk full: checkpoint (a WAL that can start over
        again is room), then once more with `work(True)`. Raises _DiskFull when that fails too."""
        for retry in (False, True):
            try:
                async with self._transaction(what):
                    if self._unsaved_dropped:
                        await self._db.execute(_ADD_DROPPED, (self._unsaved_dropped,))
                    result = await work(retry)
            except _DiskFull:
                if retry:
                    raise
                await self._checkpoint()
                continue
            self._unsaved_dropped = 0
            if self._stuck:
                self._stuck = False
                log.info("outbox %s: writing again", self.path)
            if self._low_disk:
                # The WAL grows by every write until a checkpoint lets it start over: on a disk
                # this full, start it over after each one, so it takes no more than it has.
                await self._checkpoint()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _evict(self, count: int) -> int:
        """drop_oldest, inside the append's transaction: delete the oldest rows until under both caps."""
        evicted = 0
        if count > self._max_rows:
            evicted = await self._delete_oldest(count - self._max_rows)
        if self._max_bytes is None:
            return evicted
        used = await self._used_bytes(count - evicted)
        # Deleted rows do not free pages one for one (partly filled pages): delete an estimate,
        # re-measure, repeat a few times; if that is not enough the next append goes on.
        for _ in range(8):
            left = count - evicted
            if used <= self._max_bytes or left <= 1:
                break
            evicted += await self._delete_oldest(
                min(left - 1, int((used - self._max_bytes) * left / used) + 1)
            )
            used = await self._measure(count - evicted)
        return evicted

    async def _delete_oldest(self, n: int) -> int:
        return (await self._db.execute(_DROP_OLDEST, (n,))).rowcount

    async def _used_bytes(self, count: int) -> int:
        """Bytes the rows use: an estimate far below max_bytes (saves a query per append), else measured."""
        assert self._max_bytes is not None
        self._appends_since_measure += 1
        if self._row_bytes is not None and self._appends_since_measure < _MEASURE_EVERY:
            estimate = self._used + (count - self._measured_count) * self._row_bytes
            if estimate < self._max_bytes * _MARGIN:
                return int(estimate)
        return await self._measure(count)

    async def _measure(self, count: int) -> int:
        (pages,) = next(iter(await self._db.execute_fetchall(_USED_PAGES)))
        used: int = pages * self._page_size
        self._used, self._measured_count, self._appends_since_measure = used, count, 0
        if count >= 100:  # below that the fixed pages (schema, meta) skew the ratio too much
            self._row_bytes = used / count
        return used

    @property
    def last_seq(self) -> int:
        """The seq of the newest committed row (0 before the first)."""
        return self._last_seq

    @property
    def replaying(self) -> bool:
        """Whether a replay's history lane still has rows to lease."""
        return self._split is not None

    def begin_replay(self) -> int:
        """Split the rows in two lanes and return the boundary seq: rows committed until now
        (and not yet leased) are history, leased by `lease(n)`; later rows are live, leased
        by `lease(n, live=True)`. When the history lane runs dry the lanes merge back into
        one FIFO. A replay begun during another extends the history lane to now.

        Call it with no batch leased (between batches): a leased batch that is released
        afterwards is leased again in whichever lane its rows fall."""
        boundary = self._last_seq
        # With no batch leased, every live row up to the live cursor has been acked (deleted):
        # extending the history lane over them leases nothing twice.
        if self._cursor < boundary:
            self._split = self._live_cursor = boundary
        else:
            self._split = None
        return boundary

    async def lease(self, n: int, *, live: bool = False) -> Batch:
        """The oldest `n` rows not currently leased, in seq order; may be empty. One consumer.

        During a replay, the oldest of the history lane, or with `live=True` of the live
        lane; otherwise `live` makes no difference."""
        if n < 1:
            raise ValueError("lease at least one row")  # SQLite reads LIMIT -1 as "no limit"
        async with self._lock:
            split = self._split
            live_lane = split is not None and live
            try:
                if split is None:
                    rows = await self._db.execute_fetchall(_LEASE, (self._cursor, n))
                elif live_lane:
                    rows = await self._db.execute_fetchall(_LEASE, (self._live_cursor, n))
                else:
                    rows = await self._db.execute_fetchall(_LEASE_UPTO, (self._cursor, split, n))
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot lease: {exc}") from exc
            entries = _entries(rows)
            if live_lane:
                if entries:
                    self._live_cursor = entries[-1].seq
                return Batch(entries)
            if entries:
                self._cursor = entries[-1].seq
            if split is not None and len(entries) < n:
                # History is all leased: one FIFO again, continuing after the live lane.
                self._split = None
                self._cursor = max(self._cursor, self._live_cursor)
            if self._split is None and (len(entries) < n or self._cursor >= self._last_seq):
                self._ready.clear()
            return Batch(entries)

    async def newest(self) -> list[Reading]:
        """The newest stored reading of each (device, tag), oldest first: what a publisher that
        announces current values (Sparkplug births) knows after a restart. Reads every row."""
        async with self._lock:
            try:
                rows = await self._db.execute_fetchall(_NEWEST)
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read: {exc}") from exc
        return [entry.reading for entry in _entries(rows)]

    async def wait(self) -> None:
        """Return when there are unleased rows (at once if there are)."""
        await self._ready.wait()

    async def ack(self, batch: Batch, *, refused: int = 0) -> None:
        """Delete the batch's rows: the broker has confirmed them, or refused `refused` of
        them for good (those are counted as dropped).

        On a full disk the delete is tried again until it goes through (publishing waits
        meanwhile: nothing it sends could be acked either); cancelled meanwhile, the rows stay
        and are published again after a restart (at-least-once)."""
        if not batch.entries:
            return
        first, last = batch.entries[0].seq, batch.last_seq
        retry = Backoff(initial=0.1, cap=2.0)  # between tries while the disk is full
        while not await asyncio.shield(self._ack(first, last, refused)):
            if retry.attempts == 0:
                log.warning("outbox %s: %s: published readings are deleted once there is room",
                            self.path, self._disk_reason())  # fmt: skip
            await asyncio.sleep(retry.next())
        if retry.attempts:
            log.info("outbox %s: deleting published readings again", self.path)

    async def _ack(self, first: int, last: int, refused: int) -> bool:
        """One try at the delete; False if the disk was too full for it."""
        async with self._lock:

            async def delete(retry: bool) -> int:
                # The batch is a seq range: one consumer leases in order. Rows in it that
                # drop_oldest already deleted are simply not there any more.
                cursor = await self._db.execute(_ACK, (first, last))
                if refused:
                    await self._db.execute(_ADD_DROPPED, (refused,))
                return cursor.rowcount

            try:
                deleted = await self._write("ack", delete)
            except _DiskFull:
                return False
            self._count -= deleted
            self._dropped += refused
            if self._full_since is not None and await self._has_room():
                self._end_episode()
            return True

    async def release(self, batch: Batch) -> None:
        """Un-lease the batch: its rows, and any leased after them, are leased again, first."""
        if batch.entries:
            async with self._lock:
                first = batch.entries[0].seq
                if self._split is not None and first > self._split:
                    self._live_cursor = min(self._live_cursor, first - 1)
                else:
                    self._cursor = min(self._cursor, first - 1)
                self._ready.set()

    async def stats(self) -> OutboxStats:
        """Depth, age of the oldest row, total drops, file size and the last seq handed out."""
        async with self._lock:
            try:
                oldest, pages = next(iter(await self._db.execute_fetchall(_OLDEST_AND_PAGES)))
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read stats: {exc}") from exc
        age = None if oldest is None else self._clock() - oldest
        size = pages * self._page_size + _size(self._wal)
        return OutboxStats(self._count, age, self._dropped, size, self._last_seq)

    async def close(self) -> None:
        """Wait for a write in progress, report an unfinished full episode, close the file.
        Once: a second call does nothing."""
        async with self._lock:
            if self._lock_fd < 0:
                return
            if self._full_since is not None:
                self._end_episode()
            if self._unsaved_dropped:
                with contextlib.suppress(_DiskFull, OutboxError):
                    await self._write("save the drop count", _nothing)
                if self._unsaved_dropped:
                    log.warning("outbox %s: %d dropped readings could not be counted in the file (disk "
                                "full); `outbox stats` will show that many fewer", self.path,
                                self._unsaved_dropped)  # fmt: skip
            try:
                await self._db.close()
            finally:
                os.close(self._lock_fd)
                self._lock_fd = -1

    @contextlib.asynccontextmanager
    async def _transaction(self, what: str) -> AsyncIterator[None]:
        # sqlite3 opens the transaction implicitly at the first INSERT/DELETE/UPDATE.
        try:
            yield
            await self._db.commit()
        except BaseException as exc:
            # Whatever failed, leave no half-done transaction for the next commit to pick up.
            await self._db.rollback()
            if isinstance(exc, sqlite3.Error):
                if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL:
                    raise _DiskFull(str(exc)) from exc
                raise OutboxError(f"outbox {self.path}: cannot {what}: {exc}") from exc
            raise

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database, so that the next write can start it over again."""
        try:
            await self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the disk is still full: the retry will tell
            log.debug("outbox %s: checkpoint failed: %s", self.path, exc)

    def _free(self) -> int:
        """Free bytes on the outbox's file system, for this (unprivileged) process."""
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def _disk_has_room(self, rows: int) -> bool:
        """Whether the disk has room for `rows` more rows beyond its reserve (one statfs(2)).
        If not, they must fit in the pages the database already has (`_fit`)."""
        need = int(rows * (self._row_bytes or _ROW_GUESS) * 1.5)
        self._low_disk = self._free() < self._reserve + need
        return not self._low_disk

    def _disk_reason(self) -> str:
        return f"the disk is full ({self._free() // 1024} kB free, {self._reserve // 1024} kB kept free)"

    async def _has_room(self) -> bool:
        if self._count > self._max_rows * _LOW_WATER:
            return False
        if self._free() < self._reserve:
            return False
        return self._max_bytes is None or await self._measure(self._count) <= self._max_bytes * _LOW_WATER

    def _note_dropped(self, n: int, reason: str | None = None) -> None:
        """Count `n` more dropped readings in this episode; the first drop logs why."""
        self._full_dropped += n
        if self._full_since is None:
            self._full_since = self._clock()
            what = "dropping the oldest readings" if self._policy == "drop_oldest" else "refusing new ones"
            if reason is None:
                log.warning("outbox %s is full: %s until it has room (policy %s)", self.path, what,
                            self._policy)  # fmt: skip
            else:
                log.warning("outbox %s: %s: %s until there is room (policy %s)", self.path, reason, what,
                            self._policy)  # fmt: skip

    def _end_episode(self) -> None:
        assert self._full_since is not None
        log.warning(
            "outbox full: dropped %d readings (policy %s) since %s",
            self._full_dropped, self._policy, iso_millis(self._full_since),
        )  # fmt: skip
        self._full_since, self._full_dropped = None, 0


async def _nothing(retry: bool) -> None:
    """A write with no work of its own (it saves what `_write` carries: the drop count)."""


def _wal_limit(max_bytes: int | None) -> int:
    if max_bytes is None:
        return _WAL_LIMIT
    return max(_WAL_MIN, min(_WAL_LIMIT, max_bytes // 8))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lock(path: Path) -> int:
    """Take the exclusive lock of the outbox at `path` (the file `<path>.lock`, which says the
    holder's pid); its fd. The lock goes with the process, so a killed gateway leaves none."""
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutboxError(f"outbox {path}: cannot create its directory: {exc.strerror or exc}") from exc
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutboxError(
            f"outbox {path}: cannot open its lock file {lock_path}: {exc.strerror or exc}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise OutboxLocked(str(path), holder) from None
    except OSError as exc:
        os.close(fd)
        raise OutboxError(f"outbox {path}: cannot lock {lock_path}: {exc.strerror or exc}") from exc
    # Only for the message another instance prints: a full disk may refuse it, harmlessly.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


async def _connect_when_there_is_room(path: Path, clock: Callable[[], float]) -> aiosqlite.Connection:
    """`_connect`, waiting while it fails on a full disk: exiting would only make systemd
    restart the gateway into the same failure, every few seconds, for as long as it lasts."""
    backoff = Backoff(initial=1.0, cap=10.0)
    while True:
        try:
            db = await _connect(path, clock)
        except OutboxError as exc:
            st = os.statvfs(path.parent)
            free = st.f_bavail * st.f_frsize
            # Only a full disk is worth waiting for (a newer schema, say, is not).
            cause = exc.__cause__
            code = cause.sqlite_errorcode & 0xFF if isinstance(cause, sqlite3.Error) else None
            if free >= _OPEN_ROOM or code not in _FULL_DISK_CODES:
                raise
            if backoff.attempts == 0:
                log.error("outbox %s cannot be opened: the disk is full (%d kB free): %s; waiting for room",
                          path, free // 1024, exc)  # fmt: skip
            await asyncio.sleep(backoff.next())
            continue
        if backoff.attempts:
            log.info("outbox %s opened: the disk has room again", path)
        return db


def _entries(rows: Iterable[Sequence[Any]]) -> list[Entry]:
    """Rows of `_COLUMNS` as entries (one comprehension: this runs for every leased reading)."""
    return [
        Entry(seq, Reading(device, tag, None if value is None else _decode(value),
                           _QUALITIES[quality], status, source_time, read_time, unit))
        for seq, device, tag, value, quality, status, source_time, read_time, unit in rows
    ]  # fmt: skip


async def _connect(path: Path, clock: Callable[[], float]) -> aiosqlite.Connection:
    """Open and check the file; a corrupt one is moved aside and replaced, once."""
    try:
        return await _prepare(path)
    except _Corrupt as exc:
        damage = str(exc)
    except sqlite3.Error as exc:
        # Locked, no permission: not corruption; moving the file would not help.
        raise OutboxError(f"outbox {path}: {exc}") from exc
    floor = _salvage_last_seq(path)
    if floor is None:
        # Nothing readable: continue from the clock in microseconds, which stays above any
        # seq the old file can have reached (that would take 10^6 readings/s since 1970).
        floor = time.time_ns() // 1000
    # The fresh database is made beside the damaged one, seeded and committed, before anything
    # is moved: when that fails (a full disk), the next try starts from the same damaged file.
    # An empty file left in its place would open fine, and start seq at 1 again.
    fresh = path.with_name(f"{path.name}.fresh")
    _discard(fresh)  # left by an earlier try
    try:
        db = await _prepare(fresh)
        try:
            await db.execute(_SEED_SEQ, (floor,))
            await db.commit()
        finally:
            await db.close()
    except (_Corrupt, sqlite3.Error) as exc:
        raise OutboxError(f"outbox {path}: cannot start a fresh database: {exc}") from exc
    moved = _move_aside(path, clock())
    try:
        _rename(fresh, path)
        db = await _prepare(path)
    except (OSError, _Corrupt, sqlite3.Error) as exc:
        raise OutboxError(f"outbox {path}: cannot start a fresh database: {exc}") from exc
    log.error(
        "outbox %s is corrupt (%s): moved it to %s and started a fresh one; seq continues after %d",
        path, damage, moved, floor,
    )  # fmt: skip
    return db


_SIDE_FILES = ("", "-wal", "-shm")  # a database file, its WAL and its shared-memory index


def _discard(path: Path) -> None:
    for suffix in _SIDE_FILES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _rename(source: Path, target: Path) -> None:
    """Rename a database and the -wal and -shm it has (a WAL stays if its close could not
    checkpoint)."""
    for suffix in _SIDE_FILES:
        if Path(f"{source}{suffix}").exists():
            Path(f"{source}{suffix}").rename(f"{target}{suffix}")


def _salvage_last_seq(path: Path) -> int | None:
    """The highest seq a damaged file still shows, or None.

    A fresh database must not start seq again at 1: consumers detect gaps and duplicates
    by seq, and one that drops "duplicates" would throw away every new reading."""
    found: list[int] = []
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            for sql in _LAST_SEQ_SOURCES:  # each may survive where the other's pages are damaged
                with contextlib.suppress(sqlite3.Error):
                    (n,) = db.execute(sql).fetchone()
                    if isinstance(n, int):
                        found.append(n)
    except sqlite3.Error as exc:
        log.debug("outbox %s: no seq readable: %s", path, exc)
    return max(found) if found else None


async def _prepare(path: Path) -> aiosqlite.Connection:
    # Fail here, not inside aiosqlite, when the file cannot even be opened (missing directory,
    # permissions): a failed aiosqlite.connect leaves its worker thread to report to an event
    # loop that may already be closed. Opening a SQLite file is one open(2), cheap to do twice.
    sqlite3.connect(path).close()
    db = await aiosqlite.connect(path)
    try:
        # quick_check reads every page, O(file size): 0.2 s for a million rows (49 MB, warm
        # cache), more from a cold SD card; paid once at start, it catches a damaged file here.
        (check,) = next(iter(await db.execute_fetchall("PRAGMA quick_check(1)")))
        if check != "ok":
            raise _Corrupt(f"quick_check: {check}")
        (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
        if version > SCHEMA_VERSION:
            raise OutboxError(f"outbox {path}: schema version {version} is newer than this gateway's")
        await db.execute("PRAGMA journal_mode = WAL")
        # synchronous=NORMAL in WAL mode: a commit is in the OS page cache when append returns,
        # so it survives a process crash or kill -9; only an OS crash or power cut can lose the
        # last transactions (the file stays consistent). FULL would fsync every append, which
        # the 20,000 readings/s target cannot afford on SD cards; we keep NORMAL on purpose.
        await db.execute("PRAGMA synchronous = NORMAL")
        if version < SCHEMA_VERSION:
            # Only a new file: the schema writes, and an existing outbox must open on a full disk.
            await db.executescript(_SCHEMA)
    except sqlite3.DatabaseError as exc:
        await db.close()
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            raise _Corrupt(str(exc)) from exc
        raise
    except BaseException:
        await db.close()
        raise
    return db


def _move_aside(path: Path, now: float) -> Path:
    """Rename the file to <name>.corrupt-<UTC time>, keeping its -wal/-shm beside it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    try:
        # WAL and shm first: left behind, they would be replayed into the fresh database.
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
    except OSError as exc:
        raise OutboxError(f"outbox {path} is corrupt and cannot be moved aside: {exc}") from exc
    return target


def read_stats(path: Path) -> OutboxStats:
    """Stats of an outbox file, read-only, without a running gateway (`millwright outbox stats`).

    Never creates the file; raises OutboxError when it is missing or not an outbox.
    """
    if not path.is_file():
        raise OutboxError(f"{path}: no such outbox file")
    try:
        # mode=ro: safe beside a running gateway (a WAL reader does not block its writer). With
        # no gateway running, SQLite leaves an empty -wal and a -shm beside the file; harmless.
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            count, dropped, last_seq, page_size = db.execute(_STATE).fetchone()
            oldest, pages = db.execute(_OLDEST_AND_PAGES).fetchone()
    except sqlite3.Error as exc:
        raise OutboxError(f"{path}: cannot read the outbox: {exc}") from exc
    age = None if oldest is None else time.time() - oldest
    return OutboxStats(count, age, dropped, pages * page_size + _size(Path(f"{path}-wal")), last_seq or 0)
