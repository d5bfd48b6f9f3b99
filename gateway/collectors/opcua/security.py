"""The gateway's OPC UA identity and its trust in servers.

- Client certificate: made on first use in `pki_dir` (`millwright-client.der`, and the
  private key `millwright-client-key.pem`, mode 0600) and kept, so a server administrator
  trusts it once. Its application URI, `urn:millwright:gateway:<hostname>`, is in the
  certificate's subjectAltName; the client always announces the URI of the certificate on
  disk, so a renamed host keeps its identity.
- Server trust: before a secure channel is opened, the server certificate is fetched with
  GetEndpoints (no session needed) and checked against `security.server_certificate`: a
  pinned SHA-256 fingerprint, a certificate file, or a directory of trusted certificates.
  An unknown certificate is refused with its fingerprint in the message (and a copy in
  `pki_dir/rejected/`), never accepted silently. The secure channel is then encrypted to
  exactly that certificate, so a server that cannot prove it holds the key fails.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import cert_gen, security_policies, uacrypto
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.collectors.opcua.settings import OpcUaSecurity, as_fingerprint
from gateway.errors import NotConnected

log = logging.getLogger(__name__)

CERT_FILE = "millwright-client.der"
KEY_FILE = "millwright-client-key.pem"
# Long-lived on purpose: every renewal means asking each server administrator to trust
# the new certificate again. An expired one is replaced (with a warning) at connect.
VALID_DAYS = 3650
# How long a server keeps our session after we vanish (kill -9, power loss). PLCs allow
# few sessions; an hour-long orphan (asyncua's default) can lock the gateway out.
SESSION_TIMEOUT_MS = 60_000
CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    certificate: bytes  # DER
    private_key: bytes  # PEM (PKCS#8)
    application_uri: str


def client_identity(pki_dir: Path, hostname: str | None = None) -> ClientIdentity:
    """Load the client certificate and key from `pki_dir`, creating them on first use.

    Blocking file and key work: it runs once per connect, and only the very first run
    generates a key (about 0.1 s). A worker thread would cost more than it saves.
    """
    cert_path, key_path = pki_dir / CERT_FILE, pki_dir / KEY_FILE
    pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if key_path.is_file():
        if key_path.stat().st_mode & 0o077:
            log.warning("%s was readable by others; making it private (0600)", key_path)
            key_path.chmod(0o600)
        key_pem = key_path.read_bytes()
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{key_path} does not hold an RSA private key")
    else:
        key = cert_gen.generate_private_key()
        key_pem = cert_gen.dump_private_key_as_pem(key)
        _write_atomic(key_path, key_pem, 0o600)
        log.info("created the OPC UA client key %s", key_path)
    cert = _load_certificate(cert_path, key)
    if cert is None:
        host = hostname or socket.gethostname()
        cert = _new_certificate(key, f"urn:millwright:gateway:{host}", host)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)
        log.info("created the OPC UA client certificate %s (SHA-256 %s)", cert_path,
                 fingerprint(cert.public_bytes(serialization.Encoding.DER)))  # fmt: skip
    uri = _application_uri(cert)
    assert uri is not None  # _load_certificate rejects a certificate without one
    return ClientIdentity(cert.public_bytes(serialization.Encoding.DER), key_pem, uri)


def _load_certificate(path: Path, key: rsa.RSAPrivateKey) -> x509.Certificate | None:
    """The certificate on disk, or None when it must be (re)made."""
    if not path.is_file():
        return None
    cert = x509.load_der_x509_certificate(path.read_bytes())
    if cert.public_key() != key.public_key():
        log.warning("%s does not belong to the private key beside it; making a new one", path)
        return None
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        log.warning("%s expired on %s; making a new one, which servers must trust again",
                    path, cert.not_valid_after_utc.date())  # fmt: skip
        return None
    if _application_uri(cert) is None:
        log.warning("%s has no application URI; making a new one", path)
        return None
    return cert


def _new_certificate(key: rsa.RSAPrivateKey, uri: str, host: str) -> x509.Certificate:
    names = [x509.UniformResourceIdentifier(uri), x509.DNSName(host)]
    return cert_gen.generate_self_signed_app_certificate(
        key, "Millwright gateway", {"organizationName": "Millwright"}, names,
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=VALID_DAYS,
    )  # fmt: skip


def _application_uri(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode (no window where the key is world-readable), then
    # renamed, so a crash never leaves half a key behind.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a leftover tmp file
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lowercase hex without separators."""
    return hashlib.sha256(der).hexdigest()


def trusted(setting: str, der: bytes) -> bool:
    """Whether the server certificate `der` is trusted by `security.server_certificate`."""
    actual = fingerprint(der)
    pin = as_fingerprint(setting)
    if pin is not None:
        return hmac.compare_digest(pin, actual)
    path = Path(setting).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in CERT_SUFFIXES and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"security.server_certificate: no such file or directory: {path}")
    return any(actual in _fingerprints(p) for p in files)


def _fingerprints(path: Path) -> set[str]:
    try:
        return certificate_fingerprints(path)
    except ValueError:
        log.debug("%s is not a certificate; ignored", path)
        return set()


def certificate_fingerprints(path: Path) -> set[str]:
    """The SHA-256 fingerprints of the certificates in a PEM file, or of the first one in a
    DER file, as `trusted` sees them (config load checks a server_certificate file with it).
    Raises ValueError when the file holds no certificate, OSError when it cannot be read."""
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        certs = x509.load_pem_x509_certificates(data)
        return {fingerprint(c.public_bytes(serialization.Encoding.DER)) for c in certs}
    return {fingerprint(first_certificate(data))}


def first_certificate(der: bytes) -> bytes:
    """The leading certificate of a DER blob that may hold a whole chain (servers may send
    their certificate followed by its issuers)."""
    if len(der) < 2 or der[0] != 0x30:
        raise ValueError("not a DER certificate")
    length = der[1]
    if length < 0x80:
        return der[: 2 + length]
    size = length & 0x7F
    return der[: 2 + size + int.from_bytes(der[2 : 2 + size], "big")]


async def open_client(
    name: str, endpoint: str, security: OpcUaSecurity, pki_dir: Path, request_timeout: float
) -> Client:
    """A connected asyncua Client with the configured security and identity.

    Raises NotConnected when the server is not trusted or offers no matching endpoint;
    asyncua's own exceptions (OSError, TimeoutError, UaError) pass through for the caller
    to translate once.
    """
    try:
        identity = client_identity(pki_dir)
    except (OSError, ValueError) as exc:
        raise NotConnected(name, f"OPC UA client certificate in {pki_dir}: {exc}") from exc
    # asyncua's watchdog reads the server state every interval and, with a timeout of the same
    # length, calls the connection lost; a busy PLC may take longer than its 1 s default.
    watchdog = min(request_timeout, SESSION_TIMEOUT_MS / 1000 / 3)
    client = Client(endpoint, timeout=request_timeout, watchdog_intervall=watchdog)
    client.name = client.description = "Millwright gateway"
    client.application_uri = identity.application_uri
    client.product_uri = "urn:millwright"
    client.session_timeout = SESSION_TIMEOUT_MS
    if security.secure:
        server_der = await _server_certificate(name, endpoint, security, request_timeout)
        _check_trust(name, endpoint, security, pki_dir, server_der)
        key = uacrypto.CertProperties(identity.private_key, extension="pem")
        # Everything handed over as bytes: given paths, asyncua reads them through
        # anyio's worker threads.
        await client.set_security(
            POLICIES[security.policy], identity.certificate, key, server_certificate=server_der,
            mode=ua.MessageSecurityMode[security.mode],
        )  # fmt: skip
    if security.username is not None:
        if not security.secure:
            # asyncua encrypts the password with the certificate the server announced, which
            # nothing verified without a policy: a man in the middle could read it.
            log.warning(
                "device %s: password sent without a security policy; use policy Basic256Sha256 "
                "(or better) with server_certificate to protect it", name,
            )  # fmt: skip
        client.set_user(security.username)
        client.set_password(security.secret() or "")
    await client.connect()
    return client


async def _server_certificate(
    name: str, endpoint: str, security: OpcUaSecurity, request_timeout: float
) -> bytes:
    probe = Client(endpoint, timeout=request_timeout)  # policy None: GetEndpoints needs no trust
    endpoints = await probe.connect_and_get_server_endpoints()
    uri = POLICIES[security.policy].URI
    mode = ua.MessageSecurityMode[security.mode]
    for ep in endpoints:
        if ep.SecurityPolicyUri == uri and ep.SecurityMode == mode and ep.ServerCertificate:
            return first_certificate(ep.ServerCertificate)
    offered = sorted({f"{_policy_name(e.SecurityPolicyUri)}/{e.SecurityMode.name}" for e in endpoints})
    raise NotConnected(
        name, f"{endpoint} offers no endpoint with policy {security.policy} and mode {security.mode}; "
        f"it offers {', '.join(offered) or 'none'}",
    )  # fmt: skip


def _policy_name(uri: str | None) -> str:
    return (uri or "").rpartition("#")[2]


def _check_trust(name: str, endpoint: str, security: OpcUaSecurity, pki_dir: Path, der: bytes) -> None:
    setting = security.server_certificate or ""
    try:
        if trusted(setting, der):
            return
    except (OSError, ValueError) as exc:
        raise NotConnected(name, str(exc)) from exc
    fp = fingerprint(der)
    where = ""
    # A copy of the refused certificate, as OPC UA stacks keep one, to inspect or to trust.
    rejected = pki_dir / "rejected" / f"{fp}.der"
    try:
        rejected.parent.mkdir(mode=0o700, exist_ok=True)
        rejected.write_bytes(der)
    except OSError as exc:
        log.debug("cannot keep the refused certificate in %s: %s", rejected, exc)
    else:
        if Path(setting).expanduser().is_dir():
            where = f", or copy {rejected} into {setting}"
    subject = _describe(der)
    raise NotConnected(
        name, f"server certificate of {endpoint} is not trusted: SHA-256 {fp} ({subject}); "
        f"pin it with security.server_certificate: {fp}{where}",
    )  # fmt: skip


def _describe(der: bytes) -> str:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "unreadable certificate"
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    who = f"CN={cn[0].value!s}" if cn else cert.subject.rfc4514_string()
    return f"{who}, valid until {cert.not_valid_after_utc.date()}"
