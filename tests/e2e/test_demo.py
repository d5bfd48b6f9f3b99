"""`millwright demo` as a new user runs it: readings must reach the broker and be shown."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}  (press-[12]|cnc-1)/\w+ +.+ (Good|Uncertain|Bad) +seq (\d+)$")


@pytest.mark.parametrize("broker", [[], ["--broker", "embedded"]], ids=["mosquitto", "embedded"])
def test_demo_shows_readings_arriving_at_the_broker(broker: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--duration", "4", *broker],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = [m for line in result.stdout.splitlines() if (m := LINE.match(line))]
    assert len(shown) >= 16, result.stdout  # every device, several tags each, at least once
    assert {m.group(1) for m in shown} == {"press-1", "press-2", "cnc-1"}  # Modbus and OPC UA
    assert all(m.group(2) == "Good" for m in shown), result.stdout
    seqs = [int(m.group(3)) for m in shown]
    assert seqs == list(range(1, len(seqs) + 1))  # every reading shown, in order, none missing
    summary = re.search(r"(\d+) readings arrived at the broker", result.stderr)
    assert summary is not None, result.stderr
    assert int(summary.group(1)) == len(shown)
    assert "Traceback" not in result.stderr
