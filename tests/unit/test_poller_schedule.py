"""The poller's tick arithmetic: fixed rate, no drift, overruns skip whole ticks."""

from __future__ import annotations

import pytest

from gateway.poller import next_tick


@pytest.mark.parametrize(
    ("due", "now", "every", "expected"),
    [
        (0.0, 0.03, 0.1, (0.1, 0)),  # read took 30 ms: the next tick is 100 ms after the last
        (10.0, 10.099, 0.1, (10.1, 0)),  # however long the read, within the interval
        (0.0, 0.1, 1.0, (1.0, 0)),  # no drift: the read time is not added
        (0.0, 1.0, 1.0, (1.0, 0)),  # ended exactly on the next tick: no skip
        (0.0, 1.5, 1.0, (2.0, 1)),  # overran one tick: skip it, wait for the one after
        (0.0, 3.2, 1.0, (4.0, 3)),  # overran three ticks
        (5.0, 5.25, 0.5, (5.5, 0)),
        (5.0, 6.75, 0.5, (7.0, 3)),
    ],
)
def test_next_tick(due: float, now: float, every: float, expected: tuple[float, int]) -> None:
    tick, skipped = next_tick(due, now, every)
    assert skipped == expected[1]
    assert tick == pytest.approx(expected[0])
    assert tick >= now  # never a tick in the past
