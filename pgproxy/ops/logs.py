"""How log records are written: text lines, or one JSON object per line (``log_format``).

Owns the format and level of a pgproxy process's log (``configure``: at start and on every
SIGHUP, in the supervisor and in each worker) and the JSON shape: ``ts`` (ISO 8601, UTC),
``level``, ``logger``, ``msg``, ``process`` (``supervisor`` or ``worker N``, with workers),
``exc`` (a traceback, if any), and every structured field the call passed with ``extra=``
(``event``, ``user``, ``database``, ``addr``, ``tls``, ``duration_s``, ``reason``...). Text
lines carry the same facts in their message.

Rule: this module adds nothing to a record but its shape; what must never be logged (passwords,
verifiers, learnt keys, notification payloads) is kept out by the callers, in the message and
in ``extra`` alike (tests/test_ops_logs.py scans a whole run's logs for them).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Final

__all__ = ["JsonFormatter", "configure"]

# What every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.process:
            out["process"] = self.process
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str, log_format: str, process: str = "") -> None:
    """Write this process's log to stderr at ``level`` in ``log_format`` ("text" or "json");
    called again (SIGHUP), it replaces the previous settings."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        tag = f"[{process}]" if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
