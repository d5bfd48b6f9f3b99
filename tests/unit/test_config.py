"""Config loading: valid files pass, each kind of mistake names its key path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "gateway": {
        "id": "edge-1",
        "enterprise": "acme",
        "site": "plant1",
        "area": "press-shop",
        "line": "line-1",
    },
    "outbox": {"path": "./data/outbox.db"},
    "mqtt": {"url": "mqtt://127.0.0.1:1883"},
    "devices": [
        {
            "name": "press-1",
            "protocol": "modbus",
            "host": "127.0.0.1",
            "port": 5020,
            "unit": 1,
            "poll": "1s",
            "tags": [
                {"name": "temperature", "table": "holding", "address": 0, "type": "float32", "unit": "Cel"},
                {"name": "strokes", "table": "input", "address": 10, "type": "uint32", "order": "CDAB"},
                {"name": "running", "table": "coil", "address": 0, "type": "bool"},
            ],
        }
    ],
}


def _with(path: str, value: object) -> str:
    """BASE with one value replaced (or added) at a dotted path like devices.0.tags.2.address."""
    doc = json.loads(json.dumps(BASE))
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return yaml.safe_dump(doc)


_DELETE = object()


def test_issue_example_config_is_valid() -> None:
    settings = config.load(ROOT / "config" / "example.yaml")
    tags = settings.devices[0].tags
    assert [t.name for t in tags] == ["temperature", "strokes", "running", "pressure"]
    assert tags[1].order == "CDAB"
    assert tags[3].scale == 0.1
    assert tags[3].deadband == 0.5
    assert settings.devices[0].poll == 1.0
    assert settings.outbox.max_rows == 1_000_000
    assert settings.outbox.policy == "drop_oldest"
    # relative outbox paths are taken relative to the config file, not the working directory
    assert settings.outbox.path == ROOT / "config" / "data" / "outbox.db"


@pytest.mark.parametrize("file", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_check(file: Path) -> None:
    env = {
        "MQTT_USERNAME": "gateway",
        "MQTT_PASSWORD": "secret",
        "OPCUA_PASSWORD": "secret",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(file)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize(
    ("path", "value", "where", "says"),
    [
        ("devices.0.tags.2.address", -1, "devices[0].tags[2].address", "greater than or equal to 0"),
        ("devices.0.tags.1.type", "int128", "devices[0].tags[1].type", "'bool', 'int16'"),
        ("devices.0.tags.1.order", "ABDC", "devices[0].tags[1].order", "'ABCD'"),
        ("devices.0.poll", "fast", "devices[0].poll", "not a duration"),
        ("devices.0.poll", "0s", "devices[0].poll", "greater than zero"),
        ("devices.0.port", 70000, "devices[0].port", "less than or equal to 65535"),
        ("devices.0.colour", "red", "devices[0].colour", "unknown key"),
        ("devices.0.protocol", "profibus", "devices[0]", "unknown protocol 'profibus'"),
        ("devices.0.host", _DELETE, "devices[0].host", "required key is missing"),
        ("devices.0.tags.2.table", "register", "devices[0].tags[2].table", "'coil'"),
        ("devices.0.tags.2.type", "float32", "devices[0].tags[2]", "type must be bool"),
        ("devices.0.tags.0.bit", 3, "devices[0].tags[0]", "bit applies only to type bool"),
        ("devices.0.tags.0.name", "temp/1", "devices[0].tags[0].name", "pattern"),
        ("devices.0.tags.0.name", "temp+", "devices[0].tags[0].name", "pattern"),
        (
            "devices.0.tags.1",
            {"name": "strokes", "table": "holding", "address": 1, "type": "uint32"},
            "devices[0]",
            "tag 'strokes' (holding 1-2) overlaps tag 'temperature' (holding 0-1)",
        ),
        ("devices.0.tags.1.name", "temperature", "devices[0]", "tag name 'temperature' is used twice"),
        (
            "devices.0.tags.1",
            {"name": "temperature_copy", "table": "holding", "address": 0, "type": "float32"},
            "devices[0]",
            "overlaps tag 'temperature'",
        ),
        ("devices.0.tags.0.type", "string", "devices[0].tags[0]", "needs length"),
        ("gateway.site", "plant#1", "gateway.site", "pattern"),
        ("mqtt.url", "http://broker", "mqtt.url", "mqtt:// or mqtts://"),
        ("mqtt.url", "mqtt://broker:99999", "mqtt.url", "bad port"),
        ("mqtt.url", "mqtt://bob:s3cret@broker:1883", "mqtt.url", "not in the URL"),
        ("mqtt.version", "4", "mqtt.version", "'5' or '3.1.1'"),
        ("outbox.max_rows", 0, "outbox.max_rows", "greater than or equal to 100"),
        ("outbox.policy", "drop_all", "outbox.policy", "'drop_oldest' or 'drop_newest'"),
        ("gateway.id", _DELETE, "gateway.id", "required key is missing"),
    ],
)
def test_errors_name_the_key_path(path: str, value: object, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(_with(path, value), "plant.yaml", env={})
    message = str(info.value)
    assert message.startswith("plant.yaml: invalid configuration")
    assert f"  {where}: " in message, message
    assert says in message, message


def test_duplicate_device_names_are_rejected() -> None:
    doc = json.loads(json.dumps(BASE))
    doc["devices"].append(doc["devices"][0])
    with pytest.raises(ConfigError, match="device name 'press-1' is used twice"):
        config.parse(yaml.safe_dump(doc), "plant.yaml", env={})


def test_environment_variables_are_substituted() -> None:
    text = _with("mqtt.username", "${MQTT_USER}")
    settings = config.parse(text, "plant.yaml", env={"MQTT_USER": "line1-gw"})
    assert settings.mqtt.username == "line1-gw"


def test_missing_environment_variable_is_an_error_at_its_key() -> None:
    text = _with("mqtt.password", "pre-${MQTT_PASSWORD}")
    with pytest.raises(ConfigError) as info:
        config.parse(text, "plant.yaml", env={})
    assert "mqtt.password: environment variable MQTT_PASSWORD is not set" in str(info.value)


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        config.parse("gateway:\n  id: [edge\n", "plant.yaml", env={})


def test_empty_password_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match=r"mqtt.password_file: the file is empty"):
        config.parse(_with("mqtt.password_file", str(tmp_path / "pw")), "plant.yaml", env={})


def test_password_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = config.parse(_with("mqtt.password_file", str(secret)), "plant.yaml", env={})
    assert settings.mqtt.secret() == "s3cret"


@pytest.mark.parametrize("key", ["ca", "cert", "password_file"])
def test_missing_tls_and_secret_files_are_config_errors(key: str, tmp_path: Path) -> None:
    doc = json.loads(json.dumps(BASE))
    doc["mqtt"][key] = "missing.pem"
    if key == "cert":
        doc["mqtt"]["key"] = "missing.key"
    with pytest.raises(ConfigError) as info:
        config.parse(yaml.safe_dump(doc), str(tmp_path / "plant.yaml"), env={})
    assert f"mqtt.{key}: no such file: {tmp_path / 'missing.pem'}" in str(info.value)


def test_relative_file_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here")
    doc = json.loads(json.dumps(BASE))
    doc["mqtt"]["ca"] = "ca.pem"
    settings = config.parse(yaml.safe_dump(doc), str(tmp_path / "plant.yaml"), env={})
    assert settings.mqtt.ca == tmp_path / "ca.pem"
    assert settings.outbox.path == tmp_path / "data" / "outbox.db"


def test_committed_schema_is_current() -> None:
    committed = (ROOT / "config" / "schema.json").read_text()
    assert committed == config.schema(), (
        "config/schema.json is stale: run `millwright schema > config/schema.json`"
    )


def test_check_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(_with("devices.0.tags.2.address", "zero"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "devices[0].tags[2].address" in result.stderr


def test_check_of_missing_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr


def test_sparkplug_settings_and_default_edge_node_id() -> None:
    text = _with(
        "mqtt", {"url": "mqtt://127.0.0.1:1883", "format": "sparkplug", "sparkplug": {"group_id": "plant1"}}
    )
    settings = config.parse(text, "gw.yaml")
    assert settings.mqtt.sparkplug is not None
    assert settings.mqtt.sparkplug.group_id == "plant1"
    assert settings.edge_node_id == "edge-1"  # the gateway id
    assert settings.mqtt.sparkplug.primary_host_id is None


@pytest.mark.parametrize(
    ("mqtt", "where", "says"),
    [
        ({"format": "sparkplug"}, "mqtt", "needs a sparkplug: section"),
        ({"sparkplug": {"group_id": "g"}}, "mqtt", "needs format: sparkplug"),
        ({"format": "sparkplug", "sparkplug": {}}, "mqtt.sparkplug.group_id", "required key is missing"),
        ({"format": "sparkplug", "sparkplug": {"group_id": "a/b"}}, "mqtt.sparkplug.group_id", "pattern"),
        ({"format": "sparkplug", "sparkplug": {"group_id": "g", "edge_node_id": "n#"}},
         "mqtt.sparkplug.edge_node_id", "pattern"),
        ({"format": "sparkplug", "sparkplug": {"group_id": "g", "primary_host_id": "h+"}},
         "mqtt.sparkplug.primary_host_id", "pattern"),
    ],
)  # fmt: skip
def test_sparkplug_config_errors_name_the_key(mqtt: dict[str, object], where: str, says: str) -> None:
    """topic-structure-namespace-valid-group-id, -valid-edge-node-id (and the device ids, which
    are checked like every name): no + / or # in a Sparkplug id."""
    with pytest.raises(ConfigError) as err:
        config.parse(_with("mqtt", {"url": "mqtt://127.0.0.1:1883", **mqtt}), "gw.yaml")
    assert any(p.startswith(f"{where}:") and says in p for p in err.value.problems), err.value.problems


def test_sparkplug_refuses_tags_that_differ_only_in_case() -> None:
    """case-sensitivity-metric-names: some hosts fold case, and the two would become one."""
    doc = yaml.safe_load(_with("devices.0.tags.1.name", "Temperature"))
    doc["mqtt"].update(format="sparkplug", sparkplug={"group_id": "g"})
    with pytest.raises(ConfigError, match="ignoring case"):
        config.parse(yaml.safe_dump(doc), "gw.yaml")
    doc["mqtt"] = {"url": "mqtt://127.0.0.1:1883"}  # UNS topics are case-sensitive: fine there
    config.parse(yaml.safe_dump(doc), "gw.yaml")
