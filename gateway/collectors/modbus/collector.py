"""The Modbus TCP collector: one device, one connection, one request at a time.

pymodbus is used for framing and transport only. Its own retries and automatic reconnect
are switched off (`retries=0`, `reconnect_delay=0`): the poller owns the schedule and the
reconnect with backoff, and a second, hidden retry loop would fight it. Every pymodbus
exception is translated here, once, into `NotConnected` or `DeviceTimeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from gateway.collectors.deadband import Deadband
from gateway.collectors.modbus.codec import TagCodec
from gateway.collectors.modbus.planner import Plan, Request
from gateway.collectors.modbus.settings import BIT_TABLES, ModbusDevice, ModbusTag
from gateway.errors import DeviceTimeout, NotConnected
from gateway.model import Reading, Status, bad

log = logging.getLogger(__name__)

EXCEPTIONS = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge", 6: "server device busy",
    8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}  # fmt: skip


class ModbusCollector:
    """One Modbus TCP device. Implements `gateway.collectors.Collector`.

    A request the device answers with an exception makes exactly its tags Bad
    (BadCommunicationError); exception 02 on a merged request splits it first (see
    planner). A lost connection raises NotConnected; no answer in time raises
    DeviceTimeout and closes the connection, since a late answer would otherwise be
    taken for the next request's.
    """

    def __init__(self, device: ModbusDevice, clock: Callable[[], float] = time.time) -> None:
        self.name = device.name
        self._device = device
        self._clock = clock
        self._codecs = {tag.name: TagCodec(tag, device.name, device.order) for tag in device.tags}
        self._plan = Plan(device.name, device.tags, device.max_gap)
        self._deadband = Deadband({tag.name: tag.deadband for tag in device.tags})
        # One request at a time per connection: Modbus TCP devices commonly serve one
        # transaction at a time, and a serial gateway behind them certainly does.
        self._lock = asyncio.Lock()
        self._client: AsyncModbusTcpClient | None = None
        # Requests currently answered with an exception, and the code, so that the
        # warning is logged when that state begins and ends, not on every poll.
        self._rejected: dict[str, int] = {}

    @property
    def requests(self) -> list[Request]:
        """The current read plan (it changes when a request has to be split)."""
        return list(self._plan.requests)

    async def connect(self) -> None:
        """Open the TCP connection. Raises NotConnected when the device cannot be reached."""
        await self.close()
        d = self._device
        client = AsyncModbusTcpClient(
            d.host, port=d.port, name=d.name, timeout=d.timeout, retries=0, reconnect_delay=0
        )
        # pymodbus returns False (and logs the cause itself) rather than raising.
        if not await client.connect():
            client.close()
            raise NotConnected(self.name, f"cannot connect to {d.host}:{d.port}")
        self._client = client

    async def close(self) -> None:
        """Close the connection; safe to call when not connected."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def read(self) -> list[Reading]:
        """Read every planned request once; deadband applied. Raises NotConnected/DeviceTimeout."""
        readings: list[Reading] = []
        async with self._lock:
            # A snapshot: splitting replaces requests in the plan while we walk it.
            for request in tuple(self._plan.requests):
                readings.extend(await self._read(request))
        admit = self._deadband.admit
        return [r for r in readings if admit(r)]

    def unavailable(self, status: int, now: float) -> list[Reading]:
        """Bad readings with `status` for every tag not already reported Bad with it."""
        admit = self._deadband.admit_state
        readings = (bad(self.name, c.name, status, now, c.unit) for c in self._codecs.values())
        return [r for r in readings if admit(r)]

    def describe(self) -> dict[str, Any]:
        """Metadata for the retained `_meta` message.

        Host, port and unit id are left out on purpose: plant network topology is
        sensitive and consumers of the namespace do not need it.
        """
        return {
            "protocol": "modbus",
            "type": self._device.type,
            "tags": [self._describe(tag) for tag in self._device.tags],
        }

    def _describe(self, tag: ModbusTag) -> dict[str, Any]:
        address: dict[str, Any] = {"table": tag.table, "address": tag.address}
        if tag.bit is not None:
            address["bit"] = tag.bit
        if tag.length is not None:
            address["length"] = tag.length
        entry: dict[str, Any] = {
            "name": tag.name,
            "datatype": tag.datatype,
            "unit": tag.unit,
            "description": tag.description,
            "address": address,
        }
        if tag.table not in BIT_TABLES:  # order means nothing for single bits
            entry["order"] = tag.order or self._device.order
        return entry

    async def _read(self, request: Request) -> list[Reading]:
        response = await self._fetch(request)
        now = self._clock()
        if response.isError():
            code = response.exception_code
            if code == 2 and (pieces := self._plan.split(request)):
                readings: list[Reading] = []
                for piece in pieces:  # at once, so the split costs no Bad cycle
                    readings.extend(await self._read(piece))
                return readings
            return self._reject(request, code, now)
        if self._rejected:
            self._accept(request)
        data = response.bits if request.table in BIT_TABLES else response.registers
        if len(data) < request.count:
            log.debug("device %s: %s answered %d values, expected %d", self.name, request, len(data),
                      request.count)  # fmt: skip
            return self._bad(request, Status.BAD_DECODING_ERROR, now)
        codecs = self._codecs
        return [codecs[tag.name].reading(data, request.start, now) for tag in request.tags]

    async def _fetch(self, request: Request) -> ModbusPDU:
        client = self._client
        # Checked here because pymodbus would otherwise try to reconnect on its own.
        if client is None or not client.connected:
            raise NotConnected(self.name, f"{self._device.host}:{self._device.port} closed the connection")
        try:
            return await _call(client, request, self._device.unit)
        except ConnectionException as exc:
            raise NotConnected(self.name, str(exc)) from exc
        except (TimeoutError, ModbusIOException) as exc:
            # pymodbus reports both "no answer in time" and "the connection went away
            # while we waited" as ModbusIOException; the transport state tells them apart.
            if not client.connected:
                raise NotConnected(self.name, f"connection lost during {request}") from exc
            await self.close()
            raise DeviceTimeout(
                self.name, f"no answer to {request} within {self._device.timeout:g} s"
            ) from exc

    def _reject(self, request: Request, code: int, now: float) -> list[Reading]:
        reason = EXCEPTIONS.get(code, "unknown")
        log.debug("device %s: %s answered exception %02d (%s)", self.name, request, code, reason)
        key = str(request)
        if self._rejected.get(key) != code:
            self._rejected[key] = code
            log.warning("device %s: %s answered exception %02d (%s); its %d tags are Bad",
                        self.name, request, code, reason, len(request.tags))  # fmt: skip
        return self._bad(request, Status.BAD_COMMUNICATION_ERROR, now)

    def _accept(self, request: Request) -> None:
        if self._rejected.pop(str(request), None) is not None:
            log.info("device %s: %s answered normally again", self.name, request)

    def _bad(self, request: Request, status: int, now: float) -> list[Reading]:
        codecs = self._codecs
        return [bad(self.name, t.name, status, now, codecs[t.name].unit) for t in request.tags]


async def _call(client: AsyncModbusTcpClient, request: Request, unit: int) -> ModbusPDU:
    start, count = request.start, request.count
    if request.table == "holding":
        return await client.read_holding_registers(start, count=count, device_id=unit)
    if request.table == "input":
        return await client.read_input_registers(start, count=count, device_id=unit)
    if request.table == "coil":
        return await client.read_coils(start, count=count, device_id=unit)
    return await client.read_discrete_inputs(start, count=count, device_id=unit)
