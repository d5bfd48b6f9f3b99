"""Collectors: one protocol step against one device. The poller owns the loop.

Each protocol is a package beside this module and one entry in `registry.PROTOCOLS`: its
device settings model, its collector factory, its tags' datatypes, and the files its settings
name (see `ProtocolEntry`). Nothing outside the package knows a protocol's device class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

from gateway.model import Datatype, Reading
from gateway.settings_types import AssetOverride


class Collector(Protocol):
    """One device (or one bus). Has no loop, no sleep and no retry of its own.

    `read()` returns the readings to report this cycle: deadband (report by exception) is
    already applied, so an unchanged value may yield no reading. A request the device
    rejects (a Modbus exception) gives Bad readings for the tags it covered; a lost
    connection or a timeout raises `NotConnected` / `DeviceTimeout`, and the poller then
    calls `unavailable()` once and reconnects.
    """

    name: str

    async def connect(self) -> None:
        """Open the connection. Raises NotConnected when the device cannot be reached."""

    async def read(self) -> list[Reading]:
        """Read every tag once. Raises NotConnected or DeviceTimeout."""

    async def close(self) -> None:
        """Close the connection; safe to call when not connected."""

    def unavailable(self, status: int, now: float) -> list[Reading]:
        """Bad readings with `status` for every tag not already reported Bad with it."""

    def describe(self) -> dict[str, Any]:
        """The device's metadata for its retained `_meta` message (no secrets)."""

    def summary(self) -> str:
        """What a connection reads, for the log line once it works: `17 tags, 4 requests`."""

    def told(self) -> list[Reading]:
        """Device events the device told since the last call (an OPC UA server types its
        values: `gateway.model.datatype_event`); the poller puts them before the readings."""


class TagSettings(Protocol):
    """What every protocol's tag model has."""

    @property
    def name(self) -> str: ...


class DeviceSettings(Protocol):
    """What every protocol's device model has: all that the engine and the output formats
    read of a device. The rest is the protocol's own, reached through its registry entry.
    (Properties: read-only, so that each model may narrow the types.)"""

    @property
    def name(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    @property
    def tags(self) -> Sequence[TagSettings]: ...

    @property
    def asset(self) -> AssetOverride: ...

    @property
    def cycle(self) -> float:
        """How often the poller calls read()."""

    @property
    def reconnect_max(self) -> float: ...

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self: ...


MetricType = tuple[str, Datatype | None, str | None]
"""(tag, datatype, unit) of a configured tag; the datatype None when only the device knows it."""

D = TypeVar("D", bound=DeviceSettings)


def no_files(device: D, index: int, base: Path, problems: list[str]) -> D:
    """`ProtocolEntry.resolve_files` of a protocol whose settings name no file."""
    return device


def each_alone(device: Sequence[tuple[int, D]]) -> None:
    """`ProtocolEntry.check_together` of a protocol whose devices share nothing."""


def one_each(make: Callable[[D, Path], Collector]) -> Callable[[Sequence[D], Path], list[Collector]]:
    """`ProtocolEntry.collectors` of a protocol whose devices share nothing: `make` per device."""

    def collectors(devices: Sequence[D], pki_dir: Path) -> list[Collector]:
        return [make(device, pki_dir) for device in devices]

    return collectors


@dataclass(frozen=True, slots=True)
class ProtocolEntry(Generic[D]):
    """One protocol, as the registry lists it.

    - `name`: the value of `protocol:` in a device's settings (its model's discriminator).
    - `settings`: the device settings model.
    - `collectors(devices, pki_dir)`: the collectors of the protocol's devices, one each, in
      their order: given all at once, so that devices which share a connection (a Modbus
      serial line) can share it. It imports the protocol stack (asyncua alone adds 27 MB of
      RSS), so that a gateway loads only the stacks it uses.
    - `metric_types(device)`: (tag, datatype, unit) of each tag, for the formats that type
      their metrics (Sparkplug B).
    - `resolve_files(device, index, base, problems)`: the device with the files its settings
      name made relative to the config file's folder `base`; what is wrong with them appended
      to `problems`, each naming its key path (`devices[3].security.password_file: ...`).
    - `check_together(devices)`: raises `ProblemAt` (at `devices[i]...`) when devices of the
      protocol, given with their index in `devices:`, contradict one another.
    """

    name: str
    settings: type[D]
    collectors: Callable[[Sequence[D], Path], list[Collector]]
    metric_types: Callable[[D], list[MetricType]]
    resolve_files: Callable[[D, int, Path, list[str]], D] = no_files
    check_together: Callable[[Sequence[tuple[int, D]]], None] = each_alone
