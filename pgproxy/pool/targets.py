"""Which upstream host a new server is opened on: libpq's multi-host rules.

Owns the order hosts are tried in (as the URL lists them, or shuffled with
``load_balance_hosts=random``), what a server's role is (in recovery or not, read-only by default
or not) and whether that role suits the ``target_session_attrs`` asked for, with libpq's
meanings: ``any``; ``read-write`` / ``read-only`` (the session does / does not accept writes by
default); ``primary`` / ``standby`` (not in / in hot standby); ``prefer-standby`` (a standby if
any host is one, else any host).

Rules that keep it honest:
* A server is judged after login by what it reported (``in_hot_standby`` and
  ``default_transaction_read_only``, ParameterStatus on PostgreSQL 14+), and by a query on older
  servers; one that does not suit is closed before anyone sees it.
* Names are resolved afresh on every attempt: nothing here keeps an address, so a DNS name
  moved to the new primary is followed on the next connect.
* As libpq does, a host that cannot be reached or is shutting down (SQLSTATE class 08, 57P0x)
  makes the next one be tried; any other refusal (authentication, unknown database) is final.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pgproxy.auth.credentials import UpstreamSecret
from pgproxy.backend import ServerConnection, ServerHome
from pgproxy.config import DatabaseConfig
from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError
from pgproxy.server_open import UpstreamTls, open_server


@dataclass(frozen=True)
class Role:
    standby: bool  # in recovery (hot standby)
    read_only: bool  # refuses writes by default (a standby, default_transaction_read_only)


_NOT_SUITED = {
    "read-write": "session is read-only",
    "read-only": "session is not read-only",
    "primary": "server is in hot standby mode",
    "standby": "server is not in hot standby mode",
}


def suits(role: Role, target: str) -> bool:
    """Does a server of ``role`` suit ``target`` (``prefer-standby`` is two passes, not one)?"""
    if target == "read-write":
        return not role.read_only
    if target == "read-only":
        return role.read_only
    if target == "primary":
        return not role.standby
    if target == "standby":
        return role.standby
    return True


def role_from_params(params: Mapping[str, str]) -> Role | None:
    """The role a PostgreSQL 14+ server reports (and reports again when it changes: a
    promotion, a reload); None when it does not report both parameters."""
    hot = params.get("in_hot_standby")
    read_only = params.get("default_transaction_read_only")
    if hot is None or read_only is None:
        return None
    standby = hot == "on"
    return Role(standby, standby or read_only == "on")


# For servers before 14: each statement's row count says yes (1) or no (0), so the answer
# comes in the CommandComplete tags the proxy's internal queries already collect.
ROLE_QUERY = (
    "SELECT 1 WHERE pg_catalog.pg_is_in_recovery(); "
    "SELECT 1 WHERE pg_catalog.current_setting('transaction_read_only') = 'on'"
)


async def query_role(server: ServerConnection) -> Role:
    result = await server.run_internal(ROLE_QUERY)
    if result.error is not None:
        raise result.error
    if len(result.tags) != 2:
        why = f"unexpected answer to the role query: {result.tags}"
        raise PgError(errors.PROTOCOL_VIOLATION, why)
    standby, read_only = (tag == "SELECT 1" for tag in result.tags)
    return Role(standby, standby or read_only)


async def role_of(server: ServerConnection) -> Role:
    return role_from_params(server.params) or await query_role(server)


async def unsuited(server: ServerConnection, target: str) -> str | None:
    """Why ``server``, open for a while, no longer suits ``target`` (None: it does). Asked
    after a query: a server reports a changed role with its next ReadyForQuery."""
    if target in ("any", "prefer-standby"):
        return None
    return None if suits(await role_of(server), target) else _NOT_SUITED[target]


def param_check(target: str) -> Callable[[Mapping[str, str]], bool] | None:
    """For a pool: whether a server, by what it reported last, still suits ``target`` (None:
    every server does). A server that reports nothing is given the benefit of the doubt."""
    if target in ("any", "prefer-standby"):
        return None

    def check(params: Mapping[str, str]) -> bool:
        role = role_from_params(params)
        return role is None or suits(role, target)

    return check


@dataclass(frozen=True)
class Upstream:
    """How a pool's servers are opened: where, as whom, and which role they must have."""

    home: ServerHome
    database: DatabaseConfig
    target: str
    params: dict[str, str]
    password: UpstreamSecret | None
    tls: UpstreamTls | None
    max_prepared_statements: int
    connect_timeout: float


def host_order(hosts: Sequence[tuple[str, int]], balance: str) -> list[tuple[str, int]]:
    order = list(hosts)
    if balance == "random":
        random.shuffle(order)
    return order


_SHUTTING_DOWN = (errors.ADMIN_SHUTDOWN, "57P02", errors.CANNOT_CONNECT_NOW)  # crash: 57P02


def _try_next_host(error: PgError) -> bool:
    return error.sqlstate.startswith("08") or error.sqlstate in _SHUTTING_DOWN


async def open_suited(up: Upstream) -> ServerConnection:
    """A ready server on the first host (in order) whose role suits ``up.target``; raises
    PgError: the host's own error for a single host, else 08001 naming each host's failure."""
    hosts = host_order(up.database.hosts, up.database.load_balance_hosts)
    single = len(hosts) == 1 and up.target == "any"
    passes = ("standby", "any") if up.target == "prefer-standby" else (up.target,)
    failures: list[str] = []
    for target in passes:
        for host, port in hosts:
            try:
                server = await _open_one(up, host, port)
            except PgError as exc:
                if single or not _try_next_host(exc):
                    raise
                failures.append(f"{address_text(host, port)}: {exc.message}")
                continue
            if target == "any":
                return server
            try:
                role = await role_of(server)
            except (PgError, ConnectionError) as exc:
                server.close()
                failures.append(f"{address_text(host, port)}: role check failed: {exc}")
                continue
            if suits(role, target):
                return server
            server.close()
            failures.append(f"{address_text(host, port)}: {_NOT_SUITED[target]}")
    raise PgError(
        errors.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
        f"no upstream host suits target_session_attrs={up.target}: " + "; ".join(failures),
    )


async def _open_one(up: Upstream, host: str, port: int) -> ServerConnection:
    """One host, within connect_timeout (per host, as libpq's)."""
    try:
        return await asyncio.wait_for(
            open_server(
                up.home,
                up.max_prepared_statements,
                host,
                port,
                up.params,
                up.password,
                up.tls,
            ),
            up.connect_timeout or None,
        )
    except TimeoutError:
        raise PgError(
            errors.CONNECTION_FAILURE,
            f"could not connect to upstream server {host}:{port}: "
            f"timeout after {up.connect_timeout:g}s",
        ) from None


def address_text(host: str, port: int) -> str:
    """``host:port`` as people write it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
