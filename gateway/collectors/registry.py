"""The protocols the gateway speaks: one entry each (see `ProtocolEntry`).

Adding a protocol is its package (settings, collector, and a `protocol` module with its
entry) and one line in PROTOCOLS. The config's `devices:` union, its error messages, the
engine's collectors and Sparkplug's metric datatypes all come from here.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeVar

from pydantic import Field

from gateway.collectors import Collector, DeviceSettings, ProtocolEntry
from gateway.collectors.modbus.protocol import MODBUS
from gateway.collectors.opcua.protocol import OPCUA

PROTOCOLS: dict[str, ProtocolEntry[Any]] = {p.name: p for p in (MODBUS, OPCUA)}

D = TypeVar("D", bound=DeviceSettings)

if TYPE_CHECKING:
    # What code outside the protocol packages may read of a device; a type checker cannot
    # follow the union built below.
    Device: TypeAlias = DeviceSettings
else:
    # The settings of one device: the model whose `protocol:` matches.
    Device = Annotated[
        functools.reduce(operator.or_, (p.settings for p in PROTOCOLS.values())),
        Field(discriminator="protocol"),
    ]


def protocol(device: DeviceSettings) -> ProtocolEntry[Any]:
    """The registry entry of a configured device."""
    return PROTOCOLS[device.protocol]


def by_protocol(devices: Sequence[D]) -> dict[str, list[tuple[int, D]]]:
    """The devices of each protocol, with their index in `devices`."""
    groups: dict[str, list[tuple[int, D]]] = {}
    for index, device in enumerate(devices):
        groups.setdefault(device.protocol, []).append((index, device))
    return groups


def make_collectors(devices: Sequence[D], pki_dir: Path) -> list[tuple[D, Collector]]:
    """The collector of each device, in the devices' order (each protocol's factory makes
    those of its own devices together: see `ProtocolEntry.collectors`)."""
    made: dict[int, Collector] = {}
    for name, group in by_protocol(devices).items():
        made.update(zip((i for i, _ in group), PROTOCOLS[name].collectors([d for _, d in group], pki_dir),
                        strict=True))  # fmt: skip
    return [(device, made[i]) for i, device in enumerate(devices)]
