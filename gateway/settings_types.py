"""Shared building blocks for the config models: durations, names, numbers and the base model."""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
)

from gateway.model import EVENT

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# Every interval and timeout in the config (poll, timeout, publishing_interval, ...) lies in
# this range. Below 1 ms nothing in the gateway can keep up (a Modbus round trip alone takes
# longer); above a day, a poll or a timeout is a typo, and 1e400 (infinity) would make a
# device wait forever without a word. The tests, benches and examples use 20 ms to 30 s.
DURATION_MIN = 0.001
DURATION_MAX = 24 * 3600.0
_RANGE = "a duration is between 1ms and 24h"


def parse_duration(value: Any) -> float:
    """`500ms`, `1s`, `2.5s`, `5m`, `1h`, or a bare number of seconds, to float seconds,
    between DURATION_MIN and DURATION_MAX."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 1s or 5m")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past 1e308
            seconds = math.inf
        written = f"{value:g}" if isinstance(value, float) else shown(value, 40)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        written = value.strip()
    else:
        text = shown(repr(value) if isinstance(value, str) else value, 40)
        raise ValueError(f"{text} is not a duration such as 500ms, 1s or 5m")
    # Written so that NaN, which compares false with everything, is out of range too.
    if not DURATION_MIN <= seconds <= DURATION_MAX:
        raise ValueError(f"{shown(written, 40)} is out of range: {_RANGE}")
    return seconds


def shown(value: Any, limit: int | None = None) -> str:
    """A value for a message, on one line: printable text as it is, anything else (a path or
    a name with a line break in it, a list) as a bounded repr, cut to `limit` characters."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"  # (and str() stops at 4,300 digits)
    if isinstance(value, str | Path) and str(value).isprintable():
        text = str(value)
    elif isinstance(value, str | Path):
        text = repr(str(value))
    else:
        try:
            text = reprlib.repr(value)
        except ValueError:  # a huge int inside a list
            return f"a {type(value).__name__}"
    return text if limit is None or len(text) <= limit else f"{text[: limit - 3]}..."


def _format_duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(_format_duration, return_type=str),
    Field(json_schema_extra={"type": "string", "pattern": _DURATION.pattern}),
]

# The reconnect backoff of a device starts here and doubles up to the device's reconnect_max.
RECONNECT_START = 0.5
RECONNECT_MAX_DESCRIPTION = (
    "The longest wait between two reconnect attempts to the device; the backoff starts at 0.5 s "
    "and doubles up to this."
)


def _at_least_reconnect_start(seconds: float) -> float:
    if seconds < RECONNECT_START:
        # A cap below the first wait would make every wait after the first shorter: the
        # opposite of a backoff, and a hammering of a device that is down.
        start = _format_duration(RECONNECT_START)
        raise ValueError(f"{_format_duration(seconds)} is shorter than {start}, where the backoff starts")
    return seconds


ReconnectMax = Annotated[Duration, AfterValidator(_at_least_reconnect_start)]


class EnvText(str):
    """Text that `${NAME}` put in the config. A number or a switch may come that way
    (`port: ${MQTT_PORT}`): YAML saw only the reference, so its text is read here instead."""

    __slots__ = ()


_INT = re.compile(r"\s*[-+]?[0-9]+\s*")


def _int_from_env(value: Any) -> Any:
    return int(value) if isinstance(value, EnvText) and _INT.fullmatch(value) else value


def _bool_from_env(value: Any) -> Any:
    if isinstance(value, EnvText) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


# Numbers and switches: YAML has its own types, and a config takes them as written. Plain
# pydantic coerces: `port: true` became port 1, `aliases: "yes"` True, `tls_insecure: 1` True.
INT_FROM_ENV = BeforeValidator(_int_from_env)
Int = Annotated[int, Strict(), INT_FROM_ENV]
Bool = Annotated[bool, Strict(), BeforeValidator(_bool_from_env)]
# An optional Int with bounds takes them inside, before INT_FROM_ENV: a Field's bounds on the
# optional would not pass through the validator, and would reach the JSON Schema as "ge"/"le".
# `Annotated[int, Strict(), Field(ge=0, le=15), INT_FROM_ENV] | None`


def _number(value: Any) -> Any:
    """A float field takes ints and floats, and text that is a number (YAML 1.1 reads `1e-3`,
    without a dot, as text), but not a boolean."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"{shown(value, 40)} is too large for a number") from None
    return value


# Not strict: strict floats refuse `1e-3`, which YAML 1.1 hands over as text. Non-finite
# values are refused by the base model (allow_inf_nan=False).
Float = Annotated[float, BeforeValidator(_number)]
# The bound inside, before the validator: given on the field, `ge` would wrap the validator
# and reach the JSON Schema as "ge" instead of "minimum".
NonNegativeFloat = Annotated[float, Field(ge=0), BeforeValidator(_number)]
PositiveFloat = Annotated[float, Field(gt=0), BeforeValidator(_number)]

# What MQTT cannot carry in a UTF-8 string (MQTT 5 1.5.4, 3.1.1 1.5.3): the null character
# and the other control characters (must not / should not), surrogates (not UTF-8) and the
# Unicode noncharacters. Mosquitto refuses a PUBLISH or CONNECT with any of them as malformed.
_NONCHARACTERS = "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
_NOT_MQTT = re.compile(f"[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef{_NONCHARACTERS}]")
_MQTT_MAX_BYTES = 65_535  # a UTF-8 string's two-byte length prefix


def mqtt_text_problem(text: str) -> str | None:
    """Why `text` cannot travel as an MQTT UTF-8 string (a topic level, a client id, a user
    name), e.g. `contains a control character (U+0000)`; None when it can."""
    # Four bytes at most per character: most strings need no encoding to know their size.
    if len(text) > _MQTT_MAX_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > _MQTT_MAX_BYTES:
        return f"is longer than {_MQTT_MAX_BYTES:,} bytes in UTF-8"
    if text.isascii() and text.isprintable():  # the common case, decided in C
        return None
    if m := _NOT_MQTT.search(text):
        ch = m.group()
        code = ord(ch)
        if code <= 0x9F:
            kind = "a control character"
        elif 0xD800 <= code <= 0xDFFF:
            kind = "a surrogate code point"  # only UTF-16 has them; from ${ENV} bytes, say
        else:
            kind = "a Unicode noncharacter"
        return f"contains {kind} (U+{code:04X})"
    return None


def _topic_level(value: Any) -> Any:
    if isinstance(value, str) and (problem := mqtt_text_problem(value)):
        raise ValueError(f"{problem}, which MQTT topics cannot carry")
    return value


def _mqtt_string(text: str | None) -> str | None:
    if text is not None and (problem := mqtt_text_problem(text)):
        raise ValueError(f"{problem}, which an MQTT CONNECT cannot carry")
    return text


# MQTT topic segments: the wildcards and the separator would break the namespace, and
# characters MQTT cannot carry would make the broker refuse every PUBLISH. Those are checked
# before the pattern, whose message would not say what is wrong with a leading tab; strict,
# so that bytes (`!!binary`) do not slip past the check as text.
Segment = Annotated[
    str,
    Strict(),
    Field(min_length=1, max_length=128, pattern=r"^[^+#/\s][^+#/]*$"),
    BeforeValidator(_topic_level),
]


def _not_an_event(value: str) -> str:
    if value.startswith(EVENT):
        raise ValueError(f"may not start with {EVENT!r}: such names are the gateway's device events")
    return value


# Tag names: topic segments, and not the names of device events (gateway.model.EVENT).
TagName = Annotated[Segment, AfterValidator(_not_an_event)]

# Strings the CONNECT packet carries (client id, user name).
MqttString = Annotated[str | None, AfterValidator(_mqtt_string)]


class Model(BaseModel):
    """Every config model: unknown keys are errors, values are immutable once loaded."""

    # allow_inf_nan: `scale: .inf` or `min: .nan` would make every reading Bad, unexplained.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


SECRET_FILE = "the file whose first line is the password"


def home(path: Path) -> Path:
    """`~` and `~user` expanded; left as written when there is no such home."""
    try:
        return path.expanduser()
    except RuntimeError:  # ~nobody-here/x: the "no such file" that follows says enough
        return path


def resolve_file(
    base: Path, value: Path, where: str, what: str, problems: list[str], *, secret: bool
) -> Path:
    """`value` relative to the config file's folder `base`; a problem noted (`where: ...`)
    if it is missing, a directory, or (for a secret) unreadable or empty. `what` says what
    the setting must name, for when it names a directory."""
    path = base / home(value)
    if path.is_dir():
        problems.append(f"{where}: {shown(path)} is a directory; give {what}")
    elif not path.is_file():
        problems.append(f"{where}: no such file: {shown(path)}")
    elif secret:
        try:
            if not path.read_text(encoding="utf-8").strip():
                problems.append(f"{where}: the file is empty: {shown(path)}")
        except OSError as exc:
            problems.append(f"{where}: cannot read {shown(path)}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            problems.append(f"{where}: {shown(path)} is not UTF-8 text")
    return path


class ProblemAt(ValueError):
    """A problem that a validator finds at a key below its model (`loc`, e.g. ("outputs", 1)):
    the config's message names that key rather than the model's."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


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
