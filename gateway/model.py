"""The common information model: readings, quality and the ISA-95 asset path.

Readings are plain slotted dataclasses, not pydantic models: they are made once per value
on the hot path, and their contents were validated when the collector decoded them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

# A JSON-compatible value. Lists appear for OPC UA arrays.
Value = bool | int | float | str | list["Value"] | None

# What a tag's value is beyond its JSON form (the number 5 may be an int16 or a uint64), in
# names of no protocol: each protocol maps its own types onto these (Modbus's are the same
# names), and a format that types its metrics (Sparkplug B) maps these onto its own.
Datatype = Literal[
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float32", "float64", "string", "datetime", "bytes",
]  # fmt: skip


class Quality(enum.Enum):
    GOOD = "Good"
    UNCERTAIN = "Uncertain"
    BAD = "Bad"

    @classmethod
    def from_status(cls, status: int) -> Quality:
        """OPC UA severity, bits 30-31: 00 Good, 01 Uncertain, 10 Bad, 11 (reserved) Bad."""
        severity = (status >> 30) & 0b11
        if severity == 0:
            return cls.GOOD
        if severity == 1:
            return cls.UNCERTAIN
        return cls.BAD


class Status(enum.IntEnum):
    """The OPC UA status codes the gateway produces itself."""

    GOOD = 0x00000000
    UNCERTAIN_ENGINEERING_UNITS_EXCEEDED = 0x40940000
    BAD_COMMUNICATION_ERROR = 0x80050000
    BAD_DECODING_ERROR = 0x80070000
    BAD_TIMEOUT = 0x800A0000
    BAD_WAITING_FOR_INITIAL_DATA = 0x80320000
    BAD_NODE_ID_UNKNOWN = 0x80340000
    BAD_OUT_OF_RANGE = 0x803C0000
    BAD_NOT_CONNECTED = 0x808A0000
    BAD_DEVICE_FAILURE = 0x808B0000


@dataclass(slots=True, frozen=True)
class Reading:
    """One normalized sample of one tag.

    Times are POSIX seconds (UTC). `source_time` is the device's own timestamp when it
    gives one (OPC UA SourceTimestamp); `read_time` is when the gateway got the value.
    A Bad reading carries `value = None` and the reason in `status`.
    """

    device: str
    tag: str
    value: Value
    quality: Quality
    status: int
    source_time: float | None
    read_time: float
    unit: str | None = None

    @property
    def timestamp(self) -> float:
        return self.source_time if self.source_time is not None else self.read_time


# Device events: a device went down or came back, a tag's datatype was learned. The pollers
# hand them to the outbox with the readings, as readings of tags no config can name (a tag
# name may not start with "$"): the outbox keeps the newest of each (for births) and gives
# them, in order between the readings, to the outputs that take them (Sparkplug), as Events
# beside a Batch's entries. They take no seq: a UNS consumer still sees every seq.
#   tag "$state",          value "down" or "up";
#   tag "$datatype:{tag}", value the tag's Datatype.
EVENT = "$"
STATE_EVENT = "$state"
DATATYPE_EVENT = "$datatype:"
DOWN: Final = "down"
UP: Final = "up"


def state_event(device: str, state: Literal["down", "up"], now: float) -> Reading:
    """`device` stopped answering (after its Bad readings) or answers again (before its values)."""
    quality = Quality.GOOD if state == UP else Quality.BAD
    status = Status.GOOD if state == UP else Status.BAD_NOT_CONNECTED
    return Reading(device, STATE_EVENT, state, quality, status, None, now)


def datatype_event(device: str, tag: str, datatype: Datatype, now: float) -> Reading:
    """The device told `tag`'s datatype (an OPC UA server types its values), before its value."""
    return Reading(device, DATATYPE_EVENT + tag, datatype, Quality.GOOD, Status.GOOD, None, now)


def bad(device: str, tag: str, status: int, now: float, unit: str | None = None) -> Reading:
    """A Bad reading: no value, and the reason as an OPC UA status code."""
    return Reading(device, tag, None, Quality.BAD, status, None, now, unit)


def iso_millis(ts: float) -> str:
    """UTC, millisecond precision, `Z` suffix: 2026-11-24T12:00:00.123Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True, frozen=True)
class AssetPath:
    """ISA-95 location of a device: enterprise / site / area / line / device."""

    enterprise: str
    site: str
    area: str
    line: str
    device: str

    @property
    def topic(self) -> str:
        return f"{self.enterprise}/{self.site}/{self.area}/{self.line}/{self.device}"


@dataclass(slots=True, frozen=True)
class Entry:
    """A reading as stored in the outbox; `seq` is its row id, never reused."""

    seq: int
    reading: Reading


@dataclass(slots=True, frozen=True)
class Event:
    """A device event as an output takes it: `after` is the seq of the reading it follows
    (its place in the stream; events take no seq of their own), `id` its order among events."""

    id: int
    after: int
    reading: Reading


@dataclass(slots=True, frozen=True)
class Batch:
    """Entries leased from the outbox, oldest first; acked or released as a whole.

    `historical`: leased from the history lane of a replay (`Outbox.begin_replay`). `events`:
    the device events among the entries (and after them, at the end of the outbox), for an
    output that takes them.
    `resync`: such an output fell so far behind that events it had not taken were forgotten:
    it must announce the current state again (`Outbox.newest`, then `begin_replay`).
    """

    entries: list[Entry]
    historical: bool = False
    events: tuple[Event, ...] = ()
    resync: bool = False

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries or self.events or self.resync)

    def head(self, n: int) -> Batch:
        """The first `n` entries, with the events before the next one."""
        if n >= len(self.entries):
            return self
        cut = self.entries[n].seq
        return Batch(self.entries[:n], self.historical, tuple(e for e in self.events if e.after < cut))

    def tail(self, n: int) -> Batch:
        """The entries after the first `n` (what goes back when `head(n)` went out)."""
        return Batch(self.entries[n:], self.historical)

    @property
    def last_seq(self) -> int:
        return self.entries[-1].seq if self.entries else 0
