"""The cloud platforms an output can publish to, and the rules each one imposes.

`platform:` on an output names one of PLATFORMS. The config applies its rules at load, so
that a user cannot configure something the platform would drop (a topic too deep for AWS, a
retained message for Event Grid, a keep-alive the hub refuses); the connection applies the
rest while running (the publish rate, the pause between CONNECTs).

The figures are the platforms' published limits (see the README's section per platform).
What a platform does beyond them is not always an error: AWS IoT Core discards publishes
above its rate without a word, and Azure Event Grid closes the connection on a retained
message. Hence limits here, not retries there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True, slots=True)
class Platform:
    """One platform's rules. None: no limit of the platform's own."""

    name: str
    title: str
    max_message_bytes: int | None = None  # payload and topic of one PUBLISH
    max_rate: float | None = None  # publishes per second on one connection
    max_inflight: int | None = None  # QoS 1 publishes awaiting PUBACK
    topic_bytes: int | None = None
    topic_slashes: int | None = None
    # The topic prefix that does not count against topic_slashes (AWS Basic Ingest).
    free_prefix: str | None = None
    keepalive: tuple[int, int] = (5, 3600)  # seconds, least and most
    retain: bool = True  # whether the platform stores retained messages
    status: bool = True  # whether the gateway status and `_meta` topics exist there
    reconnect_gap: float = 0.0  # seconds between two CONNECTs of one client id, at least
    tls: bool = False  # mqtts:// only
    client_certificate: bool = False  # cert and key required
    password: bool = False  # username and password required
    username: bool = False  # username required (Event Grid: the client's authentication name)
    versions: tuple[str, ...] = ("5", "3.1.1")
    formats: tuple[str, ...] = ("uns", "batch", "sparkplug")
    own_topic: bool = True  # whether `topic:` may be set


PLATFORMS: Mapping[str, Platform] = {
    "generic": Platform("generic", "an MQTT broker"),
    "aws-iot-core": Platform(
        "aws-iot-core",
        "AWS IoT Core",
        max_message_bytes=128 * KIB,
        max_rate=100.0,
        max_inflight=100,
        topic_bytes=256,
        topic_slashes=7,
        free_prefix="$aws/rules/",
        keepalive=(30, 1200),
        reconnect_gap=1.0,
        tls=True,
        client_certificate=True,
    ),
    "azure-iot-hub": Platform(
        "azure-iot-hub",
        "Azure IoT Hub",
        max_message_bytes=256 * KIB,
        # The hub's own throttle is per hub (S1: 100 device-to-cloud messages a second for
        # the first unit): one gateway alone may use it all, no more.
        max_rate=100.0,
        # The hub waits 1.5 times the keepalive, at most 1767 s: 1177 s is the most it honours.
        keepalive=(5, 1177),
        retain=False,
        status=False,
        tls=True,
        versions=("3.1.1",),
        formats=("batch",),
        own_topic=False,
    ),
    "azure-event-grid": Platform(
        "azure-event-grid",
        "Azure Event Grid",
        max_message_bytes=512 * KIB,
        max_rate=100.0,
        topic_bytes=256,
        topic_slashes=7,
        keepalive=(5, 1160),
        retain=False,
        tls=True,
        client_certificate=True,
        username=True,
    ),
    "hivemq-cloud": Platform(
        "hivemq-cloud",
        "HiveMQ Cloud",
        max_message_bytes=5 * KIB * KIB,
        tls=True,
        username=True,
        password=True,
    ),
}
"""Every platform by its `platform:` name; `generic` applies no rule of its own."""
