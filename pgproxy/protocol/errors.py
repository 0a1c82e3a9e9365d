"""Postgres-style errors the proxy raises and sends.

Every error a client sees from the proxy itself is a :class:`PgError`: it carries the SQLSTATE
that drivers map to exception classes, and it renders as an ErrorResponse with the ``S``, ``V``,
``C`` and ``M`` fields that Postgres always sends (PROTOCOL-NOTES 34).
"""

from __future__ import annotations

from collections.abc import Mapping

# SQLSTATEs used by the proxy (names follow Postgres' errcodes.txt).
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
CONNECTION_EXCEPTION = "08000"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
INVALID_PASSWORD = "28P01"
INVALID_CATALOG_NAME = "3D000"
UNDEFINED_OBJECT = "42704"
NAME_TOO_LONG = "42622"
TOO_MANY_CONNECTIONS = "53300"
FEATURE_NOT_SUPPORTED = "0A000"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
IDLE_IN_TRANSACTION_SESSION_TIMEOUT = "25P03"
INTERNAL_ERROR = "XX000"
OUT_OF_MEMORY = "53200"
PROGRAM_LIMIT_EXCEEDED = "54000"
INSUFFICIENT_PRIVILEGE = "42501"
DUPLICATE_PREPARED_STATEMENT = "42P05"
DUPLICATE_CURSOR = "42P03"
INVALID_SQL_STATEMENT_NAME = "26000"
INVALID_CURSOR_NAME = "34000"
CONFIG_FILE_ERROR = "F0000"
INVALID_PARAMETER_VALUE = "22023"
SUCCESSFUL_COMPLETION = "00000"

SEVERITIES = ("ERROR", "FATAL", "PANIC", "WARNING", "NOTICE", "DEBUG", "INFO", "LOG")


class PgError(Exception):
    """An error to report to a client as a Postgres ErrorResponse."""

    def __init__(
        self,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint

    @property
    def fatal(self) -> bool:
        return self.severity in ("FATAL", "PANIC")

    def fields(self) -> dict[str, str]:
        """The ErrorResponse fields, in the order Postgres sends them."""
        out = {"S": self.severity, "V": self.severity, "C": self.sqlstate, "M": self.message}
        if self.detail:
            out["D"] = self.detail
        if self.hint:
            out["H"] = self.hint
        return out

    def with_severity(self, severity: str) -> PgError:
        """The same error (SQLSTATE, message, detail, hint) at another severity: a server's
        FATAL passed on as an ERROR when the client can carry on, or the reverse."""
        return PgError(
            self.sqlstate, self.message, severity=severity, detail=self.detail, hint=self.hint
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> PgError:
        """Rebuild from a server's ErrorResponse; tolerate missing fields (a CVE elsewhere)."""
        severity = fields.get("V") or fields.get("S") or "ERROR"
        return cls(
            fields.get("C", INTERNAL_ERROR),
            fields.get("M", "unknown error"),
            severity=severity,
            detail=fields.get("D"),
            hint=fields.get("H"),
        )

    def __repr__(self) -> str:
        return f"PgError({self.severity} {self.sqlstate}: {self.message})"


def fatal(
    sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> PgError:
    return PgError(sqlstate, message, severity="FATAL", detail=detail, hint=hint)
