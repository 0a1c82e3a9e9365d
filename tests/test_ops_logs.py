"""Logs: text or JSON lines (``log_format``), the events operators follow, the stats line, and
no secret anywhere.

pgproxy runs as a real process whose output is read line by line as it comes; SIGHUP switches
format and level. The secret scan logs in with passwords (SCRAM, md5, cleartext upstream, a
wrong one), SCRAM pass-through, a password in a database URL and notifications with payloads,
at debug level, and searches the whole output for every secret in every spelling it knows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.testing.cluster import (
    MD5_PASSWORD,
    MD5_USER,
    PW_PASSWORD,
    PW_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    PgCluster,
)
from tests.conftest import MakeProxy, pg_server_url
from tests.support.process import EOF, ProcessOutput, free_port, pgproxy_output

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Running:
    """A pgproxy process on ``port`` and its output."""

    def __init__(self, out: ProcessOutput, config: Path, port: int) -> None:
        self.out, self.config, self.port = out, config, port

    def dsn(self, user: str = "postgres", password: str | None = None, db: str = "postgres") -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def reload(self, text: str) -> None:
        self.config.write_text(text)
        self.out.proc.send_signal(signal.SIGHUP)

    def stop(self) -> list[str]:
        """SIGTERM, wait for the exit; every line it wrote."""
        self.out.proc.send_signal(signal.SIGTERM)
        assert self.out.proc.wait(timeout=30) == 0
        self.out.wait_for(EOF)
        return self.out.since()


def config_text(pg: PgCluster, port: int, proxy: str = "", rest: str = "") -> str:
    return (
        f'[proxy]\nlisten = "127.0.0.1:{port}"\n{proxy}\n'
        f'[databases."*"]\nurl = "{pg_server_url(pg)}"\n{rest}'
    )


@pytest.fixture
def start(pg: PgCluster, tmp_path: Path) -> Iterator[Any]:
    """``start(proxy_lines, other_sections)``: a pgproxy process, stopped after the test."""
    with ExitStack() as stack:

        def starter(proxy: str = "", rest: str = "") -> Running:
            port = free_port()
            config = tmp_path / f"pgproxy-{port}.toml"
            config.write_text(config_text(pg, port, proxy, rest))
            out = stack.enter_context(pgproxy_output(config))
            out.wait_for(r"pgproxy listening on 127\.0\.0\.1")
            return Running(out, config, port)

        yield starter


def records(lines: list[str]) -> list[dict[str, Any]]:
    """Every line as a JSON object (each one must be)."""
    parsed = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        parsed.append(record)
    return parsed


def events(lines: list[str], name: str) -> list[dict[str, Any]]:
    return [r for r in records(lines) if r.get("event") == name]


# --------------------------------------------------------------------------- JSON lines


def test_json_lines_carry_logins_logouts_and_pool_events(start: Any) -> None:
    run = start('log_format = "json"\nidle_transaction_timeout = 0.3')
    with psycopg.connect(run.dsn(), application_name="left") as conn:
        conn.execute("select 1")
    timed_out = psycopg.connect(run.dsn())
    timed_out.execute("select 1")  # psycopg opens a transaction and sits in it
    run.out.wait_for("idle-in-transaction timeout")
    staying = psycopg.connect(run.dsn(), autocommit=True)
    staying.execute("select 1")
    lines = run.stop()
    timed_out.close()
    staying.close()

    for record in records(lines):
        assert TS.fullmatch(record["ts"]), record
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
        assert record["logger"] == "pgproxy" and isinstance(record["msg"], str)
    logins = events(lines, "client_login")
    assert len(logins) == 3
    for login in logins:
        assert (login["user"], login["database"], login["tls"]) == ("postgres", "postgres", False)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", login["addr"])
        assert login["msg"] == f"login: db=postgres user=postgres addr={login['addr']} tls=off"
    logouts = {r["addr"]: r for r in events(lines, "client_logout")}
    assert [logouts[r["addr"]]["reason"] for r in logins] == [
        "client closed",
        "terminating connection due to idle-in-transaction timeout",
        "pgproxy is shutting down",  # the stop is a drain: its FATAL 57P01
    ]
    for logout in logouts.values():
        assert isinstance(logout["duration_s"], float) and logout["duration_s"] >= 0
    opened = events(lines, "server_opened")
    assert opened and opened[0]["pool"] == "postgres/postgres" and opened[0]["pid"] > 0
    closed = {r["pid"]: r["reason"] for r in events(lines, "server_closed")}
    assert set(closed) == {r["pid"] for r in opened}
    assert "pool closing" in closed.values()


def test_listener_and_connect_failure_events(start: Any, pg: PgCluster) -> None:
    run = start(
        'log_format = "json"\nlistener_loss = "keep"',
        '[databases.nowhere]\nurl = "postgresql://127.0.0.1:1"\n',
    )
    with psycopg.connect(run.dsn(), autocommit=True) as listening:
        listening.execute("LISTEN ch")
        run.out.wait_for('"event": "listener_connected"')
        pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pgproxy-listener'")  # fmt: skip
        run.out.wait_for('"event": "listener_reconnected"')
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(run.dsn(db="nowhere"), connect_timeout=10)
    lines = run.stop()
    (lost,) = events(lines, "listener_lost")
    assert lost["database"] == "postgres" and lost["level"] == "WARNING"
    assert "terminating connection due to administrator command" in lost["reason"]
    assert events(lines, "listener_reconnected")[0]["channels"] == 1
    (failed,) = events(lines, "server_connect_failed")
    assert failed["upstream"] == "127.0.0.1:1" and "could not connect" in failed["reason"]


def test_sighup_switches_format_and_level(start: Any, pg: PgCluster) -> None:
    run = start()  # text, info
    psycopg.connect(run.dsn()).close()
    run.out.wait_for(
        r" INFO pgproxy: login: db=postgres user=postgres addr=127\.0\.0\.1:\d+ tls=off$"
    )
    run.out.wait_for(r" INFO pgproxy: logout: db=postgres user=postgres .* reason=client closed$")

    mark = run.out.mark()
    run.reload(config_text(pg, run.port, 'log_format = "json"'))
    run.out.wait_for("configuration reloaded", after=mark)
    mark = run.out.mark()
    psycopg.connect(run.dsn()).close()
    run.out.wait_for('"event": "client_logout"', after=mark)
    assert events(run.out.since(mark), "client_login")

    mark = run.out.mark()
    run.reload(config_text(pg, run.port, 'log_format = "json"\nlog_level = "warning"'))
    run.out.wait_for("configuration reloaded", after=mark)
    mark = run.out.mark()
    psycopg.connect(run.dsn()).close()
    run.reload("[proxy]\nno_such_setting = 1\n")  # refused: logged as an error
    run.out.wait_for("reload failed", after=mark)
    quiet = run.out.since(mark)
    assert [r["level"] for r in records(quiet)] == ["ERROR"]


# --------------------------------------------------------------------------- no secrets


def _scram_parts(verifier: str) -> list[str]:
    """The verifier and each part of it, and the client key its password gives."""
    _, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored, server = keys.split(":")
    salted = hashlib.pbkdf2_hmac(
        "sha256", SCRAM_PASSWORD.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return [verifier, salt, stored, server, base64.b64encode(client_key).decode(), client_key.hex()]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_the_log(start: Any, pg: PgCluster, log_format: str) -> None:
    verifier = pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_USER}'").strip()
    md5_hash = "md5" + hashlib.md5((MD5_PASSWORD + MD5_USER).encode()).hexdigest()
    wrong = "Wr0ng-Passw0rd-9431"
    payload = "payload-7c1e-do-not-log"
    run = start(
        f'log_format = "{log_format}"\nlog_level = "debug"\nauth_type = "scram-sha-256"',
        f'[databases.viaurl]\nurl = "postgresql://{PW_USER}:{PW_PASSWORD}@{pg.host}:{pg.port}'
        f'/postgres"\n'
        f'[users.{SCRAM_USER}]\npassword = "{verifier}"\n'  # pass-through upstream
        f'[users.{MD5_USER}]\npassword = "{MD5_PASSWORD}"\n'
        f'[users.{PW_USER}]\npassword = "{PW_PASSWORD}"\n',
    )
    for user, password in [(SCRAM_USER, SCRAM_PASSWORD), (MD5_USER, MD5_PASSWORD)]:
        with psycopg.connect(run.dsn(user, password), autocommit=True) as conn:
            conn.execute("select 1")
    with psycopg.connect(run.dsn(PW_USER, PW_PASSWORD, db="viaurl"), autocommit=True) as c:
        c.execute("select 1")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(run.dsn(SCRAM_USER, wrong), connect_timeout=10)
    with (
        psycopg.connect(run.dsn(SCRAM_USER, SCRAM_PASSWORD), autocommit=True) as listening,
        psycopg.connect(run.dsn(MD5_USER, MD5_PASSWORD), autocommit=True) as notifying,
    ):
        listening.execute("LISTEN secrets")
        notifying.execute("SELECT pg_notify('secrets', %s)", [payload])
        notifying.execute(f"NOTIFY secrets, '{payload}-2'")
        got = [n.payload for n in listening.notifies(timeout=10, stop_after=2)]
        assert got == [payload, f"{payload}-2"]
    text = "\n".join(run.stop())
    assert "login: db=postgres user=scramuser" in text and "password authentication" in text
    secrets = [SCRAM_PASSWORD, MD5_PASSWORD, PW_PASSWORD, wrong, md5_hash, md5_hash[3:], payload]
    for secret in [*secrets, *_scram_parts(verifier)]:
        assert secret not in text, secret


# --------------------------------------------------------------------------- stats line


def _stats_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "stats"]


def test_the_stats_line(make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgproxy")
    proxy = make_proxy(proxy={"log_stats_period": 0.5})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        deadline = time.monotonic() + 15
        while not any(getattr(r, "avg_query_count", 0) > 0 for r in _stats_records(caplog)):
            assert time.monotonic() < deadline, caplog.text
            for _ in range(20):
                conn.execute("select pg_sleep(0.001)")
    busy = next(r for r in _stats_records(caplog) if getattr(r, "avg_query_count", 0) > 0)
    assert re.fullmatch(
        r"stats for postgres: \d+ xacts/s, [1-9]\d* queries/s, in [1-9]\d* B/s, "
        r"out [1-9]\d* B/s, xact [1-9]\d* us, query [1-9]\d* us, wait \d+ us",
        busy.getMessage(),
    )
    fields = vars(busy)
    assert fields["database"] == "postgres" and 0.3 < fields["period_s"] < 5
    assert fields["avg_query_time"] >= 1000  # pg_sleep(0.001), in µs
    assert fields["avg_xact_count"] == fields["avg_query_count"]  # autocommit

    def no_stats_lines(p: Any) -> None:
        config = p.config
        p.reload(replace(config, proxy=replace(config.proxy, log_stats_period=0.0)))

    proxy.call(no_stats_lines)
    time.sleep(0.2)
    count = len(_stats_records(caplog))
    time.sleep(1.2)
    assert len(_stats_records(caplog)) == count  # 0 stops the lines
