"""A throwaway certificate authority for TLS tests, made with the openssl CLI.

One CA signs a server certificate for 127.0.0.1 (and localhost) and one client certificate
per name, with that name as CN: what mosquitto's `use_identity_as_username` turns into the
username, and what AWS IoT Core and Azure Event Grid take as the client's identity.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

# A name becomes a CN in `-subj` and two file names: keep it to characters neither treats
# specially, and away from the CA's and the server's own files.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED = frozenset({"ca", "server"})

# Explicit extensions rather than openssl's defaults, so that strict verifiers (Python 3.13
# sets VERIFY_X509_STRICT) accept the chain too: they want key usages and key identifiers.
_CA_EXTENSIONS = (
    "basicConstraints=critical,CA:TRUE",
    "keyUsage=critical,keyCertSign,cRLSign",
    "subjectKeyIdentifier=hash",
)
_LEAF = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)
_SERVER_EXTENSIONS = _LEAF + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
_CLIENT_EXTENSIONS = _LEAF + "extendedKeyUsage=clientAuth\n"

_DAYS = "2"
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True, slots=True)
class Pki:
    """The files `make_pki` wrote: PEM certificates and unencrypted PEM keys (mode 0600)."""

    directory: Path
    clients: tuple[str, ...]

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of client `name`; KeyError if `make_pki` made none for it,
        so that a misspelt name fails here and not as a puzzling TLS error."""
        if name not in self.clients:
            raise KeyError(f"no client certificate for {name!r}; made: {', '.join(self.clients) or 'none'}")
        return self.directory / f"{name}.pem", self.directory / f"{name}.key"


def make_pki(directory: Path, clients: Sequence[str] = ()) -> Pki:
    """Write a CA, a server certificate and one client certificate per name in `clients`
    into `directory` (EC prime256v1, valid for 2 days)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: run `make test`, which installs it")
    for name in clients:
        if not _CLIENT_NAME.fullmatch(name) or name in _RESERVED:
            raise ValueError(f"client name {name!r}: use letters, digits, '.', '_', '-', not ca or server")
    if len(set(clients)) != len(clients):
        raise ValueError(f"client names repeat: {list(clients)}")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=directory, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")

    ca_extensions = [arg for ext in _CA_EXTENSIONS for arg in ("-addext", ext)]
    ca_subject = ["-subj", "/CN=Millwright test CA", *ca_extensions]
    run("req", "-x509", *_EC_KEY, "-days", _DAYS, *ca_subject, "-keyout", "ca.key", "-out", "ca.pem")
    signing = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", _DAYS]
    leaves = [("server", "127.0.0.1", _SERVER_EXTENSIONS), *((n, n, _CLIENT_EXTENSIONS) for n in clients)]
    for stem, common_name, extensions in leaves:
        (directory / f"{stem}.ext").write_text(extensions, encoding="utf-8")
        run("req", *_EC_KEY, "-subj", f"/CN={common_name}", "-keyout", f"{stem}.key", "-out", f"{stem}.csr")
        run("x509", "-req", "-in", f"{stem}.csr", *signing, "-extfile", f"{stem}.ext", "-out", f"{stem}.pem")
    for key in ("ca", *(stem for stem, _, _ in leaves)):
        (directory / f"{key}.key").chmod(0o600)
    return Pki(directory, tuple(clients))
