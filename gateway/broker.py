"""A private MQTT broker for the demo: mosquitto when installed, else amqtt in-process."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for_port(host: str, port: int, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {within:g} s") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


class LocalBroker:
    """A broker on a free loopback port, for as long as the `async with` block runs.

    `version` is the newest MQTT version the broker speaks: amqtt knows only 3.1.1.
    """

    def __init__(self, host: str = "127.0.0.1", *, embedded: bool = False) -> None:
        self.host = host
        self.embedded = embedded
        self.port = free_port(host)
        self.kind = ""
        self.version = "5"
        self._process: asyncio.subprocess.Process | None = None
        self._amqtt: Any = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> LocalBroker:
        exe = None if self.embedded else find_mosquitto()
        if exe is not None:
            self._dir = tempfile.TemporaryDirectory(prefix="millwright-broker-")
            conf = Path(self._dir.name) / "mosquitto.conf"
            conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n")
            self._process = await asyncio.create_subprocess_exec(
                exe, "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.kind = "mosquitto"
        else:
            try:
                from amqtt.broker import Broker
            except ImportError:
                raise RuntimeError(
                    "no MQTT broker: install mosquitto, or `pip install millwright[demo]` for the "
                    "embedded one, or pass --broker mqtt://host:port"
                ) from None
            self._amqtt = Broker({
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            })  # fmt: skip
            await self._amqtt.start()
            self.kind, self.version = "amqtt", "3.1.1"
        await wait_for_port(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 5)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._amqtt is not None:
            with contextlib.suppress(
                Exception
            ):  # a broker that fails to stop must not hide the demo's result
                await self._amqtt.shutdown()
        if self._dir is not None:
            self._dir.cleanup()
