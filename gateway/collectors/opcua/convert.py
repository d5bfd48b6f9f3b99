"""OPC UA DataValues to Readings: Variant to a JSON value, StatusCode to Quality.

    Variant type                          JSON value
    Null                                  null
    Boolean                               true / false
    SByte Byte Int16 ... Int64 UInt64     number (integer)
    Float Double                          number; NaN and infinity make the reading Bad
                                          (BadOutOfRange), or null inside an array
    String                                string
    DateTime                              ISO 8601 UTC string with milliseconds, ...Z
    ByteString                            base64 string
    arrays of the above                   lists (nested for matrices)
    anything else                         null, and the reading is Uncertain with
                                          status 0x40000000 (Uncertain) unless the server
                                          already said Uncertain or Bad

The quality follows the severity bits of the server's StatusCode (DESIGN §4); a Bad
reading carries no value. The SourceTimestamp, when the server sends one, becomes the
reading's source time.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from asyncua import ua
from asyncua.ua.status_codes import code_to_name_doc

from gateway.model import Datatype, Quality, Reading, Status, Value

# The generic Uncertain code: a value of a type the gateway cannot represent in JSON was
# received. Uncertain rather than Bad, because the node itself is fine; a consumer sees
# that something arrived and why it has no value.
UNCERTAIN = 0x40000000

_VT = ua.VariantType
_EPOCH_NULL = datetime(1601, 1, 1, tzinfo=UTC)  # OPC UA's "no time"


class Unsupported(Exception):
    """A Variant type with no JSON form."""


def iso(dt: datetime) -> str:
    """UTC, milliseconds, `Z`: the same form as gateway.model.iso_millis."""
    if dt.tzinfo is None:  # asyncua decodes UTC; a naive value is UTC too
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def posix(dt: datetime | None) -> float | None:
    """A DateTime as POSIX seconds; None for a missing or null (1601-01-01) time."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    if dt <= _EPOCH_NULL:
        return None
    return dt.timestamp()


def _plain(value: Any) -> Value:
    return cast(Value, value)  # asyncua decoded it as bool, int, float or str


def _double(value: Any) -> Value:
    if value is not None and not math.isfinite(value):
        raise OverflowError  # handled by the caller: Bad scalar, null array element
    return cast(Value, value)


def _bytes(value: Any) -> Value:
    return None if value is None else base64.b64encode(value).decode("ascii")


def _datetime(value: Any) -> Value:
    return None if value is None else iso(value)


_CONVERT: dict[ua.VariantType, Callable[[Any], Value]] = {
    _VT.Boolean: _plain, _VT.SByte: _plain, _VT.Byte: _plain,
    _VT.Int16: _plain, _VT.UInt16: _plain, _VT.Int32: _plain, _VT.UInt32: _plain,
    _VT.Int64: _plain, _VT.UInt64: _plain,
    _VT.Float: _double, _VT.Double: _double,
    _VT.String: _plain,
    _VT.DateTime: _datetime,
    _VT.ByteString: _bytes,
}  # fmt: skip


# The neutral datatype (gateway.model.Datatype) of each built-in type that has one. An array
# has none: it travels as a list, which no scalar datatype describes.
DATATYPES: dict[str, Datatype] = {
    "Boolean": "bool", "SByte": "int8", "Byte": "uint8", "Int16": "int16", "UInt16": "uint16",
    "Int32": "int32", "UInt32": "uint32", "Int64": "int64", "UInt64": "uint64",
    "Float": "float32", "Double": "float64", "String": "string", "DateTime": "datetime",
    "ByteString": "bytes",
}  # fmt: skip


def to_value(variant: ua.Variant | None) -> Value:
    """The JSON value of a Variant. Raises Unsupported for a type without one and
    OverflowError for a non-finite scalar float."""
    if variant is None or variant.VariantType == _VT.Null:
        return None
    convert = _CONVERT.get(variant.VariantType)  # None for a custom or unsupported type
    if convert is None:
        raise Unsupported(getattr(variant.VariantType, "name", str(variant.VariantType)))
    value = variant.Value
    if isinstance(value, list):
        return _array(value, convert)
    return convert(value)


def _array(values: list[Any], convert: Callable[[Any], Value]) -> Value:
    out: list[Value] = []
    for item in values:
        if isinstance(item, list):  # a matrix arrives as nested lists
            out.append(_array(item, convert))
            continue
        try:
            out.append(convert(item))
        except OverflowError:
            out.append(None)  # one NaN must not hide the rest of the array
    return out


def status_name(status: int) -> str:
    """`BadNodeIdUnknown (0x80340000)`, or just the hex for a code asyncua does not know."""
    known = code_to_name_doc.get(status)
    return f"{known[0]} (0x{status:08X})" if known else f"0x{status:08X}"


def reading(device: str, tag: str, unit: str | None, dv: ua.DataValue, now: float) -> Reading:
    """The Reading for one DataValue (a notification or a read result)."""
    status = dv.StatusCode.value if dv.StatusCode is not None else 0
    quality = Quality.from_status(status)
    source = posix(dv.SourceTimestamp)
    if quality is Quality.BAD:
        return Reading(device, tag, None, quality, status, source, now, unit)
    try:
        value = to_value(dv.Value)
    except Unsupported:
        if quality is Quality.GOOD:
            quality, status = Quality.UNCERTAIN, UNCERTAIN
        return Reading(device, tag, None, quality, status, source, now, unit)
    except OverflowError:
        return Reading(device, tag, None, Quality.BAD, Status.BAD_OUT_OF_RANGE, source, now, unit)
    return Reading(device, tag, value, quality, status, source, now, unit)
