"""The asyncua server pieces the OPC UA simulator is built from: its certificate, its users,
and a standard address space loaded once per process and copied for each server."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import ipaddress
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from asyncua import ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData, NodeManagementService
from asyncua.server.internal_server import InternalServer
from asyncua.server.standard_address_space.standard_address_space import fill_address_space
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

NAMESPACE = "urn:millwright:simulator"
USERNAME, PASSWORD = "operator", "millwright"  # the one user, documented in OPCUA.md
APPLICATION_URI = "urn:millwright:simulator:server"  # namespace 1, and the certificate's SAN URI
UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"  # EUInformation.NamespaceUri
CERT_FILE, KEY_FILE = "server-cert.der", "server-key.pem"
CERT_DAYS = 3650  # a simulator certificate should not expire under a long-lived test setup

POLICIES = [
    ua.SecurityPolicyType.NoSecurity,
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    # The collector also supports these two (DESIGN §6); serving them costs nothing.
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
]


# --- certificate -----------------------------------------------------------------------------


def server_certificate(pki_dir: Path, host: str) -> tuple[bytes, bytes]:
    """The simulator's certificate (DER) and private key (PEM) in `pki_dir`.

    Made on first use and kept, so a restarted simulator presents the same fingerprint and
    clients that pinned it keep trusting it. A missing, unreadable or mismatched pair is
    replaced by a new one.
    """
    cert_path, key_path = pki_dir / CERT_FILE, pki_dir / KEY_FILE
    with contextlib.suppress(OSError, ValueError):
        der, pem = cert_path.read_bytes(), key_path.read_bytes()
        cert = x509.load_der_x509_certificate(der)
        key = serialization.load_pem_private_key(pem, password=None)
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki) and (
            cert.not_valid_after_utc > datetime.now(UTC) + timedelta(days=1)
        ):
            return der, pem
    private_key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(APPLICATION_URI),
        x509.DNSName("localhost"),
        x509.DNSName(socket.gethostname()),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    with contextlib.suppress(ValueError):  # a host name rather than an address
        address = ipaddress.ip_address(host)
        if not address.is_unspecified and not address.is_loopback:
            names.append(x509.IPAddress(address))
    cert = cert_gen.generate_self_signed_app_certificate(
        private_key,
        "Millwright OPC UA simulator",
        {"organizationName": "Millwright"},
        names,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=CERT_DAYS,
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert_gen.dump_private_key_as_pem(private_key)
    pki_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    cert_path.write_bytes(der)
    return der, pem


# --- asyncua plumbing --------------------------------------------------------------------------


class Users(UserManager):
    """`operator`/`millwright` logs in; a wrong password is refused; anonymous if allowed."""

    def __init__(self, allow_anonymous: bool) -> None:
        self.allow_anonymous = allow_anonymous

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None:
            # Anonymous gets the User role too: asyncua's Anonymous role may not even read.
            return User(role=UserRole.User) if self.allow_anonymous else None
        ok = username == USERNAME and hmac.compare_digest((password or "").encode(), PASSWORD.encode())
        return User(role=UserRole.User, name=username) if ok else None


# The standard nodes as asyncua fills them, made once per process and copied for each server.
_STANDARD_NODES: dict[ua.NodeId, NodeData] = {}


def _fill_standard_nodes() -> dict[ua.NodeId, NodeData]:
    aspace = AddressSpace()
    fill_address_space(NodeManagementService(aspace))  # type: ignore[no-untyped-call]  # asyncua's generated code
    return aspace._nodes


def _copy_nodes(nodes: dict[ua.NodeId, NodeData]) -> dict[ua.NodeId, NodeData]:
    """A copy two servers can change independently: own node, attribute and reference
    containers, and own copies of the mutable values (lists, structures) a server may change
    in place. Scalars, node ids and texts are never changed in place, so they are shared;
    so are the reference descriptions, which asyncua rewrites only when a node is renamed."""
    copied: dict[ua.NodeId, NodeData] = {}
    for nodeid, data in nodes.items():
        node = copied[nodeid] = NodeData(nodeid)
        node.references = list(data.references)
        for attr, held in data.attributes.items():
            value = held.value
            if value is None:  # an attribute served by a callback; the template has none
                fresh = node.attributes[attr] = copy.copy(held)
                fresh.datachange_callbacks = {}
                continue
            if value.Value is not None:
                inner = value.Value.Value
                if isinstance(inner, list):
                    value = replace(value, Value=replace(value.Value, Value=list(inner)))
                elif not isinstance(inner, _IMMUTABLE):
                    value = copy.deepcopy(value)
            node.attributes[attr] = AttributeValue(value)
    return copied


_IMMUTABLE = (type(None), int, float, str, bytes, datetime, ua.NodeId, ua.QualifiedName, ua.LocalizedText)


class CachedInternalServer(InternalServer):
    """asyncua's internal server, with the standard address space copied from a template.

    asyncua fills the ~6000 standard nodes anew for every server, which takes over a second;
    a copy takes a quarter of that, and tests make many simulators. Both run in a thread of
    our own, not in `asyncio.to_thread` as asyncua does: that starts the loop's default
    executor, whose thread lives on after the simulator stops (the test fixtures count it as
    a leak, and a gateway sharing the loop would inherit it).
    """

    async def load_standard_address_space(self, shelf_file: Path | None = None) -> None:
        # Even the copy takes a few hundred milliseconds: off the loop, other tasks keep running.
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="opcua-sim-init") as pool:
            if not _STANDARD_NODES:
                _STANDARD_NODES.update(await loop.run_in_executor(pool, _fill_standard_nodes))
            self.aspace._nodes = await loop.run_in_executor(pool, _copy_nodes, _STANDARD_NODES)


def node_id(ident: str | int | UUID, namespace: int = 0) -> ua.NodeId:
    """A `ua.NodeId` from plain values. asyncua annotates NodeId's fields with its own int and
    str subclasses (ua.Int32, ua.String, ...), which no plain value matches for mypy."""
    return ua.NodeId(ident, namespace)  # type: ignore[arg-type]


def now() -> ua.DateTime:
    return ua.DateTime.now(UTC)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --- the simulator -----------------------------------------------------------------------------
