"""`http:`: where the status server listens, and the credentials it asks for.

On by default on localhost only. Listening beyond the machine needs credentials, for every
path but the health checks, which load balancers and systemd probes call without any.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator

from gateway.settings_types import Bool, Model, ProblemAt, read_secret

DEFAULT_LISTEN = "127.0.0.1:8710"


class HttpSettings(Model):
    enabled: Bool = Field(default=True, description="Serve health, metrics and the status API.")
    listen: str = Field(
        default=DEFAULT_LISTEN,
        description="host:port to listen on. Anything but a loopback address needs username with "
        "password_file, or token_file.",
    )
    username: str | None = Field(default=None, description="User name for HTTP basic authentication.")
    password_file: Path | None = Field(default=None, description="File whose first line is the password.")
    token_file: Path | None = Field(
        default=None, description="File whose first line is a bearer token (Authorization: Bearer ...)."
    )
    cert: Path | None = Field(default=None, description="Server certificate (PEM): serve HTTPS.")
    key: Path | None = Field(default=None, description="The certificate's private key (PEM).")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, port = split_listen(value)
        if not host:
            raise ValueError(f"{value!r}: expected host:port, e.g. {DEFAULT_LISTEN} or 0.0.0.0:8710")
        if not 0 < port < 65536:
            raise ValueError(f"{value!r}: the port must be 1 to 65535")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if (self.cert is None) != (self.key is None):
            raise ProblemAt(("key" if self.cert else "cert",), "cert and key go together")
        if (self.username is None) != (self.password_file is None):
            raise ProblemAt(("password_file" if self.username else "username",),
                            "username and password_file go together")  # fmt: skip
        if self.enabled and not self.loopback and self.username is None and self.token_file is None:
            raise ProblemAt(
                ("listen",),
                f"{self.listen} serves the network: give username and password_file, or token_file "
                "(the health checks stay open)",
            )
        return self

    @property
    def scheme(self) -> str:
        return "http" if self.cert is None else "https"

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def loopback(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False  # a name: it may resolve to anything

    def password(self) -> str | None:
        return read_secret(None, self.password_file)

    def token(self) -> str | None:
        return read_secret(None, self.token_file)


def split_listen(value: str) -> tuple[str, int]:
    """("127.0.0.1", 8710) of "127.0.0.1:8710"; ("::1", 8710) of "[::1]:8710"; port 0 if bad."""
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return host, int(port) if port.isdigit() else 0
