"""The protocol and output format registries: each protocol's pieces come from its entry, and
a gateway imports only the protocol stacks and formats its config uses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import pytest
import yaml

from gateway import config
from gateway.collectors.registry import PROTOCOLS, protocol
from gateway.errors import ConfigError
from gateway.model import Datatype
from gateway.publishers.formats import FORMATS
from gateway.publishers.sparkplug.node import metric_types
from gateway.publishers.sparkplug.payload import DataType

ROOT = Path(__file__).resolve().parents[2]

GATEWAY = {"id": "edge-1", "enterprise": "acme", "site": "s", "area": "a", "line": "l"}
MODBUS = {
    "name": "press-1", "protocol": "modbus", "host": "127.0.0.1",
    "tags": [
        {"name": "temperature", "table": "holding", "address": 0, "type": "float32"},
        {"name": "strokes", "table": "input", "address": 10, "type": "uint32"},
        {"name": "pressure", "table": "holding", "address": 4, "type": "int16", "scale": 0.1, "unit": "bar"},
        {"name": "running", "table": "coil", "address": 0},
        {"name": "count", "table": "input", "address": 12},
    ],
}  # fmt: skip
OPCUA = {"name": "cnc-1", "protocol": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840",
         "tags": [{"name": "speed", "node": "ns=2;s=Speed", "unit": "1/min"}]}  # fmt: skip


def _config(*devices: dict[str, object], fmt: str = "uns") -> str:
    mqtt: dict[str, object] = {"url": "mqtt://127.0.0.1:1883", "format": fmt}
    if fmt == "sparkplug":
        mqtt["sparkplug"] = {"group_id": "plant1"}
    doc = {"gateway": GATEWAY, "outbox": {"path": "outbox.db"}, "mqtt": mqtt, "devices": list(devices)}
    return yaml.safe_dump(doc)


def test_each_entry_is_the_protocol_its_settings_model_says() -> None:
    for name, entry in PROTOCOLS.items():
        assert entry.name == name
        assert get_args(entry.settings.model_fields["protocol"].annotation) == (name,)


def test_devices_are_parsed_into_their_protocols_models() -> None:
    settings = config.parse(_config(MODBUS, OPCUA), "plant.yaml", env={})
    assert [type(d) for d in settings.devices] == [PROTOCOLS["modbus"].settings, PROTOCOLS["opcua"].settings]
    assert [protocol(d).name for d in settings.devices] == ["modbus", "opcua"]


def test_an_unknown_protocol_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(_config({**MODBUS, "protocol": "profinet"}), "plant.yaml", env={})
    assert err.value.problems == ["devices[0]: unknown protocol 'profinet'; expected one of modbus, opcua"]


def test_sparkplug_metric_types_come_from_each_protocol() -> None:
    """Modbus types every tag from its config (a scaled register is a Double); an OPC UA tag
    is typed when the server sends a value."""
    modbus, opcua = config.parse(_config(MODBUS, OPCUA, fmt="sparkplug"), "plant.yaml", env={}).devices
    assert metric_types(modbus) == [
        ("temperature", DataType.FLOAT, None),
        ("strokes", DataType.UINT32, None),
        ("pressure", DataType.DOUBLE, "bar"),
        ("running", DataType.BOOLEAN, None),
        ("count", DataType.UINT16, None),
    ]
    assert metric_types(opcua) == [("speed", None, "1/min")]


def test_every_neutral_datatype_has_a_sparkplug_datatype() -> None:
    """A protocol may give any of them: the Sparkplug side must type each one."""
    from gateway.publishers.sparkplug import node

    assert set(node._DATATYPES) == set(get_args(Datatype))


def test_every_opcua_builtin_type_maps_to_a_neutral_datatype() -> None:
    from gateway.collectors.opcua.convert import DATATYPES

    assert set(DATATYPES.values()) <= set(get_args(Datatype))
    assert (DATATYPES["SByte"], DATATYPES["Double"], DATATYPES["ByteString"]) == ("int8", "float64", "bytes")


def test_the_config_accepts_exactly_the_registered_formats() -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(_config(MODBUS, fmt="csv"), "plant.yaml", env={})
    assert err.value.problems == ["mqtt.format: Input should be 'uns', 'batch' or 'sparkplug'"]
    assert set(FORMATS) == {"uns", "batch", "sparkplug"}


# What a config loads: asyncua only with an OPC UA device, protobuf only with Sparkplug.
LOADED = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gateway import config
    from gateway.collectors.registry import make_collectors
    from gateway.outbox import Outbox
    from gateway.publishers.formats import FORMATS, OutputContext

    async def main() -> None:
        s = config.load(sys.argv[1])
        collectors = make_collectors(s.devices, s.pki_dir)
        outbox = await Outbox.open(s.outbox.path)
        built = FORMATS[s.outputs[0].format](OutputContext(s, s.outputs[0], outbox, collectors))
        await built.connection.close()
        await outbox.close()
        print(type(built).__name__, "asyncua" in sys.modules, "google.protobuf" in sys.modules)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    ("devices", "fmt", "loaded"),
    [
        ([MODBUS], "uns", "UnsPublisher False False"),
        ([MODBUS, OPCUA], "uns", "UnsPublisher True False"),
        ([MODBUS], "sparkplug", "SparkplugNode False True"),
    ],
)
def test_a_gateway_imports_only_what_its_config_uses(
    tmp_path: Path, devices: list[dict[str, object]], fmt: str, loaded: str
) -> None:
    file = tmp_path / "plant.yaml"
    file.write_text(_config(*devices, fmt=fmt))
    result = subprocess.run(
        [sys.executable, "-c", LOADED, str(file)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == loaded
