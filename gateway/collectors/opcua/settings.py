"""Config models of an OPC UA device, its security and its tags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from gateway.collectors.opcua.nodeid import NodeRef, parse_node
from gateway.settings_types import (
    RECONNECT_MAX_DESCRIPTION,
    AssetOverride,
    Duration,
    Int,
    Model,
    NonNegativeFloat,
    ReconnectMax,
    Segment,
    TagName,
    check_unique,
    check_url,
    read_secret,
)

Policy = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]


def as_fingerprint(text: str) -> str | None:
    """`text` as a SHA-256 fingerprint (colons, spaces and case ignored), or None if it is
    not hex at all (then it is a path). Raises ValueError for hex of the wrong length."""
    digits = text.replace(":", "").replace(" ", "").lower()
    if not digits or any(c not in "0123456789abcdef" for c in digits):
        return None
    if len(digits) == 64:
        return digits
    if ":" in text:
        # Colon-separated hex (as tools print fingerprints) of the wrong length: a fingerprint
        # of another kind (MD5, SHA-1) or a typo, not a path.
        raise ValueError(
            f"a {len(digits) // 2}-byte fingerprint: give the SHA-256 one (64 hex digits), or a path"
        )
    return None  # other hex-only text (a folder named "cafe") is a path


class OpcUaSecurity(Model):
    policy: Policy = Field(default="None", description="Security policy of the secure channel.")
    mode: SecurityMode = Field(
        default="None", description="Message security: None, Sign, or SignAndEncrypt (sign and encrypt)."
    )
    server_certificate: str | None = Field(
        default=None,
        description="How to trust the server: its certificate's SHA-256 fingerprint (hex; colons and "
        "case do not matter), or the path of its certificate file (DER or PEM), or of a directory of "
        "trusted certificates. Required with a security policy: a server is never trusted silently.",
    )
    username: str | None = Field(default=None, description="User name; use ${ENV} rather than a literal.")
    password: str | None = Field(default=None, description="Password; prefer ${ENV} or password_file.")
    password_file: Path | None = Field(default=None, description="File whose first line is the password.")

    @field_validator("server_certificate")
    @classmethod
    def _server_certificate(cls, value: str | None) -> str | None:
        if value is not None:
            as_fingerprint(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError(
                f"policy {self.policy} with mode {self.mode}: a policy needs mode Sign or SignAndEncrypt, "
                "and policy None needs mode None"
            )
        if self.policy == "None" and self.server_certificate:
            # With no security policy nothing checks the server: a pin here would only look
            # like protection.
            raise ValueError("server_certificate needs a security policy: with policy None it is not checked")
        if self.policy != "None" and not self.server_certificate:
            raise ValueError(
                f"policy {self.policy} needs server_certificate (a SHA-256 fingerprint or a certificate "
                "file or directory); `millwright browse ENDPOINT --policy POLICY` shows the server's "
                "fingerprint"
            )
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.username is not None and self.password is None and self.password_file is None:
            raise ValueError("username needs password or password_file")
        if self.username is None and (self.password is not None or self.password_file is not None):
            raise ValueError("password without username")
        return self

    @property
    def secure(self) -> bool:
        return self.policy != "None"

    def secret(self) -> str | None:
        """The password, read from password_file when one is given."""
        return read_secret(self.password, self.password_file)


class OpcUaTag(Model):
    name: TagName = Field(description="Tag name; the last segment of its MQTT topic.")
    node: str = Field(
        description="Node id: ns=<index>;s=<name> (also i=, g=, b=), or nsu=<namespace URI>;s=<name>, "
        "which survives the server renumbering its namespaces."
    )
    unit: str | None = Field(default=None, description="Engineering unit as a UCUM code, e.g. Cel, 1/min.")
    deadband: NonNegativeFloat | None = Field(
        default=None,
        description="Report by exception: publish only when the value moved by more than this (or "
        "quality changed). Also asked of the server as an absolute deadband filter.",
    )
    sampling_interval: Duration | None = Field(
        default=None,
        description="How often the server samples the node (subscribe mode). Default: the "
        "device's publishing_interval.",
    )
    queue_size: Int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="Values the server keeps per publishing interval (subscribe mode); 1 keeps the newest.",
    )
    description: str | None = Field(default=None, description="Free text, published in the device's _meta.")

    @field_validator("node")
    @classmethod
    def _node(cls, value: str) -> str:
        parse_node(value)
        return value

    @property
    def ref(self) -> NodeRef:
        return parse_node(self.node)


class OpcUaDevice(Model):
    name: Segment = Field(description="Device name; unique; a segment of its MQTT topics.")
    protocol: Literal["opcua"] = Field(description="opcua: OPC UA binary (opc.tcp).")
    endpoint: str = Field(description="Server endpoint URL, opc.tcp://host:port[/path].")
    mode: Literal["subscribe", "poll"] = Field(
        default="subscribe",
        description="subscribe: the server reports changes (monitored items); poll: read every tag "
        "each `poll` interval.",
    )
    publishing_interval: Duration = Field(
        default=1.0, description="Subscribe mode: how often the server sends the changes, e.g. 500ms."
    )
    poll: Duration = Field(default=1.0, description="Poll mode: read interval, e.g. 1s.")
    timeout: Duration = Field(default=5.0, description="Time to wait for each request and for connecting.")
    reconnect_max: ReconnectMax = Field(default=10.0, description=RECONNECT_MAX_DESCRIPTION)
    security: OpcUaSecurity = Field(
        default_factory=OpcUaSecurity, description="Secure channel, server trust and user identity."
    )
    type: str | None = Field(default=None, description="Equipment type, published in _meta.")
    asset: AssetOverride = Field(
        default_factory=AssetOverride, description="Override the gateway's ISA-95 levels for this device."
    )
    tags: list[OpcUaTag] = Field(min_length=1, description="The variables to collect.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return check_url(
            value, ("opc.tcp",), "the endpoint must start with opc.tcp://", "security.username and password"
        )

    @model_validator(mode="after")
    def _unique(self) -> Self:
        check_unique((t.name for t in self.tags), "tag")
        return self

    @property
    def cycle(self) -> float:
        """How often the poller calls read(): the publishing interval when subscribed."""
        return self.publishing_interval if self.mode == "subscribe" else self.poll
