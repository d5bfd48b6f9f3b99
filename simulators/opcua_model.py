"""What the OPC UA simulator serves: a CNC machining centre, a packaging line, and the node map.

`Cnc` and `Packer` are pure models like `signals.Press`: call `advance(now)` with a
monotonic time and read the attributes; randomness comes from a seeded `random.Random`, so
a seed reproduces a run. They know nothing of OPC UA. `VARIABLES` at the bottom maps them
to nodes (ids, data types, units; OPCUA.md lists them): a contract with the collector's
tests and example configs, so add nodes, never rename one. `simulators.opcua` serves it.
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from asyncua import ua

from simulators.signals import AMBIENT, Counter, FirstOrderLag, MachineState, StateMachine


@dataclass(frozen=True, slots=True)
class Program:
    """An NC part program: what the spindle does and how long one part takes."""

    name: str
    description: str
    spindle_speed: float  # 1/min
    direction: int  # +1 clockwise (M03), -1 counter-clockwise (M04)
    cycle_time: float  # s per part at 100 % feed override
    blocks: int  # NC blocks; the block pointer runs through them once per part
    tools: tuple[int, ...]  # tool numbers in the order the program calls them
    cutting_load: float  # % spindle load while cutting


PROGRAMS = (
    Program("O1001-FLANGE", "Flange DN50, 6 holes", 8000.0, 1, 6.0, 420, (3, 7, 12), 35.0),
    Program("O2040-SHAFT", "Drive shaft, 2 keyways", 4500.0, -1, 9.0, 880, (1, 5), 55.0),
    Program("O3300-HOUSING", "Gear housing, roughing", 12000.0, 1, 12.0, 1500, (2, 4, 9, 15), 70.0),
)

# Alarm numbers a fault draws from (spindle overload, following error, coolant level low).
ALARM_CODES = (1012, 2051, 3003)
FEED_OVERRIDES = (80, 90, 100, 100, 100, 110, 120)  # the operator mostly leaves it at 100 %
HOME = (0.0, 0.0, 350.0)  # X, Y, Z in mm: the tool change position the axes return to
CNC_DWELL = {
    MachineState.IDLE: (3.0, 10.0),
    MachineState.RUNNING: (20.0, 60.0),
    MachineState.FAULT: (5.0, 15.0),
}


class Cnc:
    """A 3-axis machining centre that runs part programs one after another.

    The state machine from `signals` drives it: running a program, idle between batches,
    and now and then an alarm. After an alarm clears the machine shows "Stopped" (halted,
    waiting for the operator) for its idle dwell, otherwise "Idle".
    """

    def __init__(self, seed: int | str | None = None, tick: float = 0.1) -> None:
        rng = self._rng = random.Random(seed)
        self.tick = tick
        self.machine = StateMachine(rng, dwell=CNC_DWELL, fault_probability=0.2)
        self.program = rng.choice(PROGRAMS)
        self.feed_override = 100
        self.stopped = False
        self.alarm_code = 0
        self.tool = self.program.tools[0]
        self.block = 1
        self._spindle = FirstOrderLag(self.program.spindle_speed, tau=0.5, noise=4.0, rng=rng)
        self._load = FirstOrderLag(self.program.cutting_load, tau=0.5, noise=1.0, rng=rng)
        self._temperature = FirstOrderLag(rng.uniform(30.0, 36.0), tau=90.0, noise=0.05, rng=rng)
        self._axes = [FirstOrderLag(home, tau=0.3) for home in HOME]
        self._parts = Counter(start=rng.randrange(1_000, 50_000))
        self._parts.phase = rng.random()
        self._revolutions = float(rng.randrange(10**8, 10**9))
        self._operating = float(rng.randrange(10**6, 10**7))
        self.clock = 0.0  # model time (monotonic seconds), advanced by step()
        self.cycle_started = 0.0  # model time the current part was started
        self._started = False

    # --- what the machine shows ---

    @property
    def state(self) -> str:
        if self.machine.state is MachineState.RUNNING:
            return "Running"
        if self.machine.state is MachineState.FAULT:
            return "Alarm"
        return "Stopped" if self.stopped else "Idle"

    @property
    def running(self) -> bool:
        return self.machine.state is MachineState.RUNNING

    @property
    def alarm(self) -> bool:
        return self.machine.state is MachineState.FAULT

    @property
    def spindle_speed(self) -> float:
        # An encoder at standstill reads zero, not the lag's noise around zero.
        return max(0.0, self._spindle.value) if self._spindle.state > 1.0 else 0.0

    @property
    def spindle_direction(self) -> int:
        return self.program.direction if self.spindle_speed > 0 else 0

    @property
    def spindle_load(self) -> float:
        return min(150.0, max(0.0, self._load.value))

    @property
    def temperature(self) -> float:
        return self._temperature.value

    @property
    def positions(self) -> list[float]:
        return [axis.value for axis in self._axes]

    @property
    def part_count(self) -> int:
        return self._parts.count

    @property
    def revolutions(self) -> int:
        return int(self._revolutions) % 2**64

    @property
    def operating_seconds(self) -> int:
        return int(self._operating)

    # --- operator commands ---

    def reset_counter(self) -> None:
        self._parts.count = 0

    # --- time ---

    def advance(self, now: float) -> None:
        """Bring the model up to `now` (monotonic seconds) in steps of at most `tick`."""
        if not self._started:
            # Time starts at the first call, with the current part already under way.
            self.clock, self._started = now, True
            self.cycle_started = now - self._parts.phase * self.program.cycle_time
            return
        gap = now - self.clock
        if gap <= 0:
            return
        steps = min(math.ceil(gap / self.tick), 10_000)
        for _ in range(steps):
            self.step(gap / steps)
        self.clock = now  # no drift from summing the steps

    def step(self, dt: float) -> None:
        before = self.machine.state
        state = self.machine.step(dt)
        if state is not before:
            self._on_transition(before, state)
        self.clock += dt
        self._operating += dt
        program = self.program
        rate = self.feed_override / 100.0 / program.cycle_time if self.running else 0.0
        for _ in range(self._parts.step(dt, rate)):
            self.cycle_started = self.clock
        phase = self._parts.phase
        if self.running:
            self.block = 1 + min(program.blocks - 1, int(phase * program.blocks))
            self.tool = program.tools[min(len(program.tools) - 1, int(phase * len(program.tools)))]
        speed = program.spindle_speed if self.running else 0.0
        self._spindle.step(dt, speed)
        self._revolutions += max(0.0, self._spindle.state) * dt / 60.0
        # Load swings with the cut: three engagements per part, each a rise and a fall.
        cut = program.cutting_load * (1.0 + 0.3 * math.sin(6.0 * math.pi * phase))
        self._load.step(dt, cut if self.running else 0.0)
        # The spindle bearings warm with speed; a stopped machine cools to the shop.
        self._temperature.step(dt, AMBIENT + 18.0 * self._spindle.state / 12_000.0 + 2.0)
        for axis, target in zip(self._axes, self._path(phase), strict=True):
            axis.step(dt, target)

    def _path(self, phase: float) -> tuple[float, float, float]:
        if self.alarm:
            # A feed hold: the axes stop where they are.
            return (self._axes[0].state, self._axes[1].state, self._axes[2].state)
        if not self.running:
            return HOME
        angle = 2.0 * math.pi * phase
        return (
            250.0 + 120.0 * math.cos(angle),
            150.0 + 80.0 * math.sin(2.0 * angle),
            -5.0 - 12.5 * (1.0 - math.cos(len(self.program.tools) * angle)),
        )

    def _on_transition(self, before: MachineState, after: MachineState) -> None:
        if after is MachineState.RUNNING:
            # A new batch: the next program, and the operator may touch the feed override.
            self.program = self._rng.choice(PROGRAMS)
            self.feed_override = self._rng.choice(FEED_OVERRIDES)
            self.stopped = False
            self._parts.phase = 0.0
            self.cycle_started = self.clock
        elif after is MachineState.FAULT:
            self.alarm_code = self._rng.choice(ALARM_CODES)
        if before is MachineState.FAULT:
            self.alarm_code = 0
            self.stopped = True


PACKER_DWELL = {
    MachineState.IDLE: (5.0, 15.0),
    MachineState.RUNNING: (40.0, 120.0),
    MachineState.FAULT: (5.0, 10.0),
}
REJECT_RATIO = 0.02  # share of packs the checkweigher throws out
BATCH_SIZE = 500  # packs per batch; the batch id changes after each


class Packer:
    """A packaging line: packs per minute, a pack counter, rejects, the sealing jaw."""

    def __init__(self, seed: int | str | None = None, tick: float = 0.1) -> None:
        rng = self._rng = random.Random(seed)
        self.tick = tick
        self.speed_setpoint = 120.0  # packs/min
        self.machine = StateMachine(rng, dwell=PACKER_DWELL, fault_probability=0.1)
        self._speed = FirstOrderLag(self.speed_setpoint, tau=3.0, noise=0.5, rng=rng)
        self._seal = FirstOrderLag(rng.uniform(160.0, 170.0), tau=60.0, noise=0.3, rng=rng)
        self._packs = Counter(start=rng.randrange(100_000, 1_000_000))
        self.rejects = math.floor(self._packs.count * REJECT_RATIO)
        self.clock: float | None = None

    @property
    def running(self) -> bool:
        return self.machine.state is MachineState.RUNNING

    @property
    def speed(self) -> float:
        return max(0.0, self._speed.value) if self._speed.state > 0.5 else 0.0

    @property
    def count(self) -> int:
        return self._packs.count

    @property
    def seal_temperature(self) -> float:
        return self._seal.value

    @property
    def batch(self) -> str:
        return f"B{self._packs.count // BATCH_SIZE:06d}"

    def advance(self, now: float) -> None:
        """Bring the model up to `now` (monotonic seconds) in steps of at most `tick`."""
        if self.clock is None:
            self.clock = now
            return
        gap = now - self.clock
        if gap <= 0:
            return
        steps = min(math.ceil(gap / self.tick), 10_000)
        for _ in range(steps):
            self.step(gap / steps)
        self.clock = now

    def step(self, dt: float) -> None:
        self.machine.step(dt)
        self._speed.step(dt, self.speed_setpoint if self.running else 0.0)
        for _ in range(self._packs.step(dt, self.speed / 60.0)):
            if self._rng.random() < REJECT_RATIO:
                self.rejects = (self.rejects + 1) % 2**32
        # The jaw heaters hold temperature between batches; a fault trips them.
        heating = self.machine.state is not MachineState.FAULT
        self._seal.step(dt, 165.0 if heating else AMBIENT)


# --- the node map ----------------------------------------------------------------------------


class Plant:
    """The machines one simulator serves, advanced together."""

    def __init__(self, seed: str | None, tick: float, wall_offset: float) -> None:
        self.cnc = Cnc(None if seed is None else f"{seed}/CNC1", tick)
        self.packer = Packer(None if seed is None else f"{seed}/Packer1", tick)
        self.wall_offset = wall_offset  # time.time() - time.monotonic() when the plant was made

    def advance(self, now: float) -> None:
        self.cnc.advance(now)
        self.packer.advance(now)

    def timestamp(self, monotonic: float) -> datetime:
        """A model time as the wall-clock time it happened at."""
        return datetime.fromtimestamp(monotonic + self.wall_offset, UTC)


@dataclass(frozen=True, slots=True)
class Unit:
    """An engineering unit: the UNECE common code OPC UA encodes into EUInformation.UnitId
    (Part 8, 5.6.3), and the UCUM symbol we put in its DisplayName, which the gateway uses."""

    code: str
    symbol: str
    description: str

    @property
    def unit_id(self) -> int:
        unit_id = 0
        for char in self.code:
            unit_id = unit_id << 8 | ord(char)
        return unit_id


CELSIUS = Unit("CEL", "Cel", "degree Celsius")
PERCENT = Unit("P1", "%", "percent")
MILLIMETRE = Unit("MMT", "mm", "millimetre")
RPM = Unit("RPM", "1/min", "revolutions per minute")
PACKS_PER_MINUTE = Unit("C94", "{pack}/min", "packs per minute")  # UNECE has only "per minute"
SECOND = Unit("SEC", "s", "second")


@dataclass(frozen=True, slots=True)
class Var:
    """One variable node. `name` is its browse path below Objects/Machines, dotted, and its
    string node id unless `ident` gives a numeric or GUID one."""

    name: str
    vtype: ua.VariantType
    read: Callable[[Plant], object]
    description: str
    unit: Unit | None = None
    eu_range: tuple[float, float] | None = None  # with a unit: an AnalogItemType
    ident: int | uuid.UUID | None = None
    array: bool = False

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))


V = ua.VariantType
BATCH_GUID = uuid.UUID("6c3a5f1e-2b7d-4e0a-9a51-3f1d2c4b5a60")
CNC_RESET = "CNC1.ResetCounter"  # the method's string node id

# One node per line reads as the table it is; the formatter would spread most over six lines.
# fmt: off
VARIABLES = (
    Var("CNC1.State", V.String, lambda p: p.cnc.state, "Idle, Running, Stopped or Alarm"),
    Var("CNC1.Alarm", V.Boolean, lambda p: p.cnc.alarm, "An alarm is active"),
    Var("CNC1.AlarmCode", V.UInt16, lambda p: p.cnc.alarm_code, "Active alarm number, 0 if none"),
    Var("CNC1.PartCount", V.UInt32, lambda p: p.cnc.part_count, "Parts made; ResetCounter zeroes it"),
    Var("CNC1.Temperature", V.Double, lambda p: p.cnc.temperature, "Spindle bearing temperature",
        CELSIUS, (0.0, 100.0)),
    Var("CNC1.FeedOverride", V.Int16, lambda p: p.cnc.feed_override, "Feed override",
        PERCENT, (0.0, 150.0)),
    Var("CNC1.CycleStart", V.DateTime, lambda p: p.timestamp(p.cnc.cycle_started),
        "When the current part was started"),
    Var("CNC1.OperatingSeconds", V.Int64, lambda p: p.cnc.operating_seconds, "Power-on time", SECOND),
    Var("CNC1.ToolNumber", V.Byte, lambda p: p.cnc.tool, "Tool in the spindle"),
    Var("CNC1.Spindle.Speed", V.Double, lambda p: p.cnc.spindle_speed, "Spindle speed",
        RPM, (0.0, 24_000.0)),
    Var("CNC1.Spindle.Load", V.Float, lambda p: p.cnc.spindle_load, "Spindle load",
        PERCENT, (0.0, 150.0)),
    Var("CNC1.Spindle.Direction", V.SByte, lambda p: p.cnc.spindle_direction,
        "1 clockwise, -1 counter-clockwise, 0 stopped"),
    Var("CNC1.Spindle.Revolutions", V.UInt64, lambda p: p.cnc.revolutions, "Spindle revolutions, total"),
    Var("CNC1.Axis.X.Position", V.Double, lambda p: p.cnc.positions[0], "X axis position",
        MILLIMETRE, (0.0, 600.0)),
    Var("CNC1.Axis.Y.Position", V.Double, lambda p: p.cnc.positions[1], "Y axis position",
        MILLIMETRE, (0.0, 400.0)),
    Var("CNC1.Axis.Z.Position", V.Double, lambda p: p.cnc.positions[2], "Z axis position",
        MILLIMETRE, (-100.0, 400.0)),
    Var("CNC1.Axis.Positions", V.Double, lambda p: p.cnc.positions, "X, Y, Z positions",
        MILLIMETRE, array=True),
    Var("CNC1.Program.Name", V.String, lambda p: p.cnc.program.name, "Part program running"),
    Var("CNC1.Program.Block", V.Int32, lambda p: p.cnc.block, "NC block being executed"),
    Var("CNC1.Program.Checksum", V.ByteString,
        lambda p: hashlib.sha256(p.cnc.program.name.encode()).digest(), "SHA-256 of the program"),
    # A LocalizedText: a type the collector does not map, for its "unsupported type" path.
    Var("CNC1.Program.Description", V.LocalizedText,
        lambda p: ua.LocalizedText(p.cnc.program.description, "en"), "What the program makes"),
    Var("Packer1.Speed", V.Double, lambda p: p.packer.speed, "Line speed",
        PACKS_PER_MINUTE, (0.0, 200.0)),
    Var("Packer1.Count", V.UInt32, lambda p: p.packer.count, "Packs made", ident=5001),
    Var("Packer1.Running", V.Boolean, lambda p: p.packer.running, "The line is running"),
    Var("Packer1.RejectCount", V.UInt32, lambda p: p.packer.rejects, "Packs rejected", ident=5002),
    Var("Packer1.SealTemperature", V.Double, lambda p: p.packer.seal_temperature, "Sealing jaw",
        CELSIUS, (0.0, 250.0)),
    Var("Packer1.BatchId", V.String, lambda p: p.packer.batch, "Batch being packed", ident=BATCH_GUID),
)
# fmt: on
