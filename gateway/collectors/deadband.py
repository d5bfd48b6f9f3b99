"""Report by exception, the same for every protocol: a reading is passed on when it says
something the last reported reading of its tag did not."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.model import Reading, Value


class Deadband:
    """Report by exception: remembers what was last reported per tag, and filters on it.

    A reading is reported when its tag has no deadband (every poll), when its quality or
    status changed, when a number moved by more than the deadband since the last
    *reported* value (so slow drift is reported once it adds up), or when a bool or
    string changed at all.
    """

    __slots__ = ("_bands", "_last")

    def __init__(self, bands: Mapping[str, float | None]) -> None:
        self._bands = dict(bands)
        self._last: dict[str, Reading] = {}

    def admit(self, reading: Reading) -> bool:
        """Whether to report `reading`; if so it becomes the tag's last reported reading."""
        last = self._last.get(reading.tag)
        band = self._bands.get(reading.tag)
        if (
            last is None
            or band is None
            or last.quality is not reading.quality
            or last.status != reading.status
            or _moved(last.value, reading.value, band)
        ):
            self._last[reading.tag] = reading
            return True
        return False

    def admit_state(self, reading: Reading) -> bool:
        """Like `admit`, but only a change of quality or status counts (for Bad readings)."""
        last = self._last.get(reading.tag)
        if last is None or last.quality is not reading.quality or last.status != reading.status:
            self._last[reading.tag] = reading
            return True
        return False


def _moved(old: Value, new: Value, band: float) -> bool:
    # bool is an int to Python, but True - False "moving by 1" is not what a deadband means.
    if (
        isinstance(old, int | float)
        and isinstance(new, int | float)
        and not isinstance(old, bool)
        and not isinstance(new, bool)
    ):
        return abs(new - old) > band
    return new != old
