"""Sparkplug B payloads: metric values by datatype, the Quality property, and decoding to JSON.

The wire format is the protobuf schema in `sparkplug_b.proto`. What the schema does not say,
and this module does (Sparkplug 3.0, chapter 6):

- Int8, Int16 and Int32 travel in the 32-bit `int_value` as two's complement, Int64 in the
  64-bit `long_value` likewise; UInt8..UInt32 in `int_value`, UInt64 and DateTime (ms since
  the epoch) in `long_value`.
- Decoding is lenient where implementations differ: an unsigned 32-bit value is accepted
  in `int_value` or `long_value`.
"""

from __future__ import annotations

import base64
import enum
import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError

from gateway.model import Quality, Value
from gateway.publishers.sparkplug import sparkplug_b_pb2 as pb

Payload = pb.Payload
Metric = pb.Payload.Metric

NAMESPACE = "spBv1.0"


class DataType(enum.IntEnum):
    """Sparkplug datatype codes (the `DataType` enum of the schema)."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19
    PROPERTYSET = 20
    PROPERTYSETLIST = 21


# Integer datatypes: (bits, signed). Bits decide the field: 64 -> long_value, else int_value.
_INTEGERS: dict[DataType, tuple[int, bool]] = {
    DataType.INT8: (8, True),
    DataType.INT16: (16, True),
    DataType.INT32: (32, True),
    DataType.INT64: (64, True),
    DataType.UINT8: (8, False),
    DataType.UINT16: (16, False),
    DataType.UINT32: (32, False),
    DataType.UINT64: (64, False),
}
_STRINGS = (DataType.STRING, DataType.TEXT, DataType.UUID)

# Quality codes of the `Quality` property (payloads-propertyset-quality-value-value).
# (500, stale, is the host's to set when a node or device dies.)
QUALITY_BAD = 0
QUALITY_GOOD = 192
# Uncertain has no code of its own: its value is still the current one (e.g. a reading
# outside its valid range), so it travels as Good, with the OPC UA status beside it.
_QUALITY_CODES = {Quality.GOOD: QUALITY_GOOD, Quality.UNCERTAIN: QUALITY_GOOD, Quality.BAD: QUALITY_BAD}


def type_name(datatype: int) -> str:
    """The schema's name of a datatype code (`Int16`), or the number for an unknown one."""
    try:
        return pb.DataType.Name(datatype)
    except ValueError:
        return str(datatype)


def datatype_of(value: Value) -> DataType | None:
    """The datatype a value of unknown origin is published as; None for a null value.

    Lists (OPC UA arrays) travel as their JSON text: Sparkplug's array types need a fixed
    element type, which a list of JSON values does not have."""
    if value is None:
        return None
    if isinstance(value, bool):
        return DataType.BOOLEAN
    if isinstance(value, int):
        return DataType.UINT64 if value > 2**63 - 1 else DataType.INT64
    if isinstance(value, float):
        return DataType.DOUBLE
    return DataType.STRING


def fits(datatype: DataType, value: Value) -> bool:
    """Whether `value` can be published as `datatype` without loss (None always fits)."""
    if value is None:
        return True
    # A bool fits the numeric types as 0 or 1: a value that switches between a bool and a
    # number (an OPC UA BaseDataType variable) then settles on the number's datatype.
    if datatype in _INTEGERS:
        if not isinstance(value, int):
            return False
        bits, signed = _INTEGERS[datatype]
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        return low <= value <= high
    if datatype in (DataType.FLOAT, DataType.DOUBLE):
        return isinstance(value, (int, float))
    if datatype is DataType.BOOLEAN:
        return isinstance(value, bool)
    if datatype is DataType.DATETIME:
        return isinstance(value, str) and _epoch_ms(value) is not None
    if datatype is DataType.BYTES:
        return isinstance(value, str) and _unbase64(value) is not None
    return datatype in _STRINGS  # anything has a text form (lists as JSON)


def set_value(metric: Metric, datatype: DataType, value: Value) -> None:
    """Put `value` into the field its datatype prescribes; None sets `is_null`. A DateTime
    comes as ISO 8601 text and a Bytes value as base64 text (their form in a Reading).

    The caller checked `fits(datatype, value)`."""
    if value is None:
        metric.is_null = True
    elif datatype in _INTEGERS:
        bits, _ = _INTEGERS[datatype]
        assert isinstance(value, int)
        if bits == 64:
            metric.long_value = value & 0xFFFF_FFFF_FFFF_FFFF
        else:
            metric.int_value = value & 0xFFFF_FFFF
    elif datatype is DataType.FLOAT:
        assert isinstance(value, (int, float))
        metric.float_value = float(value)
    elif datatype is DataType.DOUBLE:
        assert isinstance(value, (int, float))
        metric.double_value = float(value)
    elif datatype is DataType.BOOLEAN:
        metric.boolean_value = bool(value)
    elif datatype is DataType.DATETIME:
        assert isinstance(value, str)
        ms = _epoch_ms(value)
        if ms is None or ms < 0:
            # long_value is unsigned: a time before 1970 (OPC UA's "no time" is 1601-01-01)
            # has no Sparkplug form.
            metric.is_null = True
        else:
            metric.long_value = ms
    elif datatype is DataType.BYTES:
        assert isinstance(value, str)
        metric.bytes_value = _unbase64(value) or b""
    else:
        metric.string_value = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def get_value(metric: Metric, datatype: int | None) -> Any:
    """The metric's value as Python: signed integers undone from two's complement, a
    DateTime as ISO 8601 text; when the datatype is unknown (a DATA message, which does
    not repeat it), the raw field."""
    if metric.is_null:
        return None
    field = metric.WhichOneof("value")
    if field is None:
        return None
    raw = getattr(metric, field)
    if datatype in _INTEGERS and field in ("int_value", "long_value"):
        return _integer(raw, datatype)
    if datatype == DataType.DATETIME and field == "long_value":
        return iso_ms(raw)
    if field == "bytes_value":
        return base64.b64encode(raw).decode("ascii")
    if field in ("dataset_value", "template_value", "extension_value"):
        return {"unsupported": field}
    if isinstance(raw, float) and not math.isfinite(raw):
        return str(raw)  # JSON has no NaN or infinity
    return raw


def _integer(raw: int, datatype: int) -> int:
    """An integer field's value as its datatype says: cut to the datatype's width (lenient:
    an unsigned 32-bit value may come in long_value) and undone from two's complement."""
    bits, signed = _INTEGERS[DataType(datatype)]
    raw &= (1 << bits) - 1
    if signed and raw >= 1 << (bits - 1):
        raw -= 1 << bits
    return raw


def _epoch_ms(text: str) -> int | None:
    """An ISO 8601 time (as OPC UA DateTime values are carried) as ms since the epoch, UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return round(moment.timestamp() * 1000)
    except (ValueError, OverflowError):
        return None


def _unbase64(text: str) -> bytes | None:
    """Base64 text (as OPC UA ByteStrings are carried) as bytes."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


def add_properties(metric: Metric, quality: Quality | None, status: int, unit: str | None = None) -> None:
    """The `Quality` property (Int32) when `quality` is given, the OPC UA `Status` (UInt32)
    when not Good, and the `engUnit` (String) when `unit` is given."""
    props = metric.properties
    if quality is not None:
        props.keys.append("Quality")
        props.values.add(type=DataType.INT32, int_value=_QUALITY_CODES[quality])
    if status:
        props.keys.append("Status")
        props.values.add(type=DataType.UINT32, int_value=status & 0xFFFF_FFFF)
    if unit is not None:
        props.keys.append("engUnit")
        props.values.add(type=DataType.STRING, string_value=unit)


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as UTC ISO 8601 text with milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- decoding, for `millwright sparkplug decode` and for tests ---------------------------


def parse(data: bytes) -> Payload:
    """Parse a Sparkplug B payload; ValueError when the bytes are not one."""
    payload = Payload()
    try:
        payload.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a Sparkplug B payload: {exc}") from None
    return payload


class Decoder:
    """Turns payloads into JSON-ready dicts. Remembers the datatypes announced by birth
    messages, per edge node and device, so that later DATA messages (which carry no
    datatype, perhaps only an alias) decode to names and signed values as well."""

    def __init__(self) -> None:
        # (group, node, device or "") -> alias or name -> (name, datatype)
        self._births: dict[tuple[str, str, str], dict[int | str, tuple[str, int]]] = {}

    def decode(self, data: bytes, topic: str | None = None) -> dict[str, Any]:
        payload = parse(data)
        key, kind = _topic_key(topic)
        if kind in ("NBIRTH", "DBIRTH"):
            known: dict[int | str, tuple[str, int]] = {}
            for m in payload.metrics:
                known[m.name] = (m.name, m.datatype)
                if m.HasField("alias"):
                    known[m.alias] = (m.name, m.datatype)
            if kind == "NBIRTH" and key is not None:  # a new node session forgets its devices
                self._births = {k: v for k, v in self._births.items() if k[:2] != key[:2]}
            if key is not None:
                self._births[key] = known
        births = self._births.get(key, {}) if key is not None else {}
        doc: dict[str, Any] = {}
        if topic is not None:
            doc["topic"] = topic
        if payload.HasField("timestamp"):
            doc["timestamp"] = payload.timestamp
            doc["time"] = iso_ms(payload.timestamp)
        if payload.HasField("seq"):
            doc["seq"] = payload.seq
        if payload.HasField("uuid"):
            doc["uuid"] = payload.uuid
        doc["metrics"] = [_metric(m, births) for m in payload.metrics]
        return doc


def _topic_key(topic: str | None) -> tuple[tuple[str, str, str] | None, str | None]:
    parts = topic.split("/") if topic else []
    if len(parts) in (4, 5) and parts[0] == NAMESPACE:
        return (parts[1], parts[3], parts[4] if len(parts) == 5 else ""), parts[2]
    return None, None


def _metric(m: Metric, births: Mapping[int | str, tuple[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = births.get(m.name) if m.name else births.get(m.alias) if m.HasField("alias") else None
    datatype = m.datatype if m.HasField("datatype") else (known[1] if known else None)
    if m.name:
        out["name"] = m.name
    elif known is not None:
        out["name"] = known[0]
    if m.HasField("alias"):
        out["alias"] = m.alias
    if m.HasField("timestamp"):
        out["timestamp"] = m.timestamp
    if datatype is not None:
        out["datatype"] = type_name(datatype)
    if m.is_historical:
        out["is_historical"] = True
    if m.is_transient:
        out["is_transient"] = True
    if m.is_null:
        out["is_null"] = True
    out["value"] = get_value(m, datatype)
    if m.HasField("properties"):
        out["properties"] = dict(_properties(m.properties))
    return out


def _properties(props: pb.Payload.PropertySet) -> Iterable[tuple[str, Any]]:
    for key, value in zip(props.keys, props.values, strict=False):
        if value.is_null:
            yield key, None
            continue
        field = value.WhichOneof("value")
        raw: Any = getattr(value, field) if field is not None else None
        if field == "int_value" and value.type in _INTEGERS:
            raw = _integer(raw, value.type)
        if field in ("propertyset_value", "propertysets_value", "extension_value"):
            raw = {"unsupported": field}
        yield key, raw
