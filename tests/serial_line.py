"""Virtual serial lines for the Modbus RTU tests: socat joins two ptys, as a cable would.

`VirtualLine(folder, name)` links its two ends at `folder/name-a` and `folder/name-b`; `start()` runs socat
and returns when both ends exist, `stop()` ends it, and the ends disappear, as a USB adapter
does when it is unplugged. `start()` again makes a new pair at the same paths.

These ptys take no parity bit: setting PARENB on a pty here is refused (EINVAL) or dropped, so
every virtual line runs with parity N, where a real port takes E or O as given.
`start(tcp_port=P)` instead joins the pty `a` to a TCP listener on P, which accepts one
connection: a serial device server passing RTU frames over TCP.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

START_WITHIN = 10.0


class VirtualLine:
    def __init__(self, folder: Path, name: str = "line") -> None:
        self.folder = folder
        self.a = str(folder / f"{name}-a")
        self.b = str(folder / f"{name}-b")
        self._process: subprocess.Popen[bytes] | None = None
        self._log = folder / f"{name}-socat.log"

    def start(self, *, tcp_port: int | None = None) -> None:
        """Join `a` to `b`; with `tcp_port`, join `a` to a TCP listener on that port instead."""
        socat = shutil.which("socat")
        if socat is None:
            raise AssertionError("socat is not installed: run `make test`, which installs it")
        # socat opens its first address first: the pty exists before it listens.
        other = (
            f"pty,rawer,link={self.b}"
            if tcp_port is None
            else f"tcp-listen:{tcp_port},bind=127.0.0.1,reuseaddr"
        )
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [socat, "-d", "-d", f"pty,rawer,link={self.a}", other], stderr=log
            )
        deadline = time.monotonic() + START_WITHIN
        ends = [self.a] if tcp_port is not None else [self.a, self.b]
        while not all(Path(end).exists() for end in ends) or (tcp_port and not self._listening()):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"socat did not start: {self._log.read_text()}")
            time.sleep(0.01)

    def _listening(self) -> bool:
        return "listening on" in self._log.read_text()

    def stop(self) -> None:
        """End socat: both ends go away."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        for end in (self.a, self.b):
            Path(end).unlink(missing_ok=True)
