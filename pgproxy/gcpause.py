"""The cyclic GC's full collections held off while a login storm is being paced.

A full collection walks every tracked object: with thousands of clients connected, tens of
milliseconds in one turn, which an established client's query waits out. In a storm the
number of long-lived objects grows fast, and Python starts a full collection each time it has
grown by a quarter, so several ran during every storm and were the steady client's worst
latencies. While logins wait for their turn, ``pgproxy.pacing`` calls :func:`hold` every turn;
the threshold of the oldest generation is then out of reach. Young collections go on (they are
short), and at each of them a GC callback puts the threshold back once no :func:`hold` came
for :data:`QUIET` seconds, or after :data:`LONGEST_HOLD` seconds of storm (then one full
collection may run before the next hold), so cyclic garbage cannot pile up.

Rule: a hold is a lease renewed by :func:`hold` and ended only by the callback, never by the
holder: a holder that stops (a closed event loop) cannot leave full collections off.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Final

QUIET: Final = 1.0  # seconds without a hold before full collections come back
LONGEST_HOLD: Final = 30.0  # seconds
_OUT_OF_REACH: Final = 1 << 30

_saved: tuple[int, int, int] | None = None  # the thresholds to put back
_since = 0.0  # when the hold began
_renewed = 0.0  # the latest hold()
_not_before = 0.0  # after an overdue hold: the next one waits, so a full collection can run
_watching = False


def hold() -> None:
    """Logins are waiting (called every turn while they do): no full collection for now."""
    global _saved, _since, _renewed, _watching
    now = time.monotonic()
    _renewed = now
    if _saved is not None or now < _not_before:
        return
    young, middle, old = gc.get_threshold()
    _saved, _since = (young, middle, old), now
    gc.set_threshold(young, middle, _OUT_OF_REACH)
    if not _watching:
        _watching = True
        gc.callbacks.append(_on_collection)


def holding() -> bool:
    return _saved is not None


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    global _saved, _not_before
    saved = _saved
    if phase != "start" or saved is None:
        return
    now = time.monotonic()
    overdue = now - _since > LONGEST_HOLD
    if overdue or now - _renewed > QUIET:
        _saved = None
        gc.set_threshold(*saved)
        if overdue:
            _not_before = now + QUIET
