"""The Modbus entry of the protocol registry (gateway.collectors.registry)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.collectors import Collector, MetricType, ProtocolEntry
from gateway.collectors.modbus.settings import ModbusDevice, check_links


def _collectors(devices: Sequence[ModbusDevice], pki_dir: Path) -> list[Collector]:
    """One collector per device; devices on one connection (`ModbusDevice.link`) share a Bus."""
    from gateway.collectors.modbus.bus import Bus  # pymodbus: see ProtocolEntry
    from gateway.collectors.modbus.collector import ModbusCollector

    buses: dict[tuple[str, ...], Bus] = {}
    collectors: list[Collector] = []
    for device in devices:
        if (bus := buses.get(device.link)) is None:
            bus = buses[device.link] = Bus(device)
        collectors.append(ModbusCollector(device, bus))
    return collectors


def _metric_types(device: ModbusDevice) -> list[MetricType]:
    """Every datatype is in the config; a scaled register is a float64 whatever its raw type
    (raw * scale + offset is a float)."""
    return [
        (t.name, "float64" if t.scale != 1.0 or t.offset != 0.0 else t.datatype, t.unit) for t in device.tags
    ]


MODBUS = ProtocolEntry("modbus", ModbusDevice, _collectors, _metric_types, check_together=check_links)
