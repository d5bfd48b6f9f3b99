"""Config loading: valid files pass, each kind of mistake names its key path."""

from __future__ import annotations

import json
import math
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gateway import config
from gateway.collectors.modbus.settings import ModbusDevice, ModbusTag, SerialLine
from gateway.collectors.opcua.settings import OpcUaDevice, OpcUaSecurity, OpcUaTag
from gateway.errors import ConfigError
from gateway.http.settings import HttpSettings
from gateway.publishers.settings import AzureSettings
from gateway.settings_types import AssetOverride, Model, mqtt_text_problem
from gateway.tls import client_context
from tests.examples import SHIPPED, example, example_files

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
    return _edit({path: value})


def _edit(changes: dict[str, object]) -> str:
    """BASE with values replaced, added or (_DELETE) removed at dotted paths, as YAML."""
    doc = json.loads(json.dumps(BASE))
    for path, value in changes.items():
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


@pytest.fixture(scope="module")
def shipped_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding what the cloud examples name under /etc/millwright/."""
    folder = tmp_path_factory.mktemp("etc-millwright")
    example_files(folder)
    return folder


@pytest.mark.parametrize("file", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_check(file: Path, shipped_files: Path, tmp_path: Path) -> None:
    """Each example as shipped, its /etc/millwright/ files where the test made them."""
    if SHIPPED in file.read_text(encoding="utf-8"):
        file = tmp_path / file.name
        file.write_text(example(file.name, shipped_files))
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
    # A cloud output: check says what its platform makes of it.
    platform = yaml.safe_load(file.read_text(encoding="utf-8")).get("outputs", [{}])[0].get("platform")
    if platform is not None:
        assert f"  output {_first_output(file)}: {platform}, format " in result.stdout


def _first_output(file: Path) -> str:
    return str(yaml.safe_load(file.read_text(encoding="utf-8"))["outputs"][0]["name"])


@pytest.mark.parametrize(
    ("path", "value", "where", "says"),
    [
        ("devices.0.tags.2.address", -1, "devices[0].tags[2].address", "greater than or equal to 0"),
        ("devices.0.tags.1.type", "int128", "devices[0].tags[1].type", "'bool', 'int16'"),
        ("devices.0.tags.1.order", "ABDC", "devices[0].tags[1].order", "'ABCD'"),
        ("devices.0.poll", "fast", "devices[0].poll", "not a duration"),
        ("devices.0.poll", "0s", "devices[0].poll", "0s is out of range: a duration is between 1ms and 24h"),
        ("devices.0.port", 70000, "devices[0].port", "less than or equal to 65535"),
        ("devices.0.colour", "red", "devices[0].colour", "unknown key"),
        ("devices.0.protocol", "profibus", "devices[0]", "unknown protocol 'profibus'"),
        (
            "devices.0.host",
            _DELETE,
            "devices[0].host",
            "required key is missing: give host (Modbus TCP, or RTU over TCP) or serial",
        ),
        ("devices.0.tags.2.table", "register", "devices[0].tags[2].table", "'coil'"),
        ("devices.0.tags.2.type", "float32", "devices[0].tags[2]", "type must be bool"),
        ("devices.0.tags.0.bit", 3, "devices[0].tags[0]", "bit applies only to type bool"),
        ("devices.0.tags.0.name", "temp/1", "devices[0].tags[0].name", "pattern"),
        ("devices.0.tags.0.name", "temp+", "devices[0].tags[0].name", "pattern"),
        ("devices.0.tags.0.name", "$state", "devices[0].tags[0].name", "may not start with '$'"),
        ("devices.0.serial", {"port": "/dev/ttyUSB0"}, "devices[0].host", "not both"),
        ("devices.0.framer", "ascii", "devices[0].framer", "'socket' or 'rtu'"),
        ("devices.0.tags.1.name", "temperature", "devices[0]", "tag name 'temperature' is used twice"),
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
    assert settings.outputs[0].username == "line1-gw"


def test_numbers_and_switches_may_come_from_the_environment() -> None:
    """`port: ${MODBUS_PORT}`: YAML saw only the reference, so its value's text is read as the
    number or the switch the key takes; the same text stays text where a key takes text."""
    text = _edit({
        "devices.0.port": "${MODBUS_PORT}", "mqtt.keepalive": "${KEEPALIVE}",
        "outbox.max_bytes": "${OUTBOX_BYTES}", "mqtt.username": "${NUMERIC}", "mqtt.password": "${NUMERIC}",
        "devices.0.tags.0.scale": "${SCALE}", "devices.0.max_gap": " ${GAP} ",
    })  # fmt: skip
    env = {"MODBUS_PORT": "5021", "KEEPALIVE": "45", "OUTBOX_BYTES": "2000000", "NUMERIC": "1234",
           "SCALE": "0.5", "GAP": "3"}  # fmt: skip
    settings = config.parse(text, "plant.yaml", env=env)
    device = settings.devices[0]
    assert (device.port, settings.outputs[0].keepalive, settings.outbox.max_bytes) == (5021, 45, 2_000_000)
    assert (settings.outputs[0].username, settings.outputs[0].password) == ("1234", "1234")
    assert isinstance(device, ModbusDevice)
    assert (device.tags[0].scale, device.max_gap) == (0.5, 3)
    insecure = _edit({"mqtt.url": "mqtts://127.0.0.1", "mqtt.tls_insecure": "${INSECURE}"})
    assert config.parse(insecure, "plant.yaml", env={"INSECURE": "True"}).outputs[0].tls_insecure is True


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("devices.0.port", "abc", "devices[0].port: Input should be a valid integer, not text (from ${NAME}"),
        ("devices.0.port", "1.5", "devices[0].port: Input should be a valid integer, not text (from ${NAME}"),
        ("devices.0.port", "99999", "devices[0].port: Input should be less than or equal to 65535"),
        (
            "mqtt.tls_insecure",
            "yes",
            "mqtt.tls_insecure: Input should be a valid boolean, not text (from ${NAME}",
        ),
    ],
)
def test_a_number_or_switch_from_the_environment_must_be_one(path: str, value: str, message: str) -> None:
    doc = _edit({"mqtt.url": "mqtts://127.0.0.1", path: "${VALUE}"})
    with pytest.raises(ConfigError) as info:
        config.parse(doc, "plant.yaml", env={"VALUE": value})
    assert message in str(info.value)


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
    text = _edit({"mqtt.username": "gw", "mqtt.password_file": str(tmp_path / "pw")})
    with pytest.raises(ConfigError, match=r"mqtt.password_file: the file is empty"):
        config.parse(text, "plant.yaml", env={})


def test_password_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    text = _edit({"mqtt.username": "gw", "mqtt.password_file": str(secret)})
    settings = config.parse(text, "plant.yaml", env={})
    assert settings.outputs[0].secret() == "s3cret"


@pytest.mark.parametrize("key", ["ca", "cert", "password_file"])
def test_missing_tls_and_secret_files_are_config_errors(key: str, tmp_path: Path) -> None:
    doc = json.loads(json.dumps(BASE))
    doc["mqtt"].update({"url": "mqtts://127.0.0.1:8883", "username": "gw", key: "missing.pem"})
    if key == "cert":
        doc["mqtt"]["key"] = "missing.key"
    with pytest.raises(ConfigError) as info:
        config.parse(yaml.safe_dump(doc), str(tmp_path / "plant.yaml"), env={})
    assert f"mqtt.{key}: no such file: {tmp_path / 'missing.pem'}" in str(info.value)


def test_relative_file_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    settings = config.parse(
        _edit({"mqtt.username": "gw", "mqtt.password_file": "pw"}), str(tmp_path / "plant.yaml"), env={}
    )
    assert settings.outputs[0].password_file == tmp_path / "pw"
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
    assert settings.outputs[0].sparkplug is not None
    assert settings.outputs[0].sparkplug.group_id == "plant1"
    assert settings.outputs[0].sparkplug.edge_node_id == "edge-1"  # the gateway id
    assert settings.outputs[0].sparkplug.primary_host_id is None


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


# -- names that MQTT cannot carry -------------------------------------------------------------

TOPIC = "which MQTT topics cannot carry"
CONNECT = "which an MQTT CONNECT cannot carry"
CONTROL, NONCHARACTER = "contains a control character", "contains a Unicode noncharacter"


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("devices.0.name",        "press\0",      f"devices[0].name: {CONTROL} (U+0000), {TOPIC}"),
        ("devices.0.name",        "\tpress",      f"devices[0].name: {CONTROL} (U+0009), {TOPIC}"),
        ("devices.0.tags.2.name", "run\x1f",      f"devices[0].tags[2].name: {CONTROL} (U+001F), {TOPIC}"),
        ("gateway.site",          "plant\x7f",    f"gateway.site: {CONTROL} (U+007F), {TOPIC}"),
        ("gateway.area",          "a\x85b",       f"gateway.area: {CONTROL} (U+0085), {TOPIC}"),
        ("gateway.line",          "l\x9f",        f"gateway.line: {CONTROL} (U+009F), {TOPIC}"),
        ("gateway.enterprise",    "e\ufdd0",      f"gateway.enterprise: {NONCHARACTER} (U+FDD0), {TOPIC}"),
        ("gateway.id",            "g\ufffe",      f"gateway.id: {NONCHARACTER} (U+FFFE), {TOPIC}"),
        ("gateway.id",            "g\U0001ffff",  f"gateway.id: {NONCHARACTER} (U+1FFFF), {TOPIC}"),
        ("devices.0.asset",       {"line": "l\0"}, f"devices[0].asset.line: {CONTROL} (U+0000), {TOPIC}"),
        ("mqtt.client_id",        "gw\0",         f"mqtt.client_id: {CONTROL} (U+0000), {CONNECT}"),
        ("mqtt.username",         "u\x1b",        f"mqtt.username: {CONTROL} (U+001B), {CONNECT}"),
        ("mqtt.client_id",        "g" * 65_536,   f"mqtt.client_id: is longer than 65,535 bytes in UTF-8, "
                                                  f"{CONNECT}"),
    ],
)  # fmt: skip
def test_names_mqtt_cannot_carry_are_refused(path: str, value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(_with(path, value), "plant.yaml", env={})
    assert err.value.problems == [problem]


def test_sparkplug_ids_mqtt_cannot_carry_are_refused() -> None:
    mqtt = {"url": "mqtt://127.0.0.1:1883", "format": "sparkplug", "sparkplug": {"group_id": "g\0"}}
    with pytest.raises(ConfigError) as err:
        config.parse(_with("mqtt", mqtt), "plant.yaml", env={})
    assert err.value.problems == [f"mqtt.sparkplug.group_id: contains a control character (U+0000), {TOPIC}"]


def test_a_surrogate_from_the_environment_is_refused_in_a_name() -> None:
    # os.environ hands bytes that are not UTF-8 over as lone surrogates (surrogateescape).
    with pytest.raises(ConfigError) as err:
        config.parse(_with("devices.0.name", "${NAME}"), "plant.yaml", env={"NAME": "press\udcff"})
    assert err.value.problems == [f"devices[0].name: contains a surrogate code point (U+DCFF), {TOPIC}"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("press-1", None), ("Presse Nr. 1 (Halle 2)", None), ("caf\u00e9", None), ("\u6a5f\u68b0", None),
        ("\U0001f600", None), (" x", None), ("\x20\x7e\xa0\ud7ff\ue000\ufdcf\ufdf0\ufffd\U0010fffd", None),
        ("\0", "contains a control character (U+0000)"),
        ("a\nb", "contains a control character (U+000A)"),
        ("\x80", "contains a control character (U+0080)"),
        ("\ud800", "contains a surrogate code point (U+D800)"),
        ("\udfff", "contains a surrogate code point (U+DFFF)"),
        ("\ufdef", "contains a Unicode noncharacter (U+FDEF)"),
        ("\uffff", "contains a Unicode noncharacter (U+FFFF)"),
        ("\U0010fffe", "contains a Unicode noncharacter (U+10FFFE)"),
        ("\u00e9" * 32_768, "is longer than 65,535 bytes in UTF-8"),
        ("\u00e9" * 32_767, None),
    ],
)  # fmt: skip
def test_mqtt_text_problem(text: str, problem: str | None) -> None:
    assert mqtt_text_problem(text) == problem


# -- non-finite numbers, booleans as numbers, numbers as booleans ---------------------------------

FINITE = "Input should be a finite number"
INT, BOOL, STR = (f"Input should be a valid {t}, not" for t in ("integer", "boolean", "string"))
TRUE, FALSE = "the boolean true", "the boolean false"
TEXT = "text (write numbers and true/false without quotes)"
QUOTE = "(quote it to make it text)"
HUGE = "an integer of 1329 bits"  # 10**400
T0, T2 = "devices[0].tags[0]", "devices[0].tags[2]"


@pytest.mark.parametrize(
    ("path", "value", "where", "message"),
    [
        ("devices.0.tags.0.scale",    "1e400",   f"{T0}.scale",        FINITE),  # YAML 1.1 reads it as text
        ("devices.0.tags.0.scale",    1e400,     f"{T0}.scale",        FINITE),  # written as .inf
        ("devices.0.tags.0.scale",    math.nan,  f"{T0}.scale",        FINITE),
        ("devices.0.tags.0.offset",   math.inf,  f"{T0}.offset",       FINITE),
        ("devices.0.tags.0.min",      math.inf,  f"{T0}.min",          FINITE),
        ("devices.0.tags.0.max",      -math.inf, f"{T0}.max",          FINITE),
        ("devices.0.tags.0.deadband", math.nan,  f"{T0}.deadband",     FINITE),
        ("devices.0.tags.0.scale",    10**400,   f"{T0}.scale",        f"{HUGE} is too large for a number"),
        ("devices.0.port",            True,      "devices[0].port",    f"{INT} {TRUE}"),
        ("devices.0.unit",            False,     "devices[0].unit",    f"{INT} {FALSE}"),
        ("devices.0.tags.0.address",  1.0,       f"{T0}.address",      f"{INT} a decimal number"),
        ("devices.0.tags.2.address",  "1",       f"{T2}.address",      f"{INT} {TEXT}"),
        ("devices.0.tags.0.bit",      True,      f"{T0}.bit",          f"{INT} {TRUE}"),
        ("devices.0.tags.0.length",   True,      f"{T0}.length",       f"{INT} {TRUE}"),
        ("devices.0.max_gap",         True,      "devices[0].max_gap", f"{INT} {TRUE}"),
        ("mqtt.keepalive",            True,      "mqtt.keepalive",     f"{INT} {TRUE}"),
        ("mqtt.batch",                True,      "mqtt.batch",         f"{INT} {TRUE}"),
        ("mqtt.max_inflight",         True,      "mqtt.max_inflight",  f"{INT} {TRUE}"),
        ("outbox.max_rows",           True,      "outbox.max_rows",    f"{INT} {TRUE}"),
        ("outbox.max_bytes",          True,      "outbox.max_bytes",   f"{INT} {TRUE}"),
        ("devices.0.tags.0.scale",    True,      f"{T0}.scale",        f"expected a number, not {TRUE}"),
        ("devices.0.tags.0.deadband", False,     f"{T0}.deadband",     f"expected a number, not {FALSE}"),
        ("mqtt.tls_insecure",         1,         "mqtt.tls_insecure",  f"{BOOL} an integer"),
        ("mqtt.tls_insecure",         "yes",     "mqtt.tls_insecure",  f"{BOOL} {TEXT}"),
        ("gateway.site",              2024,      "gateway.site",       f"{STR} an integer {QUOTE}"),
        ("mqtt.password",             1234,      "mqtt.password",      f"{STR} an integer {QUOTE}"),
    ],
)  # fmt: skip
def test_numbers_and_booleans_are_taken_as_written(
    path: str, value: object, where: str, message: str
) -> None:
    text = _edit({path: value, "mqtt.username": "gw"} if path == "mqtt.password" else {path: value})
    with pytest.raises(ConfigError) as err:
        config.parse(text, "plant.yaml", env={})
    assert err.value.problems == [f"{where}: {message}"]
    assert "1234" not in str(err.value)  # a password written as a number is not shown


def test_sparkplug_aliases_take_only_a_boolean() -> None:
    for value, kind in [("yes", "text"), (1, "an integer")]:
        mqtt = {"url": "mqtt://h", "format": "sparkplug", "sparkplug": {"group_id": "g", "aliases": value}}
        with pytest.raises(ConfigError) as err:
            config.parse(_with("mqtt", mqtt), "plant.yaml", env={})
        assert err.value.problems[0].startswith(
            f"mqtt.sparkplug.aliases: Input should be a valid boolean, not {kind}"
        )


def test_what_strict_types_still_accept() -> None:
    text = _edit({
        "devices.0.tags.0.scale": 2,  # an int for a float
        "devices.0.tags.0.offset": "1e-3",  # YAML 1.1 reads an exponent without a dot as text
        "devices.0.tags.0.min": -40,
        "devices.0.poll": 2,  # bare seconds
        "devices.0.timeout": "250ms",
        "mqtt.version": "3.1.1",
        "mqtt.tls_insecure": False,  # with mqtt://: off is no claim of TLS
        "outbox.path": "buffer.db",
        "outbox.max_bytes": 10**9,
    })  # fmt: skip
    settings = config.parse(text, "/srv/plant.yaml", env={})
    tag = settings.devices[0].tags[0]
    assert (tag.scale, tag.offset, tag.min) == (2.0, 0.001, -40.0)
    assert isinstance(tag.scale, float)
    assert (settings.devices[0].poll, settings.devices[0].timeout) == (2.0, 0.25)
    assert settings.outbox.path == Path("/srv/buffer.db")


# Every config model, so that the exhaustive test below covers a model added later.
MODELS = [
    config.ConfigFile, config.Settings, config.GatewaySettings, config.OutboxSettings, config.MqttSettings,
    config.OutputSettings, config.SparkplugSettings, ModbusDevice, ModbusTag, OpcUaDevice, OpcUaSecurity,
    OpcUaTag, AssetOverride, SerialLine, AzureSettings, HttpSettings,
]  # fmt: skip
WRONG = {"integer": [True, 1.5, "1"], "number": [True, False], "boolean": [1, 0, "yes", "true"]}


def test_the_model_list_is_complete() -> None:
    defined = set(config.ConfigFile.model_json_schema()["$defs"]) | {"ConfigFile", "Settings"}
    assert defined == {m.__name__ for m in MODELS}


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_number_and_switch_refuses_the_other_kinds(model: type[Model]) -> None:
    """No config field coerces: not a boolean into a number, nor a number into a boolean."""
    checked = 0
    for name, prop in model.model_json_schema()["properties"].items():
        kinds = {prop.get("type")} | {p.get("type") for p in prop.get("anyOf", [])}
        for kind in kinds & WRONG.keys():
            for value in WRONG[kind]:
                with pytest.raises(ValidationError) as err:
                    model.model_validate({name: value})
                # A type error: not a range error on the value it was coerced to (true as 1).
                found = [e["type"] for e in err.value.errors() if e["loc"] == (name,)]
                assert found in (["int_type"], ["bool_type"], ["value_error"]), (name, value, found)
                checked += 1
    assert checked or model in (
        config.ConfigFile,
        config.Settings,
        config.GatewaySettings,
        AssetOverride,
        OpcUaDevice,
        OpcUaSecurity,
        AzureSettings,
    )


# -- durations ------------------------------------------------------------------------------

RANGE = "is out of range: a duration is between 1ms and 24h"


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("devices.0.poll", "99999999999999999999999h", f"devices[0].poll: 99999999999999999999999h {RANGE}"),
        ("devices.0.timeout", "1e400", f"devices[0].timeout: 1e400 {RANGE}"),
        ("devices.0.poll", math.nan, f"devices[0].poll: nan {RANGE}"),
        ("devices.0.poll", math.inf, f"devices[0].poll: inf {RANGE}"),
        ("devices.0.poll", 10**30, f"devices[0].poll: 1000000000000000000000000000000 {RANGE}"),
        ("devices.0.poll", 10**400, f"devices[0].poll: an integer of 1329 bits {RANGE}"),
        ("devices.0.poll", "0.5ms", f"devices[0].poll: 0.5ms {RANGE}"),
        ("devices.0.poll", "25h", f"devices[0].poll: 25h {RANGE}"),
        ("devices.0.poll", 0, f"devices[0].poll: 0 {RANGE}"),
        ("mqtt.connect_timeout", "86401s", f"mqtt.connect_timeout: 86401s {RANGE}"),
        ("devices.0.reconnect_max", "100ms",
         "devices[0].reconnect_max: 100ms is shorter than 500ms, where the backoff starts"),
        ("devices.0.reconnect_max", "2d",
         "devices[0].reconnect_max: '2d' is not a duration such as 500ms, 1s or 5m"),
        ("devices.0.poll", True, "devices[0].poll: expected a duration such as 500ms, 1s or 5m"),
    ],
)  # fmt: skip
def test_absurd_durations_are_refused_with_the_range(path: str, value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(_with(path, value), "plant.yaml", env={})
    assert err.value.problems == [problem]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1ms", 0.001),
        ("24h", 86_400.0),
        ("1440m", 86_400.0),
        (86_400, 86_400.0),
        ("2.5s", 2.5),
        ("1e1", 10.0),
    ],
)
def test_durations_at_the_ends_of_the_range(value: object, seconds: float) -> None:
    assert config.parse(_with("devices.0.poll", value), "plant.yaml", env={}).devices[0].poll == seconds


def test_reconnect_max_defaults_to_10s_on_both_kinds_of_device() -> None:
    device = config.parse(_with("devices.0.reconnect_max", "1m"), "plant.yaml", env={}).devices[0]
    assert device.reconnect_max == 60.0
    assert config.parse(_with("devices.0.poll", "1s"), "plant.yaml", env={}).devices[0].reconnect_max == 10.0
    opcua = OpcUaDevice.model_validate(
        {
            "name": "m",
            "protocol": "opcua",
            "endpoint": "opc.tcp://plc:4840",
            "tags": [{"name": "a", "node": "i=2258"}],
        }
    )
    assert opcua.reconnect_max == 10.0
    for model in (ModbusDevice, OpcUaDevice):
        described = model.model_json_schema()["properties"]["reconnect_max"]["description"]
        assert described.startswith("The longest wait between two reconnect attempts to the device")


# -- TLS and credentials --------------------------------------------------------------------

ONLY_TLS = "applies to mqtts:// only; the url is mqtt://, so the connection would not use TLS"
ALONE = "without username: give the broker's user name too"


@pytest.mark.parametrize(
    ("mqtt", "problems"),
    [
        ({"ca": "ca.pem"}, [f"mqtt.ca: ca {ONLY_TLS}"]),
        ({"cert": "c.pem", "key": "c.key"}, [f"mqtt.cert: cert {ONLY_TLS}", f"mqtt.key: key {ONLY_TLS}"]),
        ({"tls_insecure": True}, [f"mqtt.tls_insecure: tls_insecure {ONLY_TLS}"]),
        ({"url": "tcp://h:1883", "ca": "ca.pem"}, [f"mqtt.ca: ca {ONLY_TLS.replace('mqtt://,', 'tcp://,')}"]),
        ({"password": "s3cret"}, [f"mqtt.password: password {ALONE}"]),
        ({"password_file": "pw"}, [f"mqtt.password_file: password_file {ALONE}"]),
        ({"url": "mqtts://h", "password": "s3cret"}, [f"mqtt.password: password {ALONE}"]),
    ],
)  # fmt: skip
def test_tls_and_credential_settings_that_would_do_nothing(
    mqtt: dict[str, object], problems: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(_with("mqtt", {"url": "mqtt://127.0.0.1:1883", **mqtt}), "plant.yaml", env={})
    assert err.value.problems == problems


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates and keys made with the openssl CLI, as tests/integration/test_mqtt.py does:
    a CA, a client certificate it signed and its key, another EC key, an RSA key, the client
    key encrypted, the client certificate as DER, and a file that is no PEM at all."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run `make test`, which installs it")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["req", *ec, "-x509", "-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"],
        ["req", *ec, "-subj", "/CN=gateway", "-keyout", "client.key", "-out", "client.csr"],
        ["x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-out", "client.pem"],
        ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.key"],
        ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", "rsa.key"],
        ["pkey", "-in", "client.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key"],
        ["x509", "-in", "client.pem", "-outform", "DER", "-out", "client.der"],
    ]  # fmt: skip
    for args in commands:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)
    (d / "junk.txt").write_text("not a certificate\n")
    (d / "folder").mkdir()
    return d


NOT_PEM = "not a PEM certificate (no -----BEGIN CERTIFICATE----- block in it)"


def _tls(pki: Path, **files: str) -> str:
    """BASE over mqtts://, with the given ca/cert/key files (names inside `pki`)."""
    return _with("mqtt", {"url": "mqtts://127.0.0.1:8883", **{k: str(pki / v) for k, v in files.items()}})


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"ca": "junk.txt"}, f"mqtt.ca: {{pki}}/junk.txt: {NOT_PEM}"),
        ({"ca": "client.der"}, f"mqtt.ca: {{pki}}/client.der: {NOT_PEM}"),
        ({"ca": "ca.key"}, f"mqtt.ca: {{pki}}/ca.key: {NOT_PEM}"),
        ({"ca": "folder"}, "mqtt.ca: {pki}/folder is a directory; give the CA certificate file (PEM)"),
        ({"cert": "junk.txt", "key": "client.key"}, f"mqtt.cert: {{pki}}/junk.txt: {NOT_PEM}"),
        ({"cert": "client.der", "key": "client.key"}, f"mqtt.cert: {{pki}}/client.der: {NOT_PEM}"),
        ({"cert": "client.pem", "key": "junk.txt"}, "mqtt.key: {pki}/junk.txt: not a PEM private key"),
        ({"cert": "client.pem", "key": "client.pem"}, "mqtt.key: {pki}/client.pem: not a PEM private key"),
        ({"cert": "client.pem", "key": "other.key"},
         "mqtt.key: {pki}/other.key does not match mqtt.cert ({pki}/client.pem)"),
        ({"cert": "client.pem", "key": "rsa.key"},  # an RSA key beside an EC certificate
         "mqtt.key: {pki}/rsa.key does not match mqtt.cert ({pki}/client.pem)"),
        ({"cert": "client.pem", "key": "encrypted.key"},
         "mqtt.key: {pki}/encrypted.key: the key is encrypted, and the gateway has no passphrase "
         "setting: give it unencrypted, readable by the gateway only (mode 0600)"),
        ({"cert": "client.pem", "key": "folder"},
         "mqtt.key: {pki}/folder is a directory; give the client private key file (PEM)"),
    ],
)  # fmt: skip
def test_tls_files_that_do_not_load_are_refused_at_load(
    pki: Path, files: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(_tls(pki, **files), "plant.yaml", env={})
    assert err.value.problems == [problem.format(pki=pki)]


def test_tls_files_that_load(pki: Path) -> None:
    settings = config.parse(_tls(pki, ca="ca.pem", cert="client.pem", key="client.key"), "plant.yaml", env={})
    assert settings.outputs[0].ca == pki / "ca.pem"
    # Relative to the config file, like every path in it.
    text = _with("mqtt", {"url": "mqtts://127.0.0.1:8883", "ca": "ca.pem"})
    assert config.parse(text, str(pki / "plant.yaml"), env={}).outputs[0].ca == pki / "ca.pem"


def test_client_context_verifies_by_default(pki: Path) -> None:
    url = "mqtts://127.0.0.1:8883"
    ctx = client_context(
        config.MqttSettings(url=url, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
    )
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    insecure = client_context(config.MqttSettings(url=url, tls_insecure=True))
    assert (insecure.verify_mode, insecure.check_hostname) == (ssl.CERT_NONE, False)
    with pytest.raises(ConfigError) as err:
        client_context(config.MqttSettings(url=url, ca=pki / "junk.txt"), "gw.yaml", "outputs[1]")
    assert str(err.value).startswith("gw.yaml: invalid configuration\n  outputs[1].ca: ")
    with pytest.raises(
        ConfigError, match=r"mqtt.ca: .*/missing.pem: cannot read it: No such file or directory"
    ):
        client_context(config.MqttSettings(url=url, ca=pki / "missing.pem"))


# -- files: outbox, password files, OPC UA server certificates ------------------------------


def test_an_outbox_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(_with("outbox.path", str(tmp_path)), "plant.yaml", env={})
    assert err.value.problems == [
        f"outbox.path: {tmp_path} is a directory; give the database file, e.g. {tmp_path}/outbox.db"
    ]
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as err:
        config.parse(_with("outbox.path", str(tmp_path / "file" / "data" / "o.db")), "plant.yaml", env={})
    assert err.value.problems == [
        f"outbox.path: {tmp_path}/file/data/o.db: {tmp_path}/file is a file, not a directory"
    ]
    # Missing folders are fine: the gateway creates them.
    config.parse(_with("outbox.path", str(tmp_path / "new" / "o.db")), "plant.yaml", env={})


def test_a_password_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    text = _edit({"mqtt.username": "gw", "mqtt.password_file": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        config.parse(text, "plant.yaml", env={})
    assert err.value.problems == [
        f"mqtt.password_file: {tmp_path} is a directory; give the file whose first line is the password"
    ]


def test_a_password_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes(b"caf\xe9\n")
    text = _edit({"mqtt.username": "gw", "mqtt.password_file": str(tmp_path / "pw")})
    with pytest.raises(ConfigError) as err:
        config.parse(text, "plant.yaml", env={})
    assert err.value.problems == [f"mqtt.password_file: {tmp_path}/pw is not UTF-8 text"]


# -- where a problem is, when the text or the key is unusual (found by test_config_fuzz) -----


YAML_CONTROL = "is not allowed in YAML (control characters are not allowed)"
BAD_YAML = "not valid YAML: the character"
UNKNOWN = "unknown key (check the spelling; see `millwright schema`)"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("gateway:\n  id: a\x01b\n", f"line 2, column 8: {BAD_YAML} U+0001 {YAML_CONTROL}"),
        # libyaml counts bytes; the column is in characters all the same
        ("gateway: {id: \u00e9\u00e9\x7f}\n", f"line 1, column 17: {BAD_YAML} U+007F {YAML_CONTROL}"),
        ("gateway: {id: a\ud800}\n",
         "line 1, column 16: not valid YAML: a surrogate code point, which is not UTF-8"),
        ("gateway: {'my key': 1}\n", f"gateway['my key']: {UNKNOWN}"),
        ("gateway: {1: 1}\n", "gateway: unknown key 1 (a key is a name, such as id)"),
        ("gateway: {1: '${X}'}\n", "gateway['1']: environment variable X is not set"),
        # A key named like a protocol, deeper than the device's union branch: not dropped.
        ("devices: [{tags: [{modbus: '${X}'}]}]\n",
         "devices[0].tags[0].modbus: environment variable X is not set"),
    ],
)  # fmt: skip
def test_problems_name_the_place_on_one_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(text, "plant.yaml", env={})
    assert problem in err.value.problems, err.value.problems
