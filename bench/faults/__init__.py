"""Fault scenarios for the README's "Reliability" datasheet (``python -m bench.datasheet``).

Each scenario is a module of this package, listed in :data:`SCENARIOS` (the datasheet's row
order), with two names:

* ``TITLE``: the row's first column, e.g. ``"Postgres restarted (fast) under load"``;
* ``run(env: Env) -> list[Finding]``: break something on purpose, against pgproxy and, where
  the scenario can run there, PgBouncer 1.18 side by side in the same run; one
  :class:`~bench.faults.env.Finding` per row (a scenario may give several, e.g. one per
  restart mode).

:class:`~bench.faults.env.Env` gives the scenario a throwaway cluster, a scratch directory,
``env.quick`` (a smaller run for the smoke test) and ``env.pgproxy(...)`` /
``env.pgbouncer(...)``, which start a pooler with the given settings and stop it when the
scenario returns. Progress goes to stderr; nothing may be left running.
"""

from __future__ import annotations

# The datasheet's rows, in order: module names in this package.
SCENARIOS = ["restart", "storm", "blackhole", "hostile", "listener", "slow_consumer", "soak"]
