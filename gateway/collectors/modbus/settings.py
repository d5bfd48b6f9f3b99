"""Config models of a Modbus device and its tags."""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    ProblemAt,
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


# A character on a serial line is a start bit, the data bits, the parity bit (unless none)
# and the stop bits. Modbus over serial line (V1.02) 2.5.1.1: frames are separated by a
# silence of at least 3.5 characters, fixed at 1.75 ms above 19200 baud.
FAST_BAUDRATE = 19200
FAST_FRAME_GAP = 0.00175

# Time a unit may take to begin its answer, unless the device says (`timeout`): a Modbus TCP
# device may sit behind a network; a unit on a serial line answers within a few tens of
# milliseconds or not at all, and while it is silent no other unit on the line can be read.
# Behind a serial device server (RTU over TCP) come the network and the remote line, whose
# speed the gateway does not know: a 125-register answer takes 0.3 s at 9600 baud.
TCP_TIMEOUT = 1.0
SERIAL_TIMEOUT = 0.3


class SerialLine(Model):
    """An RS-485 (or RS-232) port and how its line is set."""

    port: str = Field(
        min_length=1,
        description="Serial port. Prefer /dev/serial/by-id/... : /dev/ttyUSB0 can come back as ttyUSB1 "
        "after the adapter is unplugged.",
    )
    baudrate: Int = Field(default=19200, ge=50, le=4_000_000, description="Bits per second.")
    parity: Literal["N", "E", "O"] = Field(
        default="E", description="N (none), E (even, the Modbus default) or O (odd)."
    )
    stopbits: Int = Field(default=1, ge=1, le=2, description="Stop bits: 1, or 2 (usual with parity N).")
    bytesize: Int = Field(default=8, ge=7, le=8, description="Data bits: 8 as Modbus RTU asks, or 7.")

    def __str__(self) -> str:
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"  # 19200 8E1

    @property
    def char_time(self) -> float:
        """Seconds one character takes on the wire."""
        return (1 + self.bytesize + (self.parity != "N") + self.stopbits) / self.baudrate

    @property
    def frame_gap(self) -> float:
        """The silence the line needs between two frames."""
        return FAST_FRAME_GAP if self.baudrate > FAST_BAUDRATE else 3.5 * self.char_time


class ModbusDevice(Model):
    name: Segment = Field(description="Device name; unique; a segment of its MQTT topics.")
    protocol: Literal["modbus"] = Field(
        description="modbus: Modbus TCP, Modbus RTU on a serial line, or RTU over TCP."
    )
    host: str | None = Field(
        default=None,
        min_length=1,
        description="IP address or host name of the device, or of the gateway or serial device server "
        "in front of it. Give host or serial.",
    )
    port: Int = Field(default=502, ge=1, le=65535, description="TCP port (with host).")
    framer: Literal["socket", "rtu"] | None = Field(
        default=None,
        description="With host: socket (Modbus TCP, the default) or rtu (RTU frames over the TCP "
        "connection, as a serial device server passes them). A serial line is always rtu.",
    )
    serial: SerialLine | None = Field(
        default=None, description="The serial line the unit is on (Modbus RTU). Give host or serial."
    )
    unit: Int = Field(
        default=1, ge=0, le=255, description="Modbus unit (slave/device) id; 1-247 on a serial line."
    )
    poll: Duration = Field(default=1.0, description="Poll interval, e.g. 500ms, 1s, 1m.")
    timeout: Duration | None = Field(
        default=None,
        description="Time the unit may take to begin its answer (on a serial line the time the frames "
        "take on the wire comes on top). Default: 300ms on a serial line, else 1s.",
    )
    frame_gap: Duration | None = Field(
        default=None,
        description="Silence on the line before each request to this unit, for units that need more "
        "than the 3.5 character times (1.75 ms above 19200 baud) Modbus RTU asks for.",
    )
    busy_retries: Int = Field(
        default=3,
        ge=0,
        le=20,
        description="How often a request answered with exception 06 (busy) or 05 (acknowledge) is "
        "sent again, busy_wait apart, before its tags are reported Bad.",
    )
    busy_wait: Duration = Field(default=0.1, description="Wait before a request answered busy is sent again.")
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
    # Tags may overlap: the same registers read as two types, as raw and scaled, or in two
    # byte orders while finding out a new device's. The planner reads them once.
    tags: list[ModbusTag] = Field(min_length=1, description="The values to read.")

    @property
    def cycle(self) -> float:
        """How often the poller calls read()."""
        return self.poll

    @property
    def rtu(self) -> bool:
        """Whether requests go as RTU frames (a serial line, or framer rtu over TCP)."""
        return self.serial is not None or self.framer == "rtu"

    @property
    def framing(self) -> Literal["socket", "rtu"]:
        """How requests are framed: rtu on a serial line or with framer rtu, else socket."""
        return "rtu" if self.rtu else "socket"

    @property
    def response_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        return SERIAL_TIMEOUT if self.serial is not None else TCP_TIMEOUT

    @property
    def link(self) -> tuple[str, ...]:
        """The physical connection: devices with the same link share one (a `Bus`)."""
        if self.serial is not None:
            # (A /dev/serial/by-id/ link and the ttyUSB0 it points at are one port.)
            return ("serial", os.path.realpath(self.serial.port))
        assert self.host is not None  # (_one_connection)
        return ("tcp", self.host.lower(), str(self.port))

    def where(self) -> str:
        """The connection, for messages: `/dev/ttyUSB0` or `10.0.0.5:502`."""
        return self.serial.port if self.serial is not None else f"{self.host}:{self.port}"

    @model_validator(mode="after")
    def _one_connection(self) -> Self:
        check_unique((t.name for t in self.tags), "tag")
        if self.serial is not None:
            if self.host is not None or "port" in self.model_fields_set:
                key = "host" if self.host is not None else "port"
                raise ProblemAt((key,), "give host and port (Modbus TCP) or serial (an RTU line), not both")
            if self.framer == "socket":
                raise ProblemAt(("framer",), "a serial line carries RTU frames: leave framer out, or rtu")
        elif self.host is None:
            raise ProblemAt(
                ("host",),
                "required key is missing: give host (Modbus TCP, or RTU over TCP) or serial (an RTU line)",
            )
        if self.frame_gap is not None and not self.rtu:
            raise ProblemAt(("frame_gap",), "applies to RTU only (a serial line, or framer: rtu)")
        if self.rtu and not 1 <= self.unit <= 247:
            # 0 is the broadcast address, which no unit answers; 248-255 are reserved.
            raise ProblemAt(("unit",), f"{self.unit} is not a unit id of RTU: 1-247")
        return self


# What devices sharing a connection must agree on, and the key that says it.
_SHARED = {"serial": ("baudrate", "parity", "stopbits", "bytesize"), "tcp": ("framer",)}


def check_links(devices: Sequence[tuple[int, ModbusDevice]]) -> None:
    """Raise ProblemAt (at `devices[i]...`) for a device that shares a connection with an
    earlier one and disagrees on how it is set: a serial line has one baud rate, a TCP
    connection one framing."""
    first: dict[tuple[str, ...], tuple[int, ModbusDevice]] = {}
    for index, device in devices:
        link = device.link
        if link not in first:
            first[link] = (index, device)
            continue
        _, other = first[link]
        for key in _SHARED[link[0]]:
            loc: tuple[str, ...]
            if link[0] == "serial":
                loc, mine, theirs = ("serial", key), getattr(device.serial, key), getattr(other.serial, key)
            else:
                loc, mine, theirs = (key,), device.framing, other.framing
            if mine != theirs:
                raise ProblemAt(
                    ("devices", index, *loc),
                    f"{device.name!r} and {other.name!r} share {device.where()} but not its {key}: "
                    f"{mine} here, {theirs} there",
                )
