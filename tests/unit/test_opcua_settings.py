"""OPC UA device settings: a valid device loads, and each mistake names its key path."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway import config
from gateway.collectors.opcua.settings import OpcUaDevice, OpcUaSecurity, OpcUaTag, as_fingerprint
from gateway.errors import ConfigError

FP = "ab12" * 16
DEVICE: dict[str, Any] = {
    "name": "cnc-1",
    "protocol": "opcua",
    "endpoint": "opc.tcp://127.0.0.1:4840",
    "mode": "subscribe",
    "publishing_interval": "500ms",
    "poll": "2s",
    "timeout": "5s",
    "security": {
        "policy": "Basic256Sha256",
        "mode": "SignAndEncrypt",
        "server_certificate": FP,
        "username": "operator",
        "password": "millwright",
    },
    "tags": [
        {"name": "spindle_speed", "node": "ns=2;s=Spindle.Speed", "unit": "1/min", "deadband": 5},
        {"name": "program", "node": "nsu=urn:millwright:simulator;s=Program.Name"},
    ],
}


def _with(path: str, value: object) -> dict[str, Any]:
    """DEVICE with one value replaced at a dotted path like tags.0.node (_DELETE removes it)."""
    doc: dict[str, Any] = json.loads(json.dumps(DEVICE))
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value
    return doc


_DELETE = object()


def test_valid_device_loads_with_defaults() -> None:
    device = OpcUaDevice.model_validate(DEVICE)
    assert device.publishing_interval == 0.5
    assert device.cycle == 0.5  # subscribe mode reads as often as the server publishes
    assert OpcUaDevice.model_validate(_with("mode", "poll")).cycle == 2.0
    tag = device.tags[0]
    assert (tag.sampling_interval, tag.queue_size, tag.deadband) == (None, 1, 5)
    assert str(device.tags[1].ref) == "nsu=urn:millwright:simulator;s=Program.Name"
    minimal = OpcUaDevice.model_validate(
        {
            "name": "m",
            "protocol": "opcua",
            "endpoint": "opc.tcp://plc:4840",
            "tags": [{"name": "a", "node": "i=2258"}],
        }
    )
    assert (minimal.mode, minimal.security.policy, minimal.security.mode) == ("subscribe", "None", "None")


SEC, CERT, SAMPLING = "security", "security.server_certificate", "tags.0.sampling_interval"
ERRORS = [
    # path                     new value               error at               message contains
    ("endpoint",               "http://x:4840",        "endpoint",            "must start with opc.tcp://"),
    ("endpoint",               "opc.tcp://",           "endpoint",            "has no host"),
    ("endpoint",               "opc.tcp://u:p@h:4840", "endpoint",            "credentials"),
    ("endpoint",               "opc.tcp://h:99999",    "endpoint",            "bad port"),
    ("mode",                   "stream",               "mode",                "'subscribe' or 'poll'"),
    ("publishing_interval",    "0ms",                  "publishing_interval", "0ms is out of range"),
    ("security.mode",          "None",                 SEC,                   "mode None: a policy"),
    ("security.policy",        "None",                 SEC,                   "policy None with mode"),
    ("security.policy",        "Basic128Rsa15",        "security.policy",     "Input should be"),
    (CERT,                     _DELETE,                SEC,                   "needs server_cert"),
    (CERT,                     "ab:12:cd",             CERT,                  "give the SHA-256"),
    ("security.password",      _DELETE,                SEC,                   "needs password"),
    ("security.username",      _DELETE,                SEC,                   "without username"),
    ("security.password_file", "/run/pw",              SEC,                   "not both"),
    ("security.encryption",    "yes",                  "security.encryption", "Extra inputs"),
    ("tags.0.node",            "Spindle.Speed",        "tags.0.node",         "expected i=<number>"),
    ("tags.0.node",            "ns=2;g=123",           "tags.0.node",         "g= takes a GUID"),
    ("tags.1.node",            "nsu=urn:x",            "tags.1.node",         "expected nsu=<uri>;"),
    ("tags.0.name",            "a/b",                  "tags.0.name",         "should match pattern"),
    ("tags.1.name",            "spindle_speed",        "(top level)",         "is used twice"),
    ("tags.0.deadband",        -1,                     "tags.0.deadband",     "equal to 0"),
    ("tags.0.queue_size",      0,                      "tags.0.queue_size",   "equal to 1"),
    (SAMPLING,                 "fast",                 SAMPLING,              "not a duration"),
    ("tags",                   [],                     "tags",                "at least 1 item"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value", "where", "message"), ERRORS)
def test_invalid_device_names_the_key(path: str, value: object, where: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        OpcUaDevice.model_validate(_with(path, value))
    errors = [(".".join(map(str, e["loc"])) or "(top level)", e["msg"]) for e in info.value.errors()]
    assert any(loc == where and message in msg for loc, msg in errors), errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (FP, FP),
        (FP.upper(), FP),
        (":".join(FP[i : i + 2] for i in range(0, 64, 2)), FP),  # AB:12:... as shown by most tools
        ("pki/trusted", None),  # a path
        ("cafe", None),  # hex-only, but not 64 digits: a folder named cafe
        ("/etc/millwright/server.der", None),
    ],
)
def test_server_certificate_is_a_fingerprint_or_a_path(text: str, expected: str | None) -> None:
    assert as_fingerprint(text) == expected


def test_a_pin_without_a_security_policy_is_refused() -> None:
    # Nothing checks the server with policy None: the pin would only look like protection.
    with pytest.raises(ValidationError, match="server_certificate needs a security policy"):
        OpcUaSecurity(policy="None", mode="None", server_certificate=FP)


def test_tag_node_is_checked_alone() -> None:
    with pytest.raises(ValidationError, match="i= takes a number"):
        OpcUaTag(name="x", node="ns=1;i=x")


def _config(device: dict[str, Any]) -> str:
    return yaml.safe_dump({
        "gateway": {"id": "edge-1", "enterprise": "acme", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": "./outbox.db"},
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "devices": [device],
    })  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("security.mode", "Sign", None),
        ("security.mode", "None", "devices[0].security: policy Basic256Sha256 with mode None"),
        (
            "security.server_certificate",
            _DELETE,
            "devices[0].security: policy Basic256Sha256 needs server_certificate",
        ),
        ("endpoint", "tcp://plc:4840", "devices[0].endpoint: the endpoint must start with opc.tcp://"),
        ("tags.1.node", "ns=2;q=1", "devices[0].tags[1].node: 'ns=2;q=1': expected i=<number>"),
    ],
)
def test_config_file_errors_name_the_key_path(path: str, value: object, message: str | None) -> None:
    text = _config(_with(path, value))
    if message is None:
        assert config.parse(text, "gateway.yaml").devices[0].name == "cnc-1"
        return
    with pytest.raises(ConfigError) as info:
        config.parse(text, "gateway.yaml")
    assert message in str(info.value)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server certificate as PEM and as DER (openssl CLI), a file that is none, a folder."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run `make test`, which installs it")
    d = tmp_path_factory.mktemp("trust")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["req", *ec, "-x509", "-days", "2", "-subj", "/CN=server",
         "-keyout", "server.key", "-out", "server.pem"],
        ["x509", "-in", "server.pem", "-outform", "DER", "-out", "server.der"],
    ]  # fmt: skip
    for args in commands:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)
    (d / "notes.txt").write_text("the fingerprint is on the label\n")
    (d / "trusted").mkdir()
    return d


FORMS = (
    "give the server certificate's SHA-256 fingerprint (64 hex digits), its certificate file (DER or "
    "PEM), or a directory of trusted certificates"
)


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("7a63fd", "'7a63fd' looks like a SHA-256 fingerprint, with 6 hex digits where 64 are needed "
         "(and no file or directory has that name)"),
        (FP[:40], f"'{FP[:40]}' looks like a SHA-256 fingerprint, with 40 hex digits where 64 are needed "
         "(and no file or directory has that name)"),
        ("pki/server.der", "no such file or directory: {d}/pki/server.der; " + FORMS),
        ("notes.txt", "{d}/notes.txt is not a certificate (DER or PEM)"),
        ("server.key", "{d}/server.key is not a certificate (DER or PEM)"),
        ("server.pem", None),
        ("server.der", None),
        ("trusted", None),  # a trust directory may start empty: the log says what to copy in
        (FP, None),
    ],
)  # fmt: skip
def test_server_certificate_is_checked_at_load(certificates: Path, setting: str, problem: str | None) -> None:
    text = _config(_with(CERT, setting))
    file = str(certificates / "gateway.yaml")
    if problem is None:
        config.parse(text, file, env={})
        return
    with pytest.raises(ConfigError) as err:
        config.parse(text, file, env={})
    assert err.value.problems == [f"devices[0].security.server_certificate: {problem.format(d=certificates)}"]


def test_a_password_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    doc = _with("security.password", _DELETE)
    doc["security"]["password_file"] = str(tmp_path)
    with pytest.raises(ConfigError) as err:
        config.parse(_config(doc), "gateway.yaml", env={})
    assert err.value.problems == [
        f"devices[0].security.password_file: {tmp_path} is a directory; give the file whose first line is "
        "the password"
    ]


@pytest.mark.parametrize(
    ("path", "value", "where", "message"),
    [
        ("tags.0.deadband", True, "tags.0.deadband", "expected a number, not the boolean true"),
        ("tags.0.deadband", float("inf"), "tags.0.deadband", "Input should be a finite number"),
        ("tags.0.queue_size", True, "tags.0.queue_size", "Input should be a valid integer"),
        ("tags.0.sampling_interval", "25h", "tags.0.sampling_interval", "25h is out of range"),
        ("timeout", float("nan"), "timeout", "nan is out of range: a duration is between 1ms and 24h"),
        ("reconnect_max", "0.1s", "reconnect_max", "100ms is shorter than 500ms"),
        ("name", "cnc\x00", "name", "contains a control character (U+0000), which MQTT topics cannot carry"),
        ("tags.1.name", "prog\ufffe", "tags.1.name", "contains a Unicode noncharacter (U+FFFE)"),
    ],
)
def test_strict_values_of_an_opcua_device(path: str, value: object, where: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        OpcUaDevice.model_validate(_with(path, value))
    errors = [(".".join(map(str, e["loc"])), e["msg"]) for e in info.value.errors()]
    assert any(loc == where and message in msg for loc, msg in errors), errors


def test_reconnect_max() -> None:
    assert OpcUaDevice.model_validate(DEVICE).reconnect_max == 10.0
    assert OpcUaDevice.model_validate(_with("reconnect_max", "2m")).reconnect_max == 120.0
