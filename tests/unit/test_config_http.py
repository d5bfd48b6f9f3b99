"""`http:` at load: on by default on localhost; the network only with credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.errors import ConfigError

GATEWAY = {"id": "edge-1", "enterprise": "acme", "site": "plant1", "area": "press-shop", "line": "line-1"}
HEAD = {
    "gateway": GATEWAY,
    "outbox": {"path": "./data/outbox.db"},
    "mqtt": {"url": "mqtt://127.0.0.1:1883"},
    "devices": [{"name": "press-1", "protocol": "modbus", "host": "127.0.0.1",
                 "tags": [{"name": "t", "table": "holding", "address": 0}]}],
}  # fmt: skip


def _load(http: dict[str, Any] | None, tmp_path: Path) -> config.Settings:
    doc = dict(HEAD) if http is None else {**HEAD, "http": http}
    (tmp_path / "plant.yaml").write_text(yaml.safe_dump(doc))
    return config.load(tmp_path / "plant.yaml")


def _problems(http: dict[str, Any], tmp_path: Path) -> list[str]:
    (tmp_path / "not-pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as err:
        _load(http, tmp_path)
    return err.value.problems


def test_on_by_default_on_localhost_only(tmp_path: Path) -> None:
    http = _load(None, tmp_path).http
    assert (http.enabled, http.host, http.port, http.loopback) == (True, "127.0.0.1", 8710, True)
    assert _load({"listen": "[::1]:9000"}, tmp_path).http.loopback
    assert _load({"enabled": False, "listen": "0.0.0.0:8710"}, tmp_path).http.enabled is False


@pytest.mark.parametrize(
    ("http", "problem"),
    [
        (
            {"listen": "0.0.0.0:8710"},
            "http.listen: 0.0.0.0:8710 serves the network: give username and password_file",
        ),
        ({"listen": "plant-gw:8710"}, "http.listen: plant-gw:8710 serves the network"),
        ({"listen": "8710"}, "http.listen: Value error, '8710': expected host:port"),
        (
            {"listen": "127.0.0.1:99999"},
            "http.listen: Value error, '127.0.0.1:99999': the port must be 1 to 65535",
        ),
        ({"username": "ops"}, "http.password_file: username and password_file go together"),
        ({"listen": "0.0.0.0:8710", "token_file": "missing"}, "http.token_file: no such file: "),
        ({"cert": "server.pem"}, "http.key: cert and key go together"),
        ({"cert": "not-pem", "key": "not-pem"}, "http.cert: "),
    ],
)
def test_what_is_refused(http: dict[str, Any], problem: str, tmp_path: Path) -> None:
    (found,) = _problems(http, tmp_path)
    assert found.replace("Value error, ", "").startswith(problem.replace("Value error, ", "")), found


def test_a_secret_file_whose_first_line_is_empty_is_refused(tmp_path: Path) -> None:
    # An empty secret would let in whoever sends an empty one.
    (tmp_path / "token").write_text("\nthe-token-on-line-two\n")
    (problem,) = _problems({"listen": "0.0.0.0:8710", "token_file": "token"}, tmp_path)
    assert (
        problem == f"http.token_file: the first line of {tmp_path / 'token'} is empty: put the secret there"
    )


def test_the_network_with_credentials(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    http = _load({"listen": "0.0.0.0:8710", "username": "ops", "password_file": "pw"}, tmp_path).http
    assert http.password() == "s3cret"
    assert http.password_file == tmp_path / "pw"
