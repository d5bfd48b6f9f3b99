"""The settings of an output: its MQTT connection and the format published on it.

`mqtt:` in a config file is one `MqttSettings` (the shorthand for a single output), each entry
of `outputs:` an `OutputSettings`; gateway.config composes them into `Settings.outputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, TypeAlias
from urllib.parse import urlsplit

from pydantic import Field, Strict, ValidationInfo, field_validator, model_validator

from gateway.publishers import topics
from gateway.publishers.formats import FORMATS
from gateway.publishers.platforms import PLATFORMS, Platform
from gateway.settings_types import (
    INT_FROM_ENV,
    Bool,
    Duration,
    Int,
    Model,
    MqttString,
    PositiveFloat,
    ProblemAt,
    Segment,
    check_url,
    read_secret,
)

if TYPE_CHECKING:  # (a type checker cannot follow the Literals built below)
    Format: TypeAlias = str
    PlatformName: TypeAlias = str
else:
    Format = Literal[tuple(FORMATS)]
    PlatformName = Literal[tuple(PLATFORMS)]

# Batch messages of an output with no limit of its platform's or its own are split here:
# most brokers take this much (mosquitto, HiveMQ and EMQX far more).
DEFAULT_BATCH_BYTES = 256 * 1024
# IoT Hub's user name carries the API version the gateway speaks.
AZURE_API_VERSION = "2021-04-12"
# A SAS token is replaced this long before it expires (the hub drops the connection then):
# a fifth of its lifetime, at most 5 minutes, and at least RENEW_LEAST (or half the lifetime):
# time for the renewal itself, which waits for the confirmations under way (up to 2 s), on
# top of a second's tick and the second that the expiry's rounding down to seconds takes.
RENEW_SHARE = 0.2
RENEW_MOST = 300.0
RENEW_LEAST = 5.0


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


def iot_hub_username(hub: str, device_id: str) -> str:
    return f"{hub}/{device_id}/?api-version={AZURE_API_VERSION}"


class AzureSettings(Model):
    """An Azure IoT Hub device identity: the hub, the device id, and a SAS key or certificate."""

    hub: Annotated[str, Strict(), Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.-]+$")] = Field(
        description="The hub's host name (myhub.azure-devices.net): the resource the SAS token is signed "
        "for, and the start of the MQTT user name. Separate from the url, so that the gateway can reach "
        "the hub through a proxy or another name."
    )
    device_id: Annotated[
        str, Strict(), Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9\-.%_*?!(),:=@$']+$")
    ] = Field(description="The device identity in the hub: the MQTT client id.")
    device_key_file: Path | None = Field(
        default=None,
        description="File holding the device's primary (or secondary) key as the portal shows it "
        "(base64); the gateway signs SAS tokens with it. Or cert and key on the output, for a device "
        "with X.509 authentication.",
    )
    token_lifetime: Duration = Field(
        default=3600.0,
        ge=10.0,
        description="How long each SAS token is valid (at least 10s). The gateway reconnects with a new "
        "token before it expires.",
    )

    @property
    def username(self) -> str:
        return iot_hub_username(self.hub, self.device_id)

    @property
    def renew_after(self) -> float:
        """Seconds after signing at which a token is replaced (see RENEW_SHARE)."""
        lifetime = self.token_lifetime
        margin = max(min(lifetime * RENEW_SHARE, RENEW_MOST), min(RENEW_LEAST, lifetime / 2))
        return lifetime - margin - 1.0  # the expiry is written in whole seconds, rounded down


_TLS_SCHEMES = ("mqtts", "ssl")


class MqttSettings(Model):
    url: str = Field(
        description="mqtt://host:port, or mqtts://host:port for TLS (default ports 1883 / 8883)."
    )
    format: Format = Field(
        default="uns",
        description="uns: one JSON message per tag on an ISA-95 topic; batch: one JSON message per "
        "device carrying many readings; sparkplug: a Sparkplug B edge node (settings under sparkplug:).",
    )
    platform: PlatformName = Field(
        default="generic",
        description="The broker's platform, whose rules the output then keeps: aws-iot-core, "
        "azure-iot-hub, azure-event-grid, hivemq-cloud, or generic (any MQTT broker).",
    )
    topic: str | None = Field(
        default=None,
        description="Topic template with {enterprise} {site} {area} {line} {device} {tag} {gateway}. "
        f"Default: {topics.UNS_TOPIC} (uns), {topics.BATCH_TOPIC} (batch).",
    )
    max_message_bytes: Annotated[int, Strict(), Field(ge=1024), INT_FROM_ENV] | None = Field(
        default=None,
        description="The largest message (payload and topic) the output publishes; batch messages are "
        "split to fit. Default: the platform's limit; for generic none (batch messages split at 256 KiB).",
    )
    max_rate: PositiveFloat | None = Field(
        default=None,
        description="Most messages per second on the connection; readings wait in the outbox meanwhile. "
        "Default: the platform's limit (100 for AWS IoT Core, Azure IoT Hub and Event Grid); none for "
        "generic and hivemq-cloud.",
    )
    alpn: Annotated[str, Strict(), Field(min_length=1, max_length=255)] | None = Field(
        default=None,
        description="TLS ALPN protocol to offer. Default: x-amzn-mqtt-ca for aws-iot-core on port 443.",
    )
    azure: AzureSettings | None = Field(
        default=None, description="Azure IoT Hub device identity; required with platform: azure-iot-hub."
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

    @field_validator("topic")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            topics.parse(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _platform_defaults(cls, data: Any) -> Any:
        """The defaults that follow from the platform: its limits, its MQTT version, and IoT
        Hub's client id and user name. Before validation, because the model is frozen after;
        anything malformed here is left for validation to report."""
        if not isinstance(data, dict) or not isinstance(name := data.get("platform", "generic"), str):
            return data
        p = PLATFORMS.get(name)
        if p is None:
            return data
        # (IoT Hub takes batch only: a hub output without format: is batch.)
        defaults: dict[str, Any] = {"version": p.versions[0], "format": p.formats[0]}
        if p.max_inflight is not None:
            defaults["max_inflight"] = min(p.max_inflight, cls.model_fields["max_inflight"].default)
        if p.max_message_bytes is not None:
            defaults["max_message_bytes"] = p.max_message_bytes
        if p.max_rate is not None:
            defaults["max_rate"] = p.max_rate
        azure = data.get("azure")
        if p.name == "azure-iot-hub" and isinstance(azure, dict):
            hub, device = azure.get("hub"), azure.get("device_id")
            if isinstance(hub, str) and isinstance(device, str):
                defaults |= {"client_id": device, "username": iot_hub_username(hub, device)}
        # A null is no value: it must not switch a platform's limit off.
        return {**defaults, **{k: v for k, v in data.items() if v is not None or k not in defaults}}

    @model_validator(mode="after")
    def _platform_rules(self) -> Self:
        """The platform's rules, each a problem at the key that breaks it."""
        p = self.profile
        if p.tls and not self.tls:
            raise ProblemAt(("url",), f"{p.title} takes TLS connections only: use mqtts://")
        if p.tls and self.tls_insecure:
            raise ProblemAt(
                ("tls_insecure",),
                f"{p.title}'s certificate verifies: tls_insecure is not allowed with platform {p.name} "
                "(give ca: if a proxy on the way signs with its own CA)",
            )
        if self.format not in p.formats:
            formats = " or ".join(p.formats)
            raise ProblemAt(("format",), f"{p.title} takes format {formats}, not {self.format}")
        if self.version not in p.versions:
            raise ProblemAt(("version",), f"{p.title} speaks MQTT {' and '.join(p.versions)} only")
        low, high = p.keepalive
        if not low <= self.keepalive <= high:
            raise ProblemAt(("keepalive",), f"{p.title} takes a keepalive of {low} to {high} seconds")
        for key, limit, what in (
            ("max_inflight", p.max_inflight, "unacknowledged messages per connection"),
            ("max_message_bytes", p.max_message_bytes, "bytes per message"),
            ("max_rate", p.max_rate, "messages per second per connection"),
        ):
            value = getattr(self, key)
            if limit is not None and value is not None and value > limit:
                raise ProblemAt((key,), f"{p.title} takes at most {limit:g} {what}, not {value:g}")
        if self.topic is not None and not p.own_topic:
            raise ProblemAt(("topic",), f"{p.title} takes telemetry on its own topic only: leave topic out")
        if self.format == "sparkplug" and self.topic is not None:
            raise ProblemAt(("topic",), "Sparkplug B topics are set by the specification: leave topic out")
        if self.topic is not None:
            self._check_template(p)
        if self.alpn is not None and not self.tls:
            raise ProblemAt(("alpn",), "alpn applies to mqtts:// only")
        if p.client_certificate and self.cert is None:
            raise ProblemAt(
                ("cert",),
                f"required key is missing: {p.title} authenticates the gateway by its X.509 certificate: "
                "give cert and key",
            )
        if p.username and self.username is None:
            what = "user name and password" if p.password else "the client's authentication name as user name"
            raise ProblemAt(("username",), f"required key is missing: {p.title} takes {what}")
        if p.password and self.password is None and self.password_file is None:
            raise ProblemAt(
                ("password",),
                f"required key is missing: {p.title} takes a password: give password_file or password",
            )
        if self.sparkplug is not None and self.sparkplug.primary_host_id is not None and not p.retain:
            raise ProblemAt(
                ("sparkplug", "primary_host_id"),
                f"a primary host announces itself in a retained STATE message, which {p.title} does not keep",
            )
        if self.platform == "azure-iot-hub":
            self._check_azure()
        elif self.azure is not None:
            raise ProblemAt(("azure",), "an azure: section needs platform: azure-iot-hub")
        return self

    def _check_template(self, p: Platform) -> None:
        template = self.template
        if self.format == "uns" and not {"device", "tag"} <= template.fields:
            # A UNS message names neither: its topic is all that tells one tag from another.
            raise ProblemAt(
                ("topic",), "a UNS topic must contain {device} and {tag}: the message names neither"
            )
        if self.format == "batch" and "device" not in template.fields:
            # Each device's retained _meta goes under its topic: without {device} they would
            # all share one, each replacing the last.
            raise ProblemAt(
                ("topic",), "a batch topic must contain {device}: each device's _meta goes under it"
            )
        if self.format == "batch" and "tag" in template.fields:
            raise ProblemAt(
                ("topic",), "a batch message carries the readings of many tags: {tag} has no place in it"
            )
        if template.text.startswith("$") and not (p.free_prefix and template.text.startswith(p.free_prefix)):
            free = f" (except {p.free_prefix}..., for {p.title}'s rules)" if p.free_prefix else ""
            raise ProblemAt(("topic",), f"topics that start with $ are the broker's own{free}")

    def _check_azure(self) -> None:
        azure = self.azure
        if azure is None:
            raise ProblemAt(
                ("azure",),
                "required key is missing: platform azure-iot-hub needs an azure: section with hub and "
                "device_id",
            )
        if azure.device_key_file is None and self.cert is None:
            raise ProblemAt(
                ("azure", "device_key_file"),
                "required key is missing: give azure.device_key_file (a SAS key) or cert and key (an X.509 "
                "device)",
            )
        if azure.device_key_file is not None and self.cert is not None:
            raise ProblemAt(
                ("azure", "device_key_file"),
                "give azure.device_key_file (a SAS key) or cert and key (an X.509 device), not both",
            )
        # The values _platform_defaults set are allowed, and the same written out.
        if self.client_id is not None and self.client_id != azure.device_id:
            raise ProblemAt(
                ("client_id",), "IoT Hub takes the device id as the client id: leave client_id out"
            )
        if self.username is not None and self.username != azure.username:
            raise ProblemAt(
                ("username",),
                "the gateway builds IoT Hub's user name from azure.hub and azure.device_id: "
                "leave username out",
            )
        if self.password is not None or self.password_file is not None:
            raise ProblemAt(("password",), "IoT Hub takes a SAS token, which the gateway signs with "
                            "azure.device_key_file: leave password out")  # fmt: skip

    @property
    def offered_alpn(self) -> str | None:
        """The ALPN protocol the TLS handshake offers: `alpn`, or AWS's for MQTT on 443."""
        if self.alpn is None and self.platform == "aws-iot-core" and self.port == 443:
            # AWS takes MQTT with a client certificate on 443 when the client asks for this
            # protocol in the handshake: for networks that let only 443 out.
            return "x-amzn-mqtt-ca"
        return self.alpn

    @property
    def profile(self) -> Platform:
        return PLATFORMS[self.platform]

    @property
    def template(self) -> topics.Template:
        """The topic template of the readings: `topic`, the platform's own topic, or the
        format's default."""
        if self.platform == "azure-iot-hub" and self.azure is not None:
            # (the device id has no braces, which str.format would take for a placeholder)
            return topics.Template(
                topics.IOT_HUB_EVENTS.replace("{device_id}", self.azure.device_id), frozenset()
            )
        if self.topic is not None:
            return topics.parse(self.topic)
        return topics.parse(topics.BATCH_TOPIC if self.format == "batch" else topics.UNS_TOPIC)

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
