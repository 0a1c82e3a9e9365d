"""One client's session parameters: what it was told, what it asked for, what RESET returns to.

Owns the *reported* parameters (announced with ParameterStatus; the values this client last
saw), the *unreported* ones it asked for at startup or with a committed session ``SET`` (kept as
the statement that sets them), the startup values ``RESET`` returns to, and the corrections a
RESET makes necessary. The snapshot it hands out (:func:`pgproxy.params.param_state`) lets a
server in the wanted state be recognised by identity.

Rule: no I/O and no session. Every method takes what it needs and returns bytes to send or
facts for the caller; the server's own records (``proxy_set``, ``param_state``) are changed
only where a committed effect says the server changed too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from pgproxy import params, sql
from pgproxy.params import READ_ONLY_PARAMETERS
from pgproxy.protocol import messages as m

if TYPE_CHECKING:
    from pgproxy.backend import ServerConnection

_UTF8_NAMES: Final = frozenset(("UTF8", "UTF-8", "UNICODE"))


class ClientSettings:
    __slots__ = (
        "_fixes",
        "_resets",
        "_startup_reported",
        "_startup_unreported",
        "corrections_due",
        "reported",
        "state",
        "text_ok",
        "unreported",
    )

    def __init__(self, reported: dict[str, str], unreported: dict[str, str]) -> None:
        self.reported = reported  # settable reported parameters, as the client saw them
        self.unreported = unreported  # name -> the SET statement giving the client's value
        self._startup_reported = dict(reported)  # what RESET returns reported ones to
        self._startup_unreported = dict(unreported)
        # Reported parameters RESET by a committed unit, and the ParameterStatus corrections
        # they need (None until a RESET happens: most clients never RESET).
        self._resets: set[str] | None = None
        self._fixes: dict[str, str] | None = None
        # The interned snapshot of reported + unreported (None: changed, to be recomputed).
        self.state: params.ParamState | None = None
        # Whether pglast reads this client's text as the server would (None: work it out).
        self.text_ok: bool | None = None
        # A RESET passed: ParameterStatus corrections may be due at the next ReadyForQuery (an
        # attribute, not a property: the session reads it before every ReadyForQuery).
        self.corrections_due = False

    def snapshot(self) -> params.ParamState:
        state = self.state
        if state is None:
            state = self.state = params.param_state(self.reported, self.unreported)
        return state

    def text_rules_ok(self) -> bool:
        """UTF-8 and standard strings: the text the LISTEN fast path parses means what the
        server would read."""
        ok = self.text_ok
        if ok is None:  # once per parameter change
            reported = self.reported
            ok = self.text_ok = (
                reported.get("standard_conforming_strings", "on") == "on"
                and reported.get("client_encoding", "UTF8").upper() in _UTF8_NAMES
            )
        return ok

    def sync_sql(self, server: ServerConnection) -> str | None:
        """SQL that brings ``server`` to this client's parameters (None: it agrees)."""
        return params.sync_sql(self.reported, self.unreported, server.params, server.proxy_set)

    def server_reported(self, name: str, value: str) -> None:
        """The linked server announced a ParameterStatus the client sees."""
        if name not in READ_ONLY_PARAMETERS:
            self.reported[name] = value
            self.state = self.text_ok = None

    def apply(self, effects: list[sql.Subscription | sql.SettingEffect]) -> SettingsChange:
        """A unit with these effects committed: session SETs of unreported parameters now
        follow the client to other servers (reported ones do already, by ParameterStatus;
        only their RESET needs a correction, made by :meth:`corrections`)."""
        reported = {k.lower(): k for k in self.reported}
        change = SettingsChange()
        for effect in effects:
            if isinstance(effect, sql.ResetAll):
                change.reset_all = change.changed = True
                change.proxy_set.clear()  # what this unit SET before is reset too
                self.unreported = dict(self._startup_unreported)
                self._reset_set().update(self._startup_reported)
            elif isinstance(effect, sql.SetParameter) and effect.name in reported:
                # Only the last RESET or SET of a name counts; a RESET is corrected at the
                # ReadyForQuery, after the server's own ParameterStatus.
                if effect.statement is None:
                    self._reset_set().add(reported[effect.name])
                elif self._resets is not None:
                    self._resets.discard(reported[effect.name])
            elif isinstance(effect, sql.SetParameter):
                change.changed = True
                name = effect.name
                if effect.statement is not None:
                    self.unreported[name] = effect.statement
                    change.proxy_set[name] = effect.statement
                else:
                    startup = self._startup_unreported.get(name)
                    if startup is not None:
                        self.unreported[name] = startup
                    else:
                        self.unreported.pop(name, None)
                    change.proxy_set[name] = None
        if change.changed:
            self.state = self.text_ok = None
        return change

    def _reset_set(self) -> set[str]:
        self.corrections_due = True
        if self._resets is None:
            self._resets = set()
        return self._resets

    def corrections(self) -> tuple[bytes, bool]:
        """Before a ReadyForQuery: ParameterStatus messages that put right what the server
        reported after a RESET (the client's default is its startup value, which a pooled
        server does not know), and whether this client's snapshot changed."""
        self.corrections_due = False
        changed = False
        if self._resets:
            for name in self._resets:
                startup = self._startup_reported.get(name)
                if startup is not None and self.reported.get(name) != startup:
                    self.reported[name] = startup
                    if self._fixes is None:
                        self._fixes = {}
                    self._fixes[name] = startup
            self._resets.clear()
            self.state = self.text_ok = None
            changed = True
        out = b""
        if self._fixes:
            out = b"".join(m.parameter_status(k, v) for k, v in self._fixes.items())
            self._fixes.clear()
        return out, changed


class SettingsChange:
    """What :meth:`ClientSettings.apply` did that the linked server must follow."""

    __slots__ = ("changed", "proxy_set", "reset_all")

    def __init__(self) -> None:
        self.changed = False  # the client's snapshot changed
        self.reset_all = False  # RESET ALL: the server is back at its own defaults
        # Unreported parameters SET (statement) or RESET (None) on the server, in order.
        self.proxy_set: dict[str, str | None] = {}

    def apply_to(self, server: ServerConnection) -> None:
        if self.reset_all:
            server.proxy_set.clear()
        for name, statement in self.proxy_set.items():
            if statement is None:
                server.proxy_set.pop(name, None)
            else:
                server.proxy_set[name] = statement
        if self.changed:
            server.param_state = None  # its proxy_set changed, and maybe not to agree
