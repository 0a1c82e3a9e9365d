"""One client connection, from its startup packet to its last byte (was ``frontend.py``).

Where things live:

* ``login.py``: startup, TLS, hba, authentication, pool choice, startup parameters (once).
* ``units.py``: who the client is and what each forwarded message does to the session in
  transaction mode; ``stream.py``: the read loop and the input state machine (``mode``),
  getting and losing a server; ``listening.py``: LISTEN without a server and notification
  delivery; ``session.py``: the session's life around them (hand-off, ReadyForQuery duties,
  drain, timers, teardown). One object, :class:`session.ClientSession`, by linear
  inheritance in that order.
* Owned objects, no I/O, tested with bytes alone: ``statements.py`` (prepared statements over
  servers' caches), ``pending.py`` (the open transaction's LISTEN/SET effects and savepoints),
  ``subscriptions.py`` (held notifications, NOTIFY attribution), ``settings.py`` (parameters
  and RESET corrections).
* ``host.py``: what the session needs from the proxy (``ProxyServices``), so nothing here
  imports ``pgproxy.app``.
"""
