"""The admin console: PgBouncer's ``SHOW`` commands (and ours) over the wire protocol.

A client that logs in to the virtual database ``pgbouncer`` (or ``pgproxy``) talks to a
:class:`~pgproxy.admin.console.Console` instead of a pool. The modules, bottom up:

* ``snapshot``: what the console shows, as JSON-serialisable data, and ``merge`` of several
  processes' snapshots (no pgproxy imports).
* ``periods``: the readings SHOW STATS' averages compare, taken once per ``stats_period``.
* ``capture``: a snapshot of this process, read from the live proxy (imported by app.py only).
* ``views``: the SHOW tables (columns, types, rows) computed from a snapshot.
* ``commands``: the command grammar, the dispatch table and who may run what.
* ``console``: the wire side, sans-IO: ``feed(bytes) -> bytes`` for the simple and the
  extended query protocol.

Rule: the live proxy is read in one place (``capture``); everything above it sees a snapshot,
so what one process shows and what several processes' merged snapshot shows come from the
same code.
"""
