"""The open transaction's LISTEN/SET effects against savepoints, with effects alone.

A hypothesis property test runs random SAVEPOINT / ROLLBACK TO / RELEASE / LISTEN / SET
sequences through :class:`TransactionEffects` and through a model written the obvious way
(each savepoint remembers a copy of what was pending), and both must agree on what is pending,
which channels are held, and which channels each step lets go.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgproxy import sql
from pgproxy.client.pending import Effect, TransactionEffects
from pgproxy.params import set_statement
from pgproxy.protocol import messages as m

NAMES = st.sampled_from(["a", "b", "c"])
CHANNELS = st.sampled_from(["x", "y", "z"])
STEP = st.one_of(
    st.builds(sql.Savepoint, NAMES),
    st.builds(sql.RollbackTo, NAMES),
    st.builds(sql.Release, NAMES),
    st.builds(sql.Listen, CHANNELS),
    st.builds(sql.Unlisten, CHANNELS),
    st.builds(sql.SetParameter, st.just("search_path"), st.sampled_from(["SET a", "SET b"])),
    st.just(sql.ResetAll()),
)


class Model:
    """Postgres' savepoint semantics, spelled out: a stack of (name, state when taken)."""

    def __init__(self) -> None:
        self.effects: list[Effect] = []
        self.held: list[str] = []
        self.stack: list[tuple[str, list[Effect], list[str]]] = []

    def step(self, op: object) -> list[str]:
        if isinstance(op, sql.Savepoint):
            self.stack.append((op.name, list(self.effects), list(self.held)))
            return []
        if isinstance(op, sql.RollbackTo | sql.Release):
            names = [name for name, _, _ in self.stack]
            if op.name not in names:
                return []  # the server raises "savepoint does not exist"; nothing changes here
            i = len(names) - 1 - names[::-1].index(op.name)  # the most recent of that name
            if isinstance(op, sql.Release):
                del self.stack[i:]
                return []
            _, effects, held = self.stack[i]
            del self.stack[i + 1 :]  # ROLLBACK TO keeps the savepoint itself
            let_go = self.held[len(held) :]
            self.effects, self.held = list(effects), list(held)
            return let_go
        assert isinstance(op, sql.Listen | sql.Unlisten | sql.SetParameter | sql.ResetAll)
        self.effects.append(op)
        if isinstance(op, sql.Listen):
            self.held.append(op.channel)
        return []


@given(st.lists(STEP, max_size=40))
def test_savepoints_cut_pending_effects_as_postgres_does(steps: list[object]) -> None:
    model = Model()
    effects = TransactionEffects()
    for op in steps:
        expected = model.step(op)
        if isinstance(op, sql.Savepoint | sql.RollbackTo | sql.Release):
            got = effects.savepoint(op)
        else:
            assert isinstance(op, sql.Listen | sql.Unlisten | sql.SetParameter | sql.ResetAll)
            held = effects.add([op])
            assert held == ([op.channel] if isinstance(op, sql.Listen) else [])
            got = []
        assert got == expected, op
        assert effects.effects == model.effects
        assert effects.held == model.held
    assert effects.open == bool(model.effects or model.held)


def test_a_repeated_savepoint_name_rolls_back_to_the_latest() -> None:
    effects = TransactionEffects()
    effects.savepoint(sql.Savepoint("s"))
    effects.add([sql.Listen("one")])
    effects.savepoint(sql.Savepoint("s"))
    effects.add([sql.Listen("two")])
    assert effects.savepoint(sql.RollbackTo("s")) == ["two"]
    assert effects.held == ["one"]
    # The inner "s" was released: the outer one is the next to count.
    assert effects.savepoint(sql.Release("s")) == []
    assert effects.savepoint(sql.RollbackTo("s")) == ["one"]
    assert effects.effects == [] and effects.held == []


def test_an_implicit_transaction_applies_unless_an_error_or_rollback_passed() -> None:
    effects = TransactionEffects()
    effects.add([sql.Listen("x")])
    assert effects.ready(m.IN_TRANSACTION) is False  # still open: wait for the outcome
    effects.error_seen()
    assert effects.ready(m.IDLE) is False  # failed: dropped by the caller
    effects.rollback_seen()
    assert effects.ready(m.IDLE) is False
    assert effects.ready(m.IDLE) is True  # each ReadyForQuery starts the flags afresh
    effects.rollback_seen()
    assert effects.ready(m.FAILED_TRANSACTION) is False
    assert effects.ready(m.IDLE) is True


def test_take_hands_over_and_clears_and_lost_lets_every_channel_go() -> None:
    effects = TransactionEffects()
    effects.add([sql.Listen("x"), sql.SetParameter("search_path", "SET a")])
    taken, held = effects.take()
    assert taken == [sql.Listen("x"), sql.SetParameter("search_path", "SET a")]
    assert held == ["x"] and not effects.open
    effects.savepoint(sql.Savepoint("s"))
    effects.add([sql.Listen("y")])
    effects.portals["p"] = ([sql.Listen("y")], False)
    assert effects.lost() == ["y"]
    assert not effects.open and not effects.portals
    assert effects.savepoint(sql.RollbackTo("s")) == []  # savepoints died with the server


def test_statements_and_portals_carry_their_effects_to_execute() -> None:
    effects = TransactionEffects()
    listen: list[Effect] = [sql.Listen("x")]
    effects.parsed("s1", listen, False)
    effects.parsed("s2", [], False)
    assert set(effects.statements) == {"s1"}
    effects.bound("p", "s1", m.bind("p", "s1", [])[5:])
    assert effects.portals["p"] == (listen, False)
    effects.bound("p", "s2", m.bind("p", "s2", [])[5:])  # the portal now runs something else
    assert "p" not in effects.portals
    effects.parsed("s1", [], False)  # re-prepared as something harmless
    assert effects.statements == {}
    effects.parsed("n", [], True)  # may NOTIFY
    effects.bound("", "n", m.bind("", "n", [])[5:])
    effects.closed(ord("P"), "")
    assert effects.portals == {}
    effects.closed(ord("S"), "n")
    assert effects.statements == {}
    effects.transaction_ended()


def test_set_config_with_a_bound_value_takes_it_from_each_bind() -> None:
    """asyncpg's ``SELECT set_config('jit', $1, false)``: the value comes with the Bind."""
    effects = TransactionEffects()
    effects.parsed("s", [sql.BoundSetParameter("jit", 1)], False)
    for value, binary in ((b"off", False), (b"on", True)):
        body = m.bind("p", "s", [value])[5:]
        if binary:  # a text parameter's binary format is its bytes, as asyncpg sends it
            body = body.replace(b"s\0\0\0\0\1", b"s\0\0\1\0\1\0\1", 1)
        effects.bound("p", "s", body)
        setting = set_statement("jit", value.decode())
        assert effects.portals["p"] == ([sql.SetParameter("jit", setting)], False)
    effects.bound("p", "s", m.bind("p", "s", [None])[5:])  # NULL: Postgres rejects it
    assert effects.portals["p"] == ([], False)
