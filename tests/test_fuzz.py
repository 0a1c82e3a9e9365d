"""Fuzzing, the short run (issue 16): every atheris target from its seed corpus for a few
seconds, and hypothesis state machines sending message sequences to a real client session
over in-memory transports. Every run checks the properties of :mod:`tests.fuzz.harness`: no
exception escapes a session, every session ends in a defined state, no server is left taken
or holding half a message, allocation bounded by what was sent (not by what was declared).

The regression tests at the end replay what the fuzzers found. The long run: README "Fuzzing".
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from pgproxy.client import stream
from pgproxy.protocol import messages as m
from tests.fuzz import seeds, targets, vocab
from tests.fuzz.harness import Rig, backend_messages, run_session

ROOT = Path(__file__).resolve().parent.parent
# Seconds per atheris target; the four run side by side. PGPROXY_FUZZ_SECONDS raises it.
FUZZ_SECONDS = int(os.environ.get("PGPROXY_FUZZ_SECONDS", "6"))


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    targets.warm_up()


def test_seed_corpora_are_current() -> None:
    """The corpora in the repository are what tests/fuzz/seeds.py writes (vocab numbering)."""
    for target, inputs in seeds.corpus().items():
        folder = seeds.CORPUS / target
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == inputs, target


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_each_seed_keeps_the_properties(target: str) -> None:
    for data in seeds.corpus()[target].values():
        targets.TARGETS[target](data)


def test_atheris_short_run(tmp_path: Path) -> None:
    """Each target, coverage-guided from its corpus, finds nothing in its time slot."""
    runs = {}
    for target in targets.TARGETS:
        args = [
            sys.executable, "-m", "tests.fuzz", target, f"-max_total_time={FUZZ_SECONDS}",
            "-runs=200000", f"-artifact_prefix={tmp_path}/{target}-",
            str(tmp_path / target), str(seeds.CORPUS / target),
        ]  # fmt: skip
        (tmp_path / target).mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        runs[target] = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    failed = {}
    for target, proc in runs.items():
        out, _ = proc.communicate(timeout=FUZZ_SECONDS + 90)
        text = out.decode(errors="replace")
        if proc.returncode != 0 or "Done " not in text:
            failed[target] = text[-3000:]
    assert not failed, "\n\n".join(f"{t}:\n{o}" for t, o in failed.items())
    assert not list(tmp_path.glob("*-crash-*"))


# --- hypothesis: a session's state machine, driven with message sequences ----------------------

MESSAGE = st.tuples(
    st.integers(0, vocab.OPS - 1), st.integers(0, 255), st.binary(max_size=24), st.integers(0, 40)
)


class SessionMachine(RuleBasedStateMachine):
    """A logged-in client; each step sends one vocabulary message, maybe in two reads."""

    pool_mode = "transaction"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rig = self.loop.run_until_complete(self._start())

    async def _start(self) -> Rig:
        rig = await Rig(pool_mode=self.pool_mode).__aenter__()
        await rig.feed([vocab.STARTUP])
        return rig

    @rule(message=MESSAGE)
    def send(self, message: tuple[int, int, bytes, int]) -> None:
        op, arg, blob, split = message
        data = vocab.build(op, arg, blob)
        chunks = [data[:split], data[split:]] if 0 < split < len(data) else [data]
        self.loop.run_until_complete(self.rig.feed(chunks, measure=True))

    @rule()
    def unit(self) -> None:
        """A well-formed unit between the fuzz: the session still answers it, if it is open."""
        rig = self.rig
        if rig.transport.closed or rig.client is None or rig.client.mode != stream.UNLINKED:
            return
        rig.sent.clear()
        self.loop.run_until_complete(rig.feed([m.query("SELECT 1")]))
        replies = backend_messages(bytes(rig.sent))
        types = [t for t, _ in replies]
        if rig.transport.closed:
            # The fuzz left part of a message (a lone type byte, say): the Query's bytes end
            # it as garbage, which must get a FATAL and a close, as from Postgres.
            assert types and types[-1] == m.ERROR_RESPONSE, types
            assert replies[-1][1].get("S") == "FATAL", replies[-1]
        else:
            assert types and types[-1] == m.READY_FOR_QUERY, types

    @invariant()
    def no_escape(self) -> None:
        rig = self.rig
        assert not rig.raised and not rig.loop_errors and not rig.logged.tracebacks
        backend_messages(bytes(rig.sent))  # well framed so far

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.rig.hang_up())
            self.rig.check()
        finally:
            self.loop.run_until_complete(self.rig.__aexit__())
            self.loop.close()


class SessionModeMachine(SessionMachine):
    pool_mode = "session"


MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("machine", [SessionMachine, SessionModeMachine])
def test_message_sequences_keep_the_properties(machine: Any) -> None:
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)


class ScramMachine(RuleBasedStateMachine):
    """A SCRAM login, each step one move: the right messages, fuzzed ones, a second
    StartupMessage mid-exchange (CVE class), an SSLRequest, a huge declared length."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rig = self.loop.run_until_complete(self._start())
        self.client = targets.ScramClient(targets.PASSWORD)

    async def _start(self) -> Rig:
        rig = await Rig("scram-sha-256").__aenter__()
        await rig.feed([vocab.STARTUP])
        return rig

    @rule(op=st.integers(0, 7), blob=st.binary(max_size=40))
    def move(self, op: int, blob: bytes) -> None:
        if op == 0:
            self.client = targets.ScramClient(targets.PASSWORD)
        data = targets.scram_step(op, blob, self.client, self.rig)
        self.loop.run_until_complete(self.rig.feed([data], measure=True))

    @invariant()
    def no_escape(self) -> None:
        assert not self.rig.raised and not self.rig.loop_errors and not self.rig.logged.tracebacks

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.rig.hang_up())
            self.rig.check()
        finally:
            self.loop.run_until_complete(self.rig.__aexit__())
            self.loop.close()


def test_scram_exchanges_keep_the_properties() -> None:
    run_state_machine_as_test(ScramMachine, settings=MACHINE_SETTINGS)


# --- what the fuzzers found ---------------------------------------------------------------------

HALF_COPY_DATA = b"d" + (1000).to_bytes(4, "big") + b"0123456789"  # 990 bytes never come


async def test_a_server_is_not_released_holding_half_a_message() -> None:
    """A Query and the start of a CopyData in one read: the Query's ReadyForQuery used to
    release the server to the pool with the CopyData's first bytes in it, so the next
    client's messages would have been read as the rest of that CopyData (a stuck server)."""
    async with Rig() as rig:
        await rig.feed([vocab.STARTUP, m.query("SELECT 1") + HALF_COPY_DATA])
        assert rig.client is not None and rig.client.mode == stream.LINKED  # kept, not released
        assert all(not fake.pending for fake in rig.fakes if fake.server in rig.pool.idle)
        await rig.hang_up()
        rig.check()  # closed as mid-message, not given back holding it


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
async def test_a_client_leaving_mid_message_does_not_leave_its_server_stuck(
    pool_mode: str,
) -> None:
    """A client that sends the start of a message and goes: its server has read part of a
    message, so it is closed. It used to be given back (session mode: a DISCARD ALL read
    as the rest of the message, waiting forever and holding the pool slot)."""
    async with Rig(pool_mode=pool_mode) as rig:
        await rig.feed([vocab.STARTUP, m.query("SELECT 1"), b"c" + (10000).to_bytes(4, "big")])
        await rig.hang_up()
        rig.check()
        assert rig.pool.total == 1 and len(rig.pool.idle) == 1  # one closed, one clean


async def test_an_empty_option_name_is_refused_at_login() -> None:
    """``options=-c=`` (PgBouncer 1.26.1's CVE class): a FATAL naming the empty parameter,
    as Postgres answers it, before any server is used."""
    startup = m.startup_message({"user": "bench", "database": "bench", "options": "-c="})
    rig = await run_session([startup])
    sent = backend_messages(bytes(rig.sent))
    assert [f["C"] for t, f in sent if t == m.ERROR_RESPONSE] == ["42704"]
    assert rig.fakes[0].transport.writes == rig.fakes[1].transport.writes == 0


async def test_a_direct_tls_hello_where_none_is_offered_gets_the_alert_and_a_close() -> None:
    """What atheris' startup target found once direct TLS landed: a first byte 0x16 (a TLS
    handshake record) with client TLS off is answered with the TLS alert alone, then closed."""
    rig = await run_session([bytes.fromhex("16300000000804d216c8002f000000002b07")])
    assert bytes(rig.sent) == m.TLS_REFUSAL_ALERT
    assert rig.transport.closed
