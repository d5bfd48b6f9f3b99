"""The signal models and the press model: pure, seeded, time passed in."""

import random
import time

import pytest

from simulators.signals import (
    AlarmFlag,
    Counter,
    FirstOrderLag,
    MachineState,
    Press,
    Sawtooth,
    StateMachine,
    stroke_pressure,
)

IDLE, RUNNING, FAULT = MachineState.IDLE, MachineState.RUNNING, MachineState.FAULT


# --- FirstOrderLag -------------------------------------------------------------------------


def test_lag_settles_at_target():
    lag = FirstOrderLag(22.0, tau=10.0)
    for _ in range(500):  # 50 s = 5 tau
        lag.step(0.1, 65.0)
    assert lag.value == pytest.approx(65.0, abs=0.5)
    assert lag.value < 65.0  # approaches from below, never overshoots


def test_lag_one_long_step_equals_many_short_ones():
    coarse, fine = FirstOrderLag(22.0, tau=30.0), FirstOrderLag(22.0, tau=30.0)
    coarse.step(10.0, 65.0)
    for _ in range(100):
        fine.step(0.1, 65.0)
    assert coarse.value == pytest.approx(fine.value, rel=1e-9)


def test_lag_noise_is_bounded_and_present():
    lag = FirstOrderLag(50.0, tau=1e9, noise=0.2, rng=random.Random(1))
    samples = [lag.step(0.1, 50.0) - lag.state for _ in range(2000)]
    assert max(abs(s) for s in samples) <= 0.2 + 1e-9  # float rounding of state + noise
    assert len(set(samples)) > 1000  # really noisy, not a constant offset
    assert min(samples) < -0.1
    assert max(samples) > 0.1


def test_lag_is_reproducible_with_a_seed():
    a = FirstOrderLag(50.0, tau=5.0, noise=0.2, rng=random.Random(7))
    b = FirstOrderLag(50.0, tau=5.0, noise=0.2, rng=random.Random(7))
    assert [a.step(0.1, 60.0) for _ in range(50)] == [b.step(0.1, 60.0) for _ in range(50)]


def test_lag_rejects_non_positive_tau():
    with pytest.raises(ValueError, match="tau"):
        FirstOrderLag(0.0, tau=0.0)


# --- Sawtooth ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "offset", "t", "expected"),
    [
        (0.0, 100.0, 0.0, 0.0, 0.0),
        (0.0, 100.0, 0.0, 5.0, 50.0),
        (0.0, 100.0, 0.0, 10.0, 0.0),  # jumps back at the end of the period
        (0.0, 100.0, 0.0, 12.5, 25.0),
        (100.0, 0.0, 0.0, 2.5, 75.0),  # falling ramp
        (0.0, 100.0, 2.5, 0.0, 25.0),
    ],
)
def test_sawtooth(start, end, offset, t, expected):
    assert Sawtooth(10.0, start, end, offset).value(t) == pytest.approx(expected)


# --- Counter -------------------------------------------------------------------------------


def test_counter_counts_whole_events_and_keeps_the_phase():
    counter = Counter(start=100)
    completed = sum(counter.step(0.1, 0.5) for _ in range(25))  # 2.5 s at 0.5/s = 1.25 events
    assert completed == 1
    assert counter.count == 101
    assert counter.phase == pytest.approx(0.25)


def test_counter_stands_still_at_zero_or_negative_rate():
    counter = Counter(start=5)
    assert counter.step(10.0, 0.0) == 0
    assert counter.step(10.0, -3.0) == 0
    assert (counter.count, counter.phase) == (5, 0.0)


def test_counter_wraps_like_a_uint32():
    counter = Counter(start=2**32 - 2)
    assert counter.step(3.0, 1.0) == 3
    assert counter.count == 1


# --- StateMachine --------------------------------------------------------------------------

FIXED = {IDLE: (2.0, 2.0), RUNNING: (5.0, 5.0), FAULT: (3.0, 3.0)}


def test_state_machine_cycles_with_its_dwell_times():
    machine = StateMachine(random.Random(1), initial=RUNNING, dwell=FIXED, fault_probability=0.0)
    seen = [machine.step(1.0) for _ in range(14)]
    assert seen == [RUNNING] * 4 + [IDLE] * 2 + [RUNNING] * 5 + [IDLE] * 2 + [RUNNING]


def test_state_machine_faults_then_clears_to_idle():
    machine = StateMachine(random.Random(1), initial=RUNNING, dwell=FIXED, fault_probability=1.0)
    assert machine.step(5.0) is FAULT
    assert machine.step(2.5) is FAULT
    assert machine.step(0.5) is IDLE


def test_state_machine_takes_several_transitions_in_one_long_step():
    machine = StateMachine(random.Random(1), initial=RUNNING, dwell=FIXED, fault_probability=0.0)
    assert machine.step(5.0 + 2.0 + 1.0) is RUNNING
    assert machine.remaining == pytest.approx(4.0)


def test_state_machine_waits_for_permission_to_start():
    machine = StateMachine(random.Random(1), initial=IDLE, dwell=FIXED)
    assert machine.step(10.0, can_start=False) is IDLE
    assert machine.step(0.1, can_start=True) is RUNNING


def test_state_machine_fault_rate_follows_probability():
    machine = StateMachine(random.Random(3), dwell=FIXED, fault_probability=0.3)
    exits = []  # the state entered each time a run ends
    for _ in range(20_000):
        before = machine.state
        after = machine.step(1.0)
        if before is RUNNING and after is not RUNNING:
            exits.append(after)
    assert len(exits) > 1000
    assert exits.count(FAULT) / len(exits) == pytest.approx(0.3, abs=0.05)


def test_state_machine_rejects_zero_dwell():
    with pytest.raises(ValueError, match="dwell"):
        StateMachine(random.Random(1), dwell={IDLE: (0.0, 0.0), RUNNING: (1.0, 1.0), FAULT: (1.0, 1.0)})


def test_force_draws_a_new_dwell():
    machine = StateMachine(random.Random(1), initial=RUNNING, dwell=FIXED)
    machine.step(4.5)
    machine.force(IDLE)
    assert (machine.state, machine.remaining) == (IDLE, 2.0)


# --- AlarmFlag -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("set_at", "clear_at", "inputs", "expected"),
    [
        # high alarm: set at 75, cleared only below 70
        (75.0, 70.0, [60, 74.9, 75, 72, 70.1, 70, 74], [False, False, True, True, True, False, False]),
        # low alarm: set at 15, cleared only above 20
        (15.0, 20.0, [50, 15.1, 15, 18, 19.9, 20, 16], [False, False, True, True, True, False, False]),
    ],
)
def test_alarm_flag_hysteresis(set_at, clear_at, inputs, expected):
    flag = AlarmFlag(set_at, clear_at)
    assert [flag.update(x) for x in inputs] == expected


def test_alarm_flag_needs_a_gap():
    with pytest.raises(ValueError, match="hysteresis"):
        AlarmFlag(10.0, 10.0)


# --- stroke_pressure -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "expected"),
    [(0.0, 0.0), (0.29, 0.0), (0.3, 0.0), (0.4, 106.066), (0.5, 150.0), (0.7, 0.0), (0.9, 0.0)],
)
def test_stroke_pressure(phase, expected):
    assert stroke_pressure(phase, 150.0) == pytest.approx(expected, abs=1e-3)


# --- Press ---------------------------------------------------------------------------------


def run(press: Press, seconds: float, start: float = 0.0) -> float:
    """Advance in 0.1 s requests, as a poller would; return the end time."""
    t = start
    press.advance(t)
    for _ in range(round(seconds * 10)):
        t += 0.1
        press.advance(t)
    return t


def snapshot(press: Press) -> tuple[object, ...]:
    return (press.temperature, press.strokes, press.good_parts, press.energy_wh, press.pressure)


def test_press_is_reproducible_with_a_seed():
    a, b = Press(seed="x/1"), Press(seed="x/1")
    run(a, 10.0)
    run(b, 10.0)
    assert snapshot(a) == snapshot(b)
    c = Press(seed="x/2")
    run(c, 10.0)
    assert snapshot(c) != snapshot(a)


def test_press_starts_running_and_counts_strokes_at_the_setpoint():
    press = Press(seed=1)
    press.speed_setpoint = 60  # one stroke per second
    strokes, good, energy = press.strokes, press.good_parts, press.energy_wh
    run(press, 10.0)
    assert press.running
    assert press.strokes - strokes in (9, 10, 11)
    assert 0 < press.good_parts - good <= press.strokes - strokes
    assert press.energy_wh > energy
    assert 20.0 <= press.temperature <= 80.0


def test_stopped_press_counts_nothing_and_cools_toward_ambient():
    press = Press(seed=1)
    press.running = False
    strokes = press.strokes
    press.advance(0.0)
    press.advance(3.0)  # shorter than the shortest idle dwell (5 s)
    assert not press.running
    assert press.strokes == strokes
    assert press.pressure < 2.0
    press.advance(3600.0)  # an hour later, whatever happened, it ends up in a plausible range
    assert 20.0 <= press.temperature <= 80.0


def test_press_temperature_follows_running_and_idle_targets():
    hot, cold = Press(seed=2), Press(seed=2)
    cold.running = False
    cold.door_open = True  # holds it idle: the interlock blocks the automatic restart
    run(hot, 20.0)
    run(cold, 20.0)
    assert hot.temperature > cold.temperature
    cold.advance(20.0 + 3600.0)
    assert cold.temperature == pytest.approx(22.0, abs=0.3)


def test_pressure_pulses_during_strokes():
    press = Press(seed=3)
    press.speed_setpoint = 60
    t = 0.0
    press.advance(t)
    samples = []
    for _ in range(40):  # 2 s in 50 ms steps: two full strokes
        t += 0.05
        press.advance(t)
        samples.append(press.pressure)
    assert max(samples) > 120.0
    assert min(samples) < 2.0


def test_door_interlock_stops_and_blocks_the_press():
    press = Press(seed=4)
    press.advance(0.0)
    press.door_open = True
    press.advance(0.1)
    assert not press.running
    press.running = True  # start command refused while the guard is open
    assert not press.running
    press.door_open = False
    press.running = True
    assert press.running


def test_fault_opens_the_door_and_reset_closes_it():
    press = Press(seed=5)
    press.fault = True
    assert (press.fault, press.running, press.door_open) == (True, False, True)
    assert press.status_word & 0b111 == 0b110
    press.running = True  # refused until the fault is reset
    assert not press.running
    press.fault = False
    assert (press.fault, press.door_open) == (False, False)
    assert press.motor_current >= 0.0


def test_status_word_bits():
    press = Press(seed=6)
    assert press.status_word & 0b1 == 1
    press.estop_ok = False
    press.advance(0.0)
    press.advance(0.1)
    assert press.status_word & 0b10001 == 0b10000  # stopped, e-stop bit set


def test_a_long_gap_is_cheap_to_catch_up():
    press = Press(seed=7)
    press.advance(0.0)
    began = time.perf_counter()
    press.advance(7 * 24 * 3600.0)  # a week without a request
    assert time.perf_counter() - began < 5.0  # generous: it is capped at 10,000 steps
    assert 20.0 <= press.temperature <= 80.0
