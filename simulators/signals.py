"""Small signal models that move like plant signals, and the stamping press built from them.

Every model is pure: time (or elapsed time) is passed in, randomness comes from a
`random.Random` the caller owns. Given the same seed and the same sequence of calls, a
model produces the same values, so simulators are reproducible and the models are easy
to test.

`Press` knows nothing of Modbus: the register map lives in `simulators.modbus`, so another
protocol's simulator can serve the same machine.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping


class FirstOrderLag:
    """A first-order lag (PT1) toward a target, plus bounded gaussian measurement noise.

    Thermal masses (a die, an oil tank) and motor currents settle like this. The update uses
    the exact solution `x += (target - x) * (1 - exp(-dt / tau))`, so it is stable for any
    `dt`, and a long gap between updates gives the same state as many small steps.
    """

    def __init__(
        self, initial: float, tau: float, noise: float = 0.0, rng: random.Random | None = None
    ) -> None:
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.state = initial
        self.tau = tau
        self.noise = noise
        self._rng = rng or random.Random()
        self._sample = 0.0

    def step(self, dt: float, target: float) -> float:
        """Move toward `target` for `dt` seconds; return the new measured value."""
        self.state += (target - self.state) * (1.0 - math.exp(-dt / self.tau))
        if self.noise:
            # sigma = noise/2, clipped: the noise is gaussian but never leaves +-noise, so
            # documented ranges ("65 +- 0.2") hold for every sample.
            self._sample = max(-self.noise, min(self.noise, self._rng.gauss(0.0, self.noise / 2)))
        return self.value

    @property
    def value(self) -> float:
        """The measured value: the state plus the noise drawn at the last step."""
        return self.state + self._sample


class Sawtooth:
    """A ramp from `start` to `end` over `period`, then a jump back to `start`.

    `start > end` gives a falling ramp (a tank that drains, then is refilled).
    """

    def __init__(self, period: float, start: float, end: float, offset: float = 0.0) -> None:
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period}")
        self.period = period
        self.start = start
        self.end = end
        self.offset = offset

    def value(self, t: float) -> float:
        frac = ((t + self.offset) % self.period) / self.period
        return self.start + (self.end - self.start) * frac


class Counter:
    """Counts whole events that happen at a rate; the fraction toward the next is `phase`.

    A stroke counter: at 30 strokes/min it completes one event every 2 s, and `phase` says
    where in the stroke the ram is. The count wraps at `modulus`, as a uint32 PLC counter does.
    """

    def __init__(self, start: int = 0, modulus: int = 2**32) -> None:
        self.count = start % modulus
        self.modulus = modulus
        self.phase = 0.0

    def step(self, dt: float, rate: float) -> int:
        """Advance `dt` seconds at `rate` events per second; return how many events completed."""
        progress = self.phase + max(rate, 0.0) * dt
        completed = math.floor(progress)
        self.phase = progress - completed
        self.count = (self.count + completed) % self.modulus
        return completed


class MachineState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    FAULT = "fault"


# Dwell times (min, max) in seconds; a new dwell is drawn uniformly on every transition.
DEFAULT_DWELL: Mapping[MachineState, tuple[float, float]] = {
    MachineState.IDLE: (5.0, 20.0),
    MachineState.RUNNING: (30.0, 120.0),
    MachineState.FAULT: (5.0, 15.0),
}


class StateMachine:
    """idle -> running -> idle, and now and then running -> fault -> idle, with random dwells.

    After a running dwell the machine faults with `fault_probability`, otherwise it goes
    idle (end of batch). A fault clears to idle. Starting is allowed only when the caller
    says so (`can_start`), as an interlock would.
    """

    def __init__(
        self,
        rng: random.Random,
        initial: MachineState = MachineState.RUNNING,
        dwell: Mapping[MachineState, tuple[float, float]] = DEFAULT_DWELL,
        fault_probability: float = 0.15,
    ) -> None:
        if any(low <= 0 or high < low for low, high in dwell.values()):
            # A zero dwell would let step() spin through transitions forever.
            raise ValueError(f"dwell ranges must satisfy 0 < min <= max, got {dict(dwell)}")
        self._rng = rng
        self.dwell = dwell
        self.fault_probability = fault_probability
        self.state = initial
        self.remaining = self._draw(initial)

    def _draw(self, state: MachineState) -> float:
        low, high = self.dwell[state]
        return self._rng.uniform(low, high)

    def force(self, state: MachineState) -> None:
        """Enter `state` now (an operator command), with a fresh dwell."""
        self.state = state
        self.remaining = self._draw(state)

    def step(self, dt: float, can_start: bool = True) -> MachineState:
        """Spend `dt` seconds; several transitions may happen in one long step."""
        while dt >= self.remaining:
            if self.state is MachineState.IDLE and not can_start:
                # Blocked start: stay idle and try again at the next step.
                self.remaining = 0.0
                return self.state
            dt -= self.remaining
            self.force(self._next())
        self.remaining -= dt
        return self.state

    def _next(self) -> MachineState:
        if self.state is MachineState.RUNNING:
            return MachineState.FAULT if self._rng.random() < self.fault_probability else MachineState.IDLE
        if self.state is MachineState.FAULT:
            return MachineState.IDLE
        return MachineState.RUNNING


class AlarmFlag:
    """An alarm with hysteresis, so a noisy signal near the limit does not chatter.

    `set_at > clear_at` is a high alarm (active from `x >= set_at` until `x <= clear_at`);
    `set_at < clear_at` is a low alarm (active from `x <= set_at` until `x >= clear_at`).
    """

    def __init__(self, set_at: float, clear_at: float) -> None:
        if set_at == clear_at:
            raise ValueError("set_at and clear_at must differ (the gap is the hysteresis)")
        self.set_at = set_at
        self.clear_at = clear_at
        self.active = False

    def update(self, x: float) -> bool:
        high = self.set_at > self.clear_at
        if self.active:
            self.active = not (x <= self.clear_at if high else x >= self.clear_at)
        else:
            self.active = x >= self.set_at if high else x <= self.set_at
        return self.active


def stroke_pressure(phase: float, peak: float) -> float:
    """Hydraulic pressure over one stroke: a half-sine pulse while the die closes.

    The ram is in contact for 40 % of the cycle (phase 0.3 to 0.7); the rest of the
    cycle is the approach and return with no load.
    """
    if 0.3 <= phase <= 0.7:
        return peak * math.sin(math.pi * (phase - 0.3) / 0.4)
    return 0.0


# --- the stamping press ---------------------------------------------------------------------

AMBIENT = 22.0
GOOD_RATIO = 0.985  # share of strokes that give a good part
LUBE_PERIOD = 200  # strokes between two runs of the central lubrication pump


class Press:
    """One stamping press. Call `advance(now)` with a monotonic time; everything else follows.

    Setting `running` or `fault` is an operator command (or a test forcing state); the
    state machine then carries on from there with its random dwell times.
    """

    def __init__(self, seed: int | str | None = None, tick: float = 0.1) -> None:
        rng = self._rng = random.Random(seed)
        self.tick = tick
        self.speed_setpoint = 30
        self.program = "PART-4711"
        self.door_open = False
        self.estop_ok = True
        self.machine = StateMachine(rng)
        self._die = FirstOrderLag(rng.uniform(45.0, 55.0), tau=120.0, noise=0.2, rng=rng)
        self._oil = FirstOrderLag(rng.uniform(36.0, 42.0), tau=300.0, noise=0.1, rng=rng)
        self._current = FirstOrderLag(self._current_target(), tau=0.5, noise=0.1, rng=rng)
        self._strokes = Counter(start=rng.randrange(10_000, 1_000_000))
        self.good_parts = math.floor(self._strokes.count * GOOD_RATIO)
        self.energy_wh = rng.uniform(1e5, 1e6)
        self.cycle_time_ms = 60_000 // self.speed_setpoint
        self.pressure = 0.0  # bar
        self._peak = 150.0
        self._lube = Sawtooth(LUBE_PERIOD, start=100.0, end=0.0, offset=rng.uniform(0, LUBE_PERIOD / 2))
        self._lube_low = AlarmFlag(set_at=15.0, clear_at=20.0)
        self._clock: float | None = None

    @property
    def running(self) -> bool:
        return self.machine.state is MachineState.RUNNING

    @running.setter
    def running(self, run: bool) -> None:
        # A start is refused while faulted or interlocked, as the press PLC would.
        if run and self.machine.state is MachineState.IDLE and self._can_start():
            self._enter(MachineState.RUNNING)
        elif not run and self.running:
            self._enter(MachineState.IDLE)

    @property
    def fault(self) -> bool:
        return self.machine.state is MachineState.FAULT

    @fault.setter
    def fault(self, faulted: bool) -> None:
        if faulted != self.fault:
            self._enter(MachineState.FAULT if faulted else MachineState.IDLE)

    @property
    def temperature(self) -> float:
        return self._die.value

    @property
    def oil_temperature(self) -> float:
        return self._oil.value

    @property
    def motor_current(self) -> float:
        return max(0.0, self._current.value)

    @property
    def strokes(self) -> int:
        return self._strokes.count

    @property
    def lube_level(self) -> float:
        return self._lube.value(self._strokes.count)

    @property
    def lubrication_low(self) -> bool:
        return self._lube_low.active

    @property
    def status_word(self) -> int:
        bits = (self.running, self.fault, self.door_open, self.lubrication_low, not self.estop_ok)
        return sum(1 << i for i, bit in enumerate(bits) if bit)

    def advance(self, now: float) -> None:
        """Bring the model up to `now` (seconds, monotonic) in steps of at most `tick`."""
        if self._clock is None:
            self._clock = now
            return
        gap = now - self._clock
        if gap <= 0:
            return
        # After a long silence, take coarser steps so one request stays fast; every model
        # is exact for any dt, only the pressure snapshot and interlocks get coarser.
        steps = min(math.ceil(gap / self.tick), 10_000)
        for _ in range(steps):
            self.step(gap / steps)
        self._clock = now

    def step(self, dt: float) -> None:
        if self.running and not self._can_start():
            self._enter(MachineState.IDLE)  # guard interlock: opening the door stops the ram
        before = self.machine.state
        state = self.machine.step(dt, can_start=self._can_start())
        if state is not before:
            self._on_transition(before, state)
        rate = self.speed_setpoint / 60.0 if self.running else 0.0
        for _ in range(self._strokes.step(dt, rate)):
            self._on_stroke()
        self._die.step(dt, 65.0 if self.running else AMBIENT)
        self._oil.step(dt, 45.0 if self.running else AMBIENT)
        self._current.step(dt, self._current_target())
        # Three-phase 400 V at power factor 0.85, plus 300 W for controls and hydraulics.
        power_w = 400.0 * math.sqrt(3) * self.motor_current * 0.85 + 300.0
        self.energy_wh += power_w * dt / 3600.0
        pulse = stroke_pressure(self._strokes.phase, self._peak) if self.running else 0.0
        self.pressure = max(0.0, pulse + self._rng.gauss(0.0, 0.3))
        self._lube_low.update(self.lube_level)

    def _can_start(self) -> bool:
        return self.estop_ok and not self.door_open

    def _current_target(self) -> float:
        # The flywheel keeps turning when idle; a fault trips the main motor.
        if self.running:
            return 6.0 + 0.08 * self.speed_setpoint
        return 0.0 if self.fault else 2.5

    def _enter(self, state: MachineState) -> None:
        before = self.machine.state
        self.machine.force(state)
        self._on_transition(before, state)

    def _on_transition(self, before: MachineState, after: MachineState) -> None:
        # The operator opens the guard to clear a jam and closes it once cleared.
        if after is MachineState.FAULT:
            self.door_open = True
        elif before is MachineState.FAULT:
            self.door_open = False

    def _on_stroke(self) -> None:
        if self._rng.random() < GOOD_RATIO:
            self.good_parts = (self.good_parts + 1) % 2**32
        self.cycle_time_ms = round(60_000 / self.speed_setpoint * self._rng.uniform(0.99, 1.01))
        self._peak = self._rng.uniform(140.0, 160.0)
