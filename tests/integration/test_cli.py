"""The `millwright` commands, run as a user runs them: as a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.model import Quality, Reading
from gateway.outbox import DEFAULT_OUTPUT as OUT
from gateway.outbox import Outbox
from tests.helpers import free_port


def millwright(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_outbox_stats_reports_depth_and_last_seq(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = await Outbox.open(path)
    try:
        await outbox.append([Reading("press-1", f"t{i}", i, Quality.GOOD, 0, None, 1.0e9) for i in range(5)])
        await outbox.ack(OUT, await outbox.lease(OUT, 2))
    finally:
        await outbox.close()

    result = millwright("outbox", "stats", str(path), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["depth"] == 3
    assert stats["last_seq"] == 5
    assert stats["dropped"] == 0
    assert stats["oldest_age"] > 0
    assert stats["outputs"] == {OUT: {"depth": 3, "dropped": 0, "position": 2}}

    text = millwright("outbox", "stats", str(path))
    assert "depth:       3 reading(s) waiting" in text.stdout
    assert f"output {OUT}: 3 waiting, 0 dropped, delivered up to seq 2" in text.stdout


def test_outbox_stats_of_a_missing_file_fails_without_creating_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    result = millwright("outbox", "stats", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr
    assert not path.exists()


def test_schema_command_prints_the_config_schema() -> None:
    result = millwright("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert set(schema["required"]) == {"gateway", "outbox", "devices"}  # and mqtt: or outputs:
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    "command", [[], ["run"], ["check"], ["outbox", "stats"], ["simulate", "modbus"], ["demo"]], ids=" ".join
)
def test_every_command_has_help(command: list[str]) -> None:
    result = millwright(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: millwright")


def test_usage_errors_exit_2() -> None:
    result = millwright("fly")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@contextlib.asynccontextmanager
async def simulator_process(*options: str) -> AsyncIterator[AsyncModbusTcpClient]:
    """`millwright simulate modbus` on a free port, and a client connected to it. Stopped
    with Ctrl-C (SIGINT), as a user stops it; it must exit cleanly."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "simulate", "modbus", "--port", str(port), *options,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0, reconnect_delay=0)
    try:
        for _ in range(100):
            if await client.connect():
                break
            await asyncio.sleep(0.1)
        yield client
    finally:
        client.close()
        await asyncio.sleep(0.05)  # let pymodbus's cancelled reconnect task finish
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 10)
    assert code in (0, 130)


async def test_simulate_modbus_serves_the_press() -> None:
    async with simulator_process("--units", "3", "--seed", "1") as client:
        rr = await client.read_coils(0, count=3, device_id=3)
        assert not rr.isError()
        rr = await client.read_holding_registers(10, count=10, device_id=3)
        assert not rr.isError()
        program = b"".join(r.to_bytes(2, "big") for r in rr.registers).rstrip(b"\0 ").decode()
        assert program == "PART-4711"


async def test_simulate_modbus_injects_exceptions_from_the_command_line() -> None:
    async with simulator_process("--exception", "4", "--exception-range", "holding:0-1") as client:
        rejected = await client.read_holding_registers(0, count=2, device_id=1)
        assert rejected.isError()
        assert rejected.exception_code == 4
        outside = await client.read_holding_registers(4, count=1, device_id=1)
        assert not outside.isError()


def test_simulate_modbus_rejects_a_bad_range() -> None:
    result = millwright("simulate", "modbus", "--exception", "2", "--exception-range", "registers:0-9")
    assert result.returncode == 2
    assert "unknown table" in result.stderr


def test_sparkplug_decode_of_a_capture(tmp_path: Path) -> None:
    """`mosquitto_sub -F '%t %x'` lines in, one JSON document per message out; a birth's
    datatypes decode the later DATA's aliases and signed values; a bad line is reported
    (exit 1) and the rest still decoded."""
    from gateway.publishers.sparkplug.payload import DataType, Payload

    birth = Payload(timestamp=1000, seq=0)
    birth.metrics.add(name="bdSeq", datatype=DataType.INT64, long_value=4)
    dbirth = Payload(timestamp=1000, seq=1)
    dbirth.metrics.add(name="offset", alias=1, datatype=DataType.INT16, int_value=0xFFFF_FFFF)
    data = Payload(timestamp=2000, seq=2)
    data.metrics.add(alias=1, timestamp=1999, int_value=0xFFFF_FFFD)
    capture = tmp_path / "capture.txt"
    capture.write_text(
        f"spBv1.0/g/NBIRTH/n {birth.SerializeToString().hex()}\n"
        f"spBv1.0/g/DBIRTH/n/press {dbirth.SerializeToString().hex()}\n"
        "spBv1.0/g/DDATA/n/press zz\n"
        f"spBv1.0/g/DDATA/n/press {data.SerializeToString().hex()}\n"
    )
    result = millwright("sparkplug", "decode", "--hex", str(capture))
    assert result.returncode == 1
    assert "line 3" in result.stderr
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["seq"] for d in docs] == [0, 1, 2]
    assert docs[0]["metrics"][0] == {"name": "bdSeq", "datatype": "Int64", "value": 4}
    assert docs[2]["topic"] == "spBv1.0/g/DDATA/n/press"
    assert docs[2]["metrics"] == [
        {"name": "offset", "alias": 1, "timestamp": 1999, "datatype": "Int16", "value": -3}
    ]

    # Standard input named twice (and a file between): read once, not closed by the first.
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "sparkplug", "decode", "--hex", "-", str(capture), "-"],
        input=capture.read_text(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Traceback" not in result.stderr
    assert len(result.stdout.splitlines()) == 6

    raw = tmp_path / "nbirth.bin"
    raw.write_bytes(birth.SerializeToString())
    result = millwright("sparkplug", "decode", str(raw))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["metrics"][0]["value"] == 4


CONFIG = """\
gateway: {id: edge-1, enterprise: acme, site: plant1, area: press-shop, line: line-1}
outbox: {path: ./outbox.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
devices:
  - name: press-1
    protocol: modbus
    host: 127.0.0.1
    tags: [{name: temperature, table: holding, address: 0}]
"""
# Nine levels of nine aliases: 387 million strings once expanded. `check` used to grow by
# 35 MB/s on it, forever.
BOMB = "".join(f"l{i}: &l{i} [{', '.join(['*l' + str(i - 1)] * 9 if i else ['x'] * 9)}]\n" for i in range(9))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (CONFIG + BOMB, "line 15, column 20: with *l5 expanded, the document stands for more than 2,000,000 "
                        "values; a config needs far fewer (this is how a YAML alias bomb looks)"),
        (CONFIG.replace("site: plant1,", "site: plant1, site: plant2,"),
         "line 1, column 55: duplicate key 'site', first given at line 1: the second would silently replace "
         "the first"),
        (CONFIG.replace("name: press-1", 'name: "press\\0"'),
         "devices[0].name: contains a control character (U+0000), which MQTT topics cannot carry"),
        (CONFIG.replace("host: 127.0.0.1", "host: 127.0.0.1\n    port: true"),
         "devices[0].port: Input should be a valid integer, not the boolean true"),
        (CONFIG.replace("host: 127.0.0.1", "host: 127.0.0.1\n    poll: 99999999999999999999999h"),
         "devices[0].poll: 99999999999999999999999h is out of range: a duration is between 1ms and 24h"),
        (CONFIG.replace("address: 0}", "address: 0, scale: .nan}"),
         "devices[0].tags[0].scale: Input should be a finite number"),
        (CONFIG.replace('"mqtt://127.0.0.1:1883"}', '"mqtt://127.0.0.1:1883", ca: ca.pem}'),
         "mqtt.ca: ca applies to mqtts:// only; the url is mqtt://, so the connection would not use TLS"),
        (CONFIG.replace('"mqtt://127.0.0.1:1883"}', '"mqtts://127.0.0.1:8883", ca: gateway.yaml}'),
         "mqtt.ca: {dir}/gateway.yaml: not a PEM certificate (no -----BEGIN CERTIFICATE----- block in it)"),
        (CONFIG.replace("./outbox.db", "."),
         "outbox.path: {dir} is a directory; give the database file, e.g. {dir}/outbox.db"),
    ],
)  # fmt: skip
def test_check_refuses_with_file_key_path_and_reason(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    result = millwright("check", str(path))  # (a timeout of 60 s: the bomb used to hang here)
    assert result.returncode == 2, result.stdout
    assert result.stderr == f"millwright: {path}: invalid configuration\n  {problem.format(dir=tmp_path)}\n"


def test_check_passes_the_same_config_unmutated(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    result = millwright("check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok (1 device(s), 1 tag(s))\n"
