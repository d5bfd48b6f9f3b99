"""The files the shipped cloud examples (config/*.yaml) name under /etc/millwright/, made
for a test: real PEM certificates from a throwaway CA, a device key, a password file."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

from tests.pki import Pki, make_pki

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = "/etc/millwright/"
# The Azure IoT Hub example's device key (any 32 bytes: the hub stand-in is told the same).
DEVICE_KEY = bytes(range(100, 132))
HIVEMQ_PASSWORD = "example-password"
# The clients the examples are: the AWS thing (its client id) and the Event Grid client.
CLIENTS = ("press-shop-edge-1", "edge-1")


def example_files(folder: Path, pki: Pki | None = None) -> Pki:
    """Write every file the examples name into `folder` (certificates of `pki`, or of a
    new one there), under the names the examples give them."""
    pki = pki or make_pki(folder / "pki", CLIENTS)
    thing_cert, thing_key = pki.client("press-shop-edge-1")
    grid_cert, grid_key = pki.client("edge-1")
    for source, name in [
        (pki.ca, "AmazonRootCA1.pem"),
        (thing_cert, "device.pem.crt"),
        (thing_key, "private.pem.key"),
        (grid_cert, "edge-1.pem"),
        (grid_key, "edge-1.key"),
    ]:
        shutil.copyfile(source, folder / name)
    (folder / "azure-device.key").write_text(base64.b64encode(DEVICE_KEY).decode() + "\n")
    (folder / "hivemq-password").write_text(HIVEMQ_PASSWORD + "\n")
    for name in ("private.pem.key", "edge-1.key", "azure-device.key", "hivemq-password"):
        (folder / name).chmod(0o600)
    return pki


def example(name: str, folder: Path, **replace: str) -> str:
    """config/`name`, its /etc/millwright/ files in `folder`, and each `replace` key (a text
    in the file) replaced by its value."""
    text = (ROOT / "config" / name).read_text(encoding="utf-8").replace(SHIPPED, f"{folder}/")
    for old, new in replace.items():
        if old not in text:
            raise ValueError(f"{old!r} is not in config/{name}")
        text = text.replace(old, new)
    return text
