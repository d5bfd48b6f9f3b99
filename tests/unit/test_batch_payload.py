"""Batch JSON messages: every reading once, in order per device, within the size; the entry
accounting after a lost connection; and the publish-rate limit on a clock of our own."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.config import GatewaySettings
from gateway.errors import BrokerUnavailable
from gateway.model import AssetPath, Batch, Entry, Quality, Reading, Status
from gateway.publishers.batch import BatchPublisher, _per_entry
from gateway.publishers.rate import WINDOW, RateLimit

GATEWAY = GatewaySettings(id="gw", enterprise="acme", site="s", area="a", line="l")
DEVICES = ("press-1", "press-2", "oven")
T0 = 1_795_000_000.123


def publisher() -> BatchPublisher:
    devices = {d: (AssetPath("acme", "s", "a", "l", d), {}) for d in DEVICES}
    # messages() never touches the connection: it is given the limit.
    return BatchPublisher(None, GATEWAY, devices)  # type: ignore[arg-type]


values = st.one_of(
    st.integers(-(2**63), 2**63), st.floats(allow_nan=True), st.booleans(), st.text(max_size=300), st.none()
)
readings = st.tuples(st.sampled_from(DEVICES), st.sampled_from(["t", "speed", "näme"]), values,
                     st.sampled_from(list(Quality)))  # fmt: skip


def entries(drawn: list[tuple[str, str, Any, Quality]]) -> list[Entry]:
    made = []
    for seq, (device, tag, value, quality) in enumerate(drawn, start=1):
        status = 0 if quality is Quality.GOOD else Status.BAD_TIMEOUT
        made.append(Entry(seq, Reading(device, tag, value, quality, status, None, T0 + seq, "Cel")))
    return made


@given(st.lists(readings, min_size=1, max_size=60), st.integers(400, 4000))
def test_batches_carry_every_reading_once_in_order_within_the_limit(
    drawn: list[tuple[str, str, Any, Quality]], limit: int
) -> None:
    batch = Batch(entries(drawn))
    pub = publisher()
    messages, carried = pub.messages(batch, limit)
    seen: list[int] = []
    for (topic, payload, qos, retain), indices in zip(messages, carried, strict=True):
        assert (qos, retain) == (1, False)
        doc = json.loads(payload)
        device = doc["device"]
        assert topic == f"acme/s/a/l/{device}"
        assert doc["path"] == {"enterprise": "acme", "site": "s", "area": "a", "line": "l"}
        # One device per message, its readings in outbox order, each with its tag and seq.
        assert [batch.entries[i].reading.device for i in indices] == [device] * len(indices)
        assert [r["seq"] for r in doc["readings"]] == [batch.entries[i].seq for i in indices]
        assert [r["tag"] for r in doc["readings"]] == [batch.entries[i].reading.tag for i in indices]
        for r in doc["readings"]:
            assert set(r) >= {"tag", "value", "quality", "timestamp", "unit", "seq"}
            assert ("status" in r) == (r["quality"] != "Good")
        if len(indices) > 1:  # alone, a reading may be too large: the connection refuses it
            assert len(payload) + len(topic) <= limit
        seen += indices
    assert sorted(seen) == list(range(len(batch)))
    # As few messages as fit: a device's next message starts with a reading that did not fit.
    for k in range(len(messages) - 1):
        (topic, payload, _, _), following = messages[k], carried[k + 1]
        if messages[k + 1][0] == topic:
            first = pub.reading(batch.entries[following[0]])
            assert len(topic) + len(payload) + len(b",") + len(first) > limit


def test_a_reading_larger_than_the_limit_goes_alone() -> None:
    big = Entry(2, Reading("press-1", "t", "x" * 5000, Quality.GOOD, 0, None, T0, None))
    small = [Entry(s, Reading("press-1", "t", 1, Quality.GOOD, 0, None, T0, None)) for s in (1, 3)]
    messages, carried = publisher().messages(Batch([small[0], big, small[1]]), 1024)
    assert carried == [[0], [1], [2]]
    assert len(messages[1][1]) > 5000


@given(st.lists(st.sampled_from(DEVICES), min_size=1, max_size=30), st.data())
def test_a_lost_connection_acks_the_entries_before_the_first_unconfirmed_message(
    devices: list[str], data: st.DataObject
) -> None:
    batch = Batch(entries([(d, "t", 1.5, Quality.GOOD) for d in devices]))
    messages, carried = publisher().messages(batch, 600)
    settled = data.draw(st.integers(0, len(messages)))
    refused = data.draw(st.lists(st.integers(0, max(settled - 1, 0)), unique=True)) if settled else []
    lost = BrokerUnavailable(
        "gone", settled=settled, refused=[(messages[k][0], "no") for k in refused], refused_at=refused,
        unconfirmed=settled if settled < len(messages) else None,
    )  # fmt: skip
    mapped = _per_entry(lost, carried, len(batch))
    confirmed = {i for k in range(settled) for i in carried[k]}
    # Every entry acked was in a settled message; the first one not acked was not.
    assert set(range(mapped.settled)) <= confirmed
    assert mapped.settled == len(batch) or mapped.settled not in confirmed
    # Refusals are counted per entry, only among those acked.
    expected = sorted(i for k in refused for i in carried[k] if i < mapped.settled)
    assert sorted(mapped.refused_at) == expected
    assert len(mapped.refused) == len(expected)
    if settled < len(messages):  # the first entry not acked is the one to blame (and isolate)
        assert mapped.unconfirmed == mapped.settled


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@given(st.floats(0.5, 500), st.lists(st.floats(0, 0.05), min_size=1, max_size=400))
def test_no_window_ever_holds_more_than_the_rate(rate: float, gaps: list[float]) -> None:
    clock = Clock()
    limit = RateLimit(rate, clock)
    asked: list[float] = []
    sent: list[float] = []
    for gap in gaps:
        clock.now += gap
        asked.append(clock.now)
        while (wait := limit.delay()) > 0:
            clock.now += wait
        sent.append(clock.now)
    most = max(1, int(rate))
    span = WINDOW * most / rate
    for i in range(len(sent) - most):
        assert sent[i + most] - sent[i] >= span - 1e-9
    # And it holds back no more than it must: a message that waited went as soon as the
    # oldest of the last `most` left the span.
    for j in range(len(sent)):
        if sent[j] > asked[j]:
            assert j >= most
            assert abs(sent[j] - (sent[j - most] + span)) < 1e-6


def test_under_the_rate_nothing_waits() -> None:
    clock = Clock()
    limit = RateLimit(100, clock)
    for _ in range(100):
        assert limit.delay() == 0
    assert limit.delay() > 0
    clock.now += WINDOW
    assert limit.delay() == 0
