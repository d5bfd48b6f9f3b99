"""`millwright simulate` as a user starts it: a port already in use is one line, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MakeLine


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


def test_the_press_on_a_serial_line_answers_its_units_only(make_line: MakeLine) -> None:
    line = make_line()
    args = ["simulate", "modbus", "--serial", line.a, "--parity", "N", "--units", "3", "--seed", "1"]
    simulator = subprocess.Popen([sys.executable, "-m", "gateway", *args], stderr=subprocess.DEVNULL)
    try:
        master = ["mbpoll", "-m", "rtu", "-b", "19200", "-P", "none", "-1", "-o", "0.5", "-t", "4", "-r", "6"]
        deadline = time.monotonic() + 30
        while (done := subprocess.run([*master, "-a", "3", line.b], capture_output=True, text=True,
                                      check=False)).returncode != 0:  # fmt: skip
            assert time.monotonic() < deadline, done.stdout + done.stderr  # (until it has the port open)
        assert "[6]: \t30" in done.stdout  # the speed setpoint of unit 3's press
        silent = subprocess.run([*master, "-a", "1", line.b], capture_output=True, text=True, check=False)
        assert silent.returncode != 0  # unit 1 is not served: no answer at all
        assert "timed out" in (silent.stdout + silent.stderr).lower()
    finally:
        simulator.terminate()
        simulator.wait(timeout=30)


def test_a_unit_id_a_serial_line_cannot_carry_is_refused(tmp_path: Path) -> None:
    args = ["simulate", "modbus", "--serial", str(tmp_path / "line"), "--units", "1,248"]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args], check=False, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "millwright: --units '1,248': a unit on a serial line is 1-247"
