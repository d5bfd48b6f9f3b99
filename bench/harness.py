"""The pieces every scenario uses: processes on loopback, their accounting, the result file.

Everything runs as its own process (mosquitto, the Modbus simulator, the gateway, the counting
subscriber), so the gateway's CPU and memory come from its own /proc accounting, and no
measuring code runs inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from gateway.broker import find_mosquitto, free_port, wait_for_port
from gateway.outbox import read_stats

RESULTS = Path(__file__).parent / "results"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    """A child process with a log file; stopped (SIGTERM, then SIGKILL) by `stop()`."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=log)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def cpu(self) -> float:
        """User + system CPU seconds of the process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def memory(self) -> tuple[int, int]:
        """(RSS, peak RSS) in bytes."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


@dataclass
class Bench:
    """One scenario's processes and working directory."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def proc(self, name: str, *args: str) -> Proc:
        p = Proc(name, list(args), self.workdir / f"{name}.log").start()
        self.procs.append(p)
        return p

    def broker(self, port: int, extra: Sequence[str] = (), name: str = "mosquitto") -> Proc:
        """mosquitto on `port` with persistence in the working directory (a folder of its own
        for a broker named other than the first); `extra`: more lines for its config file."""
        binary = find_mosquitto()
        if binary is None:
            raise SystemExit("mosquitto is not installed (make test installs it)")
        conf = self.workdir / f"{name}.conf"
        folder = self.workdir if name == "mosquitto" else self.workdir / name
        folder.mkdir(exist_ok=True)
        lines = [
            f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence true",
            f"persistence_location {folder}/", "max_queued_messages 0", "max_inflight_messages 1000",
        ]  # fmt: skip
        if os.geteuid() == 0:
            # As root mosquitto switches to user "mosquitto", which cannot write its persistence
            # file into this private directory: the counter's session would not survive a restart.
            lines.append("user root")
        lines.extend(extra)
        conf.write_text("\n".join(lines) + "\n")
        p = self.proc(name, binary, "-c", str(conf))
        wait_port(port)
        return p

    def simulator(self, port: int, units: int) -> Proc:
        p = self.proc(
            "simulator", sys.executable, "-m", "gateway", "simulate", "modbus", "--port", str(port),
            "--units", ",".join(str(u) for u in range(1, units + 1)), "--seed", "1",
        )  # fmt: skip
        wait_port(port)
        return p

    def opcua_simulator(self, port: int) -> Proc:
        p = self.proc(
            "opcua-simulator", sys.executable, "-m", "gateway", "simulate", "opcua", "--port", str(port),
            "--seed", "1", "--pki", str(self.workdir / "simulator-pki"),
        )  # fmt: skip
        wait_port(port, within=30)  # asyncua takes a while to start
        return p

    def gateway(self, config: dict[str, Any], name: str = "gateway") -> Proc:
        """`millwright run` on `config`; `name` names its log (a restarted gateway gets its own)."""
        path = self.workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        return self.proc(name, sys.executable, "-m", "gateway", "run", str(path))

    def counter(self, port: int, topic_filter: str, fmt: str) -> tuple[Proc, Path]:
        out = self.workdir / "counter.json"
        args = ["-m", "bench.counter", "127.0.0.1", str(port), topic_filter, fmt, str(out)]
        p = self.proc("counter", sys.executable, *args)
        deadline = time.monotonic() + 10
        while "ready" not in p.log.read_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"the counter did not start: {p.log.read_text()}")
            time.sleep(0.05)
        time.sleep(0.3)  # its SUBACK
        return p, out

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@contextlib.contextmanager
def bench(keep: bool = False) -> Iterator[Bench]:
    workdir = Path(tempfile.mkdtemp(prefix="millwright-bench-"))
    b = Bench(workdir)
    try:
        yield b
    finally:
        b.stop_all()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_port(port: int, within: float = 10.0) -> None:
    """Until something listens on the loopback port (the gateway's own check, run here)."""
    try:
        asyncio.run(wait_for_port("127.0.0.1", port, within))
    except TimeoutError as exc:
        raise SystemExit(str(exc)) from None


def ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def modbus_config(
    broker: int, simulator: int, outbox: Path, *, devices: int, tags: int, poll: str, fmt: str
) -> dict[str, Any]:
    """N presses (units 1..N of one simulator) with M holding registers each (uint16, at most
    100: the simulator's holding table), no deadband: every tag is a reading every poll."""
    if tags > 100:
        raise SystemExit("at most 100 tags per device (the simulator's holding registers)")
    mqtt: dict[str, Any] = {"url": f"mqtt://127.0.0.1:{broker}"}
    if fmt == "sparkplug":
        mqtt.update(format="sparkplug", sparkplug={"group_id": "bench"})
    elif fmt == "batch":
        mqtt.update(format="batch")
    return {
        "gateway": {"id": "bench", "enterprise": "bench", "site": "s", "area": "a", "line": "l"},
        "outbox": {"path": str(outbox)},
        "mqtt": mqtt,
        "devices": [
            {"name": f"press-{u}", "protocol": "modbus", "host": "127.0.0.1", "port": simulator, "unit": u,
             "poll": poll, "tags": [{"name": f"r{i}", "table": "holding", "address": i} for i in range(tags)]}
            for u in range(1, devices + 1)
        ],
    }  # fmt: skip


# Simulator variables that change at every tick (0.1 s) whatever the machines do (noise on
# temperatures that never settle): each monitored item on them is a reading every 0.1 s.
OPCUA_TICKING = ("ns=2;s=CNC1.Temperature", "ns=2;s=Packer1.SealTemperature")
OPCUA_TICK = 0.1


def opcua_config(broker: int, simulator: int, outbox: Path, *, items: int, fmt: str) -> dict[str, Any]:
    """One OPC UA device subscribing to `items` monitored items, in turn on the ticking
    variables (a server keeps a monitored item per item, even on the same node)."""
    config = modbus_config(broker, simulator, outbox, devices=1, tags=1, poll="1s", fmt=fmt)
    # A queue of 4 per item: two ticks that land in one publishing interval lose no value.
    item = {"sampling_interval": "100ms", "queue_size": 4}
    tags = [{"name": f"i{i}", "node": OPCUA_TICKING[i % len(OPCUA_TICKING)], **item} for i in range(items)]
    config["devices"] = [
        {"name": "cnc-1", "protocol": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{simulator}",
         "mode": "subscribe", "publishing_interval": "100ms", "tags": tags}
    ]  # fmt: skip
    return config


def outbox_depth(path: Path) -> int:
    """Readings waiting in the gateway's outbox (read-only, beside the running gateway)."""
    return read_stats(path).depth


def percentile(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = q * (total - 1)
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen > rank:
            return float(value)
    return float(max(hist))


def merge(hists: list[dict[Any, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hists:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + v
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mosquitto = find_mosquitto()
    version = ""
    if mosquitto:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, check=False).stdout
            version = text.splitlines()[0] if text else ""
    packages = {}
    for name in ("millwright", "paho-mqtt", "pymodbus", "asyncua", "aiosqlite", "protobuf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python_loop_s": python_loop(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": version,
        "packages": packages,
    }


def python_loop() -> float:
    """Seconds this machine takes for ten million iterations of a pure-Python loop (best of
    three): the same "AMD EPYC" can be twice as fast on one day's machine as on another's,
    so results are compared only with this beside them."""
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(10_000_000):
            total += i
        best = min(best, time.perf_counter() - start)
    return round(best, 2)


def save(scenario: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"scenario": scenario, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), **result}  # fmt: skip
    path = RESULTS / f"{scenario}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
