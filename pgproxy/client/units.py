"""What each forwarded message does to the session, in transaction mode.

Owns the per-type decisions the read loop (:mod:`pgproxy.client.stream`) asks for on a Query,
Parse, Bind, Describe, Close or Execute that a pooled server is about to run: statement names
rewritten (:mod:`.statements`), LISTEN/SET effects recorded for the transaction's outcome
(:mod:`.pending`), NOTIFY attributed (:mod:`.subscriptions`), session state transaction
pooling cannot carry refused or logged; and what the server's CommandComplete and
ErrorResponse tags then decide: effects applied at COMMIT, dropped at ROLLBACK.

Rule: the owned objects are created here, on first need (``stmts``, ``pending``, ``subs`` stay
None for a client that never prepares, LISTENs or NOTIFYs), and only this class and the session
hand their results to the listener and the server.
"""

from __future__ import annotations

import asyncio
from typing import Final

from pgproxy import listening_channels, precheck, sql
from pgproxy.backend import ServerConnection, ServerLink
from pgproxy.client.host import ProxyServices
from pgproxy.client.pending import Effect, StatementEffect, TransactionEffects
from pgproxy.client.settings import ClientSettings
from pgproxy.client.statements import ClientStatements
from pgproxy.client.subscriptions import Subscriptions
from pgproxy.pool.pool import Pool
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from pgproxy.wire import WireProtocol, log

# Text no server can parse: sent in place of a refused statement, so the server raises the
# error (a syntax error the proxy rewords) exactly where the statement's own would be.
_PROVOKE: Final = "pgproxy_refused_statement"
_S: Final = ord("S")
_BEFORE_LOGIN: Final = ClientSettings({}, {})  # shared, and never changed: replaced at login


class ClientUnits(WireProtocol, ServerLink):
    """Who the client is, what it holds, and what each of its messages does to that; the
    base of :class:`~pgproxy.client.stream.ClientStream`, which walks the messages."""

    __slots__ = (
        "database",
        "end_reason",
        "may_stall",
        "pending",
        "pool",
        "proxy",
        "server",
        "settings",
        "stmts",
        "subs",
        "user",
        "vpid",
    )

    def __init__(self, proxy: ProxyServices) -> None:
        super().__init__()
        self.proxy = proxy
        self.server: ServerConnection | None = None
        self.pool: Pool | None = None
        self.user = ""
        self.database = ""
        self.settings = _BEFORE_LOGIN
        # LISTEN/SET effects of the open transaction (None until the first one: most clients
        # never LISTEN or SET in transaction mode).
        self.pending: TransactionEffects | None = None
        self.may_stall = False  # see ServerLink
        self.vpid = 0
        self.end_reason = ""  # why the proxy ended it (its FATAL, "admin"); "": the client left
        self.stmts: ClientStatements | None = None
        self.subs: Subscriptions | None = None

    # --- what the session provides (the listener's Subscriber side) --------------------------

    def notify(self, data: bytes) -> None:
        raise NotImplementedError

    def listener_lost(self, error: PgError) -> None:
        raise NotImplementedError

    # --- the per-type switch -----------------------------------------------------------------

    def _inspect(
        self, server: ServerConnection, type_: int, body: bytes, matters: bool | None
    ) -> bytes | None:
        """Note what this message does to the session; return what to send instead of it
        (None: send it as it is). ``matters``: ``might_matter`` of a Query's body, if known."""
        if type_ == m.QUERY:
            return self._inspect_query(server, body, matters)
        if type_ == m.PARSE:
            return self._inspect_parse(server, body)
        if type_ == m.EXECUTE:
            portal, _ = m.read_cstring(body, 0)
            pending = self.pending
            info = pending.portals.get(portal) if pending is not None else None
            if info is not None:
                effects, notifies = info
                if notifies:
                    self._note_notify(server)
                if effects:
                    self._add_pending(server, effects)
            return None
        if type_ == m.BIND:
            if body.startswith(b"\0\0"):  # unnamed portal and statement: nothing to decode
                portal, name, name_at, rest_at = "", "", 1, 2
            else:
                portal, name_at = ("", 1) if body[:1] == b"\0" else m.read_cstring(body, 0)
                name, rest_at = m.read_cstring(body, name_at)
            server.stats.bind_count += 1
            if self.pending is not None:
                self.pending.bound(portal, name, body)
            return self._statements().bind(server, body, name, name_at, rest_at)
        kind, name = m.parse_describe_or_close(body)
        if type_ == m.DESCRIBE:
            return self._statements().describe(server, body, name) if kind == _S else None
        if self.pending is not None:  # Close
            self.pending.closed(kind, name)
        self._statements().close(server, kind, name)
        return None

    def _statements(self) -> ClientStatements:
        stmts = self.stmts
        if stmts is None:
            stmts = self.stmts = ClientStatements()
        return stmts

    def _effects(self) -> TransactionEffects:
        pending = self.pending
        if pending is None:
            pending = self.pending = TransactionEffects()
        return pending

    def _subscriptions(self) -> Subscriptions:
        subs = self.subs
        if subs is None:
            subs = self.subs = Subscriptions()
        return subs

    def _query_forwarded(self, server: ServerConnection) -> None:
        """A simple Query destroys the unnamed statement, on the server and for the client."""
        if self.stmts is not None:
            self.stmts.unnamed = None
        cache = server.statements
        cache.unnamed, cache.unnamed_unit = None, server.flow.sent

    def _inspect_query(
        self, server: ServerConnection, body: bytes, matters: bool | None
    ) -> bytes | None:
        self._query_forwarded(server)
        if not (precheck.might_matter(body) if matters is None else matters):
            return None
        server.watch_tags = True  # DEALLOCATE ALL / DISCARD ALL clear statements
        text = m.parse_query(body)
        if sql.may_notify(text):
            self._note_notify(server)
        effects = sql.session_effects(text) or ()
        for effect in effects:
            if isinstance(effect, sql.SessionState) and self._unsupported_state(effect):
                if sql.statement_count(text) == 1:
                    return self._provoke_error(server, effect, m.query(_PROVOKE))
                # In a multi-statement Query the stand-in would replace the statements before
                # it too (changing what they do to the transaction): only log it there.
                self._log_unsupported_state(effect)
        for effect in effects:
            if isinstance(effect, sql.Listen | sql.Unlisten):
                server.needs_unlisten = True  # a LISTEN there would outlive this client
                self._add_pending(server, [effect])
            elif isinstance(effect, sql.SetParameter | sql.ResetAll):
                self._add_pending(server, [effect])
            elif isinstance(effect, sql.Deallocate):
                stmts = self.stmts
                if (
                    stmts is not None
                    and effect.name in stmts.named
                    and server.flow.status != m.FAILED_TRANSACTION  # else: 25P02, kept
                    and sql.is_only(text, effect)
                ):
                    if self.pending is not None:
                        self.pending.statements.pop(effect.name, None)
                    return stmts.deallocate(server, effect.name)
            elif isinstance(effect, sql.Savepoint | sql.Release | sql.RollbackTo):
                released = self._effects().savepoint(effect)
                if released:
                    self._unhold(released)
        rewritten = self._listening_rewrite(text)
        if rewritten is not None:  # parsed anew each time: the channels go into the text
            return m.query(rewritten.text(listening_channels.channels_literal(self._channels())))
        return None

    def _inspect_parse(self, server: ServerConnection, body: bytes) -> bytes | None:
        server.stats.client_parse_count += 1
        name, tail_at = ("", 1) if body[:1] == b"\0" else m.read_cstring(body, 0)
        effects: list[StatementEffect] = []
        notifies = False
        rewritten: listening_channels.Rewritten | None = None
        text_end = body.find(b"\0", tail_at)
        if text_end < 0:
            raise m.ProtocolError("missing string terminator")
        if precheck.might_matter(body[tail_at:text_end]):
            text, _ = m.read_cstring(body, tail_at)
            for effect in sql.session_effects(text) or ():
                if isinstance(effect, sql.SessionState):
                    if self._unsupported_state(effect):
                        # the server drops it before parsing
                        cache = server.statements
                        cache.unnamed, cache.unnamed_unit = None, server.flow.sent
                        return self._provoke_error(server, effect, m.parse("", _PROVOKE, []))
                elif isinstance(
                    effect,
                    sql.Listen
                    | sql.Unlisten
                    | sql.SetParameter
                    | sql.ResetAll
                    | sql.BoundSetParameter,
                ):
                    effects.append(effect)
            notifies = sql.may_notify(text)
            rewritten = self._listening_rewrite(text)
        if effects or notifies:
            if any(isinstance(e, sql.Listen | sql.Unlisten) for e in effects):
                server.needs_unlisten = True
            self._effects().parsed(name, effects, notifies)
        elif self.pending is not None:
            self.pending.parsed(name, effects, notifies)
        if rewritten is not None:
            rest = body[text_end + 1 :]  # the parameter types
            return self._statements().parse_rewritten(
                server, name, rewritten, rest, self._channels()
            )
        return self._statements().parse(server, name, body[tail_at:])

    # --- pg_listening_channels(): the client's channels, not the server's -------------------

    def _channels(self) -> list[str]:
        """The client's committed channels, in Postgres' order."""
        return self.subs.channels if self.subs is not None else []

    def _listening_rewrite(self, text: str) -> listening_channels.Rewritten | None:
        """``text`` with its pg_listening_channels() calls reading the client's channels,
        where pglast reads the text as the server does (else the server answers)."""
        if "pg_listening_channels" not in text.lower():  # most texts the pre-check passes
            return None
        if not self.settings.text_rules_ok():
            return None
        return listening_channels.rewrite(text)

    def _channels_committed(self, channels: list[str]) -> None:
        """The client's channel list is now ``channels``: its prepared statements that read
        it map to server statements holding the new list."""
        self._subscriptions().channels = channels
        if self.stmts is not None:
            self.stmts.channels_changed(channels)

    # --- session state transaction pooling cannot carry --------------------------------------

    def _unsupported_state(self, effect: sql.SessionState) -> bool:
        """Log it, or (True) refuse it, as ``unsupported_session_state`` says."""
        policy = self.proxy.config.proxy.unsupported_session_state
        if policy == "error":
            return True
        if policy == "log":
            self._log_unsupported_state(effect)
        return False

    def _log_unsupported_state(self, effect: sql.SessionState) -> None:
        """Once per pool and kind, not once per connection (a fleet of identical workers
        would log the same line hundreds of times)."""
        pool = self.pool
        if pool is None or effect.what in pool.logged_states:
            return
        pool.logged_states.add(effect.what)
        log.warning(
            "%r: %s will not follow clients to other servers (transaction pooling); "
            "logged once for pool %s",
            self,
            effect.what,
            pool.name,
        )

    @staticmethod
    def _provoke_error(server: ServerConnection, effect: sql.SessionState, message: bytes) -> bytes:
        """Refuse a statement where it stands: the server fails a stand-in for it (so the
        transaction aborts exactly as the statement's own error would), reworded as ours."""
        error = PgError(
            errors.FEATURE_NOT_SUPPORTED,
            f"{effect.what} is not supported in transaction pooling mode",
            hint="Use a transaction-scoped alternative (pg_advisory_xact_lock, ON COMMIT DROP) "
            "or session pool_mode for this database.",
        )
        server.replies.expect_error(_PROVOKE, lambda _: error.fields(), server.flow.sent)
        return message

    # --- NOTIFY attribution ------------------------------------------------------------------

    def _note_notify(self, server: ServerConnection) -> None:
        """A statement that may NOTIFY is being forwarded: attribute its notifications."""
        subs = self._subscriptions()
        subs.may_have_notified = self.may_stall = True
        pool = self.pool
        listener = self.proxy.existing_listener(pool) if pool is not None else None
        if listener is not None and listener.channels:
            subs.map_pid(listener, server.pid, self.vpid)

    # --- effects and their outcome -----------------------------------------------------------

    def _add_pending(self, server: ServerConnection, effects: list[Effect]) -> None:
        """Effects that take hold when the transaction running them commits."""
        server.watch_tags = True
        channels = self._effects().add(effects)
        if channels:
            assert self.pool is not None
            listener = self.proxy.listener_for(self.pool)
            self._subscriptions().listener = listener
            for channel in channels:
                # LISTEN upstream now, so it is live before this client's COMMIT returns.
                listener.hold(channel)

    def _unhold(self, channels: list[str]) -> None:
        listener = self.subs.listener if self.subs is not None else None
        if listener is not None:
            for channel in channels:
                listener.unhold(channel)

    def command_complete(self, tag: bytes) -> None:
        if tag.startswith((b"DEALLOCATE ALL", b"DISCARD ALL")):
            if self.stmts is not None:
                self.stmts.named.clear()
            if self.pending is not None:
                self.pending.forget_statements()
        if self.pending is None:
            return
        if tag.startswith(b"COMMIT"):
            self._apply_pending()  # also COMMIT AND CHAIN, which stays in a transaction
        elif tag.startswith(b"ROLLBACK"):
            self.pending.rollback_seen()

    def error_seen(self) -> None:
        if self.pending is not None:
            self.pending.error_seen()

    def _settle_pending(self, pending: TransactionEffects, status: int) -> None:
        """At ReadyForQuery: an implicit transaction ended, or an explicit one rolled back."""
        active = pending.open
        if pending.ready(status):
            if active:
                self._apply_pending()
        elif status == m.IDLE and active:
            self._drop_pending()
        if status == m.IDLE:
            pending.transaction_ended()

    def _apply_pending(self) -> None:
        assert self.pending is not None
        effects, held = self.pending.take()
        server = self.server
        change = self.settings.apply(effects)
        if server is not None:
            change.apply_to(server)
        listener = self.subs.listener if self.subs is not None else None
        if listener is not None and any(isinstance(e, sql.Listen | sql.Unlisten) for e in effects):
            channels = sql.apply_effects(self._channels(), effects)
            wanted = set(channels)
            listener.set_channels(self, wanted)
            self._channels_committed(channels)
            not_live = listener.pending_readiness(wanted)
            if not_live:
                # Acknowledge only what is true: the COMMIT's reply waits for the listener.
                self.hold_output()
                self.proxy.spawn(self._release_when_live(not_live))
        self._unhold(held)

    def _drop_pending(self) -> None:
        if self.pending is not None:
            self._unhold(self.pending.take()[1])

    async def _release_when_live(self, waits: list[asyncio.Future[None]]) -> None:
        results = await asyncio.gather(*(asyncio.shield(w) for w in waits), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("%r: a committed LISTEN is not live upstream yet: %s", self, result)
        self.release_output()
