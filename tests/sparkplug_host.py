"""A test Sparkplug host application: what a SCADA host sees on `spBv1.0/#`, decoded.

It decodes with the generated protobuf classes directly (not with the gateway's decoder),
and sends the host's side of the protocol: STATE and NCMD, as a real host would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import paho.mqtt.publish as mqtt_publish
from paho.mqtt.enums import MQTTProtocolVersion

from gateway.publishers.sparkplug.sparkplug_b_pb2 import Payload
from tests.helpers import Message, Mosquitto, Subscriber

REBIRTH = "Node Control/Rebirth"


@dataclass(frozen=True, slots=True)
class Spark:
    """One Sparkplug message as the host received it."""

    topic: str
    kind: str  # NBIRTH, DBIRTH, NDATA, DDATA, DDEATH, NDEATH, NCMD, DCMD, STATE
    device: str | None
    qos: int
    retain: bool
    payload: Payload

    @property
    def seq(self) -> int | None:
        return self.payload.seq if self.payload.HasField("seq") else None

    def metric(self, name: str) -> Payload.Metric:
        found = [m for m in self.payload.metrics if m.name == name]
        assert len(found) == 1, f"{self.topic}: {len(found)} metrics named {name!r}"
        return found[0]

    @property
    def bdseq(self) -> int:
        return int(self.metric("bdSeq").long_value)


def decode(message: Message) -> Spark | None:
    """What the edge node sent; None for STATE and for commands (sent by the tests, some of
    them not Sparkplug at all, on purpose)."""
    parts = message.topic.split("/")
    if len(parts) < 3 or parts[0] != "spBv1.0" or parts[1] == "STATE" or parts[2] in ("NCMD", "DCMD"):
        return None
    payload = Payload()
    payload.ParseFromString(message.payload)
    device = parts[4] if len(parts) == 5 else None
    return Spark(message.topic, parts[2], device, message.qos, message.retain, payload)


class Host:
    """Subscribed to `spBv1.0/#` (QoS 1) on `broker`; decodes what the edge node sends."""

    def __init__(self, broker: Mosquitto, subscriber: Subscriber, host_id: str = "scada") -> None:
        self.broker = broker
        self.subscriber = subscriber
        self.host_id = host_id

    @property
    def sparks(self) -> list[Spark]:
        return [s for m in self.subscriber.messages if (s := decode(m)) is not None]

    def of(self, kind: str) -> list[Spark]:
        return [s for s in self.sparks if s.kind == kind]

    async def received(self, predicate: Any, timeout: float = 10.0) -> list[Spark]:  # noqa: ASYNC109
        await self.subscriber.received(lambda _: predicate(self.sparks), timeout)
        return self.sparks

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> None:
        mqtt_publish.single(
            topic, payload, qos=qos, retain=retain, hostname=self.broker.host, port=self.broker.port,
            protocol=MQTTProtocolVersion.MQTTv5,
        )  # fmt: skip

    def state(self, *, online: bool, timestamp: int) -> None:
        """Publish this host's STATE (retained, QoS 1), as a Sparkplug 3.0 host does."""
        body = json.dumps({"online": online, "timestamp": timestamp}).encode()
        self.publish(f"spBv1.0/STATE/{self.host_id}", body, qos=1, retain=True)

    def rebirth(self, group: str, node: str, timestamp: int) -> None:
        payload = Payload(timestamp=timestamp)
        payload.metrics.add(name=REBIRTH, datatype=11, boolean_value=True)
        self.publish(f"spBv1.0/{group}/NCMD/{node}", payload.SerializeToString())


def seq_gaps(sparks: list[Spark]) -> list[tuple[int, int]]:
    """(previous, next) pairs where the node's seq did not go up by one modulo 256, counting
    from each NBIRTH (seq 0); NDEATH carries no seq and is skipped."""
    gaps: list[tuple[int, int]] = []
    previous: int | None = None
    for s in sparks:
        if s.kind in ("NDEATH", "NCMD", "DCMD"):
            continue
        assert s.seq is not None, f"{s.topic} has no seq"
        if s.kind == "NBIRTH":
            previous = s.seq
            continue
        if previous is not None and s.seq != (previous + 1) % 256:
            gaps.append((previous, s.seq))
        previous = s.seq
    return gaps


_FIELDS = {
    1: "int_value", 2: "int_value", 3: "int_value", 5: "int_value", 6: "int_value", 7: "int_value",
    4: "long_value", 8: "long_value", 13: "long_value", 9: "float_value", 10: "double_value",
    11: "boolean_value", 12: "string_value", 14: "string_value", 17: "bytes_value",
}  # fmt: skip


def mismatched_values(sparks: list[Spark]) -> list[str]:
    """DDATA metrics whose value is not in the field the datatype of the device's latest
    DBIRTH prescribes (or that the DBIRTH did not announce at all)."""
    born: dict[str, dict[str, int]] = {}  # device -> name or alias -> datatype
    wrong: list[str] = []
    for s in sparks:
        if s.kind == "DBIRTH" and s.device is not None:
            known: dict[str, int] = {}
            for m in s.payload.metrics:
                known[m.name] = m.datatype
                if m.HasField("alias"):
                    known[f"#{m.alias}"] = m.datatype
            born[s.device] = known
        elif s.kind == "DDATA" and s.device is not None:
            for m in s.payload.metrics:
                key = m.name or f"#{m.alias}"
                datatype = born.get(s.device, {}).get(key)
                if datatype is None:
                    wrong.append(f"{s.topic} seq {s.seq}: {key} was not in a DBIRTH")
                elif not m.is_null and m.WhichOneof("value") != _FIELDS.get(datatype):
                    wrong.append(
                        f"{s.topic} seq {s.seq}: {key} born {datatype}, sent {m.WhichOneof('value')}"
                    )
    return wrong
