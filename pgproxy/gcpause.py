"""The cyclic GC's full collections held off while a login storm is being paced.

A full collection walks every tracked object: with thousands of clients connected, tens of
milliseconds in one turn, which an established client's query waits out. In a storm the
number of long-lived objects grows fast, and Python starts a full collection each time it has
grown by a quarter, so several ran during every storm and were the steady client's worst
latencies. While logins wait for their turn (``pgproxy.pacing``) the threshold of the oldest
generation is raised out of reach; when the storm is over it is put back and the next full
collection runs in the usual way. Young collections go on meanwhile (they are short), and the
hold never lasts longer than :data:`LONGEST_HOLD` seconds, so cyclic garbage cannot pile up
under logins that never stop.

Rule: :func:`hold` and :func:`release` come in pairs (a count: several event loops may share
the process, as in the tests); nothing else changes the GC's thresholds after start-up.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Final

LONGEST_HOLD: Final = 30.0  # seconds
_OUT_OF_REACH: Final = 1 << 30

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None
_since = 0.0


def hold() -> None:
    """A storm began: no full collection until every holder has released."""
    global _holders, _saved, _since
    with _lock:
        _holders += 1
        if _holders == 1:
            young, middle, old = gc.get_threshold()
            _saved, _since = (young, middle, old), time.monotonic()
            gc.set_threshold(young, middle, _OUT_OF_REACH)


def release() -> None:
    """A storm is over (or has been held long enough): full collections as before."""
    global _holders, _saved
    with _lock:
        _holders -= 1
        if _holders == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None


def overdue() -> bool:
    """The hold has lasted :data:`LONGEST_HOLD`: its holders should release and hold anew."""
    return _saved is not None and time.monotonic() - _since > LONGEST_HOLD
