"""The upstream listener backend killed (``pg_terminate_backend``) while clients LISTEN
through pgproxy: every listener is told (none waits in silence for notifications that will
not come), and a new LISTEN hears notifications again. PgBouncer 1.18 is not run: it does not
support LISTEN in transaction mode, and in session mode every listener holds a server of its
own (killing it ends that one client's connection, as direct)."""

from __future__ import annotations

from bench.faults.env import Env, Finding, progress
from bench.faults.load import hears_again, listening, told_of_loss

TITLE = "Listener backend killed"
KILL = (
    "select count(pg_terminate_backend(pid)) from pg_stat_activity"
    " where application_name = 'pgproxy-listener'"
)


def run(env: Env) -> list[Finding]:
    count = 10 if env.quick else 100
    proxy = env.pgproxy({"default_pool_size": 4})
    listeners = listening(proxy.dsn(), count, "datasheet")
    progress(f"[listener] {count} listeners, killing the listener backend ...")
    killed = env.cluster.psql(KILL).strip()
    told, silent = told_of_loss(listeners)
    back = hears_again(proxy.dsn(), env.cluster.dsn(), "datasheet")
    said = (
        f"{killed} listener backend killed: {told} of {count} listeners told (connection closed "
        f"with an error naming the listener), {silent} left silent; a new LISTEN "
        + (f"heard a NOTIFY {back:.1f} s later" if back is not None else "heard nothing")
    )
    bouncer = (
        "not run: LISTEN is unsupported in transaction mode; in session mode each listener "
        "has a server of its own, whose loss ends that client's connection"
    )
    title = f"Listener backend killed ({count} listeners)"
    ok = silent == 0 and told == count and back is not None
    return [Finding(title, said, bouncer, ok=ok)]
