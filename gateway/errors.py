"""The exception tree.

    GatewayError
    ├── ConfigError            bad or missing config; the CLI exits 2 with file and key path
    ├── DeviceError            a device did not give us data
    │   ├── NotConnected       the connection is gone; the poller reconnects with backoff
    │   └── DeviceTimeout      no answer in time; the poller treats it like NotConnected
    ├── PublishError           the broker did not take a batch
    │   ├── BrokerUnavailable  not connected; the batch is released back to the outbox
    │   └── MessagesRefused    the broker refused some messages for good; the rest were confirmed
    └── OutboxError            the local buffer cannot be used
        └── OutboxLocked       another gateway process holds it; the CLI exits 2

Library exceptions (pymodbus, paho, sqlite3) are translated into these once, at the
boundary where they are raised, so the engine never imports a protocol library.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A config file is invalid. `str()` is the full message for the user."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{file}: invalid configuration\n{lines}")


class DeviceError(GatewayError):
    """A device could not be read. `logged`: the cause was logged already, for every device
    it concerns (a serial line lost, which all its devices share), so that the poller need
    not log it once more for this one."""

    def __init__(self, device: str, reason: str, *, logged: bool = False) -> None:
        self.device = device
        self.reason = reason
        self.logged = logged
        super().__init__(f"device {device!r}: {reason}")


class NotConnected(DeviceError):
    """The connection to the device is gone; ask the poller to reconnect."""


class DeviceTimeout(DeviceError):
    """The device did not answer in time."""


class PublishError(GatewayError):
    """The broker did not confirm a batch."""


class BrokerUnavailable(PublishError):
    """Not connected to the broker, or the connection was lost before every message was
    confirmed. Of the messages of that publish: the first `settled` were confirmed or
    refused (`refused`: topic, reason); `unconfirmed` is the index of the first message the
    broker had and did not confirm (None if none); `blames_message` says the broker ended
    the connection in a way that may be its answer to that message. `refused_at` holds the
    indices of the refused messages, in the order of `refused`."""

    def __init__(
        self,
        message: str,
        *,
        settled: int = 0,
        refused: list[tuple[str, str]] | None = None,
        refused_at: list[int] | None = None,
        unconfirmed: int | None = None,
        blames_message: bool = False,
    ) -> None:
        super().__init__(message)
        self.settled = settled
        self.refused = refused or []
        self.refused_at = refused_at or []
        self.unconfirmed = unconfirmed
        self.blames_message = blames_message


class MessagesRefused(PublishError):
    """The broker refused some messages (MQTT 5 PUBACK reason >= 0x80, e.g. not authorised)
    and confirmed all the others. `refused` lists (topic, reason), and `indices` their places
    among the messages published."""

    def __init__(self, refused: list[tuple[str, str]], indices: list[int] | None = None) -> None:
        self.refused = refused
        self.indices = indices or []
        topic, reason = refused[0]
        more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
        super().__init__(f"the broker refused the message to {topic!r}: {reason}{more}")


class OutboxError(GatewayError):
    """The outbox database cannot be opened or written."""


class OutboxLocked(OutboxError):
    """Another process (a second gateway on the same config) holds the outbox's lock."""

    def __init__(self, path: str, holder: int | None) -> None:
        self.holder = holder
        who = f"millwright (pid {holder})" if holder is not None else "another millwright process"
        super().__init__(
            f"outbox {path} is in use by {who}: one gateway per outbox "
            "(stop the other one, or give this config its own outbox.path)"
        )
