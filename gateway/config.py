"""The config file: pydantic models, `${ENV}` substitution and errors that name the key path.

Each protocol's device model lives beside its collector; this module composes them into
one `Settings` with a discriminated union on `protocol:`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gateway import yamlload
from gateway.collectors.modbus.settings import ModbusDevice
from gateway.collectors.opcua.settings import OpcUaDevice, as_fingerprint
from gateway.errors import ConfigError
from gateway.model import AssetPath
from gateway.settings_types import Duration, Model, Segment, check_unique, check_url, read_secret

Device = Annotated[ModbusDevice | OpcUaDevice, Field(discriminator="protocol")]
DEVICE_PROTOCOLS = ("modbus", "opcua")


class GatewaySettings(Model):
    id: Segment = Field(description="This gateway's id; used in its status topic and MQTT client id.")
    enterprise: Segment = Field(description="ISA-95 enterprise: first segment of every topic.")
    site: Segment = Field(description="ISA-95 site.")
    area: Segment = Field(description="ISA-95 area.")
    line: Segment = Field(description="ISA-95 line (work center).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log verbosity."
    )
    pki_dir: Path | None = Field(
        default=None,
        description="Where the OPC UA client certificate and key are kept (created on first run). "
        "Default: pki/ beside the outbox file.",
    )


class OutboxSettings(Model):
    path: Path = Field(description="SQLite file of the store-and-forward buffer; created if missing.")
    max_rows: int = Field(
        default=1_000_000, ge=100, description="Most readings kept while the broker is away."
    )
    max_bytes: int | None = Field(
        default=None, ge=1_000_000, description="Optional cap on the database file size, in bytes."
    )
    policy: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest",
        description="What to drop when full: the oldest buffered readings, or the new ones. "
        "Every dropped reading is counted and logged.",
    )


class SparkplugSettings(Model):
    group_id: Segment = Field(description="Sparkplug group id: the first level of the node's topics.")
    edge_node_id: Segment | None = Field(
        default=None, description="Sparkplug edge node id, unique within the group. Default: the gateway id."
    )
    primary_host_id: Segment | None = Field(
        default=None,
        description="Wait for this host application's STATE online before publishing births, and "
        "disconnect (NDEATH) when it goes offline; readings wait in the outbox meanwhile.",
    )
    aliases: bool = Field(
        default=False,
        description="Give each device metric a numeric alias in its DBIRTH and send only the alias in DDATA.",
    )


class MqttSettings(Model):
    url: str = Field(
        description="mqtt://host:port, or mqtts://host:port for TLS (default ports 1883 / 8883)."
    )
    format: Literal["uns", "sparkplug"] = Field(
        default="uns",
        description="uns: one JSON message per tag on an ISA-95 topic; sparkplug: a Sparkplug B "
        "edge node (settings under sparkplug:).",
    )
    sparkplug: SparkplugSettings | None = Field(
        default=None, description="Sparkplug B edge node settings; required with format: sparkplug."
    )
    version: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version.")
    client_id: str | None = Field(default=None, description="Default: millwright-<gateway id>.")
    username: str | None = Field(
        default=None, description="Broker user name; use ${ENV} rather than a literal."
    )
    password: str | None = Field(default=None, description="Broker password; prefer ${ENV} or password_file.")
    password_file: Path | None = Field(default=None, description="File whose first line is the password.")
    ca: Path | None = Field(default=None, description="CA bundle for mqtts://; default: the system store.")
    cert: Path | None = Field(default=None, description="Client certificate (PEM) for mutual TLS.")
    key: Path | None = Field(default=None, description="Client private key (PEM) for mutual TLS.")
    tls_insecure: bool = Field(
        default=False,
        description="Skip server certificate verification (logs a warning). Never in production.",
    )
    keepalive: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, in seconds.")
    batch: int = Field(default=500, ge=1, le=10_000, description="Readings published per outbox lease.")
    max_inflight: int = Field(
        default=200, ge=1, le=65_535, description="QoS 1 messages awaiting PUBACK at once."
    )
    connect_timeout: Duration = Field(default=10.0, description="Give up one connection attempt after this.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        schemes = ("mqtt", "mqtts", "tcp", "ssl")
        return check_url(value, schemes, "scheme must be mqtt:// or mqtts://", "username and password")

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.format == "sparkplug" and self.sparkplug is None:
            raise ValueError("format sparkplug needs a sparkplug: section with at least group_id")
        if self.format != "sparkplug" and self.sparkplug is not None:
            raise ValueError("a sparkplug: section needs format: sparkplug")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    def secret(self) -> str | None:
        """The password, read from password_file when one is given."""
        return read_secret(self.password, self.password_file)


class Settings(Model):
    gateway: GatewaySettings
    outbox: OutboxSettings
    mqtt: MqttSettings
    devices: list[Device] = Field(min_length=1, description="Devices to collect from.")

    @model_validator(mode="after")
    def _unique_devices(self) -> Self:
        check_unique((d.name for d in self.devices), "device")
        if self.mqtt.format == "sparkplug":
            # Sparkplug ids and metric names should not differ only in case: some hosts
            # fold case, and two devices (or tags) would then become one.
            check_unique((d.name.lower() for d in self.devices), "device (ignoring case)")
            for device in self.devices:
                check_unique((t.name.lower() for t in device.tags), f"{device.name}: tag (ignoring case)")
        return self

    @property
    def edge_node_id(self) -> str:
        sparkplug = self.mqtt.sparkplug
        return (sparkplug.edge_node_id if sparkplug else None) or self.gateway.id

    @property
    def pki_dir(self) -> Path:
        return self.gateway.pki_dir or self.outbox.path.parent / "pki"

    def asset(self, device: ModbusDevice | OpcUaDevice) -> AssetPath:
        g, o = self.gateway, device.asset
        return AssetPath(
            o.enterprise or g.enterprise, o.site or g.site, o.area or g.area, o.line or g.line, device.name
        )


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(node: Any, loc: tuple[str | int, ...], env: dict[str, str], problems: list[str]) -> Any:
    """Replace ${NAME} in every string value; a missing variable is a config error."""
    if isinstance(node, dict):
        return {k: _expand(v, (*loc, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                problems.append(f"{_key_path(loc)}: environment variable {name} is not set")
                return ""
            return env[name]

        return _ENV.sub(sub, node)
    return node


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _key_path(loc: tuple[str | int, ...]) -> str:
    """('devices', 0, 'modbus', 'tags', 2, 'address') -> devices[0].tags[2].address"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in DEVICE_PROTOCOLS and out.endswith("]") and out.startswith("devices"):
            continue  # the discriminated union's branch name is not a key in the file
        else:
            out = _join(out, part)
    return out or "(top level)"


def parse(text: str, file: str, env: dict[str, str] | None = None) -> Settings:
    """Validate config text; raise ConfigError naming `file` and every bad key path."""
    try:
        raw = yamlload.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(file, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if raw is None:
        raise ConfigError(file, ["the file is empty"])
    if not isinstance(raw, dict):
        raise ConfigError(file, ["the top level must be a mapping (gateway:, outbox:, mqtt:, devices:)"])
    problems: list[str] = []
    try:
        expanded = _expand(raw, (), dict(os.environ) if env is None else env, problems)
        if problems:
            raise ConfigError(file, problems)
        settings = Settings.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(file, [_describe(err) for err in exc.errors()]) from None
    except RecursionError:  # hundreds of levels: YAML allows it, nothing here needs it
        raise ConfigError(file, ["nested too deeply"]) from None
    return _resolve_files(settings, file)


def _resolve_files(settings: Settings, file: str) -> Settings:
    """Make relative paths relative to the config file (not to wherever the service
    started), and check now that the files the MQTT connection will need are there."""
    base = Path(file).resolve().parent
    outbox = settings.outbox.model_copy(update={"path": base / settings.outbox.path})
    found: dict[str, Path] = {}
    problems: list[str] = []
    for key in ("ca", "cert", "key", "password_file"):
        value = getattr(settings.mqtt, key)
        if value is None:
            continue
        found[key] = _file(base, value, f"mqtt.{key}", problems, secret=key == "password_file")
    devices = [_resolve_device(d, i, base, problems) for i, d in enumerate(settings.devices)]
    if problems:
        raise ConfigError(file, problems)
    mqtt = settings.mqtt.model_copy(update=found)
    gateway = settings.gateway
    if gateway.pki_dir is not None:
        gateway = gateway.model_copy(update={"pki_dir": base / gateway.pki_dir})
    return settings.model_copy(
        update={"outbox": outbox, "mqtt": mqtt, "gateway": gateway, "devices": devices}
    )


def _file(base: Path, value: Path, where: str, problems: list[str], *, secret: bool) -> Path:
    """`value` relative to the config file's folder; a problem noted if it is missing, or
    (for a secret) empty."""
    path = base / value.expanduser()
    if not path.is_file():
        problems.append(f"{where}: no such file: {path}")
    elif secret and not path.read_text(encoding="utf-8").strip():
        problems.append(f"{where}: the file is empty: {path}")
    return path


def _resolve_device(
    device: ModbusDevice | OpcUaDevice, index: int, base: Path, problems: list[str]
) -> ModbusDevice | OpcUaDevice:
    """OPC UA files (password, trusted server certificate) relative to the config file."""
    if not isinstance(device, OpcUaDevice):
        return device
    security = device.security
    update: dict[str, Any] = {}
    if security.password_file is not None:
        where = f"devices[{index}].security.password_file"
        update["password_file"] = _file(base, security.password_file, where, problems, secret=True)
    trusted = security.server_certificate
    if trusted is not None and as_fingerprint(trusted) is None:
        path = base / Path(trusted).expanduser()
        if not path.exists():
            problems.append(
                f"devices[{index}].security.server_certificate: no such file or directory: {path}"
            )
        update["server_certificate"] = str(path)
    if not update:
        return device
    return device.model_copy(update={"security": security.model_copy(update=update)})


def _describe(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see `millwright schema`)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "union_tag_invalid":
        protocol = err["input"].get("protocol")
        msg = f"unknown protocol {protocol!r}; expected one of {', '.join(DEVICE_PROTOCOLS)}"
    elif err["type"] == "union_tag_not_found":
        msg = f"protocol: is missing; expected one of {', '.join(DEVICE_PROTOCOLS)}"
    return f"{_key_path(err['loc'])}: {msg}"


def load(path: str | Path) -> Settings:
    """Read and validate a config file. Raises ConfigError (the CLI exits 2)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, [f"not UTF-8 text (byte {exc.start}): save it as UTF-8"]) from None
    return parse(text, file)


def schema() -> str:
    """The JSON Schema of the config file, as committed in config/schema.json."""
    doc = Settings.model_json_schema(mode="validation")
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "Millwright gateway configuration"
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
