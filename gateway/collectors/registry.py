"""The protocols the gateway speaks: one entry each (see `ProtocolEntry`).

Adding a protocol is its package (settings, collector, and a `protocol` module with its
entry) and one line in PROTOCOLS. The config's `devices:` union, its error messages, the
engine's collectors and Sparkplug's metric datatypes all come from here.
"""

from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias

from pydantic import Field

from gateway.collectors import DeviceSettings, ProtocolEntry
from gateway.collectors.modbus.protocol import MODBUS
from gateway.collectors.opcua.protocol import OPCUA

PROTOCOLS: dict[str, ProtocolEntry[Any]] = {p.name: p for p in (MODBUS, OPCUA)}

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
