"""The settings of an output: its MQTT connection and the format published on it.

`mqtt:` in a config file is one `MqttSettings` (the shorthand for a single output), each entry
of `outputs:` an `OutputSettings`; gateway.config composes them into `Settings.outputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeAlias
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.publishers.formats import FORMATS
from gateway.settings_types import (
    Bool,
    Duration,
    Int,
    Model,
    MqttString,
    Segment,
    check_url,
    read_secret,
)

if TYPE_CHECKING:  # (a type checker cannot follow the Literal built below)
    Format: TypeAlias = str
else:
    Format = Literal[tuple(FORMATS)]


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
    aliases: Bool = Field(
        default=False,
        description="Give each device metric a numeric alias in its DBIRTH and send only the alias in DDATA.",
    )


_TLS_SCHEMES = ("mqtts", "ssl")


class MqttSettings(Model):
    url: str = Field(
        description="mqtt://host:port, or mqtts://host:port for TLS (default ports 1883 / 8883)."
    )
    format: Format = Field(
        default="uns",
        description="uns: one JSON message per tag on an ISA-95 topic; sparkplug: a Sparkplug B "
        "edge node (settings under sparkplug:).",
    )
    sparkplug: SparkplugSettings | None = Field(
        default=None, description="Sparkplug B edge node settings; required with format: sparkplug."
    )
    version: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version.")
    client_id: MqttString = Field(default=None, description="Default: millwright-<gateway id>.")
    username: MqttString = Field(
        default=None, description="Broker user name; use ${ENV} rather than a literal."
    )
    password: str | None = Field(default=None, description="Broker password; prefer ${ENV} or password_file.")
    password_file: Path | None = Field(default=None, description="File whose first line is the password.")
    ca: Path | None = Field(default=None, description="CA bundle for mqtts://; default: the system store.")
    cert: Path | None = Field(default=None, description="Client certificate (PEM) for mutual TLS.")
    key: Path | None = Field(default=None, description="Client private key (PEM) for mutual TLS.")
    tls_insecure: Bool = Field(
        default=False,
        description="Skip server certificate verification (logs a warning). Never in production.",
    )
    keepalive: Int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, in seconds.")
    batch: Int = Field(default=500, ge=1, le=10_000, description="Readings published per outbox lease.")
    max_inflight: Int = Field(
        default=200, ge=1, le=65_535, description="QoS 1 messages awaiting PUBACK at once."
    )
    connect_timeout: Duration = Field(default=10.0, description="Give up one connection attempt after this.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        schemes = ("mqtt", "mqtts", "tcp", "ssl")
        return check_url(value, schemes, "scheme must be mqtt:// or mqtts://", "username and password")

    @field_validator("ca", "cert", "key", "tls_insecure")
    @classmethod
    def _needs_tls(cls, value: Any, info: ValidationInfo) -> Any:
        url = info.data.get("url")  # absent when the url itself is wrong
        scheme = urlsplit(url).scheme if url else "mqtts"
        if value not in (None, False) and scheme not in _TLS_SCHEMES:
            # An error, not a warning: whoever wrote it believes the link is encrypted, and
            # the fix is one letter.
            raise ValueError(
                f"{info.field_name} applies to mqtts:// only; the url is {scheme}://, so the "
                "connection would not use TLS"
            )
        return value

    @field_validator("password", "password_file")
    @classmethod
    def _needs_username(cls, value: Any, info: ValidationInfo) -> Any:
        # `"username" in data`: a username that failed its own check is reported there.
        if value is not None and "username" in info.data and info.data["username"] is None:
            raise ValueError(f"{info.field_name} without username: give the broker's user name too")
        return value

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
        return urlsplit(self.url).scheme in _TLS_SCHEMES

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    def secret(self) -> str | None:
        """The password, read from password_file when one is given."""
        return read_secret(self.password, self.password_file)


class OutputSettings(MqttSettings):
    """One entry of `outputs:`: a broker, the format published to it, and a name."""

    name: Segment = Field(
        description="The output's name, unique among the outputs: it names the output's place in the "
        "outbox, and ends its default client id."
    )
    client_id: MqttString = Field(
        default=None,
        description="Default: millwright-<gateway id>-<name>, so that two outputs to one broker need "
        "no client id of their own.",
    )
