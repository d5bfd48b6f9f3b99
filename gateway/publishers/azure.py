"""Azure IoT Hub's device authentication: SAS tokens signed with the device key.

A token is `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}`: the resource is
the URL-encoded `{hub}/devices/{device id}`, the expiry in Unix seconds, and the signature
the base64 HMAC-SHA256 of the resource, a newline and the expiry, keyed with the device key
(base64-decoded), URL-encoded in turn. The hub drops the connection when the token expires,
so the connection asks for a new one `renew_after` seconds into each (`Tokens`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from gateway.publishers.settings import AzureSettings


def sas_token(hub: str, device_id: str, key: bytes, expiry: int) -> str:
    """The SAS token for `device_id` on `hub`, valid until `expiry` (Unix seconds)."""
    resource = quote(f"{hub}/devices/{device_id}", safe="")
    signed = hmac.new(key, f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = quote(base64.b64encode(signed).decode(), safe="")
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}"


def read_device_key(path: Path) -> bytes:
    """The device key in `path`, as the portal shows it (base64, whitespace around it
    ignored). Raises OSError if unreadable, ValueError if it is not such a key."""
    text = path.read_text(encoding="utf-8").strip()
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not a device key: expected the base64 text the portal shows") from None
    if not key:
        raise ValueError("the file is empty")
    return key


class SasTokens:
    """A new SAS token for each connection (the connection's `Tokens`); the key file is read
    each time, so that a key rotated in the portal and written there needs no restart."""

    what = "the SAS token"

    def __init__(self, azure: AzureSettings, clock: Callable[[], float] = time.time) -> None:
        if azure.device_key_file is None:
            raise ValueError("SAS tokens need azure.device_key_file")
        self._azure = azure
        self._key_file = azure.device_key_file
        self._clock = clock
        self.renew_after = azure.renew_after

    def __call__(self) -> str:
        try:
            key = read_device_key(self._key_file)
        except ValueError as exc:
            raise OSError(f"{self._key_file}: {exc}") from None
        a = self._azure
        return sas_token(a.hub, a.device_id, key, int(self._clock() + a.token_lifetime))
