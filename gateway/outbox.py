"""The outbox: a durable, bounded FIFO of readings in SQLite (store and forward).

Pollers append; each output leases the oldest rows past its own position, publishes them,
and acks them once its broker has confirmed (which moves its position), or releases them to
be leased again. A row is deleted once every output's position has passed it. A reading is
safe from the moment `append` returns: it survives a broker outage and `kill -9`.

Delivery is at-least-once: positions are saved with each ack, leases live in memory only, so
after a restart each output leases again from its last acked row. `seq` is an AUTOINCREMENT
row id, never reused, not even after every row was deleted, so a consumer can detect gaps and
duplicates. An output added to the config starts at the oldest row in the file; one removed
from it gives up its position at open, so that rows do not pile up for it.

For a Sparkplug replay an output can split its rows in two lanes (`begin_replay`): the rows
committed so far (history) and those committed later (live), leased separately so that a
long backlog does not hold up live values.

Device events (`gateway.model.state_event`, `datatype_event`) come in with the readings
but take no row and no seq, so a consumer's gap check stays true. The newest of each is
written to the `latest` table in the append's transaction (births read it through `newest`,
also after `kill -9`), and an output that takes events (it began a replay: its births
folded in what came before) gets each one in a live batch, placed after the reading it
followed (`Batch.events`). They wait in memory (MAX_EVENTS at most) until every such output
acked them: what they say lasts in `latest`, so an output that falls further behind than
that is told to announce the state again (`Batch.resync`) rather than miss an outage.

Each output has one batch out at a time, in either lane, acked (or released) before it leases
the next, as the forwarding loops do: its position is then simply the end of its last acked
batch, and the lanes can merge while a history batch is out.

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
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.backoff import Backoff
from gateway.errors import OutboxError, OutboxLocked
from gateway.model import EVENT, Batch, Entry, Event, Quality, Reading, iso_millis

log = logging.getLogger(__name__)

POLICIES = ("drop_oldest", "drop_newest")
# Device events kept for the outputs that take them (see Outbox._events): a few per device
# outage, so this many is hours of a flapping plant; beyond it, an output that lags resyncs.
MAX_EVENTS = 10_000
SCHEMA_VERSION = 2  # 2: one position per output (table output); 1 had a single consumer
DEFAULT_OUTPUT = "mqtt"  # the output of a config with the `mqtt:` shorthand

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
-- position: every row up to it has been delivered to the output (or given up, counted in dropped)
CREATE TABLE IF NOT EXISTS output (
    name TEXT PRIMARY KEY, position INTEGER NOT NULL, dropped INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- The newest reading of each tag as of meta 'latest_seq' (saved at a clean stop; published
-- rows are deleted, so the reading table alone would forget the values that went out).
CREATE TABLE IF NOT EXISTS latest (
    device TEXT NOT NULL, tag TEXT NOT NULL, value TEXT, quality INTEGER NOT NULL,
    status INTEGER NOT NULL, source_time REAL, read_time REAL NOT NULL, unit TEXT,
    PRIMARY KEY (device, tag)
) WITHOUT ROWID;
-- 'clean' is 1 after a clean stop (close), 0 while a gateway runs: a file found at 0 was not
-- closed (kill -9, power cut) and is checked at open.
INSERT OR IGNORE INTO meta VALUES ('clean', 0);
INSERT OR IGNORE INTO meta VALUES ('latest_seq', 0);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_INSERT = (
    "INSERT INTO reading (device, tag, value, quality, status, source_time, read_time, unit)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = "SELECT seq, device, tag, value, quality, status, source_time, read_time, unit FROM reading"
_LEASE = f"{_COLUMNS} WHERE seq > ? ORDER BY seq LIMIT ?"
_LEASE_UPTO = f"{_COLUMNS} WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
_LATEST_COLUMNS = "device, tag, value, quality, status, source_time, read_time, unit"
# The newest row of each tag among those after a seq: what the snapshot has not seen.
_FOLD_LATEST = (
    f"INSERT OR REPLACE INTO latest SELECT {_LATEST_COLUMNS} FROM reading"
    " WHERE seq IN (SELECT max(seq) FROM reading WHERE seq > ? GROUP BY device, tag)"
)
_SAVE_LATEST = f"INSERT OR REPLACE INTO latest ({_LATEST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_READ_LATEST = f"SELECT 0, {_LATEST_COLUMNS} FROM latest ORDER BY read_time"
_META = "SELECT value FROM meta WHERE key = ?"
_SET_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"
_DELETE_UPTO = "DELETE FROM reading WHERE seq > ? AND seq <= ?"
_NTH_OLDEST = "SELECT max(seq) FROM (SELECT seq FROM reading ORDER BY seq LIMIT ?)"
_COUNT_BETWEEN = "SELECT count(*) FROM reading WHERE seq > ? AND seq <= ?"
_COUNT_AFTER = "SELECT count(*) FROM reading WHERE seq > ?"
_ADD_DROPPED = "UPDATE meta SET value = value + ? WHERE key = 'dropped'"
_OUTPUTS = "SELECT name, position, dropped FROM output"
_SAVE_POSITION = "UPDATE output SET position = ?, dropped = dropped + ? WHERE name = ?"
_ADD_OUTPUT_DROPPED = "UPDATE output SET dropped = dropped + ? WHERE name = ?"
_ADD_OUTPUT = "INSERT INTO output (name, position) VALUES (?, ?)"
_REMOVE_OUTPUT = "DELETE FROM output WHERE name = ?"
_OLDEST_SEQ = "SELECT min(seq) FROM reading"
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
class OutputStats:
    """One output's place in the outbox: the rows it has still to deliver (`depth`), the
    readings it will never deliver (`dropped`: evicted before it sent them, or refused by its
    broker), and the seq up to which it has delivered everything (`position`)."""

    depth: int
    dropped: int
    position: int


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox. `depth` counts the rows that at least one output still has to
    deliver; `dropped` is the readings refused before they were stored plus every output's
    drops; `bytes` is what its files take: the database (page count x page size) and its WAL."""

    depth: int
    oldest_age: float | None
    dropped: int
    bytes: int
    last_seq: int
    outputs: Mapping[str, OutputStats] = field(default_factory=dict)


class _Cursor:
    """One output's place in the outbox. `position` is what the file has (every row up to it
    was acked); the rest lives in memory and starts again from `position` after a restart."""

    __slots__ = ("cursor", "done", "dropped", "events_from", "events_lost", "live_acked", "live_cursor",
                 "lost", "name", "position", "ready", "split")  # fmt: skip

    def __init__(self, name: str, position: int, dropped: int) -> None:
        self.name = name
        self.position = position
        self.dropped = dropped
        self.cursor = position  # leased up to here (the history lane during a replay)
        # During a replay (see begin_replay): the last history row; the live lane's lease and
        # ack marks. Live rows acked during a replay wait in `done` (as seq ranges (lo, hi]) for
        # the history before them: the position can only pass them after it.
        self.split: int | None = None
        self.live_cursor = self.live_acked = 0
        self.done: list[tuple[int, int]] = []
        # Rows up to this seq were evicted while leased: if that batch is released rather than
        # acked, its evicted rows are lost to this output (counted then, not at eviction).
        self.lost = 0
        self.ready = asyncio.Event()  # set while there may be unleased rows (or events)
        # Device events: None if this output takes none (it never began a replay); else the
        # id of the last event it has acked. `events_lost`: some it had not were forgotten.
        self.events_from: int | None = None
        self.events_lost = False

    def unleased(self, upto: int) -> list[tuple[int, int]]:
        """The seq ranges (lo, hi] up to `upto` that this output has neither leased nor acked."""
        if self.split is None:
            ranges = [(self.cursor, upto)]
        else:
            ranges = [(self.cursor, min(self.split, upto)), (self.live_cursor, upto)]
        out: list[tuple[int, int]] = []
        for start, hi in ranges:
            lo = start
            for d_lo, d_hi in self.done:  # (ranges already acked, ascending)
                if d_lo >= hi:
                    break
                if d_hi > lo:
                    if d_lo > lo:
                        out.append((lo, d_lo))
                    lo = max(lo, d_hi)
            if hi > lo:
                out.append((lo, hi))
        return out


class _Corrupt(Exception):
    """The file is damaged: not a database, malformed, or quick_check failed."""


class _DiskFull(Exception):
    """SQLite could not write: the disk is full (SQLITE_FULL). The transaction was rolled back."""


class Outbox:
    """Durable bounded FIFO of readings, for many appenders and one consumer per output."""

    def __init__(
        self, db: aiosqlite.Connection, path: Path, *, state: tuple[int, int, int, int], lock: int,
        outputs: Mapping[str, tuple[int, int]], max_rows: int, max_bytes: int | None, policy: str,
        clock: Callable[[], float],
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
        # Each output's place (name -> (position, dropped) as the file has them).
        self._outputs = {name: _Cursor(name, *saved) for name, saved in outputs.items()}
        for out in self._outputs.values():
            if out.position < self._last_seq:
                out.ready.set()
        # Rows up to the lowest position have been deleted (every output has them).
        self._floor = min(out.position for out in self._outputs.values())
        # Per output, readings the transaction under way gives up (see _delete_oldest).
        self._losing: dict[str, int] = {}
        self._evicted_upto = 0  # and the last seq it evicted
        self._after_commit: list[Callable[[], None]] = []  # in-memory changes that await its commit
        # The newest reading of each tag appended since open (saved into `latest` at close).
        self._newest: dict[tuple[str, str], Reading] = {}
        # Device events not yet acked by every output that takes them, oldest first, and the
        # id of the last one. In memory only: what they say lasts in `latest` (written with
        # them), and an output announces that state at every birth before it takes events.
        self._events: deque[Event] = deque()
        self._event_id = 0
        # SQLite failed other than for a full disk: the file is not marked clean at close, so
        # the next open checks it whole.
        self._damaged = False
        # File-size estimate between measurements (see _used_bytes).
        self._used = 0
        self._measured_count = 0
        self._row_bytes: float | None = None  # unknown until enough rows were measured
        self._appends_since_measure = 0
        # The current "outbox full" episode, if any.
        self._full_since: float | None = None
        self._full_dropped = 0
        self._episode_losses: dict[str, int] = {}  # per output, in this episode (several outputs)
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
        *,
        outputs: Sequence[str] = (DEFAULT_OUTPUT,),
    ) -> Outbox:
        """Open (or create) the outbox at `path` for `outputs` (their names); a corrupt file is
        moved aside, not fatal. An output the file does not know yet starts at its oldest row;
        one it knows that is not in `outputs` is removed (logged).

        Raises OutboxError when the file cannot be used at all (missing directory, no
        permission, locked, or written by a newer schema).
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if not outputs or len(set(outputs)) != len(outputs):
            raise ValueError("outputs must be one or more distinct names")
        lock = _lock(path)
        try:
            db, positions, (count, dropped, last_seq, page_size) = await _open_for(path, clock, outputs)
        except BaseException:
            os.close(lock)
            raise
        try:
            state = (count, dropped, last_seq or 0, page_size)
            outbox = cls(
                db, path, state=state, lock=lock, outputs=positions, max_rows=max_rows,
                max_bytes=max_bytes, policy=policy, clock=clock,
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

        When the outbox is full the policy applies: drop_oldest deletes the oldest rows (each
        output loses those it has not leased; a leased one it still delivers), drop_newest
        refuses the readings beyond the cap. Every drop is counted in `stats().dropped` (and
        the output's) and logged once per episode.
        """
        if not readings:
            return
        # Noted before the commit: a Sparkplug birth meanwhile announces these values (see
        # SparkplugNode._birth).
        newest, events = self._newest, False
        for r in readings:
            newest[r.device, r.tag] = r
            if r.tag[0] == EVENT:  # (tag names are never empty)
                events = True
        if not events:
            # Shielded: a caller cancelled mid-commit must not leave the transaction done but the
            # in-memory counters that mirror it stale; close() waits for it through the lock.
            await asyncio.shield(self._append(_to_rows(readings)))
            return
        # Device events take no row: each keeps its place as the number of readings before it.
        kept: list[Reading] = []
        placed: list[tuple[int, Reading]] = []
        for r in readings:
            if r.tag[0] == EVENT:
                placed.append((len(kept), r))
            else:
                kept.append(r)
        await asyncio.shield(self._append(_to_rows(kept), placed))

    async def _append(self, rows: list[_Row], events: list[tuple[int, Reading]] | None = None) -> None:
        async with self._lock:
            first = self._last_seq
            try:
                stored, evicted, refused, disk_full = await self._write(
                    "append", lambda retry: self._insert_with(rows, events, disk_full=retry)
                )
            except _DiskFull as exc:
                # Nothing of this batch could be written, even after a checkpoint: refused,
                # counted, and the pollers go on (the next append may find room).
                self._dropped += len(rows)
                self._unsaved_dropped += len(rows)
                self._note_dropped(len(rows), self._disk_reason())
                if events:  # not in `latest` now, but told live (and `newest` has them)
                    self._queue_events(self._last_seq, 0, 0, events)
                if not self._stuck:
                    self._stuck = True
                    log.error("outbox %s: SQLite cannot write (%s): new readings are refused and counted "
                              "until the disk has room", self.path, exc)  # fmt: skip
                return
            # Committed. One writer and AUTOINCREMENT: the new rows took the next `stored` seqs.
            self._count += stored - evicted
            self._last_seq += stored
            lost = self._count_losses()
            self._dropped += refused
            if events:
                # Refused rows are the last of the append, except under drop_oldest on a full
                # disk, which keeps the newest (see _fit).
                self._queue_events(first, stored, refused if self._policy == "drop_oldest" else 0, events)
            if stored or events:
                for out in self._outputs.values():
                    if stored or out.events_from is not None:
                        out.ready.set()
            if refused or evicted:
                self._note_dropped(refused + lost, self._disk_reason() if disk_full else None)
            elif self._full_since is not None and await self._has_room():
                self._end_episode()

    async def _insert_with(
        self, rows: list[_Row], events: list[tuple[int, Reading]] | None, *, disk_full: bool
    ) -> tuple[int, int, int, bool]:
        """`_insert`, and the device events as the newest of their kind (births read them)."""
        result = await self._insert(rows, disk_full=disk_full) if rows else (0, 0, 0, disk_full)
        if events:
            await self._db.executemany(_SAVE_LATEST, _to_rows(r for _, r in events))
        return result

    def _queue_events(self, first: int, stored: int, skipped: int, events: list[tuple[int, Reading]]) -> None:
        """Committed: queue the events for the outputs that take them, each after the reading
        it followed: of the append's rows, the first `skipped` were refused, the next `stored`
        took the seqs after `first`. Bounded: past MAX_EVENTS the oldest are forgotten, and an
        output that had not taken them resyncs."""
        takers = [o for o in self._outputs.values() if o.events_from is not None]
        if not takers:
            return  # (nobody takes them: their state is in `latest`)
        queue = self._events
        for before, r in events:
            self._event_id += 1
            queue.append(Event(self._event_id, first + min(max(before - skipped, 0), stored), r))
        while len(queue) > MAX_EVENTS:
            gone = queue.popleft().id
            for out in takers:
                assert out.events_from is not None
                if out.events_from < gone and not out.events_lost:
                    out.events_lost = True
                    log.warning("outbox %s: output %s is %d device events behind: it announces the "
                                "devices' state again", self.path, out.name, MAX_EVENTS)  # fmt: skip

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
        if refused:
            await self._db.execute(_ADD_DROPPED, (refused,))
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
            self._losing.clear()  # (counted again if the work runs again)
            self._evicted_upto = 0
            self._after_commit.clear()
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
            for apply in self._after_commit:
                apply()
            self._after_commit.clear()
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
        """Evict the oldest `n` rows, inside a transaction. Each output loses those it had not
        leased yet (counted in `_losing`, saved in this transaction); those it has leased it
        still delivers, unless it releases them (see release)."""
        db = self._db
        ((last,),) = await db.execute_fetchall(_NTH_OLDEST, (n,))
        if last is None:
            return 0
        for out in self._outputs.values():
            lost = 0
            for lo, hi in out.unleased(last):
                ((k,),) = await db.execute_fetchall(_COUNT_BETWEEN, (lo, hi))
                lost += k
            if lost:
                self._losing[out.name] = self._losing.get(out.name, 0) + lost
                await db.execute(_ADD_OUTPUT_DROPPED, (lost, out.name))
                await db.execute(_ADD_DROPPED, (lost,))
        self._evicted_upto = last
        deleted: int = (await db.execute(_DELETE_UPTO, (self._floor, last))).rowcount
        return deleted

    def _count_losses(self) -> int:
        """After a commit: add the losses it saved to each output's count; their total."""
        if self._evicted_upto:
            for out in self._outputs.values():
                out.lost = max(out.lost, self._evicted_upto)
            self._evicted_upto = 0
        total = 0
        for name, n in self._losing.items():
            self._outputs[name].dropped += n
            total += n
            if len(self._outputs) > 1:
                # With several outputs, say which fell behind: once per output and episode.
                lost = self._episode_losses.get(name, 0)
                if not lost:
                    log.warning("outbox %s: output %s is so far behind that the cap evicts readings it has "
                                "not sent; they count as its drops", self.path, name)  # fmt: skip
                self._episode_losses[name] = lost + n
        self._dropped += total
        self._losing.clear()
        return total

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
    def outputs(self) -> list[str]:
        """The names of the outputs, as given to `open`."""
        return list(self._outputs)

    def _out(self, output: str) -> _Cursor:
        try:
            return self._outputs[output]
        except KeyError:
            raise ValueError(f"outbox {self.path} has no output {output!r}") from None

    def replaying(self, output: str) -> bool:
        """Whether `output`'s replay has history left (its lanes have not merged yet)."""
        return self._out(output).split is not None

    def begin_replay(self, output: str) -> int:
        """Split `output`'s rows in two lanes and return the boundary seq: rows committed until
        now (and not yet leased) are history, leased by `lease(output, n)`; later rows are live,
        leased by `lease(output, n, live=True)`. When the history lane is empty the lanes merge
        back into one FIFO. A replay begun during another extends the history lane to now.

        Call it with no batch of `output` leased (between batches): a leased batch that is
        released afterwards is leased again in whichever lane its rows fall."""
        out = self._out(output)
        # From here on the output takes device events; those before were folded into what it
        # announces now (Outbox.newest).
        out.events_from, out.events_lost = self._event_id, False
        self._forget_events()
        boundary = self._last_seq
        if out.cursor >= boundary:
            out.split = None  # nothing unleased: nothing to replay
            return boundary
        if out.split is not None and out.live_acked > out.split:
            # The live rows acked so far are inside the new history lane: not leased again.
            out.done.append((out.split, out.live_acked))
        out.split = out.live_cursor = out.live_acked = boundary
        return boundary

    async def lease(self, output: str, n: int, *, live: bool = False) -> Batch:
        """The oldest `n` rows past `output`'s position that it has not leased, in seq order;
        may be empty.

        During a replay, the oldest of the history lane, or with `live=True` of the live
        lane; otherwise `live` makes no difference. An output that takes device events (it
        began a replay once) gets those among the rows of a live batch, and after them when
        the lease reached the end, each in its place (`Event.after`)."""
        if n < 1:
            raise ValueError("lease at least one row")  # SQLite reads LIMIT -1 as "no limit"
        out = self._out(output)
        if out.events_lost:
            return Batch([], resync=True)
        async with self._lock:
            try:
                if out.split is not None and live:
                    entries = _entries(await self._db.execute_fetchall(_LEASE, (out.live_cursor, n)))
                    if entries:
                        out.live_cursor = entries[-1].seq
                    return self._with_events(out, entries, at_end=out.live_cursor >= self._last_seq)
                historical = out.split is not None
                entries = await self._lease_in_order(out, n)
            except sqlite3.Error as exc:
                self._damaged = True
                raise OutboxError(f"outbox {self.path}: cannot lease: {exc}") from exc
            if out.split is not None and len(entries) < n:
                await self._merge(out, leased=bool(entries))
            at_end = out.split is None and out.cursor >= self._last_seq
            # (Events still to ack keep it set: an ack and the next lease see them through.)
            if at_end and self._pending_since(out) is None:
                out.ready.clear()
            if historical:
                return Batch(entries, historical=True)
            return self._with_events(out, entries, at_end=at_end)

    def _pending_since(self, out: _Cursor) -> int | None:
        """The id of the last event `out` acked, if it takes events and has some it has not."""
        since = out.events_from
        return since if since is not None and self._events and self._events[-1].id > since else None

    def _with_events(self, out: _Cursor, entries: list[Entry], *, at_end: bool) -> Batch:
        """A live batch of `entries`, with the events `out` takes among them: those before
        the last entry, and if the lease reached the end of the outbox, all pending."""
        if (since := self._pending_since(out)) is None:
            return Batch(entries)
        limit = self._last_seq + 1 if at_end or not entries else entries[-1].seq
        taken = tuple(e for e in self._events if e.id > since and e.after < limit)
        return Batch(entries, events=taken)

    async def _lease_in_order(self, out: _Cursor, n: int) -> list[Entry]:
        """The next rows of the FIFO (or of the history lane), over the ranges acked already."""
        entries: list[Entry] = []
        while len(entries) < n:
            skip = next(((lo, hi) for lo, hi in out.done if hi > out.cursor), None)
            if skip is not None and skip[0] <= out.cursor:
                out.cursor = skip[1]
                continue
            bounds = [b for b in (out.split, None if skip is None else skip[0]) if b is not None]
            want = n - len(entries)
            if bounds:
                rows = await self._db.execute_fetchall(_LEASE_UPTO, (out.cursor, min(bounds), want))
            else:
                rows = await self._db.execute_fetchall(_LEASE, (out.cursor, want))
            got = _entries(rows)
            entries += got
            if got:
                out.cursor = got[-1].seq
            if len(got) == want:
                break
            if skip is not None and (out.split is None or skip[0] < out.split):
                out.cursor = skip[1]  # up to the acked range: on after it
                continue
            if out.split is None:
                out.cursor = max(out.cursor, self._last_seq)  # nothing more: the FIFO is all leased
            break
        return entries

    async def _merge(self, out: _Cursor, *, leased: bool) -> None:
        """The history lane is all leased: one FIFO again, continuing after the live lane. Its
        last batch is out if `leased`; its ack then moves the position over the live rows acked
        meanwhile. Otherwise (one batch at a time) the history was all acked or evicted."""
        assert out.split is not None
        split, out.split = out.split, None
        if out.live_acked > split:
            out.done.append((split, out.live_acked))
        out.cursor = max(out.cursor, out.live_cursor)
        if not leased:
            # Saved now, not at the next ack: the live rows acked during the replay may be all
            # there is, and rows are deleted once every position has passed them.
            with contextlib.suppress(_DiskFull):
                await self._write(
                    "save a position", lambda retry: self._advance(out, max(out.position, split), 0)
                )

    def _forget_events(self) -> None:
        """Drop the events every output that takes them has acked."""
        takers = [o.events_from for o in self._outputs.values() if o.events_from is not None]
        floor = min(takers) if takers else self._event_id
        queue = self._events
        while queue and queue[0].id <= floor:
            queue.popleft()

    async def newest(self) -> list[Reading]:
        """The newest reading of each (device, tag) the outbox was given, published or not, in
        this run or before it (kept across a restart): what a publisher that announces current
        values (Sparkplug births) knows. One row per tag is read, not the backlog."""
        async with self._lock:
            try:
                rows = await self._db.execute_fetchall(_READ_LATEST)
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read: {exc}") from exc
        saved = {(e.reading.device, e.reading.tag): e.reading for e in _entries(rows)}
        return list({**saved, **self._newest}.values())

    async def wait(self, output: str) -> None:
        """Return when `output` may have unleased rows (at once if it has), or was woken."""
        await self._out(output).ready.wait()

    def wake(self, output: str) -> None:
        """Make `output`'s `wait()` return, rows or not: its publisher has something to say
        (births after a connect, a rebirth asked for). A lease that finds nothing may make
        it block again: the loop checks the publisher before it waits (`Publisher.due`)."""
        self._out(output).ready.set()

    async def ack(self, output: str, batch: Batch, *, refused: int = 0) -> None:
        """`output` has delivered the batch: its broker confirmed it, or refused `refused` of
        its readings for good (those are counted as dropped for it). Acks come in lease order.
        Rows every output has acked are deleted.

        On a full disk the write is tried again until it goes through (publishing waits
        meanwhile: nothing it sends could be acked either); cancelled meanwhile, the rows stay
        and are published again after a restart (at-least-once)."""
        out = self._out(output)
        if batch.events and out.events_from is not None:
            out.events_from = max(out.events_from, batch.events[-1].id)
            self._forget_events()
        if not batch.entries:
            return
        retry = Backoff(initial=0.1, cap=2.0)  # between tries while the disk is full
        while not await asyncio.shield(self._ack(out, batch.entries[0].seq, batch.last_seq, refused)):
            if retry.attempts == 0:
                log.warning("outbox %s: %s: published readings are deleted once there is room",
                            self.path, self._disk_reason())  # fmt: skip
            await asyncio.sleep(retry.next())
        if retry.attempts:
            log.info("outbox %s: deleting published readings again", self.path)

    async def _ack(self, out: _Cursor, first: int, last: int, refused: int) -> bool:
        """One try at the write; False if the disk was too full for it."""
        async with self._lock:
            live = out.split is not None and first > out.split
            if live:
                # A live row during a replay: the position waits for the history before it.
                out.live_acked = max(out.live_acked, last)
                if not refused:
                    return True
                position = out.position
            else:
                position = max(out.position, last)
            try:
                await self._write("ack", lambda retry: self._advance(out, position, refused))
            except _DiskFull:
                return False
            if self._full_since is not None and await self._has_room():
                self._end_episode()
            return True

    async def _advance(self, out: _Cursor, position: int, refused: int) -> None:
        """Inside a transaction: save `out`'s position (folding the acked ranges it reaches) and
        its refusals, and delete the rows every output now has. In memory after the commit."""
        done = list(out.done)
        while done and done[0][0] <= position:
            position = max(position, done.pop(0)[1])
        await self._db.execute(_SAVE_POSITION, (position, refused, out.name))
        if refused:
            await self._db.execute(_ADD_DROPPED, (refused,))
        floor = min(position if o is out else o.position for o in self._outputs.values())
        deleted = 0
        if floor > self._floor:
            deleted = (await self._db.execute(_DELETE_UPTO, (self._floor, floor))).rowcount
        self._after_commit.append(lambda: self._moved(out, (position, done), refused, (floor, deleted)))

    def _moved(
        self, out: _Cursor, place: tuple[int, list[tuple[int, int]]], refused: int, freed: tuple[int, int]
    ) -> None:
        (position, done), (floor, deleted) = place, freed
        out.position, out.done = position, done
        out.cursor = max(out.cursor, position)
        out.dropped += refused
        self._dropped += refused
        if floor > self._floor:
            self._floor = floor
            self._count -= deleted

    async def release(self, output: str, batch: Batch) -> None:
        """Un-lease the batch: its rows, and any leased after them in its lane, are leased again,
        first. Those the cap evicted meanwhile are gone: counted as dropped for `output`."""
        if not batch.entries:
            return
        out = self._out(output)
        async with self._lock:
            first = batch.entries[0].seq
            # Never back over what was acked: a batch is released whole after its confirmed
            # prefix was acked, and those rows may still be in the file for other outputs.
            if out.split is not None and first > out.split:
                acked = out.live_acked
                out.live_cursor = max(acked, min(out.live_cursor, first - 1))
            else:
                acked = out.position
                out.cursor = max(acked, min(out.cursor, first - 1))
            out.ready.set()
            gone = sum(1 for e in batch.entries if acked < e.seq <= out.lost)
            if gone:

                async def count(retry: bool) -> None:
                    await self._db.execute(_ADD_OUTPUT_DROPPED, (gone, out.name))
                    await self._db.execute(_ADD_DROPPED, (gone,))

                try:
                    await self._write("count dropped readings", count)
                except _DiskFull:
                    self._unsaved_dropped += gone  # (the total only: the output's is in memory)
                out.dropped += gone
                self._dropped += gone
                self._note_dropped(gone)

    async def stats(self) -> OutboxStats:
        """Depth, age of the oldest row, total drops, file size, the last seq handed out, and
        each output's depth, drops and position (a count of its rows: O(its depth))."""
        async with self._lock:
            try:
                oldest, pages = next(iter(await self._db.execute_fetchall(_OLDEST_AND_PAGES)))
                outputs = {}
                for out in self._outputs.values():
                    outputs[out.name] = OutputStats(await self._depth(out), out.dropped, out.position)
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read stats: {exc}") from exc
        age = None if oldest is None else self._clock() - oldest
        size = pages * self._page_size + _size(self._wal)
        return OutboxStats(self._count, age, self._dropped, size, self._last_seq, outputs)

    async def _depth(self, out: _Cursor) -> int:
        """The rows past `out`'s position, counted over the shorter range: those after it, or
        (an output far behind) those before it, taken from the total. Not a scan of a backlog of
        millions each minute while the outbox waits."""
        if self._last_seq - out.position <= out.position - self._floor:
            ((depth,),) = await self._db.execute_fetchall(_COUNT_AFTER, (out.position,))
        else:
            ((before,),) = await self._db.execute_fetchall(_COUNT_BETWEEN, (self._floor, out.position))
            depth = self._count - before
        return int(depth)

    async def close(self) -> None:
        """Wait for a write in progress, report an unfinished full episode, close the file.
        Once: a second call does nothing."""
        async with self._lock:
            if self._lock_fd < 0:
                return
            if self._full_since is not None:
                self._end_episode()
            # The newest values and the clean mark: with them the next open skips the check of
            # the whole file. Not saved (a full disk), the next open checks it and rebuilds them.
            if not self._damaged:
                with contextlib.suppress(_DiskFull, OutboxError):
                    await self._write("save the newest values", self._save_newest)
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
                self._damaged = True
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
        outputs = ", ".join(f"{name} {n}" for name, n in self._episode_losses.items())
        log.warning(
            "outbox full: dropped %d readings (policy %s) since %s%s",
            self._full_dropped, self._policy, iso_millis(self._full_since),
            f" (outputs that had not sent them: {outputs})" if outputs else "",
        )  # fmt: skip
        self._full_since, self._full_dropped = None, 0
        self._episode_losses.clear()

    async def _save_newest(self, retry: bool) -> None:
        await self._db.executemany(_SAVE_LATEST, _to_rows(self._newest.values()))
        await self._db.execute(_SET_META, ("latest_seq", self._last_seq))
        await self._db.execute(_SET_META, ("clean", 1))


def _to_rows(readings: Iterable[Reading]) -> list[_Row]:
    """Readings as rows of the reading table (one comprehension: it runs for every reading)."""
    return [
        (r.device, r.tag, None if r.value is None else _encode(r.value), _QUALITY_CODE[r.quality],
         r.status, r.source_time, r.read_time, r.unit)
        for r in readings
    ]  # fmt: skip


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


async def _open_for(
    path: Path, clock: Callable[[], float], outputs: Sequence[str]
) -> tuple[aiosqlite.Connection, dict[str, tuple[int, int]], tuple[Any, ...]]:
    """The database, marked open, with `outputs`' positions. A file closed cleanly is not
    checked whole; if it turns out damaged all the same (the first reads fail), it is checked,
    and moved aside. A full disk that refuses the few writes of opening is waited for."""
    check = False
    backoff = Backoff(initial=1.0, cap=10.0)
    while True:
        db = await _connect_when_there_is_room(path, clock, check=check)
        try:
            await _mark_open(db, path)
            positions = await _sync_outputs(db, path, outputs)
            # (count(*) reads every row: damage the quick check skipped shows here)
            state = tuple(next(iter(await db.execute_fetchall(_STATE))))
            return db, positions, state
        except sqlite3.DatabaseError as exc:
            await db.close()
            code = exc.sqlite_errorcode & 0xFF
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) and not check:
                log.warning("outbox %s: damaged though it was closed cleanly (%s): checking it", path, exc)
                check = True
                continue
            if code != sqlite3.SQLITE_FULL:
                raise OutboxError(f"outbox {path}: {exc}") from exc
            if backoff.attempts == 0:
                log.error("outbox %s: the disk is full: cannot record the outputs; waiting for room", path)
            await asyncio.sleep(backoff.next())
        except BaseException:
            await db.close()
            raise


async def _connect_when_there_is_room(
    path: Path, clock: Callable[[], float], *, check: bool = False
) -> aiosqlite.Connection:
    """`_connect`, waiting while it fails on a full disk: exiting would only make systemd
    restart the gateway into the same failure, every few seconds, for as long as it lasts."""
    backoff = Backoff(initial=1.0, cap=10.0)
    while True:
        try:
            db = await _connect(path, clock, check=check)
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


async def _meta(db: aiosqlite.Connection, key: str) -> int | None:
    rows = list(await db.execute_fetchall(_META, (key,)))
    return int(rows[0][0]) if rows else None


async def _mark_open(db: aiosqlite.Connection, path: Path) -> None:
    """Note in the file that a gateway has it open (see 'clean'); after a stop that was not
    clean, first bring the newest-value snapshot up to date from the rows left (before any
    of them are deleted for an output removed from the config)."""
    try:
        rows = list(await db.execute_fetchall(_LAST_SEQ_SOURCES[0]))
        last_seq = rows[0][0] if rows else 0
        if await _meta(db, "clean") != 1:
            await db.execute(_FOLD_LATEST, (await _meta(db, "latest_seq") or 0,))
            await db.execute(_SET_META, ("latest_seq", last_seq))
        await db.execute(_SET_META, ("clean", 0))
        await db.commit()
    except sqlite3.Error as exc:
        await db.rollback()
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_FULL:
            raise
        # On a full disk the gateway still starts; if it is then killed, the flag may still say
        # clean and the next start skip its quick_check (SQLite still reports damage it meets).
        log.debug("outbox %s: cannot mark the file open: %s", path, exc)


async def _sync_outputs(
    db: aiosqlite.Connection, path: Path, outputs: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Make the file's outputs those configured: a new one starts at the oldest row (it gets
    what is buffered: after a rename, nothing is lost), a removed one gives up its position
    and the rows only it was waiting for are deleted. Each output's (position, dropped)."""
    known = {name: (position, dropped) for name, position, dropped in await db.execute_fetchall(_OUTPUTS)}
    new = [name for name in outputs if name not in known]
    gone = [name for name in known if name not in outputs]
    if not new and not gone:
        return known
    (oldest,) = next(iter(await db.execute_fetchall(_OLDEST_SEQ)))
    rows = await db.execute_fetchall(_LAST_SEQ_SOURCES[0])
    last_seq = next(iter(rows))[0] if rows else 0
    start = oldest - 1 if oldest is not None else last_seq
    before = min((position for position, _ in known.values()), default=start)
    try:
        for name in new:
            await db.execute(_ADD_OUTPUT, (name, start))
            known[name] = (start, 0)
        released: dict[str, tuple[int, int]] = {}
        for name in gone:
            ((unsent,),) = await db.execute_fetchall(_COUNT_AFTER, (known[name][0],))
            released[name] = (known.pop(name)[0], unsent)
            await db.execute(_REMOVE_OUTPUT, (name,))
        floor = min(position for position, _ in known.values())
        if floor > before:
            await db.execute(_DELETE_UPTO, (before, floor))
        await db.commit()
    except BaseException:
        await db.rollback()
        raise
    if oldest is not None or gone:  # (a new, empty file has nothing to say)
        for name in new:
            log.info("outbox %s: new output %s starts with the readings buffered now (after seq %d)",
                     path, name, start)  # fmt: skip
    for name, (position, unsent) in released.items():
        log.warning("outbox %s: output %s is no longer configured: its position (seq %d) is released, "
                    "and the %d reading(s) it had not delivered are no longer kept for it", path, name,
                    position, unsent)  # fmt: skip
    return known


def _entries(rows: Iterable[Sequence[Any]]) -> list[Entry]:
    """Rows of `_COLUMNS` as entries (one comprehension: this runs for every leased reading)."""
    return [
        Entry(seq, Reading(device, tag, None if value is None else _decode(value),
                           _QUALITIES[quality], status, source_time, read_time, unit))
        for seq, device, tag, value, quality, status, source_time, read_time, unit in rows
    ]  # fmt: skip


async def _connect(path: Path, clock: Callable[[], float], *, check: bool = False) -> aiosqlite.Connection:
    """Open and check the file (see _prepare; `check`: whole, whatever it says); a corrupt one
    is moved aside and replaced, once."""
    try:
        return await _prepare(path, check=check)
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


async def _prepare(path: Path, *, check: bool = False) -> aiosqlite.Connection:
    # Fail here, not inside aiosqlite, when the file cannot even be opened (missing directory,
    # permissions): a failed aiosqlite.connect leaves its worker thread to report to an event
    # loop that may already be closed. Opening a SQLite file is one open(2), cheap to do twice.
    sqlite3.connect(path).close()
    db = await aiosqlite.connect(path)
    try:
        (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
        if version > SCHEMA_VERSION:
            raise OutboxError(f"outbox {path}: schema version {version} is newer than this gateway's")
        # quick_check reads every page, O(file size): 0.2 s for a million rows (49 MB, warm
        # cache), seconds from a cold SD card. Only a file that was not closed cleanly (a kill,
        # a power cut, a crash) can be damaged by how it was left, so only such a file is checked
        # (and one in which opening meets damage all the same: see _open_for).
        if version > 0 and (check or not (version >= 2 and await _meta(db, "clean") == 1)):
            (verdict,) = next(iter(await db.execute_fetchall("PRAGMA quick_check(1)")))
            if verdict != "ok":
                raise _Corrupt(f"quick_check: {verdict}")
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
            (version,) = db.execute("PRAGMA user_version").fetchone()
            outputs = {}
            if version >= 2:  # (a file of schema 1 had one consumer and no positions)
                for name, position, lost in db.execute(_OUTPUTS).fetchall():
                    (depth,) = db.execute(_COUNT_AFTER, (position,)).fetchone()
                    outputs[name] = OutputStats(depth, lost, position)
    except sqlite3.Error as exc:
        raise OutboxError(f"{path}: cannot read the outbox: {exc}") from exc
    age = None if oldest is None else time.time() - oldest
    size = pages * page_size + _size(Path(f"{path}-wal"))
    return OutboxStats(count, age, dropped, size, last_seq or 0, outputs)
