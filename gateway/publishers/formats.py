"""The output formats: one entry each, what `format:` accepts and how the engine builds it.

A format is a module with a `build(context)` function; adding one is that module and one
line in FORMATS. The modules are imported when an output uses them: Sparkplug brings
protobuf (5 MB of RSS, which a gateway without a Sparkplug output need not carry), and the
config takes the names from here, so this module imports no format.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.collectors import Collector, DeviceSettings
    from gateway.config import Settings
    from gateway.outbox import Outbox
    from gateway.publishers import Publisher
    from gateway.publishers.settings import OutputSettings


@dataclass(frozen=True, slots=True)
class OutputContext:
    """What building an output may use: the whole config, the output's own settings, the
    outbox, and each configured device with its collector."""

    settings: Settings
    output: OutputSettings
    outbox: Outbox
    collectors: Sequence[tuple[DeviceSettings, Collector]]


Factory = Callable[[OutputContext], "Publisher"]
"""What a format's `build` is: the `Publisher` of one output, on its own MQTT connection."""


def _lazy(module: str) -> Factory:
    """The `build` of `module`, which is imported on the first call."""

    def build(context: OutputContext) -> Publisher:
        factory: Factory = importlib.import_module(module).build
        return factory(context)

    return build


FORMATS: Mapping[str, Factory] = {
    "uns": _lazy("gateway.publishers.uns"),
    "batch": _lazy("gateway.publishers.batch"),
    "sparkplug": _lazy("gateway.publishers.sparkplug.node"),
}
