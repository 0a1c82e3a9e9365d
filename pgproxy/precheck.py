"""The cheap pre-check that decides whether a query's text is worth parsing with pglast.

It is on the per-transaction path (every Query and Parse in transaction mode), so it lives in a
module of its own that the optional mypyc build compiles (``pgproxy.sql``, which needs pglast's
introspecting Visitor, stays pure Python).
"""

from __future__ import annotations

import re
from typing import Final

_PRECHECKED: dict[bytes, bool] = {}  # drivers send the same texts over and over
# Texts that differ only in their digits get the same verdict (no keyword contains a digit),
# so queries with inlined numbers (pgbench, ORMs inlining ids) share one cache entry.
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_PRECHECK_CACHE_ENTRIES: Final = 4096
_PRECHECK_CACHE_TEXT: Final = 2048  # longer texts are rarely repeated verbatim
# SET/RESET at the start of a statement (after a ';', a comment or a newline). UPDATE ... SET
# does not match, so the common write pays one C-level scan and no parse.
_SET_STATEMENT: Final = re.compile(r"(?:\A|[;\n/])\s*(?:re)?set\s")


def might_matter(query_body: bytes | str) -> bool:
    """True if query text may do something the proxy tracks: LISTEN, UNLISTEN, NOTIFY, DISCARD,
    DEALLOCATE, savepoints, session SET/RESET/set_config(), or session state a pool cannot
    carry (advisory locks, temporary tables, WITH HOLD cursors, SQL PREPARE). False positives
    are fine: they cost one (cached) parse."""
    if isinstance(query_body, str):
        return _precheck(query_body)
    if len(query_body) > _PRECHECK_CACHE_TEXT:
        return _precheck(query_body.decode("latin-1"))
    key = query_body.translate(_DIGITS_AS_ZERO)
    known = _PRECHECKED.get(key)
    if known is not None:
        return known  # a translate and a hash cost a fraction of the twelve scans
    result = _precheck(key.decode("latin-1"))
    if len(_PRECHECKED) >= _PRECHECK_CACHE_ENTRIES:
        _PRECHECKED.clear()  # bounded; cheaper than an LRU and good enough
    _PRECHECKED[key] = result
    return result


def _precheck(text: str) -> bool:
    # Substring tests on str, not bytes: ``bytes in bytes`` first tries the needle as an
    # integer and formats (then discards) a TypeError every time, which made this pre-check a
    # quarter of the proxy's instructions per transaction (callgrind). latin-1 maps bytes 1:1,
    # and the keywords are ASCII, so lower() folding other characters too changes nothing.
    low = text.lower()
    return (
        "listen" in low
        or "notify" in low
        or "discard" in low
        or "deallocate" in low
        or "savepoint" in low  # LISTEN effects follow savepoints (PROTOCOL-NOTES 10)
        or "rollback" in low
        or "release" in low
        or "advisory" in low
        or "temp" in low
        or "hold" in low
        or "prepare" in low
        or ("set" in low and ("set_config" in low or _SET_STATEMENT.search(low) is not None))
    )
