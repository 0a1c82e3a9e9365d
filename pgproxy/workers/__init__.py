"""``workers = N``: proxy processes sharing one listen address, and their supervisor.

One Python process can use one core only, and needs about twice PgBouncer's CPU per transaction
(the profile is mostly send syscalls), so with ``workers = N`` the ``pgproxy`` command becomes
a *supervisor* that starts N *workers*. Each worker is ``python -m pgproxy`` again, with the
same arguments and environment plus the internal ``--worker`` flag, and runs the ordinary
``Proxy``: it binds the listen address with ``SO_REUSEPORT`` (the kernel spreads new
connections over the workers) and has its own pools and its own listener connection per
database. Nothing is shared between workers but their share of the configured sizes, the
mock-auth key, and what they ask each other: cancel requests, and for the admin console and
/metrics, which show and control the whole proxy, snapshots and control commands.

The package, from the bottom up:

* ``role``: what a worker is told (``WorkerRole``, passed as ``WORKER_FLAG``) and the share
  of the sizes it runs with (``per_worker``);
* ``peerwire``: the messages of the workers' private channel, built and parsed, bounded;
* ``peers``: that channel (``Peers``): each worker's unix socket, answering the others
  (a CancelRequest for its client, its snapshot, a control command) and asking them;
* ``supervisor``: the supervisor process (``supervise``): starting, restarting and stopping
  workers, reloads, the mock-auth key; and the worker's end of its channel to the supervisor
  (``serve_supervisor``).

Rule: the modules here never import ``pgproxy.cli`` or ``pgproxy.app``; those import them
(the supervisor receives configuration loading as a callable). And this file imports nothing,
so the CLI can import ``role`` without loading the event-loop machinery of the others.
"""
