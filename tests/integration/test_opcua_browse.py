"""`browse` against the OPC UA simulator: the tree, and a tags block the config accepts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.collectors.opcua.browse import BrowseRow, browse, format_tags, format_tree, tag_name
from gateway.collectors.opcua.collector import OpcUaCollector
from gateway.collectors.opcua.settings import OpcUaDevice, OpcUaSecurity, OpcUaTag
from gateway.errors import NotConnected
from gateway.model import Quality
from simulators.opcua import OpcUaSimulator
from simulators.opcua_model import BATCH_GUID

NS = OpcUaSimulator.NAMESPACE
ANONYMOUS = OpcUaSecurity()


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[OpcUaSimulator]:
    async with OpcUaSimulator(port=0, seed=3, pki_dir=tmp_path / "server-pki") as simulator:
        yield simulator


def by_id(rows: list[BrowseRow]) -> dict[str, BrowseRow]:
    return {r.node_id: r for r in rows}


async def test_tree_from_the_objects_folder(sim: OpcUaSimulator, tmp_path: Path) -> None:
    rows = await browse(sim.endpoint, ANONYMOUS, tmp_path / "pki", None, 4)
    assert (rows[0].browse_name, rows[0].node_id, rows[0].depth) == ("Objects", "i=85", 0)
    nodes = by_id(rows)
    speed = nodes[f"nsu={NS};s=CNC1.Spindle.Speed"]
    assert (speed.browse_name, speed.node_class, speed.data_type, speed.unit) == (
        "Speed",
        "Variable",
        "Double",
        "1/min",
    )
    assert speed.path == ("Machines", "CNC1", "Spindle", "Speed")
    assert isinstance(speed.value, float)
    assert nodes[f"nsu={NS};i=5001"].data_type == "UInt32"
    assert nodes[f"nsu={NS};g={BATCH_GUID}"].data_type == "String"
    assert nodes[f"nsu={NS};s=CNC1.Axis.Positions"].data_type == "Double[]"
    assert not nodes[f"nsu={NS};s=CNC1.Program.Description"].supported  # LocalizedText
    assert all(r.depth <= 4 for r in rows)
    assert not any(r.browse_name == "EngineeringUnits" for r in rows)  # properties are not listed
    text = format_tree(rows)
    assert "\n        Speed  [nsu=urn:millwright:simulator;s=CNC1.Spindle.Speed]  Double = " in text
    assert text.endswith(" 1/min\n") or " 1/min\n" in text
    assert (
        "Description  [nsu=urn:millwright:simulator;s=CNC1.Program.Description]  LocalizedText = <no JSON"
        in text
    )


async def test_depth_limits_the_walk(sim: OpcUaSimulator, tmp_path: Path) -> None:
    rows = await browse(sim.endpoint, ANONYMOUS, tmp_path / "pki", f"nsu={NS};s=CNC1", 1)
    assert rows[0].browse_name == "CNC1"
    assert {r.depth for r in rows} == {0, 1}
    assert "Spindle" in {r.browse_name for r in rows}
    assert "Speed" not in {r.browse_name for r in rows}  # below Spindle: depth 2


async def test_tags_block_is_accepted_by_the_config(sim: OpcUaSimulator, tmp_path: Path) -> None:
    rows = await browse(sim.endpoint, ANONYMOUS, tmp_path / "pki", f"nsu={NS};s=Machines", 10)
    block = format_tags(rows)
    tags = [OpcUaTag.model_validate(t) for t in yaml.safe_load(block)["tags"]]
    by_name = {t.name: t for t in tags}
    assert by_name["cnc1_spindle_speed"].node == f"nsu={NS};s=CNC1.Spindle.Speed"
    assert by_name["cnc1_spindle_speed"].unit == "1/min"
    assert by_name["cnc1_axis_x_position"].unit == "mm"
    assert by_name["packer1_count"].node == f"nsu={NS};i=5001"
    assert "cnc1_program_description" not in by_name  # commented out: no JSON form
    assert '# - {name: "cnc1_program_description"' in block
    variables = [r for r in rows if r.node_class == "Variable"]
    assert len(tags) == len(variables) - 1
    # What browse suggests, the collector reads: every tag Good.
    device: dict[str, Any] = {"name": "cnc-1", "protocol": "opcua", "endpoint": sim.endpoint, "mode": "poll",
                              "tags": [t.model_dump(exclude_none=True) for t in tags]}  # fmt: skip
    collector = OpcUaCollector(OpcUaDevice.model_validate(device), tmp_path / "pki")
    try:
        await collector.connect()
        readings = await collector.read()
    finally:
        await collector.close()
    assert len(readings) == len(tags)
    assert {r.quality for r in readings} == {Quality.GOOD}


async def test_browse_refuses_an_untrusted_server(sim: OpcUaSimulator, tmp_path: Path) -> None:
    security = OpcUaSecurity(policy="Basic256Sha256", mode="Sign", server_certificate="11" * 32)
    with pytest.raises(NotConnected, match=f"not trusted: SHA-256 {sim.fingerprint}"):
        await browse(sim.endpoint, security, tmp_path / "pki", None, 1)
    trusted = security.model_copy(update={"server_certificate": sim.fingerprint})
    rows = await browse(sim.endpoint, trusted, tmp_path / "pki", f"nsu={NS};s=Machines", 1)
    assert [r.browse_name for r in rows[1:]] == ["CNC1", "Packer1"]


async def test_unknown_start_node(sim: OpcUaSimulator, tmp_path: Path) -> None:
    with pytest.raises(NotConnected, match="BadNodeIdUnknown"):
        await browse(sim.endpoint, ANONYMOUS, tmp_path / "pki", f"nsu={NS};s=Nope", 1)
    with pytest.raises(NotConnected, match="the server has no namespace urn:nope"):
        await browse(sim.endpoint, ANONYMOUS, tmp_path / "pki", "nsu=urn:nope;i=1", 1)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (("CNC1", "Spindle", "Speed"), "cnc1_spindle_speed"),
        (("Line 1", "PartCount"), "line_1_part_count"),
        (("Motor#2", "Temp+/Out"), "motor_2_temp_out"),
        (("HTTPServer", "ID"), "http_server_id"),
        (("°C",), "c"),
        (("+++",), "tag"),
    ],
)
def test_tag_names_are_safe_topic_segments(path: tuple[str, ...], name: str) -> None:
    assert tag_name(path) == name
    OpcUaTag(name=name, node="i=1")  # the config accepts it
