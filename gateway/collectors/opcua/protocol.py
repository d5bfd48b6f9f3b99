"""The OPC UA entry of the protocol registry (gateway.collectors.registry).

This module does not import asyncua: the registry imports it with every config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.collectors import Collector, MetricType, ProtocolEntry, one_each
from gateway.collectors.opcua.settings import OpcUaDevice, as_fingerprint
from gateway.settings_types import SECRET_FILE, home, resolve_file, shown


def _collector(device: OpcUaDevice, pki_dir: Path) -> Collector:
    from gateway.collectors.opcua.collector import OpcUaCollector  # asyncua: see ProtocolEntry

    return OpcUaCollector(device, pki_dir)


def _metric_types(device: OpcUaDevice) -> list[MetricType]:
    """No datatype is known before the server sends a value (the collector tells it then:
    OpcUaCollector.told)."""
    return [(t.name, None, t.unit) for t in device.tags]


def _resolve_files(device: OpcUaDevice, index: int, base: Path, problems: list[str]) -> OpcUaDevice:
    """The password file and the trusted server certificate relative to the config file."""
    security = device.security
    update: dict[str, Any] = {}
    if security.password_file is not None:
        where = f"devices[{index}].security.password_file"
        update["password_file"] = resolve_file(
            base, security.password_file, where, SECRET_FILE, problems, secret=True
        )
    trusted = security.server_certificate
    if trusted is not None and as_fingerprint(trusted) is None:
        path = base / home(Path(trusted))
        problem = _server_certificate_problem(trusted, path)
        if problem is not None:
            problems.append(f"devices[{index}].security.server_certificate: {problem}")
        update["server_certificate"] = str(path)
    if not update:
        return device
    return device.model_copy(update={"security": security.model_copy(update=update)})


def _server_certificate_problem(setting: str, path: Path) -> str | None:
    """What is wrong with a server_certificate that is not a fingerprint, or None."""
    if path.is_dir():
        return None  # a trust directory may still be empty: `browse` and the log say what to copy in
    if path.is_file():
        # Imported here: it brings asyncua (0.7 s), which only such a config needs.
        from gateway.collectors.opcua.security import certificate_fingerprints

        try:
            certificate_fingerprints(path)
        except OSError as exc:
            return f"cannot read {shown(path)}: {exc.strerror or exc}"
        except ValueError:
            return f"{shown(path)} is not a certificate (DER or PEM)"
        return None
    digits = setting.replace(":", "").replace(" ", "")
    if digits and all(c in "0123456789abcdefABCDEF" for c in digits):
        return (
            f"{setting!r} looks like a SHA-256 fingerprint, with {len(digits)} hex digits where 64 "
            "are needed (and no file or directory has that name)"
        )
    return (
        f"no such file or directory: {shown(path)}; give the server certificate's SHA-256 fingerprint "
        "(64 hex digits), its certificate file (DER or PEM), or a directory of trusted certificates"
    )


OPCUA = ProtocolEntry("opcua", OpcUaDevice, one_each(_collector), _metric_types, _resolve_files)
