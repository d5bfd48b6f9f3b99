"""The client side of TLS to a broker: the `ssl.SSLContext` built from `MqttSettings`.

Config load builds it once, so that `millwright check` refuses a CA that is not PEM or a key
that does not belong to its certificate, naming the key path and the file; the connection
builds it again, with the same function and so the same errors. OpenSSL's own reasons
(`[X509: NO_CERTIFICATE_OR_CRL_FOUND]`, `[SSL] PEM lib`, `KEY_VALUES_MISMATCH`) say neither
which file nor what to do about it; the messages here do.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError
from gateway.settings_types import shown

if TYPE_CHECKING:  # (the annotation only)
    from gateway.publishers.settings import MqttSettings

# OpenSSL reasons for a certificate and a private key that do not belong together (the
# second: an RSA key beside an EC certificate).
_MISMATCH = ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED")


class _Encrypted(Exception):
    """The private key asks for a passphrase."""


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, and `check` would hang there.
    raise _Encrypted


def client_context(settings: MqttSettings, file: str = "mqtt", where: str = "mqtt") -> ssl.SSLContext:
    """The context for an mqtts:// connection: verification on, against `ca` or else the
    system store; the client certificate and key when given; the ALPN protocol the output
    offers; verification off with `tls_insecure`.

    Raises ConfigError(`file`, problems) with one problem per bad file, each naming its key
    (`where`.ca, .cert, .key) and its path, e.g. `outputs[1].ca: /etc/ca.pem: not a PEM certificate`.
    Config load passes the config file; the connection, which has only the settings, may
    leave the default (its files were checked at load: only a file changed since can fail).
    """
    problems: list[str] = []
    try:
        ctx = ssl.create_default_context(cafile=str(settings.ca) if settings.ca else None)
    except OSError as exc:  # ssl.SSLError is one
        source = shown(settings.ca) if settings.ca else "the system's CA store"
        problems.append(f"{where}.ca: {source}: {_reason(exc, 'certificate')}")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # to go on checking cert and key
    if settings.cert is not None and settings.key is not None:
        problems += _load_pair(ctx, settings.cert, settings.key, where)
    if problems:
        raise ConfigError(file, problems)
    if (alpn := settings.offered_alpn) is not None:
        ctx.set_alpn_protocols([alpn])
    if settings.tls_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path, where: str) -> list[str]:
    # load_cert_chain says "PEM lib" whichever of the two files is wrong: read the
    # certificate alone first (as a trust anchor of a throwaway context), so that a failure
    # after it is the key's.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except OSError as exc:
        return [f"{where}.cert: {shown(cert)}: {_reason(exc, 'certificate')}"]
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        return [
            f"{where}.key: {shown(key)}: the key is encrypted, and the gateway has no passphrase setting: "
            "give it unencrypted, readable by the gateway only (mode 0600)"
        ]
    except OSError as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason in _MISMATCH:
            return [f"{where}.key: {shown(key)} does not match {where}.cert ({shown(cert)})"]
        return [f"{where}.key: {shown(key)}: {_reason(exc, 'private key')}"]
    return []


def _reason(exc: OSError, what: str) -> str:
    """A readable reason for a file that OpenSSL could not load as a PEM `what`."""
    if not isinstance(exc, ssl.SSLError):
        return f"cannot read it: {exc.strerror or exc}"
    if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return f"not a PEM {what} (no -----BEGIN CERTIFICATE----- block in it)"
    if "PEM lib" in str(exc) or exc.library == "PEM":
        # The file has no PEM block of that kind, or a damaged one (DER, a key where a
        # certificate belongs, a cut copy).
        return f"not a PEM {what}"
    return f"cannot load it as a PEM {what}: {exc.reason or exc}"
