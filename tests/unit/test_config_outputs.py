"""`outputs:` and its shorthand `mqtt:`: each rule of issue 11 names the key it is about."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.errors import ConfigError

HEAD = """\
gateway: {id: edge-1, enterprise: acme, site: plant1, area: press-shop, line: line-1}
outbox: {path: ./data/outbox.db}
"""
DEVICES = """\
devices:
  - name: press-1
    protocol: modbus
    host: 127.0.0.1
    tags: [{name: temperature, table: holding, address: 0, type: float32}]
"""
# Issue 11's example, as written.
ISSUE_EXAMPLE = """\
outputs:
  - {name: local, url: "mqtt://127.0.0.1:1883", format: uns}
  - name: scada
    url: mqtts://scada.plant1:8883
    format: sparkplug
    sparkplug: {group_id: plant1}
"""


def _parse(outputs: Any, tmp_path: Path | None = None, **top: Any) -> config.Settings:
    """A full config with `outputs` (YAML text, or a list of mappings) and other top-level keys."""
    text = outputs if isinstance(outputs, str) else yaml.safe_dump({"outputs": outputs})
    text = HEAD + text + DEVICES + (yaml.safe_dump(top) if top else "")
    file = "plant.yaml" if tmp_path is None else str(tmp_path / "plant.yaml")
    return config.parse(text, file, env={})


def _problems(outputs: Any, tmp_path: Path | None = None, **top: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        _parse(outputs, tmp_path, **top)
    return err.value.problems


def test_the_issue_example_is_valid_as_written() -> None:
    local, scada = _parse(ISSUE_EXAMPLE).outputs
    assert (local.name, local.format, local.url) == ("local", "uns", "mqtt://127.0.0.1:1883")
    assert (scada.name, scada.format, scada.host, scada.port, scada.tls) == (
        "scada", "sparkplug", "scada.plant1", 8883, True,
    )  # fmt: skip
    # Two outputs need no client id of their own; a Sparkplug output's edge node is the gateway.
    assert (local.client_id, scada.client_id) == ("millwright-edge-1-local", "millwright-edge-1-scada")
    assert scada.sparkplug is not None
    assert (scada.sparkplug.group_id, scada.sparkplug.edge_node_id) == ("plant1", "edge-1")


def test_the_mqtt_shorthand_is_one_output_named_mqtt_with_the_client_id_it_always_had() -> None:
    (output,) = _parse("mqtt: {url: 'mqtt://127.0.0.1:1883'}\n").outputs
    assert (output.name, output.format, output.client_id) == ("mqtt", "uns", "millwright-edge-1")
    (output,) = _parse("mqtt: {url: 'mqtt://h', client_id: mine}\n").outputs
    assert output.client_id == "mine"


def test_a_given_client_id_and_edge_node_id_are_kept() -> None:
    outputs = [
        {"name": "a", "url": "mqtt://h", "client_id": "gw-a", "format": "sparkplug",
         "sparkplug": {"group_id": "g", "edge_node_id": "node-a"}},
        {"name": "b", "url": "mqtt://h", "format": "sparkplug", "sparkplug": {"group_id": "g"}},
    ]  # fmt: skip
    a, b = _parse(outputs).outputs
    assert (a.client_id, a.sparkplug and a.sparkplug.edge_node_id) == ("gw-a", "node-a")
    assert (b.client_id, b.sparkplug and b.sparkplug.edge_node_id) == ("millwright-edge-1-b", "edge-1")


def test_mqtt_and_outputs_together_are_an_error() -> None:
    problems = _problems(ISSUE_EXAMPLE, mqtt={"url": "mqtt://h"})
    assert problems == [
        "mqtt: give mqtt: (a single output) or outputs: (a list), not both: move it into outputs:, "
        "with a name"
    ]


def test_neither_is_an_error_reported_with_the_other_problems() -> None:
    text = HEAD.replace("line: line-1", "line: a/b") + DEVICES
    with pytest.raises(ConfigError) as err:
        config.parse(text, "plant.yaml", env={})
    assert err.value.problems[-1] == "outputs: required key is missing (or mqtt: for a single output)"
    assert any(p.startswith("gateway.line: ") for p in err.value.problems)


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [
        ("outputs: []\n", "outputs: List should have at least 1 item after validation, not 0"),
        ("outputs:\n", "outputs: expected a list of outputs, not null (an empty value); or mqtt: for a "
                        "single output"),
        ("mqtt:\n", "mqtt: expected a mapping (key: value), not null (an empty value)"),
        ("outputs: {name: a, url: 'mqtt://h'}\n", "outputs: expected a list (- item), not a mapping"),
        ("outputs: [{url: 'mqtt://h'}]\n", "outputs[0].name: required key is missing"),
        ("outputs: [{name: a/b, url: 'mqtt://h'}]\n",
         "outputs[0].name: String should match pattern '^[^+#/\\s][^+#/]*$'"),
        ("outputs: [{name: a, url: 'mqtt://h'}, {name: b, url: 'http://h'}]\n",
         "outputs[1].url: scheme must be mqtt:// or mqtts://"),
        ("outputs: [{name: a, url: 'mqtt://h', colour: red}]\n",
         "outputs[0].colour: unknown key (check the spelling; see `millwright schema`)"),
        ("outputs: [{name: a, url: 'mqtt://h', format: sparkplug}]\n",
         "outputs[0]: format sparkplug needs a sparkplug: section with at least group_id"),
    ],
)  # fmt: skip
def test_each_entry_is_checked_like_mqtt_under_its_own_key(outputs: str, problem: str) -> None:
    assert _problems(outputs) == [problem]


def test_output_names_are_unique() -> None:
    outputs = [{"name": "local", "url": "mqtt://a"}, {"name": "cloud", "url": "mqtt://b"},
               {"name": "local", "url": "mqtt://c"}]  # fmt: skip
    assert _problems(outputs) == ["outputs[2].name: the output name 'local' is used twice"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"url": "mqtt://broker", "client_id": "gw"}, {"url": "mqtt://broker:1883", "client_id": "gw"}),
        ({"url": "mqtts://broker", "client_id": "gw"}, {"url": "mqtt://broker:8883", "client_id": "gw"}),
        ({"url": "mqtt://Broker", "client_id": "gw"}, {"url": "tcp://broker", "client_id": "gw"}),
        # A default that someone else chose as well.
        ({"url": "mqtt://broker"}, {"url": "mqtt://broker", "client_id": "millwright-edge-1-a"}),
    ],
)
def test_one_broker_and_one_client_id_for_two_outputs_is_an_error(
    first: dict[str, str], second: dict[str, str]
) -> None:
    """The broker allows one connection per client id: each would disconnect the other."""
    problems = _problems([{"name": "a", **first}, {"name": "b", **second}])
    port = 8883 if "mqtts" in first["url"] else 1883
    client = second.get("client_id", "gw")
    assert problems == [
        f"outputs[1]: the same broker (broker:{port}) and client id ({client!r}) as outputs[0]: the broker "
        "would disconnect one whenever the other connects; give one of them its own client_id"
    ]


@pytest.mark.parametrize(
    "second",
    [
        {"url": "mqtt://broker"},  # the default client ids differ by name
        {"url": "mqtt://broker:1884", "client_id": "gw"},
        {"url": "mqtt://other", "client_id": "gw"},
        {"url": "mqtt://broker", "client_id": "gw-2"},
    ],
)
def test_two_outputs_may_share_a_broker_or_a_client_id(second: dict[str, str]) -> None:
    first = {"url": "mqtt://broker", "client_id": "gw"} if "client_id" in second else {"url": "mqtt://broker"}
    assert len(_parse([{"name": "a", **first}, {"name": "b", **second}]).outputs) == 2


def _sparkplug(name: str, url: str, **sparkplug: str) -> dict[str, Any]:
    return {"name": name, "url": url, "format": "sparkplug", "sparkplug": {"group_id": "plant1", **sparkplug}}


@pytest.mark.parametrize(
    ("a", "b", "node"),
    [
        ({}, {}, "'edge-1'"),  # both default to the gateway id
        ({"edge_node_id": "line-1"}, {"edge_node_id": "line-1"}, "'line-1'"),
        ({"edge_node_id": "Line-1"}, {"edge_node_id": "line-1"}, "'line-1'"),  # some hosts fold case
    ],
)
def test_two_sparkplug_outputs_as_one_edge_node_of_one_broker_are_an_error(
    a: dict[str, str], b: dict[str, str], node: str
) -> None:
    problems = _problems([_sparkplug("a", "mqtt://scada", **a), _sparkplug("b", "mqtt://scada:1883", **b)])
    assert problems == [
        f"outputs[1]: the same Sparkplug edge node as outputs[0] (group 'plant1', edge node {node} on "
        "scada:1883): the host would take the births and deaths of both for one node's; give one of them "
        "its own sparkplug.edge_node_id"
    ]


def test_sparkplug_outputs_as_other_edge_nodes_or_to_other_brokers_are_fine() -> None:
    outputs = [
        _sparkplug("a", "mqtt://scada"),
        _sparkplug("b", "mqtt://scada", edge_node_id="edge-1-backup"),
        _sparkplug("c", "mqtt://historian"),
        {**_sparkplug("d", "mqtt://scada"), "sparkplug": {"group_id": "plant2"}},
    ]
    assert [o.name for o in _parse(outputs).outputs] == ["a", "b", "c", "d"]


def test_names_that_differ_only_in_case_are_refused_when_any_output_is_sparkplug() -> None:
    devices = DEVICES + DEVICES.replace("press-1", "Press-1").removeprefix("devices:\n")
    outputs = [{"name": "local", "url": "mqtt://h"}]
    config.parse(HEAD + yaml.safe_dump({"outputs": outputs}) + devices, "plant.yaml", env={})
    outputs.append(_sparkplug("scada", "mqtt://scada"))
    with pytest.raises(ConfigError, match=r"device \(ignoring case\) name 'press-1' is used twice"):
        config.parse(HEAD + yaml.safe_dump({"outputs": outputs}) + devices, "plant.yaml", env={})


def test_each_outputs_files_are_resolved_and_checked_under_its_key(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "pw").write_text("s3cret\n")
    outputs = [
        {"name": "local", "url": "mqtt://127.0.0.1", "username": "gw", "password_file": "pw"},
        {"name": "cloud", "url": "mqtts://cloud", "ca": "certs/missing.pem"},
        {"name": "scada", "url": "mqtts://scada", "ca": "certs/junk.pem"},
    ]
    assert _problems(outputs, tmp_path) == [
        f"outputs[1].ca: no such file: {tmp_path}/certs/missing.pem",
        f"outputs[2].ca: {tmp_path}/certs/junk.pem: not a PEM certificate (no -----BEGIN CERTIFICATE----- "
        "block in it)",
    ]
    del outputs[1:]
    (local,) = _parse(outputs, tmp_path).outputs
    assert local.password_file == tmp_path / "pw"  # relative to the config file
    assert local.secret() == "s3cret"


def test_a_config_error_in_outputs_exits_2_naming_the_file_and_the_key(tmp_path: Path) -> None:
    file = tmp_path / "plant.yaml"
    file.write_text(HEAD + ISSUE_EXAMPLE + DEVICES + "mqtt: {url: 'mqtt://h'}\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert f"{file}: invalid configuration" in result.stderr
    assert "  mqtt: give mqtt: (a single output) or outputs: (a list), not both" in result.stderr


def test_the_schema_asks_for_mqtt_or_outputs() -> None:
    schema = config.ConfigFile.model_json_schema()
    assert set(schema["required"]) == {"gateway", "outbox", "devices"}
    assert schema["oneOf"] == [{"required": ["mqtt"]}, {"required": ["outputs"]}]
    assert schema["$defs"]["OutputSettings"]["required"] == ["url", "name"]
