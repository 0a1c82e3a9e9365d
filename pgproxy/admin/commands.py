"""The console's commands: their grammar, the dispatch table, and who may run what.

Owns turning a statement's text into a :class:`Command` (what it is called, what columns it
returns, whether only ``admin_users`` may run it) and running it against a
:class:`ConsoleHost`. The grammar is PgBouncer's: one command word and an optional argument
(a word or a double-quoted name), case-insensitive, with an optional ``;``; or ``SET key =
value``. The control commands (PAUSE, RESUME, RECONNECT, WAIT_CLOSE, KILL, KILL_CLIENT,
DISABLE, ENABLE, SHUTDOWN) run :class:`Operations` (``pgproxy.control.Control``); those that
wait (PAUSE, WAIT_CLOSE) return an awaitable the console's session awaits. SUSPEND (PgBouncer's
socket hand-over) is not pgproxy's way to restart (see "Shutting down") and fails with 0A000.
With ``workers = N`` the console answers for the whole proxy, whichever worker it is on: a
SHOW awaits the host's ``gather_snapshot`` (every worker's snapshot, merged), a control
command its ``everywhere`` (run on every worker; :func:`perform` is what each one runs).

Rules: parsing raises what Postgres would raise at Parse (an unknown command), running what
it would raise at Execute (permission, failure), so the simple and the extended protocol
report the same errors at the same points. ``stats_users`` may run SHOW (and the harmless
transaction and SET statements drivers send); everything else needs ``admin_users``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pgproxy import version
from pgproxy.admin.snapshot import Snapshot
from pgproxy.admin.views import TABLES, Column, Row, Table
from pgproxy.config import ConfigError
from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError

ADMIN: Final = "admin"  # may run every command
STATS: Final = "stats"  # may only SHOW


def console_role(
    admin_users: tuple[str, ...], stats_users: tuple[str, ...], user: str
) -> str | None:
    """What ``user`` may do on the console (None: it may not log in there)."""
    if user in admin_users:
        return ADMIN
    if user in stats_users:
        return STATS
    return None


class Operations(Protocol):
    """The operator's commands (``pgproxy.control.Control`` provides them)."""

    def knows(self, database: str) -> bool: ...
    def pause(self, database: str | None = None) -> Coroutine[Any, Any, None]: ...
    def resume(self, database: str | None = None) -> None: ...
    def reconnect(self, database: str | None = None) -> None: ...
    def wait_close(self, database: str | None = None) -> Coroutine[Any, Any, None]: ...
    def kill(self, database: str | None = None) -> int: ...
    def kill_client(self, vpid: int) -> bool: ...
    def disable(self, database: str) -> None: ...
    def enable(self, database: str) -> None: ...
    def shutdown_all(self, drain: bool) -> None: ...


class ConsoleHost(Protocol):
    """What the console needs from the proxy (``pgproxy.app.Proxy`` provides it)."""

    def snapshot(self) -> Snapshot:
        """This process's."""
        ...

    @property
    def worker(self) -> tuple[int, int]:
        """(index, count) of this process among the workers ((0, 1) without workers)."""
        ...

    def gather_snapshot(self) -> Awaitable[Snapshot]:
        """The whole proxy's: every worker's that answers in time, merged."""
        ...

    @property
    def control(self) -> Operations: ...

    def everywhere(self, verb: str, arg: str) -> Awaitable[Result]:
        """Run a control command on every worker; its result once all have run it."""
        ...

    def reload_config(self) -> None:
        """Load the configuration again and apply it; ConfigError if it is invalid."""
        ...


def parameters() -> dict[str, str]:
    """The server parameters the console reports (ParameterStatus, and SHOW of each): it
    always speaks UTF8 and ISO dates, and shows times in this host's time zone."""
    return {
        "server_version": f"{version()}/pgproxy",
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY",
        "TimeZone": time.strftime("%Z"),
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
        "is_superuser": "off",
    }


@dataclass(frozen=True)
class Result:
    tag: str  # CommandComplete's
    rows: list[Row] | None = None  # None: the command returns no rows
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    text: str  # as the client sent it
    tag: str
    columns: tuple[Column, ...] | None  # None: no rows (Describe answers NoData)
    admin_only: bool
    runner: Callable[[ConsoleHost], Result | Awaitable[Result]]

    def run(self, host: ConsoleHost, role: str) -> Result | Awaitable[Result]:
        if self.admin_only and role != ADMIN:
            raise PgError(
                errors.INSUFFICIENT_PRIVILEGE,
                f"admin access needed: only proxy.admin_users may run {self.tag}",
            )
        return self.runner(host)


# --- grammar ----------------------------------------------------------------------------------

_WORD: Final = r'"(?:[^"]|"")+"|[0-9a-z_]+'
_END: Final = r"\s*(?:;\s*)?"
_STATEMENT: Final = re.compile(rf"\s*({_WORD})(?:\s+({_WORD}))?{_END}", re.IGNORECASE)
_SET: Final = re.compile(
    rf"\s*set\s+({_WORD})\s*(?:=|\bto\b)\s*({_WORD}|'(?:[^']|'')*'){_END}", re.IGNORECASE
)


def parse(text: str) -> Command | None:
    """The command ``text`` is (None: an empty statement); PgError if there is none."""
    if not text.strip().strip(";").strip():
        return None
    match = _STATEMENT.fullmatch(text)
    if match is not None:
        verb, arg = _word(match[1]).lower(), _word(match[2] or "")
        make = _VERBS.get(verb)
        command = make(text, verb, arg) if make is not None else None
        if command is not None:
            return command
    match = _SET.fullmatch(text)
    if match is not None:
        return _set(text, _word(match[1]).lower())
    raise _invalid(text)


def _word(word: str) -> str:
    """A word as written: a double-quoted one unquoted."""
    if word.startswith('"'):
        return word[1:-1].replace('""', '"')
    return word


def _invalid(text: str) -> PgError:
    # PgBouncer's wording and SQLSTATE, which scripts written for it may look for.
    return PgError(errors.PROTOCOL_VIOLATION, f"invalid command '{text}', use SHOW HELP;")


# --- the commands -----------------------------------------------------------------------------

_HELP: Final = """
\tSHOW POOLS | STATS | STATS_TOTALS | STATS_AVERAGES | TOTALS
\tSHOW CLIENTS | SERVERS | DATABASES | USERS | LISTS | STATE | CONFIG | VERSION
\tSHOW LISTENERS | CHANNELS   (LISTEN/NOTIFY: listener connections, channels)
\tPAUSE [<db>] | RESUME [<db>] | RECONNECT [<db>] | WAIT_CLOSE [<db>] | KILL [<db>]
\tKILL_CLIENT <id> | DISABLE <db> | ENABLE <db>
\tSHUTDOWN [WAIT_FOR_CLIENTS | WAIT_FOR_SERVERS]   (both drain at transaction boundaries)
\tRELOAD"""
# SHOW commands of PgBouncer's that have no meaning here.
_NOT_OURS: Final = frozenset(
    ("fds", "sockets", "active_sockets", "mem", "dns_hosts", "dns_zones", "peers", "peer_pools")
)
# Parameters drivers may SET (the console ignores them) or SHOW.
_SETTABLE: Final = frozenset(
    (
        "client_encoding", "datestyle", "timezone", "standard_conforming_strings",
        "default_transaction_isolation", "extra_float_digits", "application_name",
    )
)  # fmt: skip


def _show(text: str, verb: str, arg: str) -> Command | None:
    name = arg.lower()
    table = TABLES.get(name)
    if table is not None:

        def rows(host: ConsoleHost) -> Result | Awaitable[Result]:
            if host.worker[1] == 1:
                return Result("SHOW", table.rows(host.snapshot()))
            return _gathered(host, table)

        return Command(text, "SHOW", table.columns, False, rows)
    if name == "help":
        return Command(
            text, "SHOW", None, False, lambda _: Result("SHOW", None, ("Console usage" + _HELP,))
        )
    shown = {k.lower(): (k, v) for k, v in parameters().items()}
    shown["default_transaction_isolation"] = ("default_transaction_isolation", "read committed")
    if name in shown:
        key, value = shown[name]
        return Command(
            text, "SHOW", (Column(key, "s"),), False, lambda _: Result("SHOW", [(value,)])
        )
    if name in _NOT_OURS:
        return Command(
            text, "SHOW", None, False, _unsupported(f"SHOW {name.upper()}", "by pgproxy")
        )
    return None


async def _gathered(host: ConsoleHost, table: Table) -> Result:
    """A SHOW of the whole proxy (``workers = N``), with a notice if a worker is missing."""
    snapshot = await host.gather_snapshot()
    missing = snapshot["workers"] - snapshot["processes"]
    notices: tuple[str, ...] = ()
    if missing:
        notices = (
            f"{missing} of {snapshot['workers']} workers did not answer in time: their "
            "clients, servers and counters are missing from this answer",
        )
    return Result("SHOW", table.rows(snapshot), notices)


def _unsupported(what: str, when: str = "by pgproxy yet") -> Callable[[object], Result]:
    def fail(_: object) -> Result:
        raise PgError(errors.FEATURE_NOT_SUPPORTED, f"{what} is not supported {when}")

    return fail


def _control(text: str, verb: str, arg: str) -> Command | None:
    """PAUSE, RESUME, ... as PgBouncer spells them; None: not a valid use of the verb.

    With ``workers = N`` the command runs on every worker and answers once all have run it
    (SHUTDOWN asks the supervisor, which stops every worker as its signals do)."""
    make = _CONTROL.get(verb)
    action = make(arg) if make is not None else None
    if action is None:
        return None

    def run(host: ConsoleHost) -> Result | Awaitable[Result]:
        if host.worker[1] == 1 or verb in _ONE_PROCESS:
            return action(host.control)
        return host.everywhere(verb, arg)

    return Command(text, verb.upper(), None, True, run)


def perform(ops: Operations, verb: str, arg: str) -> Result | Awaitable[Result]:
    """Control command ``verb`` ``arg`` run in this process (a worker runs what another
    worker's console forwards with this); PgError if it is not one, or fails."""
    make = _CONTROL.get(verb)
    action = make(arg) if make is not None else None
    if action is None:
        raise _invalid(f"{verb} {arg}".strip())
    return action(ops)


Action = Callable[[Operations], Result | Awaitable[Result]]


def _database(ops: Operations, arg: str) -> str | None:
    """The command's database (None: all of them); an unknown one is an error."""
    if arg and not ops.knows(arg):
        raise PgError(errors.INVALID_CATALOG_NAME, f"no such database: {arg}")
    return arg or None


async def _after(wait: Awaitable[None], tag: str) -> Result:
    await wait
    return Result(tag)


def _pause(arg: str) -> Action:
    return lambda ops: _after(ops.pause(_database(ops, arg)), "PAUSE")


def _wait_close(arg: str) -> Action:
    return lambda ops: _after(ops.wait_close(_database(ops, arg)), "WAIT_CLOSE")


def _on_database(tag: str, needs_name: bool) -> Callable[[str], Action | None]:
    """RESUME, RECONNECT, KILL [db]; DISABLE, ENABLE db: an operation that returns at once."""

    def make(arg: str) -> Action | None:
        if needs_name and not arg:
            return None

        def run(ops: Operations) -> Result:
            getattr(ops, tag.lower())(_database(ops, arg))
            return Result(tag)

        return run

    return make


def _kill_client(arg: str) -> Action | None:
    if not arg.isdigit():
        return None

    def run(ops: Operations) -> Result:
        if not ops.kill_client(int(arg)):
            raise PgError(errors.UNDEFINED_OBJECT, f"client not found: {arg}")
        return Result("KILL_CLIENT")

    return run


def _shutdown(arg: str) -> Action | None:
    mode = arg.lower()
    if mode not in ("", "wait_for_clients", "wait_for_servers"):
        return None

    def run(ops: Operations) -> Result:
        ops.shutdown_all(drain=bool(mode))  # both WAIT_FOR_* drain at boundaries
        return Result("SHUTDOWN")

    return run


_CONTROL: Final[dict[str, Callable[[str], Action | None]]] = {
    "pause": _pause,
    "wait_close": _wait_close,
    "resume": _on_database("RESUME", False),
    "reconnect": _on_database("RECONNECT", False),
    "kill": _on_database("KILL", False),
    "disable": _on_database("DISABLE", True),
    "enable": _on_database("ENABLE", True),
    "kill_client": _kill_client,
    "shutdown": _shutdown,
    "suspend": lambda _: _unsupported("SUSPEND", "by pgproxy: start a new one beside it"),
}
# Run by the worker the console client is on alone, also with workers = N.
_ONE_PROCESS: Final = frozenset(("shutdown", "suspend"))
# Answered once done, however long that takes: forwarded without a time limit.
WAITING: Final = frozenset(("pause", "wait_close"))


def _reload(text: str, verb: str, arg: str) -> Command | None:
    if arg:
        return None

    def reload(host: ConsoleHost) -> Result:
        try:
            host.reload_config()
        except ConfigError as exc:  # its message names the key and never holds a secret
            raise PgError(errors.CONFIG_FILE_ERROR, f"RELOAD failed: {exc}") from None
        return Result("RELOAD")

    return Command(text, "RELOAD", None, True, reload)


# Transaction statements drivers send on their own (psycopg2 and psycopg outside autocommit):
# the console has no transactions, so they do nothing.
_TRANSACTION_TAGS: Final = {
    ("begin", ""): "BEGIN", ("begin", "transaction"): "BEGIN", ("begin", "work"): "BEGIN",
    ("start", "transaction"): "START TRANSACTION",
    ("commit", ""): "COMMIT", ("commit", "transaction"): "COMMIT", ("commit", "work"): "COMMIT",
    ("end", ""): "COMMIT", ("end", "transaction"): "COMMIT", ("end", "work"): "COMMIT",
    ("rollback", ""): "ROLLBACK", ("rollback", "transaction"): "ROLLBACK",
    ("rollback", "work"): "ROLLBACK", ("abort", ""): "ROLLBACK",
}  # fmt: skip


def _transaction(text: str, verb: str, arg: str) -> Command | None:
    tag = _TRANSACTION_TAGS.get((verb, arg.lower()))
    if tag is None:
        return None
    return Command(text, tag, None, False, lambda _: Result(tag))


def _set(text: str, key: str) -> Command:
    if key in _SETTABLE:
        ignored = f"SET {key} ignored: the admin console always speaks UTF8 and ISO dates"
        return Command(text, "SET", None, False, lambda _: Result("SET", None, (ignored,)))
    return Command(text, "SET", None, True, _unsupported("SET of pgproxy settings"))


_VERBS: Final[dict[str, Callable[[str, str, str], Command | None]]] = {
    "show": _show,
    "select": _show,  # PgBouncer reads "SELECT x" as "SHOW x"
    "reload": _reload,
    **dict.fromkeys(_CONTROL, _control),
    **dict.fromkeys(("begin", "start", "commit", "end", "rollback", "abort"), _transaction),
}
