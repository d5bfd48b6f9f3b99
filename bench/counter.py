"""The counting subscriber: a process of its own, so that counting does not share a core's
time with the gateway in a way the gateway's own accounting would hide.

Subscribes to a topic filter, and for every reading received notes, in buckets of one second:
- by receive time: how many readings arrived;
- by the reading's own timestamp: how many, and a histogram of latency (receive time minus
  reading timestamp) in milliseconds;
and, for UNS and batch JSON, every `seq` (a bitmap), to count gaps and duplicates. On SIGTERM it writes the
whole as JSON to the file given and exits.

    python -m bench.counter HOST PORT FILTER FORMAT OUT.json
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Tally:
    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.received: Counter[int] = Counter()  # receive second -> readings
        self.made: Counter[int] = Counter()  # reading-timestamp second -> readings
        self.latency: defaultdict[int, Counter[int]] = defaultdict(Counter)  # timestamp second -> ms -> n
        self.seen = bytearray()
        self.duplicates = 0
        self.max_seq = 0
        self.messages = 0

    def reading(self, now: float, ts: float) -> None:
        second = int(ts)
        self.received[int(now)] += 1
        self.made[second] += 1
        self.latency[second][max(0, int((now - ts) * 1000))] += 1

    def seq(self, seq: int) -> None:
        if seq >= len(self.seen) * 8:
            self.seen.extend(bytes(max(len(self.seen), seq // 8 + 1 - len(self.seen))))
        byte, bit = divmod(seq, 8)
        if self.seen[byte] >> bit & 1:
            self.duplicates += 1
        self.seen[byte] |= 1 << bit
        self.max_seq = max(self.max_seq, seq)

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        self.messages += 1
        if self.fmt in ("uns", "batch"):
            if msg.topic.endswith(("/_meta", "/status")):
                return
            doc = json.loads(msg.payload)
            for r in doc["readings"] if self.fmt == "batch" else [doc]:
                self.reading(now, datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp())
                self.seq(r["seq"])
        else:
            from gateway.publishers.sparkplug.sparkplug_b_pb2 import Payload

            if "/DDATA/" not in msg.topic:
                return
            payload = Payload()
            payload.ParseFromString(bytes(msg.payload))
            for m in payload.metrics:
                self.reading(now, m.timestamp / 1000)

    def dump(self) -> dict[str, Any]:
        missing = sum(1 for seq in range(1, self.max_seq + 1) if not self.seen[seq // 8] >> (seq % 8) & 1)
        return {
            "messages": self.messages,
            "received": dict(self.received),
            "made": dict(self.made),
            "latency_ms": {second: dict(hist) for second, hist in self.latency.items()},
            "seq": {"max": self.max_seq, "missing": missing, "duplicates": self.duplicates},
        }


def main(argv: list[str]) -> int:
    host, port, topic_filter, fmt, out = argv
    tally = Tally(fmt)
    # A persistent session (on a broker with persistence): what is published while the counter
    # reconnects after a broker restart waits for it, so a gap it sees is the gateway's.
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-counter", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.reconnect_delay_set(min_delay=1, max_delay=1)
    client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
    client.on_message = tally.on_message
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600

    def stop(*_: object) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    client.connect(host, int(port), clean_start=False, properties=properties)
    print("ready", flush=True)
    client.loop_forever()
    with open(out, "w", encoding="utf-8") as f:
        json.dump(tally.dump(), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
