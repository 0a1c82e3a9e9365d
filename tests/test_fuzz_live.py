"""Live-proxy fuzzing (issue 16): a hypothesis state machine opens raw sockets to a real pgproxy
in front of a real Postgres and sends them fuzzed startups (SSL/GSS requests, ``-c=``,
protocol 3.2, declared lengths of 2^31) and fuzzed message sequences (:mod:`tests.fuzz.vocab`:
extended protocol in any order, COPY, bad names and counts, half messages), reads or not, and
hangs up with a FIN or a RST at any point. After every step a normal client is still served;
at the end no client is left and ``SHOW POOLS`` shows no server taken and no client waiting.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import psycopg2
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pgproxy.protocol import messages as m
from tests.conftest import MakeProxy
from tests.fuzz import vocab
from tests.support.proxy_runner import ProxyThread

PLAIN = m.startup_message({"user": "postgres", "database": "postgres"})
STARTUPS = (
    PLAIN,
    m.ssl_request() + PLAIN,
    m.gssenc_request() + m.ssl_request() + PLAIN,
    m.startup_message({"user": "postgres", "database": "postgres", "options": "-c="}),
    m.startup_message({"user": "postgres", "database": "postgres", "options": "-c work_mem=8MB"}),
    m.startup_message({"user": "postgres", "database": "postgres"}, version=3 << 16 | 2),
    struct.pack("!ii", 0x7FFFFFFF, 3 << 16),
    PLAIN + PLAIN,
    b"",  # silence until the login timeout, or a hang-up
)
MESSAGE = st.tuples(st.integers(0, vocab.OPS - 1), st.integers(0, 255), st.binary(max_size=24))
# Headers declaring more than will follow, for types the proxy streams through to a server.
HALF = st.sampled_from(
    [b"d" + struct.pack("!i", 0x3FFFFFFF), b"E" + struct.pack("!i", 10000), b"d\0\0\0\x20"]
)
MAX_OPEN = 4  # raw clients at once, each holding at most one server; the pool has more


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the proxy closed it: what it sent is its business; the checks come later


def test_fuzzed_sessions_leave_the_live_proxy_healthy(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(
        proxy={
            "default_pool_size": MAX_OPEN + 2,
            "client_login_timeout": 2,
            "query_wait_timeout": 5,
            "admin_users": ["postgres"],
        }
    )
    normal = psycopg2.connect(proxy.dsn())
    normal.autocommit = True

    stuck: list[threading.Thread] = []  # its connection is left as it is

    def query(answer: list[object]) -> None:
        try:
            with normal.cursor() as cur:
                cur.execute("SELECT 6 * 7")
                answer.append(cur.fetchone())
        except psycopg2.Error as exc:
            answer.append(exc)

    def served() -> None:
        # In a daemon thread: a client given a stuck server would wait forever (libpq has
        # no read timeout), and a stuck thread must not keep the test process alive.
        answer: list[object] = []
        thread = threading.Thread(target=query, args=(answer,), daemon=True)
        thread.start()
        thread.join(10)
        if thread.is_alive():
            stuck.append(thread)
            raise AssertionError("a normal client was not served within 10 s")
        assert answer == [(42,)]

    class LiveProxy(RuleBasedStateMachine):
        conns = Bundle("conns")

        def __init__(self) -> None:
            super().__init__()
            self.open: list[socket.socket] = []

        @precondition(lambda self: len(self.open) < MAX_OPEN)
        @rule(target=conns, startup=st.sampled_from(STARTUPS))
        def connect(self, startup: bytes) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
            _send(sock, startup)
            self.open.append(sock)
            return sock

        @rule(sock=conns, messages=st.lists(MESSAGE, min_size=1, max_size=6))
        def send(self, sock: socket.socket, messages: list[tuple[int, int, bytes]]) -> None:
            _send(sock, b"".join(vocab.build(op, arg, blob) for op, arg, blob in messages))

        @rule(sock=conns, start=st.sampled_from([b"", m.query("SELECT 1")]), head=HALF)
        def half_message(self, sock: socket.socket, start: bytes, head: bytes) -> None:
            """The start of a message whose rest never comes (it may hang up next)."""
            _send(sock, start + head + b"0123")

        @rule(sock=conns)
        def read(self, sock: socket.socket) -> None:
            sock.settimeout(0.05)
            try:
                sock.recv(1 << 16)
            except OSError:
                pass

        @rule(sock=consumes(conns), reset=st.booleans())
        def hang_up(self, sock: socket.socket, reset: bool) -> None:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            if sock in self.open:
                self.open.remove(sock)

        @invariant()
        def a_normal_client_is_served(self) -> None:
            served()

        def teardown(self) -> None:
            for sock in self.open:
                sock.close()
            _wait_until_only_the_normal_client_is_left(proxy)

    try:
        run_state_machine_as_test(
            LiveProxy,
            settings=settings(
                max_examples=12,
                stateful_step_count=12,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
                # No shrinking: against a live proxy a failing step can cost the 10 s wait
                # below, again for every attempt; the unshrunk steps are reported.
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
            ),
        )
        served()
        admin = psycopg2.connect(proxy.dsn(dbname="pgbouncer"))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SHOW POOLS")
            columns = [d.name for d in cur.description or ()]
            pools = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
        admin.close()
        assert pools and all(p["sv_active"] == 0 and p["cl_waiting"] == 0 for p in pools), pools
    finally:
        if not stuck:
            normal.close()


def _wait_until_only_the_normal_client_is_left(proxy: ProxyThread) -> None:
    """Every raw client gone and every server idle (a hang-up is seen within moments; a
    cleanup ROLLBACK runs on a real server first)."""
    deadline = time.monotonic() + 15
    while True:
        state = proxy.call(
            lambda p: (p.client_count, sum(len(pool.active) for pool in p.pools.values()))
        )
        if state == (1, 0):
            return
        assert time.monotonic() < deadline, f"left behind: clients, active servers = {state}"
        time.sleep(0.05)
