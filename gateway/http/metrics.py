"""Prometheus metrics: a custom collector that reads `State` at each scrape.

No per-tag labels: a gateway of 10,000 tags would make 10,000 series of each family, and the
values are what the outputs carry; the metrics say how the gateway is doing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gateway import __version__
from gateway.state import DeviceState, OutputState, State

E = TypeVar("E", DeviceState, OutputState)


# Per device and per output: (family, help, counter or gauge, the figure of its entry).
_DEVICE: list[tuple[str, str, bool, Callable[[DeviceState], float]]] = [
    ("millwright_device_reads", "Read cycles that succeeded.", True, lambda d: d.reads),
    ("millwright_device_read_errors", "Failed connects and reads.", True, lambda d: d.read_errors),
    (
        "millwright_device_missed_cycles",
        "Poll ticks skipped because a read overran.",
        True,
        lambda d: d.missed,
    ),
    ("millwright_readings", "Readings taken in.", True, lambda d: d.readings),
]
_OUTPUT: list[tuple[str, str, bool, Callable[[OutputState], float]]] = [
    ("millwright_output_connected", "1 while connected.", False, lambda o: 1.0 if o.connected else 0.0),
    ("millwright_output_published", "Readings the broker confirmed.", True, lambda o: o.published),
    ("millwright_output_refused", "Readings the broker refused for good.", True, lambda o: o.refused),
    ("millwright_outbox_depth", "Readings the output has still to send.", False, lambda o: o.depth),
    (
        "millwright_outbox_dropped",
        "Readings dropped for the output (cap, refusals).",
        True,
        lambda o: o.dropped,
    ),
]


def _families(label: str, table: list[tuple[str, str, bool, Callable[[E], float]]],
              entries: dict[str, E]) -> Iterator[Metric]:  # fmt: skip
    for name, help_text, counter, figure in table:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, help_text, labels=[label])
        for key, entry in entries.items():
            family.add_metric([key], figure(entry))
        yield family


class StateCollector(Collector):
    """The families of issue 14, from `state` as it is when scraped."""

    def __init__(self, state: State) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state
        up = GaugeMetricFamily(
            "millwright_device_up", "1 while the device answers.", labels=["device", "protocol"]
        )
        for name, d in s.devices.items():
            up.add_metric([name, d.protocol], 1.0 if d.up else 0.0)
        yield up
        yield from _families("device", _DEVICE, s.devices)
        yield from _families("output", _OUTPUT, s.outputs)
        oldest = s.outbox.oldest_age if s.outbox is not None else None
        yield GaugeMetricFamily(
            "millwright_outbox_oldest_age_seconds", "Age of the oldest reading in the outbox (0: empty).",
            value=oldest or 0.0,
        )  # fmt: skip
        build = GaugeMetricFamily("millwright_build_info", "The gateway's version.", labels=["version"])
        build.add_metric([__version__], 1.0)
        yield build
        yield GaugeMetricFamily("millwright_uptime_seconds", "Seconds since the gateway started.",
                                value=time.time() - s.started)  # fmt: skip


def registry(state: State) -> CollectorRegistry:
    """A registry of `state`'s metrics only (not the process's default ones: one scrape, one
    gateway)."""
    made = CollectorRegistry(auto_describe=False)
    made.register(StateCollector(state))
    return made
