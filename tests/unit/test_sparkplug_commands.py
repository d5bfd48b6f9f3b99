"""What any client of the broker can send the edge node (NCMD, DCMD, the primary host's
STATE), at random: the node never raises, keeps no state that grows with what it is sent,
and does what a command says only when the command is valid."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import MqttSettings, SparkplugSettings
from gateway.model import DOWN, Quality, Reading, datatype_event, state_event
from gateway.outbox import DEFAULT_OUTPUT, Outbox
from gateway.publishers.sparkplug.node import REBIRTH, BdSeqFile, SparkplugNode
from gateway.publishers.sparkplug.payload import DataType, Payload

NCMD = "spBv1.0/g/NCMD/n"
STATE = "spBv1.0/STATE/scada"
# The node's warnings are keyed by kind, never by what a message says.
WARNING_KINDS = {"dcmd", "ncmd-payload", "ncmd metric", "state"}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[SparkplugNode]:
    box = await Outbox.open(tmp_path / "outbox.db")
    mqtt = MqttSettings(
        url="mqtt://127.0.0.1:1", format="sparkplug", sparkplug=SparkplugSettings(group_id="g")
    )
    yield SparkplugNode(
        mqtt,
        SparkplugSettings(group_id="g", primary_host_id="scada"),
        box,
        edge_node_id="n",
        devices={"m1": [("t", DataType.DOUBLE, None)]},
        bdseq=BdSeqFile(tmp_path / "bdseq"),
        client_id="fuzzed",
    )
    await box.close()


# -- payloads ----------------------------------------------------------------------------

VALUE_FIELDS = {
    "int_value": st.integers(0, 2**32 - 1),
    "long_value": st.integers(0, 2**64 - 1),
    "float_value": st.floats(width=32),
    "double_value": st.floats(),
    "boolean_value": st.booleans(),
    "string_value": st.text(max_size=40),
    "bytes_value": st.binary(max_size=40),
}


@st.composite
def metrics(draw: st.DrawFn) -> dict[str, Any]:
    metric: dict[str, Any] = {}
    if draw(st.booleans()):
        metric["name"] = draw(st.one_of(st.just(REBIRTH), st.text(max_size=30), st.just("")))
    if draw(st.booleans()):
        metric["alias"] = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        metric["datatype"] = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(VALUE_FIELDS)))
        metric[field] = draw(VALUE_FIELDS[field])
    if draw(st.booleans()):
        metric["is_null"] = draw(st.booleans())
    return metric


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    payload = Payload()
    if draw(st.booleans()):
        payload.timestamp = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        payload.seq = draw(st.integers(0, 2**64 - 1))
    for metric in draw(st.lists(metrics(), max_size=8)):
        payload.metrics.add(**metric)
    data = payload.SerializeToString()
    # And damaged on the way: cut short, or bytes flipped.
    cut = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        data = data[:cut]
    elif data and draw(st.booleans()):
        data = data[:cut] + bytes([draw(st.integers(0, 255))]) + data[cut + 1 :]
    return data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def states(draw: st.DrawFn) -> bytes:
    doc = draw(
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"online": st.one_of(st.booleans(), json_values), "timestamp": json_values},
                optional={"extra": json_values},
            ),
            # Past a float's range: isfinite() raises OverflowError on such an int.
            st.builds(lambda online: {"online": online, "timestamp": 10**400}, st.booleans()),
        )
    )
    text = json.dumps(doc)
    return draw(st.one_of(st.just(text.encode()), st.binary(max_size=60), st.just(text[:-1].encode())))


def is_rebirth(topic: str, data: bytes) -> bool:
    """The oracle: a valid NCMD with a Rebirth metric whose boolean value is true."""
    if topic != NCMD:
        return False
    payload = Payload()
    try:
        payload.ParseFromString(data)
    except Exception:  # any decoding failure means: not a command
        return False
    return any(
        m.name == REBIRTH and m.WhichOneof("value") == "boolean_value" and m.boolean_value
        for m in payload.metrics
    )


messages = st.one_of(
    st.tuples(st.just(NCMD), st.one_of(payloads(), st.binary(max_size=80))),
    st.tuples(st.text(max_size=20).map(lambda d: f"spBv1.0/g/DCMD/n/{d}"), payloads()),
    st.tuples(st.just(STATE), states()),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=messages)
async def test_commands_from_the_network(node: SparkplugNode, message: tuple[str, bytes]) -> None:
    topic, data = message
    node._birth_due = False
    state_before = (node._state_ts, node._host_online)

    node._on_message(topic, data)  # the connection's callback for every message received

    assert node._birth_due is is_rebirth(topic, data)
    if topic != STATE:
        assert (node._state_ts, node._host_online) == state_before
    assert node._warned <= WARNING_KINDS  # bounded, whatever was sent, example after example


async def test_a_state_timestamp_past_a_floats_range_is_ignored(node: SparkplugNode) -> None:
    node._on_message(STATE, b'{"online": true, "timestamp": 1' + b"0" * 400 + b"}")
    assert node._host_online is False
    assert node._warned == {"state"}


async def test_a_flapping_device_is_told_in_order_and_leaves_nothing_behind(node: SparkplugNode) -> None:
    """Outages travel in the outbox with the readings (nothing waits in the node's memory,
    however often a device flaps): each becomes a DDEATH right after the device's last
    DDATA, and its next reading brings a DBIRTH first."""
    node._outbox.begin_replay(DEFAULT_OUTPUT)  # as the births do: from now on it takes events
    flaps = [r for i in range(1000) for r in (reading("m1", "t", float(i)), state_event("m1", DOWN, 1.0 + i))]
    await node._outbox.append(flaps)
    batch = await node._outbox.lease(DEFAULT_OUTPUT, len(flaps), live=True)
    assert (len(batch), len(batch.events)) == (1000, 1000)  # the events take no seq
    messages, done, carried = node._messages(batch, historical=False)
    assert done == len(batch)
    assert [topic.split("/")[2] for topic, *_ in messages] == ["DBIRTH", "DDATA", "DDEATH"] * 1000
    assert sorted(carried.values()) == [1] * 1000  # one reading per DDATA, none lost
    assert node._born == set()


def reading(device: str, tag: str, value: float) -> Reading:
    return Reading(device, tag, value, Quality.GOOD, 0, None, 1.0)


def test_a_datatype_event_does_not_retype_a_metric_the_config_types(node: SparkplugNode) -> None:
    """A stale event (the device was an OPC UA one under the same name) leaves the
    configured Double alone."""
    node._told_datatype(datatype_event("m1", "t", "int16", 1.0))
    spec = node._metrics["m1"]["t"]
    assert (spec.datatype, spec.learned, spec.sure) == (DataType.DOUBLE, None, True)
