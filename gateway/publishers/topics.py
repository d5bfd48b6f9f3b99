"""Topic templates: `topic:` on an output, e.g. `plant/{site}/{device}/{tag}`.

A template is checked when the config loads (known placeholders, no wildcards, no empty
level) and compiled into a `str.format` string; the publishers render it once per device
or tag and keep the result, so the hot path never formats a topic.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from gateway.model import AssetPath

PLACEHOLDERS = ("enterprise", "site", "area", "line", "device", "tag", "gateway")
UNS_TOPIC = "{enterprise}/{site}/{area}/{line}/{device}/{tag}"
BATCH_TOPIC = "{enterprise}/{site}/{area}/{line}/{device}"
# Azure IoT Hub takes telemetry on its device's events topic only; the property bag says the
# body is UTF-8 JSON, so that the hub's message routing can query it.
IOT_HUB_EVENTS = "devices/{device_id}/messages/events/$.ct=application%2Fjson&$.ce=utf-8"


@dataclass(frozen=True, slots=True)
class Template:
    text: str
    fields: frozenset[str]

    def render(self, asset: AssetPath, gateway: str, tag: str = "") -> str:
        return self.text.format(
            enterprise=asset.enterprise,
            site=asset.site,
            area=asset.area,
            line=asset.line,
            device=asset.device,
            tag=tag,
            gateway=gateway,
        )


def parse(text: str) -> Template:
    """The template of `text`; ValueError saying what is wrong with it."""
    fields: set[str] = set()
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:  # a lone { or }
        raise ValueError(f"{text!r}: {exc} (placeholders are {_listed()})") from None
    for literal, field, spec, conversion in parts:
        if "+" in literal or "#" in literal:
            raise ValueError(f"{text!r}: + and # are wildcards, which a published topic cannot contain")
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            raise ValueError(f"{text!r}: unknown placeholder {{{field}}}; expected {_listed()}")
        fields.add(field)
    if "" in text.split("/"):
        raise ValueError(f"{text!r}: a topic level is empty (a leading, trailing or double /)")
    return Template(text, frozenset(fields))


def _listed() -> str:
    return ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)


def limit_problem(
    topic: str, most_bytes: int | None, most_slashes: int | None, free_prefix: str | None
) -> str | None:
    """What is wrong with `topic` for a platform that takes at most `most_bytes` bytes and
    `most_slashes` slashes in a topic, not counting `free_prefix` and the level after it (AWS
    IoT Core's Basic Ingest, `$aws/rules/<rule>/`); None if nothing."""
    size = len(topic.encode("utf-8"))
    rest = topic
    if free_prefix is not None and topic.startswith(free_prefix):
        rest = topic[len(free_prefix) :].partition("/")[2]
        size -= len(topic) - len(rest)
    if most_bytes is not None and size > most_bytes:
        return f"has {size} bytes, more than {most_bytes}"
    slashes = rest.count("/")
    if most_slashes is not None and slashes > most_slashes:
        return f"has {slashes} slashes (levels {slashes + 1}), more than {most_slashes}"
    return None
