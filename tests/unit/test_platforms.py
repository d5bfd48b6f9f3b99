"""`platform:`, `topic:` and `format: batch` at load: each platform rule is a config error
at the key that breaks it, and each default the platform implies is filled in."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway import config
from gateway.errors import ConfigError
from gateway.publishers import topics
from gateway.publishers.azure import read_device_key, sas_token
from gateway.publishers.platforms import PLATFORMS
from gateway.publishers.settings import AzureSettings

HEAD = {
    "gateway": {
        "id": "edge-1",
        "enterprise": "acme",
        "site": "plant1",
        "area": "press-shop",
        "line": "line-1",
    },
    "outbox": {"path": "./data/outbox.db"},
}
TAGS = [{"name": "temperature", "table": "holding", "address": 0, "type": "float32"}]


def _text(output: dict[str, Any], tags: list[dict[str, Any]] | None = None, **device: Any) -> str:
    press = {"name": "press-1", "protocol": "modbus", "host": "127.0.0.1", "tags": tags or TAGS, **device}
    return yaml.safe_dump({**HEAD, "outputs": [{"name": "cloud", **output}], "devices": [press]})


def _parse(output: dict[str, Any], tmp_path: Path, **device: Any) -> config.Settings:
    path = tmp_path / "plant.yaml"
    path.write_text(_text(output, **device))
    return config.load(path)


def _problems(output: dict[str, Any], tmp_path: Path, **device: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        _parse(output, tmp_path, **device)
    return err.value.problems


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """TLS file names the rules need to exist (their content is checked by test_config)."""
    names = {"ca": "ca.pem", "cert": "device.pem.crt", "key": "private.pem.key"}
    for name in names.values():
        (tmp_path / name).write_text("x")
    return names


def _aws(**more: Any) -> dict[str, Any]:
    url = "mqtts://a1b2c3-ats.iot.eu-central-1.amazonaws.com:8883"
    return {"platform": "aws-iot-core", "url": url, "cert": "/c.pem", "key": "/k.pem", **more}


def _config(output: dict[str, Any]) -> config.ConfigFile:
    return config.ConfigFile.model_validate(yaml.safe_load(_text(output)))


def _problem(output: dict[str, Any], **device: Any) -> str:
    """The first problem of a config with `output` (the cross-key rules stop at the first)."""
    with pytest.raises(ConfigError) as err:
        config.parse(_text(output, **device), "plant.yaml", env={})
    return err.value.problems[0]


@pytest.mark.parametrize("key", ["max_rate", "max_message_bytes", "max_inflight", "version"])
def test_a_null_does_not_switch_a_platform_limit_off(key: str) -> None:
    (_, output), = _config(_aws(format="batch", **{key: None})).resolved_outputs()  # fmt: skip
    assert (output.max_rate, output.max_message_bytes, output.max_inflight) == (100.0, 128 * 1024, 100)


@pytest.mark.parametrize(
    ("lifetime", "renewed_after"),
    [(10.0, 4.0), (60.0, 47.0), (3600.0, 3299.0), (86400.0, 86099.0)],
)
def test_a_sas_token_is_renewed_before_it_expires(lifetime: float, renewed_after: float) -> None:
    """A fifth of the lifetime before, at most 5 minutes and at least 5 s before; a second
    more, as the expiry is written in whole seconds."""
    azure = AzureSettings(
        hub="h.azure-devices.net", device_id="d", device_key_file=Path("k"), token_lifetime=lifetime
    )
    assert azure.renew_after == renewed_after


def test_an_iot_hub_output_without_format_is_batch() -> None:
    azure = {"hub": "myhub.azure-devices.net", "device_id": "edge-1", "device_key_file": "/k"}
    hub = {"platform": "azure-iot-hub", "url": "mqtts://myhub.azure-devices.net:8883", "azure": azure}
    (_, output), = _config(hub).resolved_outputs()  # fmt: skip
    assert output.format == "batch"


def test_aws_defaults_follow_the_platform() -> None:
    (aws,) = _config(_aws(format="batch")).resolved_outputs()
    output = aws[1]
    assert (output.max_rate, output.max_inflight, output.max_message_bytes) == (100.0, 100, 128 * 1024)
    assert output.offered_alpn is None
    assert output.template.text == topics.BATCH_TOPIC
    on_443 = _config(_aws(url="mqtts://a1b2c3-ats.iot.eu-central-1.amazonaws.com:443"))
    assert next(on_443.resolved_outputs())[1].offered_alpn == "x-amzn-mqtt-ca"


@pytest.mark.parametrize(
    ("output", "key", "words"),
    [
        (_aws(keepalive=10), "keepalive", "30 to 1200 seconds"),
        (_aws(max_rate=150), "max_rate", "at most 100 messages per second"),
        (_aws(max_message_bytes=200_000), "max_message_bytes", "at most 131072 bytes"),
        (_aws(max_inflight=500), "max_inflight", "at most 100 unacknowledged"),
        (
            {**_aws(url="mqtt://a1b2c3-ats.iot.eu-central-1.amazonaws.com"), "cert": None, "key": None},
            "url",
            "TLS connections only",
        ),
        (_aws(tls_insecure=True), "tls_insecure", "not allowed"),
        ({**_aws(), "cert": None, "key": None}, "cert", "X.509 certificate"),
        (_aws(topic="plant/{device}"), "topic", "{device} and {tag}"),
        (_aws(topic="{device}/{tag}/{bogus}"), "topic", "unknown placeholder {bogus}"),
        (_aws(topic="a/+/{device}/{tag}"), "topic", "wildcards"),
        (_aws(topic="a//{device}/{tag}"), "topic", "level is empty"),
        (_aws(topic="{device}/{tag"), "topic", "placeholders are"),
        (_aws(topic="$sys/{device}/{tag}"), "topic", "start with $"),
        (_aws(format="batch", topic="{device}/{tag}"), "topic", "{tag} has no place"),
        (_aws(format="batch", topic="plant/{site}/telemetry"), "topic", "must contain {device}"),
        (_aws(format="sparkplug", sparkplug={"group_id": "g"}, topic="x/{device}"), "topic", "Sparkplug"),
        (_aws(topic="a/b/c/d/e/f/g/{device}/{tag}"), "topic", "8 slashes (levels 9), more than 7"),
    ],
)
def test_aws_rules_name_the_key(output: dict[str, Any], key: str, words: str) -> None:
    problem = _problem(output)
    assert problem.startswith(f"outputs[0].{key}: "), problem
    assert words in problem


def test_the_topic_limits_are_checked_on_every_topic_the_config_makes() -> None:
    # Within 7 slashes as a template, too long once the names are in: 258 bytes.
    long_tag = [{"name": "t" * 120, "table": "holding", "address": 0, "type": "float32"}]
    problem = _problem(_aws(), tags=long_tag, asset={"area": "a" * 110})
    # No topic: key to name (the default template): the output itself.
    assert problem.startswith("outputs[0]: the topic acme/plant1/"), problem
    assert "bytes, more than 256, which AWS IoT Core refuses: give topic: a shorter template" in problem
    # The same on a generic broker is fine: it has no such limit.
    config.parse(_text({"url": "mqtt://h"}, tags=long_tag, asset={"area": "a" * 100}), "p.yaml", env={})
    assert _config(_aws(format="batch"))  # (and a batch topic has no tag in it)
    # The gateway's status topic is one of them.
    long_id = _text(_aws())
    long_id = long_id.replace("id: edge-1", f"id: {'g' * 128}").replace("site: plant1", f"site: {'s' * 128}")
    with pytest.raises(ConfigError) as err:
        config.parse(long_id, "plant.yaml", env={})
    (problem,) = err.value.problems
    assert problem.startswith("gateway.id: the topic acme/sss"), problem
    assert "has 278 bytes, more than 256" in problem


def test_aws_basic_ingest_topics_do_not_count_their_prefix() -> None:
    # 3 slashes of the prefix, 7 after it: AWS takes it.
    ingest = _aws(format="batch", topic="$aws/rules/plant_ingest/a/b/c/{enterprise}/{site}/{area}/{device}")
    _config(ingest)
    deeper = _aws(format="batch", topic="$aws/rules/plant_ingest/a/b/c/d/{enterprise}/{site}/{area}/{device}")
    assert "8 slashes" in _problem(deeper)
    # Elsewhere a $ topic is the broker's own.
    assert "start with $" in _problem({"url": "mqtt://h", "topic": "$aws/rules/r/{device}/{tag}"})


@pytest.mark.parametrize(
    ("output", "key", "words"),
    [
        ({"version": "5"}, "version", "MQTT 3.1.1 only"),
        ({"format": "uns"}, "format", "takes format batch, not uns"),
        ({"topic": "x/{device}"}, "topic", "its own topic only"),
        ({"client_id": "other"}, "client_id", "device id as the client id"),
        ({"username": "me"}, "username", "leave username out"),
        ({"keepalive": 1500}, "keepalive", "5 to 1177 seconds"),
        (
            {"azure": {"hub": "myhub.azure-devices.net", "device_id": "edge-1"}},
            "azure.device_key_file",
            "required key is missing",
        ),
        ({"azure": None}, "azure", "needs an azure: section"),
        ({"azure": {"hub": "h", "device_id": "d/1", "device_key_file": "k"}}, "azure.device_id", "pattern"),
    ],
)
def test_azure_iot_hub_rules_name_the_key(output: dict[str, Any], key: str, words: str) -> None:
    hub = {
        "platform": "azure-iot-hub", "url": "mqtts://myhub.azure-devices.net:8883", "format": "batch",
        "azure": {"hub": "myhub.azure-devices.net", "device_id": "edge-1", "device_key_file": "/k"},
    }  # fmt: skip
    problem = _problem({**hub, **output})
    assert problem.startswith(f"outputs[0].{key}: "), problem
    assert words in problem


def test_the_issue_example_outputs_load(tmp_path: Path, files: dict[str, str]) -> None:
    key = tmp_path / "azure-device.key"
    key.write_text("  " + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode() + "\n")
    aws = {"platform": "aws-iot-core", "url": "mqtts://a1b2c3-ats.iot.eu-central-1.amazonaws.com:8883",
           "client_id": "press-shop-edge-1", **files, "format": "batch"}  # fmt: skip
    azure = {
        "platform": "azure-iot-hub", "url": "mqtts://myhub.azure-devices.net:8883", "format": "batch",
        "azure": {"hub": "myhub.azure-devices.net", "device_id": "edge-1", "device_key_file": key.name,
                  "token_lifetime": "1h"},
    }  # fmt: skip
    press = {"name": "press-1", "protocol": "modbus", "host": "h", "tags": TAGS}
    outputs = [{"name": "aws", **aws}, {"name": "azure", **azure}]
    text = yaml.safe_dump({**HEAD, "outputs": outputs, "devices": [press]})
    (tmp_path / "plant.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:  # the TLS files are not PEM: everything else is right
        config.load(tmp_path / "plant.yaml")
    assert all(p.startswith(("outputs[0].ca:", "outputs[0].cert:")) for p in err.value.problems), (
        err.value.problems
    )
    doc = config.ConfigFile.model_validate(yaml.safe_load(text))
    (_, a), (_, z) = doc.resolved_outputs()
    assert (a.client_id, a.max_rate) == ("press-shop-edge-1", 100.0)
    assert (z.client_id, z.username, z.version) == (
        "edge-1", "myhub.azure-devices.net/edge-1/?api-version=2021-04-12", "3.1.1",
    )  # fmt: skip
    assert z.azure is not None
    assert z.azure.token_lifetime == 3600.0
    assert z.azure.renew_after == 3299.0  # 5 minutes before it expires


def test_the_device_key_file_must_hold_a_key(tmp_path: Path) -> None:
    azure = {"hub": "myhub.azure-devices.net", "device_id": "edge-1", "device_key_file": "dev.key"}
    hub = {"platform": "azure-iot-hub", "url": "mqtts://myhub.azure-devices.net:8883", "format": "batch",
           "azure": azure}  # fmt: skip
    assert _problems(hub, tmp_path) == [
        f"outputs[0].azure.device_key_file: no such file: {tmp_path / 'dev.key'}"
    ]
    (tmp_path / "dev.key").write_text("not base64 at all!\n")
    (problem,) = _problems(hub, tmp_path)
    assert problem.startswith("outputs[0].azure.device_key_file: ")
    assert "base64" in problem
    short = {**hub, "azure": {**azure, "token_lifetime": "5s"}}
    (problem,) = _problems(short, tmp_path)
    assert problem.startswith("outputs[0].azure.token_lifetime: ")
    assert "10" in problem


@pytest.mark.parametrize(
    ("output", "key", "words"),
    [
        ({"retain_check": None}, "sparkplug.primary_host_id", "retained STATE"),
        ({"username": None}, "username", "authentication name"),
        ({"keepalive": 1200}, "keepalive", "5 to 1160 seconds"),
        ({"max_rate": 101}, "max_rate", "at most 100"),
    ],
)
def test_event_grid_rules_name_the_key(output: dict[str, Any], key: str, words: str) -> None:
    grid = {"platform": "azure-event-grid", "url": "mqtts://ns.westeurope-1.ts.eventgrid.azure.net:8883",
            "cert": "/c", "key": "/k", "username": "edge-1"}  # fmt: skip
    if "retain_check" in output:
        output = {"format": "sparkplug", "sparkplug": {"group_id": "g", "primary_host_id": "scada"}}
    problem = _problem({**grid, **output})
    assert problem.startswith(f"outputs[0].{key}: "), problem
    assert words in problem


def test_hivemq_cloud_takes_a_user_and_password_over_verified_tls() -> None:
    url = "mqtts://abc123.s1.eu.hivemq.cloud:8883"
    assert _problem({"platform": "hivemq-cloud", "url": url}).startswith("outputs[0].username: ")
    assert _problem({"platform": "hivemq-cloud", "url": url, "username": "u"}).startswith(
        "outputs[0].password: "
    )
    good = {"platform": "hivemq-cloud", "url": url, "username": "u", "password": "p"}
    assert _problem({**good, "tls_insecure": True}).startswith("outputs[0].tls_insecure: ")
    assert _problem({**good, "url": "mqtt://abc123.s1.eu.hivemq.cloud"}).startswith("outputs[0].url: ")
    config.parse(_text(good), "plant.yaml", env={})


def test_every_platform_keeps_qos_within_one_and_a_generic_output_keeps_its_old_defaults() -> None:
    (_, output), = _config({"url": "mqtt://h"}).resolved_outputs()  # fmt: skip
    assert (output.platform, output.max_rate, output.max_message_bytes, output.max_inflight) == (
        "generic", None, None, 200,
    )  # fmt: skip
    assert set(PLATFORMS) == {"generic", "aws-iot-core", "azure-iot-hub", "azure-event-grid", "hivemq-cloud"}


@given(st.text(max_size=40))
def test_any_topic_text_is_a_template_or_a_clear_error(text: str) -> None:
    try:
        template = topics.parse(text)
    except ValueError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        assert repr(text) in problem  # it names the template
        return
    asset = config.AssetPath("e", "s", "a", "l", "d")
    rendered = template.render(asset, "gw", "t")
    assert "+" not in rendered
    assert "#" not in rendered
    assert "" not in rendered.split("/")


def test_sas_tokens_sign_what_openssl_signs(tmp_path: Path) -> None:
    """The signature checked against openssl's HMAC: another implementation of it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run `make test`, which installs it")
    key = bytes(range(32))
    token = sas_token("myhub.azure-devices.net", "edge 1/é", key, 1_900_000_000)
    fields = dict(part.split("=", 1) for part in token.removeprefix("SharedAccessSignature ").split("&"))
    assert fields["sr"] == "myhub.azure-devices.net%2Fdevices%2Fedge%201%2F%C3%A9"
    assert fields["se"] == "1900000000"
    signed = subprocess.run(
        [openssl, "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{key.hex()}", "-binary"],
        input=f"{fields['sr']}\n1900000000".encode(), capture_output=True, check=True,
    ).stdout  # fmt: skip
    from urllib.parse import unquote

    assert base64.b64decode(unquote(fields["sig"])) == signed
    (tmp_path / "k").write_text(f"\n  {base64.b64encode(key).decode()}  \n")
    assert read_device_key(tmp_path / "k") == key
