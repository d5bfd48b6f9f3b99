"""Shared building blocks for the config models: durations, names and the base model."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`500ms`, `1s`, `2.5s`, `5m`, `1h`, or a bare number of seconds, to float seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 1s or 5m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration such as 500ms, 1s or 5m")
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


def _format_duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(_format_duration, return_type=str),
    Field(json_schema_extra={"type": "string", "pattern": _DURATION.pattern}),
]

# MQTT topic segments: the wildcards and the separator would break the namespace.
Segment = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[^+#/\s][^+#/]*$"),
]


class Model(BaseModel):
    """Every config model: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_url(value: str, schemes: tuple[str, ...], bad_scheme: str, credentials: str) -> str:
    """A URL with one of `schemes`, a host, a valid port and no credentials in it."""
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(bad_scheme)
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and process listings.
        raise ValueError(f"put credentials in {credentials}, not in the URL")
    try:
        parts.port  # noqa: B018  (parsing the port is the check)
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    return value


def read_secret(password: str | None, password_file: Path | None) -> str | None:
    """The password: the first line of `password_file` when one is given, else `password`."""
    if password_file is not None:
        lines = password_file.read_text(encoding="utf-8").splitlines()
        return lines[0] if lines else ""
    return password


def check_unique(names: Iterable[str], what: str) -> None:
    """Raise ValueError naming the first name that appears twice."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} name {name!r} is used twice")
        seen.add(name)


class AssetOverride(Model):
    """ISA-95 levels a device may set differently from the gateway's."""

    enterprise: Segment | None = Field(default=None, description="Enterprise, instead of the gateway's.")
    site: Segment | None = Field(default=None, description="Site, instead of the gateway's.")
    area: Segment | None = Field(default=None, description="Area, instead of the gateway's.")
    line: Segment | None = Field(default=None, description="Line, instead of the gateway's.")
