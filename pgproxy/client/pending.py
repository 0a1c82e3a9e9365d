"""What the open transaction has done to the session, until it commits or rolls back.

Owns the LISTEN/UNLISTEN and SET/RESET effects forwarded to a pooled server (they take hold
for the client only when their transaction commits, and vanish if it rolls back), the channels
held upstream for its LISTENs meanwhile, the savepoints that cut both, and which prepared
statements and portals carry such effects (so an Execute adds them).

Rule: no I/O and no session. Every method returns what the caller must do (channels to hold
or let go, effects to apply); one savepoint stack cuts LISTEN and SET effects alike, as it
does on the server.
"""

from __future__ import annotations

from typing import Final

from pgproxy import sql
from pgproxy.params import set_statement
from pgproxy.protocol import extended
from pgproxy.protocol import messages as m

Effect = sql.Subscription | sql.SettingEffect
# What a prepared statement carries: also set_config() values that come with each Bind.
StatementEffect = Effect | sql.BoundSetParameter
# Effects a prepared statement or portal carries, and whether it may NOTIFY.
StatementEffects = tuple[list[StatementEffect], bool]
PortalEffects = tuple[list[Effect], bool]

_NOTHING: Final[list[str]] = []  # returned, never changed


class TransactionEffects:
    __slots__ = ("_error", "_rollback", "_savepoints", "effects", "held", "portals", "statements")

    def __init__(self) -> None:
        self.effects: list[Effect] = []  # in order, awaiting the transaction's outcome
        self.held: list[str] = []  # channels held upstream for LISTENs in ``effects``
        # Savepoints of the open transaction: (name, len(effects), len(held)) when taken.
        self._savepoints: list[tuple[str, int, int]] = []
        self._error = False  # an ErrorResponse passed since the last ReadyForQuery
        self._rollback = False  # a ROLLBACK tag passed since the last ReadyForQuery
        self.statements: dict[str, StatementEffects] = {}  # prepared statements with effects
        self.portals: dict[str, PortalEffects] = {}  # portals bound to those

    @property
    def open(self) -> bool:
        """Effects wait for an outcome (or channels are held for them)."""
        return bool(self.effects) or bool(self.held)

    def add(self, effects: list[Effect]) -> list[str]:
        """Effects forwarded in the open transaction; returns the channels to hold upstream
        now, so that a LISTEN is live before the client's COMMIT returns."""
        self.effects += effects
        channels = [e.channel for e in effects if isinstance(e, sql.Listen)]
        self.held += channels
        return channels

    def savepoint(self, op: sql.SavepointOp) -> list[str]:
        """SAVEPOINT / ROLLBACK TO / RELEASE; returns the channels to let go. Names may
        repeat (the most recent counts); ROLLBACK TO keeps its savepoint, RELEASE drops it and
        later ones; an unknown name changes nothing (the server raises the error)."""
        if isinstance(op, sql.Savepoint):
            self._savepoints.append((op.name, len(self.effects), len(self.held)))
            return _NOTHING
        for i in range(len(self._savepoints) - 1, -1, -1):
            name, effects_len, held_len = self._savepoints[i]
            if name != op.name:
                continue
            if isinstance(op, sql.Release):
                del self._savepoints[i:]
                return _NOTHING
            del self._savepoints[i + 1 :]
            del self.effects[effects_len:]
            released = self.held[held_len:]
            del self.held[held_len:]
            return released
        return _NOTHING

    def take(self) -> tuple[list[Effect], list[str]]:
        """The transaction committed (or ended): its effects and held channels, now cleared
        (a COMMIT AND CHAIN stays in a transaction and starts afresh)."""
        effects, held = self.effects, self.held
        self.effects, self.held = [], []
        return effects, held

    def rollback_seen(self) -> None:
        self._rollback = True

    def error_seen(self) -> None:
        self._error = True

    def ready(self, status: int) -> bool:
        """At ReadyForQuery: True if the effects are to be applied now (an implicit
        transaction ended well), False if they wait or are to be dropped (see
        :meth:`failed`). ROLLBACK TO SAVEPOINT also says ROLLBACK but stays in the
        transaction: the effects wait for the real outcome."""
        outcome = status == m.IDLE and not (self._rollback or self._error)
        self._rollback = self._error = False
        return outcome

    def transaction_ended(self) -> None:
        """ReadyForQuery I: savepoints and portals end with their transaction."""
        if self._savepoints:
            self._savepoints.clear()
        if self.portals:
            self.portals.clear()

    def lost(self) -> list[str]:
        """The server died: nothing of its transaction committed. Returns held channels."""
        _, held = self.take()
        self._savepoints.clear()
        self.portals.clear()
        self._error = self._rollback = False
        return held

    # --- prepared statements and portals that carry effects ----------------------------------

    def parsed(self, name: str, effects: list[StatementEffect], notifies: bool) -> None:
        if effects or notifies:
            self.statements[name] = (effects, notifies)
        elif self.statements:
            self.statements.pop(name, None)

    def bound(self, portal: str, statement: str, bind: bytes) -> None:
        """A Bind of ``statement`` (its body ``bind``) into ``portal``: the portal carries the
        statement's effects, set_config() values taken from the Bind's parameters (a value
        that cannot be read, NULL, is left out: Postgres rejects it)."""
        info = self.statements.get(statement)
        if info is None:
            if self.portals:
                self.portals.pop(portal, None)
            return
        effects, notifies = info
        resolved: list[Effect] = []
        for effect in effects:
            if isinstance(effect, sql.BoundSetParameter):
                value, _ = extended.bind_parameter(bind, effect.param - 1)
                # Text or binary, a text parameter's bytes are its UTF-8 value.
                if value is not None:
                    text = value.decode("utf-8", "replace")
                    resolved.append(sql.SetParameter(effect.name, set_statement(effect.name, text)))
            else:
                resolved.append(effect)
        self.portals[portal] = (resolved, notifies)

    def closed(self, kind: int, name: str) -> None:
        (self.statements if kind == ord("S") else self.portals).pop(name, None)

    def forget_statements(self) -> None:
        """DEALLOCATE ALL / DISCARD ALL."""
        self.statements.clear()
