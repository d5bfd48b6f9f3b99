"""The soak: a moderate steady load for N minutes with faults injected at random moments.

What runs: the Modbus simulator (N presses x M registers, polled every P s) and the OPC UA
simulator (K monitored items, 10 readings/s each), a private mosquitto with persistence, the
gateway (`millwright run`, publishing UNS JSON with a 5 s keepalive) connected to the broker
through a TCP proxy (bench/proxy.py), and a subscriber with a persistent session, connected to
the broker directly, inside this process. The outbox lives on a small tmpfs that the soak
mounts (root only) and unmounts at the end.

Faults, one at a time, from a seeded RNG (`--seed` repeats the schedule): a pause drawn from
`--pause`, counted from the previous fault's recovery, then a kind drawn from a shuffled bag
(so that every kind comes once before any comes twice) and a length drawn from LENGTHS:
- broker: mosquitto stopped (SIGTERM, or SIGKILL one time in three), started again on the same
  port and persistence file after `length` s;
- simulator: the Modbus simulator killed (SIGKILL), started again on the same port;
- gateway: `kill -9`, and once that pid is gone, down for `length` s, started on the same outbox;
- stall: the proxy stops forwarding both ways without closing anything; after `length` s it
  resumes, or resets every connection (one time in two);
- disk: a filler file takes every free byte of the outbox's tmpfs (topped up while the fault
  lasts), then is deleted. In steady state the outbox reuses the pages its acks freed and
  needs no new space, so one time in two ("fill+stall") the proxy stalls for as long: the
  backlog then needs room that the disk does not have, and the fault holds for `length` once
  the outbox counts a drop or the gateway exits (or after DISK_LIMIT).

A gateway that exits by itself is started again after RESTART_DELAY (the systemd unit's
RestartSec) and counted as a crash, with its exit status and the end of its log: a finding,
not a failure of the soak.

Recovery of a fault: from the moment the fault ended (broker, simulator or gateway started
again, proxy forwarding again, filler deleted) until the subscriber has received, from every
device, a Good reading committed after that moment (a seq above the outbox's last seq read as
the fault ended). It includes the gateway's reconnect backoff, any restart delay, and the
drain of the backlog that built up (UNS delivers in order).

At the end the simulators are stopped, the gateway drains its outbox, and is stopped with
SIGTERM. Accounting over seq 1 .. the outbox's last seq: delivered (distinct seqs received),
gaps (never received and not still in the outbox), lost at broker SIGKILLs (gaps among the
readings committed before a SIGKILL and not yet at the subscriber when the broker died: see
_accounting), dropped (the outbox's own counter of readings its policy evicted or refused),
missing = gaps - lost at broker SIGKILLs - dropped, duplicates. Also: the gateway's RSS every
RSS_EVERY s (following its pid through restarts), its CPU summed over every process it was,
and every fault with its start, length and recovery.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.counter import Tally
from bench.harness import Bench, Proc, modbus_config, opcua_config, ports, wait_port
from gateway.errors import OutboxError
from gateway.outbox import OutboxStats, read_stats

KINDS = ("broker", "simulator", "gateway", "stall", "disk")
# How long each kind of fault lasts, in seconds (uniform between the bounds). A stall shorter
# than about 1.5 keepalives (7.5 s) may go unnoticed by the gateway: both cases are wanted.
LENGTHS = {"broker": (2, 20), "simulator": (2, 20), "gateway": (0.5, 10), "stall": (3, 30), "disk": (5, 30)}
KEEPALIVE = 5  # the gateway's MQTT keepalive (its minimum): a stall is detected within ~2x this
RESTART_DELAY = 5.0  # RestartSec in systemd/millwright.service
RSS_EVERY = 10.0
RECOVERY_LIMIT = 120.0  # a fault not recovered by then is recorded as such, and the soak goes on
DRAIN_LIMIT = 120.0
DISK_MB = 64
DISK_LIMIT = 120.0  # fill+stall: at most this long for the outbox to run out of room
TICK = 0.2
# Once a second, so that a broker killed with SIGKILL comes back with at most about a second
# less of its state than it had (the default saves every 30 minutes, and on a clean exit only).
BROKER_EXTRA = ("autosave_interval 1",)
# A seq this high means a fresh outbox seeded from the clock (a corrupt file moved aside): not
# tracked in the bitmap, which would need a byte per eight of them.
SEQ_LIMIT = 10**9


@dataclass(frozen=True)
class Fault:
    """One planned fault: its kind and variant, the pause before it, and how long it lasts."""

    kind: str
    variant: str
    pause: float
    length: float


def plan(rng: random.Random, kinds: Sequence[str], pause: tuple[float, float]) -> Iterator[Fault]:
    """The fault schedule, forever: draws depend only on the RNG, so a seed repeats it."""
    bag: list[str] = []
    while kinds:
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        kind = bag.pop()
        if kind == "broker":
            variant = "sigkill" if rng.random() < 1 / 3 else "sigterm"
        elif kind == "stall":
            variant = rng.choice(("resume", "reset"))
        elif kind == "disk":
            variant = rng.choice(("fill", "fill+stall"))
        else:
            variant = {"simulator": "sigkill", "gateway": "kill -9"}[kind]
        wait = round(rng.uniform(*pause), 1)
        yield Fault(kind, variant, wait, round(rng.uniform(*LENGTHS[kind]), 1))


class Subscriber(Tally):
    """bench.counter's tally, fed by a paho client in this process (persistent session, QoS 1)
    that also notes, per device, the highest seq of a Good reading received so far."""

    def __init__(self, port: int) -> None:
        super().__init__("uns")
        self.good: dict[str, int] = {}
        self.out_of_range = 0
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="soak-subscriber", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = lambda c, *_: c.subscribe("bench/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self.on_message
        self.port = port

    def start(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise SystemExit("the soak's subscriber got no SUBACK within 10 s")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith(("/_meta", "/status")):
            return
        doc = json.loads(msg.payload)
        self.messages += 1
        seq = doc["seq"]
        if seq >= SEQ_LIMIT:
            self.out_of_range += 1
            return
        self.seq(seq)
        if doc["quality"] == "Good":
            device = msg.topic.split("/")[4]  # enterprise/site/area/line/device/tag
            if seq > self.good.get(device, 0):
                self.good[device] = seq

    def caught_up(self, devices: Sequence[str], after: int) -> bool:
        """Whether every device has a Good reading with a seq above `after` here."""
        return all(self.good.get(device, 0) > after for device in devices)

    def has(self, seq: int) -> bool:
        return seq < len(self.seen) * 8 and bool(self.seen[seq // 8] >> (seq % 8) & 1)


@dataclass(frozen=True)
class Setup:
    """What the soak runs against: the load and the ports."""

    devices: int
    tags: int
    poll: float
    items: int
    broker_port: int
    proxy_port: int
    sim_port: int
    opcua_port: int
    outbox: Path

    @property
    def names(self) -> list[str]:
        return [f"press-{u}" for u in range(1, self.devices + 1)] + (["cnc-1"] if self.items else [])

    def config(self) -> dict[str, Any]:
        """The gateway's config: the presses and the OPC UA items, to the broker via the proxy."""
        config = modbus_config(
            self.proxy_port, self.sim_port, self.outbox,
            devices=self.devices, tags=self.tags, poll=f"{self.poll * 1000:g}ms", fmt="uns",
        )  # fmt: skip
        config["mqtt"]["keepalive"] = KEEPALIVE
        if self.items:
            opcua = opcua_config(self.proxy_port, self.opcua_port, self.outbox, items=self.items, fmt="uns")
            config["devices"] += opcua["devices"]
        return config


class Soak:
    """The running soak: its processes, the gateway's successive pids, and what was recorded."""

    def __init__(self, b: Bench, setup: Setup) -> None:
        self.b, self.setup = b, setup
        self.config = setup.config()
        self.t0 = time.monotonic()
        self.broker = b.broker(setup.broker_port, BROKER_EXTRA)
        self.proxy = b.proc(
            "proxy", sys.executable, "-m", "bench.proxy", str(setup.proxy_port), str(setup.broker_port)
        )
        wait_port(setup.proxy_port)
        self.simulator = b.simulator(setup.sim_port, setup.devices)
        self.opcua = b.opcua_simulator(setup.opcua_port) if setup.items else None
        self.sub = Subscriber(setup.broker_port)
        self.sub.start()
        self.gateway: Proc | None = None
        self.restart_at: float | None = None
        self.lives: list[dict[str, Any]] = []  # one per gateway process
        self.crashes: list[dict[str, Any]] = []
        self.rss: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.current: str | None = None  # the fault in progress, for crash records
        self._next_rss = 0.0

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    # The gateway's lives.

    def start_gateway(self) -> None:
        self.restart_at = None
        name = f"gateway-{len(self.lives) + 1}"
        self.gateway = self.b.gateway(self.config, name)
        self.lives.append({"pid": self.gateway.pid, "log": name + ".log", "started_s": self.now()})

    def end_gateway(self, sig: int, how: str) -> dict[str, Any] | None:
        """Stop the gateway with `sig` and wait until its pid is gone; its life's record."""
        if self.gateway is None:
            return None
        status, cpu = _end(self.gateway, sig)
        return self._ended(status, cpu, how)

    def _ended(self, status: int, cpu: float | None, how: str) -> dict[str, Any]:
        life = self.lives[-1]
        life.update(ended_s=self.now(), how=how, exit_status=status, cpu_s=cpu)
        self.gateway = None
        return life

    def _check_gateway(self) -> None:
        """As systemd would: a gateway that exited by itself is started again after a delay."""
        if self.gateway is None:
            if self.restart_at is not None and time.monotonic() >= self.restart_at:
                self.start_gateway()
            return
        if not _exited(self.gateway):
            return
        log = self.gateway.log
        life = self._ended(*_end(self.gateway, signal.SIGKILL), "crash")  # sends nothing: reaps it
        self.crashes.append({
            "at_s": life["ended_s"], "pid": life["pid"], "exit_status": life["exit_status"],
            "uptime_s": round(life["ended_s"] - life["started_s"], 1), "during": self.current,
            "cause": _cause(_tail(log, 200)), "log_tail": _tail(log, 15),
        })  # fmt: skip
        self.restart_at = time.monotonic() + RESTART_DELAY

    # Waiting, which keeps watching the gateway and sampling its memory.

    def tick(self) -> None:
        self._check_gateway()
        # Not in its first seconds: a process still importing says little about its memory.
        young = self.gateway is not None and self.now() - self.lives[-1]["started_s"] < 5
        if self.gateway is not None and not young and time.monotonic() >= self._next_rss:
            self._next_rss = time.monotonic() + RSS_EVERY
            with contextlib.suppress(OSError, KeyError):  # it may have just exited
                rss, _ = self.gateway.memory()
                self.rss.append(
                    {"at_s": self.now(), "pid": self.gateway.pid, "rss_mb": round(rss / 2**20, 1)}
                )

    def wait(self, seconds: float, *, each: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.tick()
            if each is not None:
                each()
            time.sleep(min(TICK, left))

    def wait_for(self, condition: Callable[[], bool], limit: float) -> float | None:
        """Seconds until `condition` held, or None after `limit`."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > limit:
                return None
            self.tick()
            time.sleep(TICK / 4)
        return round(time.monotonic() - start, 2)

    # The faults. Each returns once the fault is over; notes go into its record.

    def inject(self, fault: Fault) -> None:
        record: dict[str, Any] = {**asdict(fault), "start_s": self.now(), "epoch": round(time.time(), 3)}
        self.current = fault.kind
        crashes = len(self.crashes)
        before = _stats(self.setup.outbox)
        # How far the subscriber was behind the outbox as the fault began (in seqs).
        record["behind_at_start"] = before.last_seq - self.sub.max_seq
        record["notes"] = getattr(self, f"_{fault.kind}")(fault)
        ended = time.monotonic()
        record["end_s"] = self.now()
        stats = _stats(self.setup.outbox)
        record["last_seq_at_end"] = after = stats.last_seq
        record["committed_during"] = stats.last_seq - before.last_seq
        record["dropped_during"] = stats.dropped - before.dropped
        record["depth_at_end"] = stats.depth
        record["recovery_s"] = self.wait_for(
            lambda: self.sub.caught_up(self.setup.names, after), RECOVERY_LIMIT
        )
        record["duration_s"] = round(ended - self.t0 - record["start_s"], 2)
        record["crashes"] = len(self.crashes) - crashes
        self.current = None
        self.faults.append(record)
        print(_fault_line(record), flush=True)

    def _broker(self, fault: Fault) -> dict[str, Any]:
        sig = signal.SIGKILL if fault.variant == "sigkill" else signal.SIGTERM
        committed = _stats(self.setup.outbox).last_seq
        status, _ = _end(self.broker, sig)
        notes: dict[str, Any] = {"broker_exit_status": status}
        self.wait(min(0.5, fault.length))  # the subscriber reads what the broker sent before dying
        if fault.variant == "sigkill":
            # Committed before the kill and not received once the subscriber has read the dead
            # broker's last bytes: what it may have confirmed to the gateway, then lost.
            notes["owed"] = [self.sub.max_seq + 1, committed]
        self.wait(fault.length - min(0.5, fault.length))
        self.broker = self.b.broker(self.setup.broker_port, BROKER_EXTRA)
        return notes

    def _simulator(self, fault: Fault) -> dict[str, Any]:
        _end(self.simulator, signal.SIGKILL)
        self.wait(fault.length)
        self.simulator = self.b.simulator(self.setup.sim_port, self.setup.devices)
        return {}

    def _gateway(self, fault: Fault) -> dict[str, Any]:
        life = self.end_gateway(signal.SIGKILL, "kill -9")  # returns once the pid is gone
        self.restart_at = None  # held down for the fault's length, not restarted by tick()
        self.wait(fault.length)
        self.start_gateway()
        return {"killed_pid": life["pid"] if life else None}

    def _stall(self, fault: Fault) -> dict[str, Any]:
        assert self.proxy.popen is not None
        self.proxy.popen.send_signal(signal.SIGUSR1)
        self.wait(fault.length)
        self.proxy.popen.send_signal(signal.SIGHUP if fault.variant == "reset" else signal.SIGUSR2)
        return {}

    def _disk(self, fault: Fault) -> dict[str, Any]:
        assert self.proxy.popen is not None
        outbox = self.setup.outbox
        filler = outbox.parent / "filler"
        written = [_fill(filler)]

        def top_up() -> None:
            # A gateway that frees space (a WAL truncated as it exits) must not find it free again.
            written.append(_fill(filler))

        notes: dict[str, Any] = {}
        if fault.variant == "fill+stall":
            # The backlog grows on a full disk until the outbox can take no more: held from
            # the moment it says so (a drop counted) or the gateway exits.
            self.proxy.popen.send_signal(signal.SIGUSR1)
            dropped, crashes = _stats(outbox).dropped, len(self.crashes)

            def failing() -> bool:
                top_up()
                return _stats(outbox).dropped > dropped or len(self.crashes) > crashes

            notes["writes_failed_after_s"] = self.wait_for(failing, DISK_LIMIT)
        self.wait(fault.length, each=top_up)
        filler.unlink()
        if fault.variant == "fill+stall":
            self.proxy.popen.send_signal(signal.SIGUSR2)
        notes["filled_mb"] = round(sum(written) / 2**20, 1)
        return notes

    # The end.

    def drain(self) -> dict[str, Any]:
        """Stop the sources, let the gateway deliver everything, then stop it with SIGTERM."""
        for sim in (self.simulator, self.opcua):
            if sim is not None:
                _end(sim, signal.SIGTERM)
        stable: list[tuple[int, float]] = []

        def drained() -> bool:
            # Empty, delivered, and no new row for two seconds (the devices' Bad readings are in).
            stats = _stats(self.setup.outbox)
            if not stable or stable[-1][0] != stats.last_seq:
                stable.append((stats.last_seq, time.monotonic()))
            quiet = time.monotonic() - stable[-1][1] > 2
            return self.gateway is not None and stats.depth == 0 and quiet and self.sub.has(stats.last_seq)

        waited = self.wait_for(drained, DRAIN_LIMIT)
        started = time.monotonic()
        life = self.end_gateway(signal.SIGTERM, "SIGTERM at the end")
        took = round(time.monotonic() - started, 2)
        time.sleep(1)  # the last PUBLISH on its way to the subscriber
        self.sub.stop()
        return {"drained_in_s": waited, "exit_status": life["exit_status"] if life else None, "stop_s": took}


def soak(
    b: Bench, *, minutes: float, seed: int, pause: tuple[float, float], kinds: Sequence[str],
    devices: int, tags: int, poll: float, items: int, keep: bool,
) -> dict[str, Any]:  # fmt: skip
    """Run the soak for `minutes` (faults of `kinds` after pauses drawn from `pause`); the result."""
    _exit_on_sigterm()
    if "disk" in kinds and os.geteuid() != 0:
        raise SystemExit("the disk fault mounts a tmpfs: run as root, or leave it out (--faults)")
    broker_port, proxy_port, sim_port, opcua_port = ports(4)
    disk = b.workdir / "disk"
    with _tmpfs(b, disk, keep=keep, mount=os.geteuid() == 0):
        setup = Setup(
            devices, tags, poll, items, broker_port, proxy_port, sim_port, opcua_port, disk / "outbox.db"
        )
        s = Soak(b, setup)
        s.start_gateway()
        startup = s.wait_for(lambda: s.sub.caught_up(setup.names, 0), 90)
        if startup is None:
            raise SystemExit(f"no Good reading from every device within 90 s; see {b.workdir} (--keep)")
        print(f"soak: every device delivering {startup:.1f} s after the gateway started", flush=True)
        deadline = s.t0 + minutes * 60
        for fault in plan(random.Random(seed), kinds, pause):
            if time.monotonic() + fault.pause + fault.length > deadline:
                break
            s.wait(fault.pause)
            s.inject(fault)
        s.wait(max(0.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - s.t0
        shutdown = s.drain()
        stats = _stats(setup.outbox)
        pending = _pending(setup.outbox)
        b.stop_all()
        result = _result(s, stats, pending, shutdown, elapsed)
    result["parameters"] = {
        "minutes": minutes, "seed": seed, "pause_s": list(pause), "faults": list(kinds),
        "lengths_s": {k: list(LENGTHS[k]) for k in kinds}, "devices": devices, "tags": tags, "poll_s": poll,
        "opcua_items": items, "offered_per_s": devices * tags / poll + items * 10, "keepalive_s": KEEPALIVE,
        "restart_delay_s": RESTART_DELAY, "disk_mb": DISK_MB,
    }  # fmt: skip
    result["gateway"]["startup_s"] = startup
    result["gateway"]["log_findings"] = _log_findings(b.workdir, [life["log"] for life in s.lives])
    print_summary(result)
    return result


def _result(
    s: Soak, stats: OutboxStats, pending: set[int], shutdown: dict[str, Any], elapsed: float
) -> dict[str, Any]:
    owed = [f["notes"]["owed"] for f in s.faults if "owed" in f["notes"]]
    readings = _accounting(s.sub, stats, pending, owed)
    cpu = sum(life.get("cpu_s") or 0.0 for life in s.lives)
    rss = [r["rss_mb"] for r in s.rss]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "duration_s": round(elapsed, 1),
        "committed_per_s": round(readings["committed"] / elapsed, 1),
        "readings": readings,
        "gateway": {
            "cpu_s": round(cpu, 1),
            "cpu_share": round(cpu / elapsed, 3),
            "cpu_ms_per_1000": round(cpu / readings["committed"] * 1e6, 1) if readings["committed"] else None,
            "rss_mb": {"min": min(rss), "max": max(rss), "first": rss[0], "last": rss[-1]} if rss else None,
            "rss_samples": s.rss,
            "processes": len(s.lives),
            "crashes": s.crashes,
            "shutdown": shutdown,
            "lives": s.lives,
        },
        "faults": s.faults,
        # Every process's CPU, for the budget: the children (reaped by now) and this process,
        # whose subscriber counts every reading.
        "cpu_share_all_children": round((children.ru_utime + children.ru_stime) / elapsed, 3),
        "cpu_share_soak_process": round((own.ru_utime + own.ru_stime) / elapsed, 3),
    }


def _accounting(
    sub: Subscriber, stats: OutboxStats, pending: set[int], owed: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Seqs 1 .. the last committed: delivered, gaps (with their ranges), dropped, missing.

    `owed`: per broker SIGKILL, the seqs committed before it and not received when it died.
    mosquitto confirms a QoS 1 message (PUBACK) once it is in its memory, before it has
    reached the subscriber, and writes its memory to disk only now and then (BROKER_EXTRA): a
    SIGKILL loses what it had confirmed and not yet delivered. The gateway, which deletes a
    row only on its PUBACK, cannot send those again; they are counted apart, not as missing.
    """
    committed = min(stats.last_seq, SEQ_LIMIT - 1)
    delivered, gaps, lost_by_broker = 0, 0, 0
    ranges: list[list[int]] = []
    for seq in range(1, committed + 1):
        if sub.has(seq):
            delivered += 1
        elif seq not in pending:
            gaps += 1
            lost_by_broker += any(low <= seq <= high for low, high in owed)
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1][1] = seq
            else:
                ranges.append([seq, seq])
    beyond = sum(1 for seq in range(committed + 1, sub.max_seq + 1) if sub.has(seq))
    return {
        "committed": stats.last_seq,
        "delivered": delivered,
        "gaps": gaps,
        "gap_ranges": ranges[:50],
        "lost_at_broker_kills": lost_by_broker,
        "dropped": stats.dropped,
        # Dropped readings were deleted before anyone got them: they are among the gaps, by
        # count only (the outbox does not keep their seqs).
        "missing": max(0, gaps - lost_by_broker - stats.dropped),
        "duplicates": sub.duplicates,
        "pending_at_end": len(pending),
        "received_beyond_committed": beyond,
        "received_out_of_range": sub.out_of_range,
    }


def print_summary(result: dict[str, Any]) -> None:
    r, g, p = result["readings"], result["gateway"], result["parameters"]
    rss = g["rss_mb"] or {"min": None, "max": None, "first": None, "last": None}
    lines = [
        f"soak: {result['duration_s'] / 60:.1f} min, seed {p['seed']}, {len(result['faults'])} faults, "
        f"{result['committed_per_s']:.0f} readings/s committed",
        f"  committed {r['committed']}, delivered {r['delivered']}, gaps {r['gaps']} "
        f"({r['lost_at_broker_kills']} lost at broker SIGKILLs), dropped {r['dropped']}, "
        f"missing {r['missing']}, duplicates {r['duplicates']}, "
        f"still in the outbox {r['pending_at_end']}",
        f"  gateway: CPU {g['cpu_share']:.1%} of a core ({g['cpu_ms_per_1000']} ms per 1,000 readings), "
        f"RSS {rss['first']} MB first, {rss['last']} last, {rss['min']}-{rss['max']} over "
        f"{len(g['rss_samples'])} samples; {g['processes']} processes, {len(g['crashes'])} crashes; "
        f"final SIGTERM: exit {g['shutdown']['exit_status']} in {g['shutdown']['stop_s']} s",
        f"  all processes: children {result['cpu_share_all_children']:.0%} of a core, "
        f"this one {result['cpu_share_soak_process']:.0%}",
    ]
    lines += [_fault_line(f) for f in result["faults"]]
    for crash in g["crashes"]:
        lines.append(f"  crash +{crash['at_s']:.0f} s: pid {crash['pid']} exit {crash['exit_status']} "
                     f"after {crash['uptime_s']} s, during {crash['during']}: {crash['cause']}")  # fmt: skip
    print("\n".join(lines))


def _fault_line(f: dict[str, Any]) -> str:
    recovery = "NOT recovered" if f["recovery_s"] is None else f"recovered in {f['recovery_s']:.1f} s"
    crashes = f", {f['crashes']} gateway crashes" if f["crashes"] else ""
    dropped = f", {f['dropped_during']} dropped" if f["dropped_during"] else ""
    return (f"  fault +{f['start_s']:.0f} s: {f['kind']} ({f['variant']}) for {f['duration_s']:.1f} s "
            f"({f['committed_during']} committed meanwhile{dropped}), {recovery}{crashes}")  # fmt: skip


# Processes.


def _exited(p: Proc) -> bool:
    """Whether the process has exited, without reaping it: until it is reaped, its /proc entry
    (a zombie's) still holds its CPU times."""
    assert p.popen is not None
    if p.popen.returncode is not None:
        return True
    return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _end(p: Proc, sig: int, timeout: float = 20.0) -> tuple[int, float | None]:
    """Send `sig` (SIGKILL after `timeout`) and wait until the pid is gone: its exit status
    (negative: the signal that ended it) and its CPU seconds."""
    assert p.popen is not None
    if not _exited(p):
        p.popen.send_signal(sig)
    deadline = time.monotonic() + timeout
    while not _exited(p):
        if time.monotonic() > deadline:
            p.popen.kill()
        time.sleep(0.02)
    cpu = None
    with contextlib.suppress(OSError):
        cpu = p.cpu()
    return p.popen.wait(), cpu


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that every child is stopped and the tmpfs unmounted."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# The outbox and its disk.


@contextlib.contextmanager
def _tmpfs(b: Bench, path: Path, *, keep: bool, mount: bool) -> Iterator[Path]:
    """A tmpfs of DISK_MB at `path` for the outbox; on the way out, every process is stopped
    first (the gateway keeps the outbox open), the outbox copied out with --keep, then unmounted."""
    path.mkdir()
    if mount:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        b.stop_all()
        if keep:
            shutil.copytree(path, b.workdir / "disk-copy", dirs_exist_ok=True)
        if mount:
            _unmount(path)


def _unmount(path: Path) -> None:
    for _ in range(10):
        if subprocess.run(["umount", str(path)], check=False).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "--lazy", str(path)], check=False)


def _fill(path: Path) -> int:
    """Append zeros to `path` until the file system is full; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in _CHUNKS:
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


_CHUNKS = (bytes(1 << 20), bytes(4096))  # large to fill fast, then a page to fill the last ones


def _stats(outbox: Path) -> OutboxStats:
    """The outbox's stats; retried while it cannot be read (not created yet, or busy)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return read_stats(outbox)
        except OutboxError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _pending(outbox: Path) -> set[int]:
    """The seqs still in the outbox (never confirmed by the broker)."""
    with contextlib.closing(sqlite3.connect(f"{outbox.resolve().as_uri()}?mode=ro", uri=True)) as db:
        return {seq for (seq,) in db.execute("SELECT seq FROM reading")}


# Logs.


def _tail(path: Path, n: int) -> list[str]:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace").splitlines()[-n:]
    return []


# The last line of a traceback (also inside an exception group's "| " frame), or the CLI's
# one-line error.
_EXCEPTION = re.compile(r"^[\s|]*((?:\w+\.)*\w*(?:Error|Exception|Group)\b.*|millwright: .*)$")


def _cause(lines: Sequence[str]) -> str:
    """What a crashed gateway said last: its last exception line, else its last line."""
    for line in reversed(lines):
        if match := _EXCEPTION.match(line):
            return match.group(1)
    return lines[-1] if lines else ""


def _log_findings(workdir: Path, logs: Sequence[str]) -> list[dict[str, Any]]:
    """The gateway's warnings, errors and tracebacks' last lines over every process, grouped by
    message with digits blanked: how often each came, and its first occurrence."""
    found: dict[str, dict[str, Any]] = {}
    for name in logs:
        lines = _tail(workdir / name, 10**9)
        for i, line in enumerate(lines):
            level = re.search(r" (WARNING|ERROR|CRITICAL) ", line)
            if level:
                text = line[level.start() + 1 :]
            elif match := _EXCEPTION.match(line):
                text = "exception: " + match.group(1)
            else:
                continue
            key = re.sub(r"\d+", "N", text)
            entry = found.setdefault(key, {"count": 0, "first": text, "log": name, "line": i + 1})
            entry["count"] += 1
    return sorted(found.values(), key=lambda e: -e["count"])
