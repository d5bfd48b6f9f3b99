"""Fixtures shared by every test: a real mosquitto, subscribers, and a thread-leak check."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.helpers import (
    MakeMosquitto,
    Mosquitto,
    SmallDisk,
    Subscribe,
    Subscriber,
    is_long_lived,
    mosquitto_binary,
)
from tests.serial_line import VirtualLine

MakeLine = Callable[..., VirtualLine]

__all__ = ["MakeLine", "MakeMosquitto", "Subscribe"]  # re-exported: tests import them from here too

# Property-based tests: no deadline (timing belongs in bench/, and a loaded 2-core machine
# would make one flaky); each test bounds its own number of examples.
settings.register_profile("millwright", deadline=None)
settings.load_profile("millwright")

# Tasks a test started get this long to end after it (pymodbus's close() cancels a task
# without awaiting it, and aiosqlite hands results back a loop turn later).
TASK_GRACE = 0.5
# Threads a test started get this long to end after it, before the test fails.
THREAD_GRACE = 2.0


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves threads running (paho network threads, connect threads).

    Threads alive before the test are ignored, and so are those registered with
    `tests.helpers.allow_long_lived` (session-scoped servers)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE
    while True:
        leaked = [
            t for t in threading.enumerate() if t not in before and t.is_alive() and not is_long_lived(t)
        ]
        if not leaked:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the test leaked threads: {', '.join(sorted(t.name for t in leaked))}")
        time.sleep(0.02)


@pytest.fixture(autouse=True)
async def no_task_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (after the other fixtures' teardown:
    autouse fixtures are set up first and torn down last)."""
    yield
    current = asyncio.current_task()
    deadline = time.monotonic() + TASK_GRACE
    while leaked := [t for t in asyncio.all_tasks() if t is not current and not t.done()]:
        if time.monotonic() > deadline:
            for task in leaked:
                task.cancel()
            pytest.fail(f"the test leaked tasks: {', '.join(sorted(t.get_name() for t in leaked))}")
        await asyncio.sleep(0.01)


@pytest.fixture
def make_mosquitto(tmp_path: Path) -> Iterator[MakeMosquitto]:
    """Start brokers with extra config lines: `make_mosquitto("allow_anonymous false", ...)`.

    Each gets a free port and its own directory; all are stopped at teardown."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail("mosquitto is not installed: run `make test`, which installs it")
    brokers: list[Mosquitto] = []

    def make(*lines: str) -> Mosquitto:
        directory = tmp_path / f"mosquitto-{len(brokers)}"
        directory.mkdir()
        broker = Mosquitto(binary, directory, lines)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def make_line(tmp_path: Path) -> Iterator[MakeLine]:
    """`make_line()` -> a started virtual serial line (`.a`, `.b`: its two ends; see
    tests.serial_line); `make_line(tcp_port=P)`: `.a` joined to a TCP listener on P. All are
    stopped at teardown."""
    lines: list[VirtualLine] = []

    def make(*, tcp_port: int | None = None) -> VirtualLine:
        line = VirtualLine(tmp_path, f"line{len(lines)}")
        lines.append(line)
        line.start(tcp_port=tcp_port)
        return line

    yield make
    for line in lines:
        line.stop()


@pytest.fixture
def mosquitto(make_mosquitto: MakeMosquitto) -> Mosquitto:
    """A plain broker: anonymous, no persistence, on a free loopback port.

    `.host`, `.port`, `.url`, `.stop(kill=False)`, `.start()` (same port), `.pause()`,
    `.resume()`, `.log_text()`."""
    return make_mosquitto()


@pytest.fixture
def subscriber() -> Iterator[Subscribe]:
    """`subscriber(broker, "topic/#", **options)` -> a connected, subscribed `Subscriber`
    (options: client_id, persistent, username, password); closed at teardown."""
    made: list[Subscriber] = []

    def subscribe(broker: Mosquitto, topic_filter: str = "#", **options: Any) -> Subscriber:
        sub = Subscriber(broker.host, broker.port, topic_filter, **options)
        made.append(sub)
        return sub

    yield subscribe
    for sub in made:
        sub.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], SmallDisk]]:
    """`small_disk(size)` -> a tmpfs of `size` bytes, mounted (needs root; `make test` runs
    as root in CI) and unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    disks: list[SmallDisk] = []

    def make(size: int) -> SmallDisk:
        disk = SmallDisk(tmp_path / f"disk-{len(disks)}", size).mount()
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        disk.unmount()
