"""Prometheus metrics: a custom collector that reads `State` at each scrape.

No per-tag labels: a gateway of 10,000 tags would make 10,000 series of each family, and the
values are what the outputs carry; the metrics say how the gateway is doing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gateway import __version__
from gateway.state import State


class StateCollector(Collector):
    """The families of issue 14, from `state` as it is when scraped."""

    def __init__(self, state: State) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state
        up = GaugeMetricFamily(
            "millwright_device_up", "1 while the device answers.", labels=["device", "protocol"]
        )
        reads = CounterMetricFamily(
            "millwright_device_reads", "Read cycles that succeeded.", labels=["device"]
        )
        errors = CounterMetricFamily(
            "millwright_device_read_errors", "Failed connects and reads.", labels=["device"]
        )
        missed = CounterMetricFamily(
            "millwright_device_missed_cycles", "Poll ticks skipped because a read overran.", labels=["device"]
        )
        readings = CounterMetricFamily("millwright_readings", "Readings taken in.", labels=["device"])
        for name, d in s.devices.items():
            up.add_metric([name, d.protocol], 1.0 if d.up else 0.0)
            reads.add_metric([name], d.reads)
            errors.add_metric([name], d.read_errors)
            missed.add_metric([name], d.missed)
            readings.add_metric([name], d.readings)
        yield from (up, reads, errors, missed, readings)

        connected = GaugeMetricFamily("millwright_output_connected", "1 while connected.", labels=["output"])
        published = CounterMetricFamily(
            "millwright_output_published", "Readings the broker confirmed.", labels=["output"]
        )
        refused = CounterMetricFamily(
            "millwright_output_refused", "Readings the broker refused for good.", labels=["output"]
        )
        depth = GaugeMetricFamily(
            "millwright_outbox_depth", "Readings the output has still to send.", labels=["output"]
        )
        dropped = CounterMetricFamily(
            "millwright_outbox_dropped", "Readings dropped for the output (cap, refusals).", labels=["output"]
        )
        for name, o in s.outputs.items():
            connected.add_metric([name], 1.0 if o.connected else 0.0)
            published.add_metric([name], o.published)
            refused.add_metric([name], o.refused)
            depth.add_metric([name], o.depth)
            dropped.add_metric([name], o.dropped)
        yield from (connected, published, refused, depth, dropped)

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
