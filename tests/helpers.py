"""Test helpers shared by every test package: free ports, a real mosquitto, a subscriber.

The fixtures in conftest.py wrap these; import the classes from here for type hints or to
build a broker or subscriber by hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.app import Gateway
from gateway.broker import find_mosquitto, free_port
from gateway.config import parse

# Threads that may outlive the test that started them (a session-scoped simulator, say):
# register them with `allow_long_lived`, and the thread-leak check ignores them.
_long_lived: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def allow_long_lived(thread: threading.Thread) -> None:
    _long_lived.add(thread)


def is_long_lived(thread: threading.Thread) -> bool:
    return thread in _long_lived


# The demo finds and places its broker the same way the tests do.
mosquitto_binary = find_mosquitto


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if not alive() or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


async def eventually(
    condition: Callable[[], bool],
    timeout: float = 5.0,  # noqa: ASYNC109
    what: str = "condition",
    every: float = 0.01,
) -> None:
    """Poll `condition` every `every` s while the event loop keeps running; fail the test
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(every)


@asynccontextmanager
async def running(text: str, file: Path, **options: Any) -> AsyncIterator[Gateway]:
    """The gateway of config `text` (named `file` in errors) running in this event loop, in
    a task, with `Gateway` `options`; stopped cleanly on the way out."""
    gateway = Gateway(parse(text, str(file)), **options)
    task = asyncio.create_task(gateway.run(), name="gateway")
    try:
        yield gateway
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 10)


class Mosquitto:
    """A mosquitto process on 127.0.0.1:`port`, configured by `lines` (after the listener
    line, so per-listener options such as certfile apply to it). Logs go to a file."""

    host = "127.0.0.1"

    def __init__(self, binary: str, directory: Path, lines: Sequence[str] = ()) -> None:
        self.binary = binary
        self.port = free_port()
        self.directory = directory
        self.log_path = directory / "mosquitto.log"
        config = [f"listener {self.port} {self.host}", *lines]
        given = {line.split(maxsplit=1)[0] for line in lines if line.strip()}
        config += [
            line for line in ("allow_anonymous true", "persistence false") if line.split()[0] not in given
        ]
        # A log file, not stdout: mosquitto block-buffers stdout when it is not a terminal.
        # One log_type per line: mosquitto reads only the first value of a line.
        config.append(f"log_dest file {self.log_path}")
        config += [f"log_type {kind}" for kind in ("error", "warning", "notice", "information")]
        if os.geteuid() == 0:
            # As root, mosquitto switches to user "mosquitto", which cannot read the
            # test's private tmp_path (password and certificate files).
            config.append("user root")
        self.config_path = directory / "mosquitto.conf"
        self.config_path.write_text("\n".join(config) + "\n", encoding="utf-8")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (again) on the same port; return once it accepts connections."""
        if self.running:
            return
        # stdout/stderr only carry what mosquitto prints before it opens its log file.
        with (self.directory / "mosquitto.out").open("ab") as out:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(self.host, self.port, 5.0, alive=lambda: self.running)
        except OSError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start on port {self.port}:\n{self.log_text()}") from None

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM (clients see their sockets closed), or SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case it was paused
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets open and answers nothing."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        """Everything mosquitto logged, across restarts."""
        texts = []
        for path in (self.directory / "mosquitto.out", self.log_path):
            with suppress(FileNotFoundError):
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "".join(texts)


MakeMosquitto = Callable[..., Mosquitto]
"""The `make_mosquitto` fixture: `make_mosquitto(*config_lines) -> Mosquitto`."""


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float = 0.0  # time.monotonic() when the subscriber got it

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A paho client on its own network thread that collects what matches `topic_filter`.

    `retain` of a collected message is the flag the publisher set (MQTT 5 "retain as
    published"), also for messages forwarded live. After a broker restart it reconnects and
    resubscribes; with `persistent=True` (and a named `client_id`) its session, and what
    was queued for it, outlives the disconnection, given a broker with persistence.
    Call `close()`; the fixture does.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str,
        *,
        client_id: str = "",
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.topic_filter = topic_filter
        self._messages: list[Message] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.subscriptions = 0  # SUBACKs so far: one more after each reconnect
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id, protocol=MQTTProtocolVersion.MQTTv5)
        client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        if username is not None:
            client.username_pw_set(username, password)
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        client.on_connect = lambda c, *_: c.subscribe(topic_filter, options=options)
        client.on_subscribe = lambda *_: self._subacked()
        client.on_message = self._on_message
        self._client = client
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        client.connect(host, port, clean_start=not persistent, properties=properties)
        client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"no SUBACK for {topic_filter!r} from {host}:{port}")

    def _subacked(self) -> None:
        self.subscriptions += 1
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._changed:
            message = Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, time.monotonic())
            self._messages.append(message)
            self._changed.notify_all()

    @property
    def messages(self) -> list[Message]:
        with self._changed:
            return list(self._messages)

    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    def clear(self) -> None:
        with self._changed:
            self._messages.clear()

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 5.0) -> list[Message]:
        """Block until `predicate(messages)` holds; fail the test after `timeout` seconds.

        Blocking: in an async test whose code under test needs the event loop, use
        `await received(...)` instead."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self._messages), timeout):
                raise AssertionError(self._describe(timeout))
            return list(self._messages)

    async def received(
        self,
        predicate: Callable[[list[Message]], bool],
        timeout: float = 5.0,  # noqa: ASYNC109  (same signature as wait_for, on purpose)
    ) -> list[Message]:
        """`wait_for` for async tests: polls, so the event loop keeps running meanwhile."""
        deadline = time.monotonic() + timeout
        while not predicate(messages := self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(self._describe(timeout))
            await asyncio.sleep(0.01)
        return messages

    def _describe(self, timeout: float) -> str:
        got = self.messages
        tail = "\n".join(f"  {m.topic} retain={m.retain} {m.payload[:120]!r}" for m in got[-10:])
        return (
            f"condition not met within {timeout} s on {self.topic_filter!r}; "
            f"{len(got)} messages, last:\n{tail}"
        )

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


Subscribe = Callable[..., Subscriber]
"""The `subscriber` fixture: `subscriber(broker, topic_filter="#", **Subscriber options)`."""


class SmallDisk:
    """A tmpfs of `size` bytes mounted on `path` (as root), to run out of space for real.

    `fill(leave)` takes all but `leave` bytes of it with a filler file (as another program
    filling the disk would); `free()` deletes the filler again."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._filler = path / "filler"
        self._mounted = False

    def mount(self) -> SmallDisk:
        if os.geteuid() != 0:
            raise PermissionError("mounting a tmpfs needs root (make test runs the suite as root)")
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )
        self._mounted = True
        return self

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Grow the filler until only `leave` bytes (rounded to pages) are free."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            take = self.available() - leave
            if take > 0:
                with suppress(OSError):  # ENOSPC on the last page: the disk is as full as it gets
                    os.posix_fallocate(fd, os.fstat(fd).st_size, take)
            if leave == 0:
                # tmpfs may keep a few pages back from fallocate; write until it says no.
                with suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self._mounted = False
