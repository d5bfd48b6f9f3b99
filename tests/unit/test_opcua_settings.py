"""OPC UA device settings: a valid device loads, and each mistake names its key path."""

from __future__ import annotations

import json
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
    ("publishing_interval",    "0ms",                  "publishing_interval", "greater than zero"),
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
