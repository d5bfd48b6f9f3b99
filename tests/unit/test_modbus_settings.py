"""The config of a Modbus device's connection: TCP, a serial line, RTU over TCP, shared."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.errors import ConfigError

USB0 = {"port": "/dev/ttyUSB0"}
TAGS = [{"name": "temperature", "table": "holding", "address": 0, "type": "float32"}]


def _config(*devices: dict[str, Any]) -> str:
    return yaml.safe_dump({
        "gateway": {"id": "edge-1", "enterprise": "acme", "site": "plant1", "area": "a", "line": "l"},
        "outbox": {"path": "./data/outbox.db"},
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "devices": [{"protocol": "modbus", "tags": TAGS, **d} for d in devices],
    })  # fmt: skip


def _load(*devices: dict[str, Any]) -> list[ModbusDevice]:
    settings = config.parse(_config(*devices), "plant.yaml", env={})
    return [d for d in settings.devices if isinstance(d, ModbusDevice)]


def _problems(*devices: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(_config(*devices), "plant.yaml", env={})
    return info.value.problems


def test_a_serial_device_takes_the_modbus_line_defaults() -> None:
    (meter,) = _load({"name": "meter-7", "serial": {"port": "/dev/ttyUSB0"}, "unit": 7})
    assert meter.serial is not None
    line = meter.serial
    assert (line.baudrate, line.parity, line.stopbits, line.bytesize) == (19200, "E", 1, 8)
    assert meter.rtu
    assert meter.response_timeout == 0.3
    assert meter.link == ("serial", "/dev/ttyUSB0")
    # 11 bits a character at 19200 baud: 3.5 characters are 2.005 ms
    assert line.frame_gap == pytest.approx(3.5 * 11 / 19200)


def test_the_frame_gap_is_fixed_above_19200_baud_and_counts_the_bits_below() -> None:
    fast, slow = _load(
        {"name": "a", "serial": {"port": "/dev/ttyUSB0", "baudrate": 115200}},
        {"name": "b", "serial": {"port": "/dev/ttyUSB1", "baudrate": 9600, "parity": "N", "stopbits": 2}},
    )
    assert fast.serial is not None
    assert slow.serial is not None
    assert fast.serial.frame_gap == 0.00175
    assert slow.serial.frame_gap == pytest.approx(3.5 * 11 / 9600)  # 1 + 8 + 0 + 2 bits


def test_rtu_over_tcp_and_modbus_tcp_timeouts() -> None:
    server, tcp, slow = _load(
        {"name": "drive-3", "host": "10.20.1.40", "port": 4001, "framer": "rtu", "unit": 3},
        {"name": "plc", "host": "10.20.1.41"},
        {"name": "slow", "host": "10.20.1.42", "timeout": "2s"},
    )
    assert (server.rtu, server.response_timeout, server.link) == (True, 1.0, ("tcp", "10.20.1.40", "4001"))
    assert (tcp.rtu, tcp.response_timeout) == (False, 1.0)
    assert slow.response_timeout == 2.0


@pytest.mark.parametrize(
    ("device", "problem"),
    [
        ({"host": "10.0.0.1", "serial": {"port": "/dev/ttyUSB0"}}, "devices[0].host: give host and port"),
        ({"port": 502, "serial": {"port": "/dev/ttyUSB0"}}, "devices[0].port: give host and port"),
        ({}, "devices[0].host: required key is missing: give host"),
        ({"serial": USB0, "framer": "socket"}, "devices[0].framer: a serial line carries RTU"),
        ({"serial": USB0, "unit": 0}, "devices[0].unit: 0 is not a unit id of RTU: 1-247"),
        ({"host": "h", "framer": "rtu", "unit": 248}, "devices[0].unit: 248 is not a unit id of RTU"),
        ({"serial": {}}, "devices[0].serial.port: required key is missing"),
        ({"serial": {**USB0, "parity": "X"}}, "devices[0].serial.parity: Input should be 'N', 'E' or 'O'"),
        ({"serial": {**USB0, "baudrate": "fast"}}, "devices[0].serial.baudrate"),
        ({"serial": {**USB0, "stopbits": 3}}, "devices[0].serial.stopbits"),
        ({"host": "h", "busy_retries": -1}, "devices[0].busy_retries"),
        ({"host": "h", "frame_gap": "5ms"}, "devices[0].frame_gap: applies to RTU only"),
    ],
)  # fmt: skip
def test_a_device_reaches_its_unit_one_way(device: dict[str, Any], problem: str) -> None:
    (message,) = _problems({"name": "meter", **device})
    assert message.startswith(problem), message


def test_devices_on_one_serial_port_share_its_settings() -> None:
    line = {"port": "/dev/ttyUSB0", "baudrate": 9600}
    first, second = _load({"name": "a", "serial": line, "unit": 1}, {"name": "b", "serial": line, "unit": 2})
    assert first.link == second.link
    (message,) = _problems(
        {"name": "a", "serial": line, "unit": 1},
        {"name": "tcp", "host": "10.0.0.1"},
        {"name": "b", "serial": {**line, "baudrate": 19200}, "unit": 2},
    )
    assert message == (
        "devices[2].serial.baudrate: 'b' and 'a' share /dev/ttyUSB0 but not its baudrate: "
        "19200 here, 9600 there"
    )


def test_devices_behind_one_tcp_endpoint_share_its_framing() -> None:
    (message,) = _problems(
        {"name": "a", "host": "GW.local", "port": 4001, "framer": "rtu"},
        {"name": "b", "host": "gw.local", "port": 4001},
    )
    assert (
        message
        == "devices[1].framer: 'b' and 'a' share gw.local:4001 but not its framer: socket here, rtu there"
    )


def test_overlapping_tags_are_allowed() -> None:
    tags = [
        {"name": "raw", "table": "holding", "address": 0},
        {"name": "scaled", "table": "holding", "address": 0, "scale": 0.1},
        {"name": "as_float", "table": "holding", "address": 0, "type": "float32"},
        {"name": "swapped", "table": "holding", "address": 0, "type": "float32", "order": "CDAB"},
    ]
    (device,) = _load({"name": "new-meter", "host": "h", "tags": tags})
    assert [t.name for t in device.tags] == ["raw", "scaled", "as_float", "swapped"]


def test_the_schema_describes_the_serial_line() -> None:
    schema = json.loads(config.schema())
    line = schema["$defs"]["SerialLine"]["properties"]
    assert set(line) == {"port", "baudrate", "parity", "stopbits", "bytesize"}
    assert line["parity"]["default"] == "E"


def test_a_port_and_a_link_to_it_are_one_line(tmp_path: Any) -> None:
    port = tmp_path / "ttyUSB0"
    port.touch()
    by_id = tmp_path / "usb-FTDI_FT232R-if00-port0"
    by_id.symlink_to(port)
    (message,) = _problems(
        {"name": "a", "serial": {"port": str(by_id), "baudrate": 9600}},
        {"name": "b", "serial": {"port": str(port), "baudrate": 19200}},
    )
    assert message.startswith(f"devices[1].serial.baudrate: 'b' and 'a' share {port} but not its baudrate")
