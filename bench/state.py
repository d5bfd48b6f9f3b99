"""Micro-benchmark of what the State costs on the hot path: folding each batch of readings into
the latest value per tag. In process, no sockets: the figure is nanoseconds per reading, to
set beside the ~80 us the whole UNS pipeline spends on one."""

from __future__ import annotations

import asyncio
import timeit
from typing import Any

from gateway.model import Quality, Reading
from gateway.state import State


def fold(devices: int = 4, tags: int = 100, rounds: int = 2_000) -> dict[str, Any]:
    """Per reading: a bare dict store (the floor the issue sets), `State.fold`, and the sink
    that `State.sink` wraps around the outbox's (with a no-op outbox), each the best of five
    runs over `rounds` polls of every device (a batch is one device's poll, as the poller
    hands it over)."""
    batches = [
        [Reading(f"press-{d}", f"hr{t}", float(t), Quality.GOOD, 0, None, 1.7e9) for t in range(tags)]
        for d in range(devices)
    ]
    readings = rounds * devices * tags
    state = State((r.device, r.tag) for batch in batches for r in batch)
    latest: dict[tuple[str, str], Reading] = {}

    def dict_store() -> None:
        for batch in batches:
            for r in batch:
                latest[r.device, r.tag] = r

    def state_fold() -> None:
        for batch in batches:
            state.fold(batch)

    async def nothing(readings: list[Reading]) -> None:
        pass

    sink = state.sink(nothing)

    async def through_sink() -> None:
        for _ in range(rounds):
            for batch in batches:
                await sink(batch)

    async def bare_sink() -> None:  # the same loop without the State: what the wrapper adds
        for _ in range(rounds):
            for batch in batches:
                await nothing(batch)

    def ns(run: Any) -> float:
        return min(timeit.repeat(run, number=rounds, repeat=5)) / readings * 1e9

    def ns_async(run: Any) -> float:
        return min(timeit.repeat(lambda: asyncio.run(run()), number=1, repeat=5)) / readings * 1e9

    result = {
        "devices": devices,
        "tags": tags,
        "readings_per_run": readings,
        "dict_store_ns_per_reading": round(ns(dict_store), 1),
        "fold_ns_per_reading": round(ns(state_fold), 1),
        "sink_ns_per_reading": round(ns_async(through_sink) - ns_async(bare_sink), 1),
    }
    print(
        f"State.fold: {result['fold_ns_per_reading']} ns/reading "
        f"(a bare dict store: {result['dict_store_ns_per_reading']} ns); "
        f"through State.sink: {result['sink_ns_per_reading']} ns more than the outbox's sink alone "
        f"({devices} x {tags} tags, batches of {tags})"
    )
    return result
