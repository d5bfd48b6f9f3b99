"""The Modbus entry of the protocol registry (gateway.collectors.registry)."""

from __future__ import annotations

from pathlib import Path

from gateway.collectors import Collector, MetricType, ProtocolEntry
from gateway.collectors.modbus.settings import ModbusDevice


def _collector(device: ModbusDevice, pki_dir: Path) -> Collector:
    from gateway.collectors.modbus.collector import ModbusCollector  # pymodbus: see ProtocolEntry

    return ModbusCollector(device)


def _metric_types(device: ModbusDevice) -> list[MetricType]:
    """Every datatype is in the config; a scaled register is a float64 whatever its raw type
    (raw * scale + offset is a float)."""
    return [
        (t.name, "float64" if t.scale != 1.0 or t.offset != 0.0 else t.datatype, t.unit) for t in device.tags
    ]


MODBUS = ProtocolEntry("modbus", ModbusDevice, _collector, _metric_types)
