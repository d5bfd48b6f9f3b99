"""systemd's notify protocol (sd_notify(3)): a datagram of `KEY=value` lines to the socket
in `$NOTIFY_SOCKET`. A few lines, rather than a dependency.

Under `Type=notify` the gateway says `READY=1` once its pollers run, `WATCHDOG=1` every half
`WatchdogSec` while it is healthy (from the event loop: a stuck loop sends nothing, and
systemd restarts the service), `STATUS=` with the one-line summary (`systemctl status`
shows it), and `STOPPING=1` on the way out. Without `$NOTIFY_SOCKET` (not under systemd)
nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# STATUS= is refreshed this often when there is no watchdog to ride along with.
STATUS_EVERY = 10.0


class Notifier:
    """Datagrams to systemd; every send is best effort (a failure is logged once)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET") or None
        # An abstract socket is written with a leading @ (its first byte is a NUL).
        self._address = None if path is None else "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._failed = False

    @property
    def active(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> None:
        """`send(READY="1", STATUS="...")`; nothing without $NOTIFY_SOCKET."""
        if self._address is None:
            return
        text = "".join(f"{key}={value.replace(chr(10), ' ')}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(text.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning(
                    "cannot notify systemd at %s: %s", self._address.lstrip("\0"), exc.strerror or exc
                )
            self._failed = True


async def keep_alive(notifier: Notifier, healthy: Callable[[], list[str]], status: Callable[[], str]) -> None:
    """Until cancelled: WATCHDOG=1 every half watchdog interval while `healthy()` gives no
    reason against it, with `STATUS=status()`; without a watchdog, the status only."""
    every = notifier.watchdog / 2 if notifier.watchdog is not None else STATUS_EVERY
    while True:
        reasons = healthy()
        if notifier.watchdog is not None and not reasons:
            notifier.send(WATCHDOG="1", STATUS=status())
        else:
            notifier.send(STATUS="; ".join(reasons) if reasons else status())
        await asyncio.sleep(every)
