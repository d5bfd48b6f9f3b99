"""When the forward loop gives up on a reading the broker keeps dropping the connection on,
and when it must not: a network that fails, a broker that restarts, a connection that never
carried anything say nothing about the reading."""

from __future__ import annotations

from gateway.app import POISON_STRIKES, _Suspect
from gateway.errors import BrokerUnavailable
from gateway.model import Batch, Entry, Quality, Reading


def batch(*seqs: int) -> Batch:
    return Batch([Entry(s, Reading("press-1", f"t{s}", s, Quality.GOOD, 0, None, 1.0)) for s in seqs])


def lost(unconfirmed: int | None, *, blames: bool = True, settled: int = 0) -> BrokerUnavailable:
    return BrokerUnavailable(
        "connection lost", settled=settled, unconfirmed=unconfirmed, blames_message=blames
    )


def test_three_losses_on_the_same_reading_the_last_two_alone_give_it_up() -> None:
    suspect = _Suspect()
    assert suspect.blame(batch(5, 6, 7), lost(0)) is None
    assert suspect.isolating  # next: seq 5 alone
    assert suspect.blame(batch(5), lost(0)) is None
    given_up = suspect.blame(batch(5), lost(0))
    assert given_up is not None
    assert given_up.seq == 5
    assert not suspect.isolating
    assert POISON_STRIKES == 3


def test_losses_that_say_nothing_about_the_reading_are_no_strikes() -> None:
    suspect = _Suspect()
    suspect.blame(batch(5, 6), lost(0))
    for _ in range(10):
        # A keepalive timeout, a server shutting down (0x8B), a connection that carried no
        # message before: Session.fail says blames_message=False.
        assert suspect.blame(batch(5), lost(0, blames=False)) is None
    assert suspect.strikes == 1


def test_a_loss_with_other_readings_in_flight_is_no_strike_after_the_first() -> None:
    suspect = _Suspect()
    suspect.blame(batch(5, 6), lost(0))
    for _ in range(10):  # (the loop leases one while isolating; were it more, it proves nothing)
        assert suspect.blame(batch(5, 6), lost(0)) is None
    assert suspect.strikes == 1


def test_progress_or_another_reading_starts_over() -> None:
    suspect = _Suspect()
    suspect.blame(batch(5, 6), lost(0))
    suspect.blame(batch(5), lost(0))
    assert suspect.blame(batch(5, 6), lost(None, settled=2)) is None  # it went through
    assert not suspect.isolating
    suspect.blame(batch(5, 6), lost(0))
    suspect.blame(batch(5), lost(0))
    assert suspect.blame(batch(9), lost(0)) is None  # another one (5 was evicted meanwhile)
    assert (suspect.seq, suspect.strikes) == (9, 1)
