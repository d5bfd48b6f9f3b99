"""`millwright simulate` as a user starts it: a port already in use is one line, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
def test_a_port_in_use_is_one_line(protocol: str, taken_port: int, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "gateway", "simulate", protocol, "--port", str(taken_port)]
    if protocol == "opcua":
        args += ["--pki", str(tmp_path / "pki")]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"millwright: cannot listen on 127.0.0.1:{taken_port}: Address already in use"
    )
    assert "Traceback" not in done.stderr


def test_another_os_error_is_one_line_of_its_own(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    pki = tmp_path / "a-file" / "pki"  # cannot be made: its parent is a file
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "simulate", "opcua", "--port", "0", "--pki", str(pki)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("millwright: ")
    assert "cannot listen" not in last
    assert "a-file" in last
    assert "Traceback" not in done.stderr
