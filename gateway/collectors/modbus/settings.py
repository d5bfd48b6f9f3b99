"""Config models of a Modbus device and its tags."""

from __future__ import annotations

import itertools
from typing import Annotated, Literal, Self

from pydantic import Field, Strict, model_validator

from gateway.settings_types import (
    INT_FROM_ENV,
    RECONNECT_MAX_DESCRIPTION,
    AssetOverride,
    Duration,
    Float,
    Int,
    Model,
    NonNegativeFloat,
    ReconnectMax,
    Segment,
    TagName,
    check_unique,
)

Table = Literal["coil", "discrete", "holding", "input"]
DataType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]

# Registers per data type; a string takes `length` registers.
REGISTERS: dict[str, int] = {
    "bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2,
    "int64": 4, "uint64": 4, "float32": 2, "float64": 4,
}  # fmt: skip

BIT_TABLES = ("coil", "discrete")


class ModbusTag(Model):
    name: TagName = Field(description="Tag name; the last segment of its MQTT topic.")
    table: Table = Field(description="Modbus table: coil, discrete (input), holding or input (register).")
    address: Int = Field(ge=0, le=65535, description="0-based address on the wire.")
    type: DataType | None = Field(
        default=None, description="Data type. Default: bool for coil/discrete, uint16 for registers."
    )
    order: ByteOrder | None = Field(
        default=None,
        description="Byte/word order of multi-register values; defaults to the device's `order`.",
    )
    # (Optional and bounded: see settings_types.INT_FROM_ENV.)
    bit: Annotated[int, Strict(), Field(ge=0, le=15), INT_FROM_ENV] | None = Field(
        default=None, description="For type bool on a register: the bit, 0 = least significant."
    )
    length: Annotated[int, Strict(), Field(ge=1, le=125), INT_FROM_ENV] | None = Field(
        default=None, description="For type string: the number of registers (2 chars each)."
    )
    scale: Float = Field(default=1.0, description="value = raw * scale + offset.")
    offset: Float = Field(default=0.0, description="value = raw * scale + offset.")
    unit: str | None = Field(
        default=None, description="Engineering unit as a UCUM code, e.g. Cel, bar, 1/min."
    )
    deadband: NonNegativeFloat | None = Field(
        default=None,
        description="Report by exception: publish only when the value moved by more than this "
        "(or quality changed). Unset: publish every poll.",
    )
    min: Float | None = Field(
        default=None, description="Lowest valid value; below it the reading is Uncertain."
    )
    max: Float | None = Field(
        default=None, description="Highest valid value; above it the reading is Uncertain."
    )
    description: str | None = Field(default=None, description="Free text, published in the device's _meta.")

    @property
    def datatype(self) -> DataType:
        if self.type is not None:
            return self.type
        return "bool" if self.table in BIT_TABLES else "uint16"

    @property
    def size(self) -> int:
        """Registers (or bits, for coil/discrete) this tag occupies."""
        if self.table in BIT_TABLES:
            return 1
        if self.datatype == "string":
            return self.length or 1
        return REGISTERS[self.datatype]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        dt = self.datatype
        if self.table in BIT_TABLES and dt != "bool":
            raise ValueError(f"a {self.table} holds single bits: type must be bool, not {dt}")
        if self.bit is not None and (dt != "bool" or self.table in BIT_TABLES):
            raise ValueError("bit applies only to type bool on a holding or input register")
        if dt == "string" and self.length is None:
            raise ValueError("type string needs length (registers, two characters each)")
        if self.length is not None and dt != "string":
            raise ValueError("length applies only to type string")
        if dt in ("bool", "string") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset do not apply to type {dt}")
        if self.address + self.size > 65536:
            raise ValueError(f"address {self.address} + {self.size} registers runs past 65535")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class ModbusDevice(Model):
    name: Segment = Field(description="Device name; unique; a segment of its MQTT topics.")
    protocol: Literal["modbus"] = Field(description="modbus: Modbus TCP.")
    host: str = Field(min_length=1, description="IP address or host name of the device or gateway.")
    port: Int = Field(default=502, ge=1, le=65535, description="TCP port.")
    unit: Int = Field(default=1, ge=0, le=255, description="Modbus unit (slave/device) id.")
    poll: Duration = Field(default=1.0, description="Poll interval, e.g. 500ms, 1s, 1m.")
    timeout: Duration = Field(default=1.0, description="Time to wait for each response.")
    reconnect_max: ReconnectMax = Field(default=10.0, description=RECONNECT_MAX_DESCRIPTION)
    order: ByteOrder = Field(default="ABCD", description="Default byte/word order of multi-register tags.")
    max_gap: Int = Field(
        default=10,
        ge=0,
        le=124,
        description="Merge tags into one request across at most this many unused registers (or bits).",
    )
    type: str | None = Field(default=None, description="Equipment type, published in _meta.")
    asset: AssetOverride = Field(
        default_factory=AssetOverride, description="Override the gateway's ISA-95 levels for this device."
    )
    tags: list[ModbusTag] = Field(min_length=1, description="The values to read.")

    @property
    def cycle(self) -> float:
        """How often the poller calls read()."""
        return self.poll

    @model_validator(mode="after")
    def _unique_and_disjoint(self) -> Self:
        check_unique((t.name for t in self.tags), "tag")
        # Two tags over the same registers almost always mean a typo in an address. Bits of
        # one register are the exception: several bool tags may share a status word.
        spans = sorted(
            ((t.table, t.address, t.address + t.size - 1, t) for t in self.tags if t.bit is None),
            key=lambda span: span[:3],
        )
        for (ta, _, end_a, a), (tb, start_b, end_b, b) in itertools.pairwise(spans):
            if ta == tb and start_b <= end_a:
                raise ValueError(
                    f"tag {b.name!r} ({tb} {start_b}-{end_b}) overlaps tag {a.name!r} "
                    f"({ta} {a.address}-{end_a})"
                )
        return self
