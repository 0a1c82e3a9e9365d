"""The seed corpora in ``tests/fuzz/corpus/``, written by ``python -m tests.fuzz.seeds``.

One small input per behaviour worth starting from (a clean login and unit, each CVE class,
each COPY path, each parser's valid input); the fuzzer mutates from there. Regenerate after
changing :mod:`tests.fuzz.vocab` (the inputs are encoded with its numbering); the files are kept
in the repository so a run needs no generator, and ``test_fuzz`` checks they are current.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pgproxy.auth import scram
from pgproxy.protocol import messages as m
from tests.fuzz import vocab

CORPUS = Path(__file__).parent / "corpus"
WHOLE = bytes([200])  # first byte >= 192: every input in one read
OP = {
    name: n
    for n, name in enumerate(
        [
            "query",
            "parse",
            "bind",
            "badbind",
            "describe",
            "execute",
            "close",
            "sync",
            "flush",
            "copydata",
            "copydone",
            "copyfail",
            "function",
            "raw",
            "declared",
            "startup",
            "end",
        ]
    )
}


def ops(*steps: tuple[str, int, bytes], read: bytes = WHOLE, mode: int = 0) -> bytes:
    """A ``session`` input: steps (op name, arg, blob) fed in reads of ``read``'s size."""
    out = read + b"".join(bytes((OP[op], arg, len(blob))) + blob for op, arg, blob in steps)
    return out + bytes((mode,))


def sql(text: str) -> int:
    return vocab.SQL.index(text)


def _startup(**params: str) -> bytes:
    return m.startup_message({"user": "bench", "database": "bench", **params})


STARTUP: dict[str, bytes] = {
    "login-query": WHOLE + _startup() + m.query("SELECT 1") + m.TERMINATE_MESSAGE,
    "login-bytewise": bytes([0]) + _startup() + m.query("SELECT 1"),
    "ssl-then-login": WHOLE + m.ssl_request() + _startup(),
    "gss-ssl-login": WHOLE + m.gssenc_request() + m.ssl_request() + _startup(),
    "ssl-twice": WHOLE + m.ssl_request() + m.ssl_request(),
    "cancel": WHOLE + m.cancel_request(1, b"abcd"),
    "options-empty-c": WHOLE + _startup(options="-c="),
    "options-set": WHOLE + _startup(options="-c work_mem=8MB --search-path=x"),
    "length-2g": WHOLE + struct.pack("!ii", 0x7FFFFFFF, 3 << 16),
    "length-negative": WHOLE + struct.pack("!ii", -8, 3 << 16),
    "protocol-3-2": WHOLE
    + _startup(_pq_x="1")[:4]
    + struct.pack("!i", 3 << 16 | 2)
    + _startup(_pq_x="1")[8:],
    "console": WHOLE
    + m.startup_message({"user": "bench", "database": "pgbouncer"})
    + m.query("SHOW POOLS"),
    "startup-twice": WHOLE + _startup() + _startup(),
    "message-huge": WHOLE + _startup() + b"Q" + struct.pack("!i", 0x7FFFFFFF) + b"SEL",
}

SESSION: dict[str, bytes] = {
    "simple": ops(("query", sql("SELECT 1"), b"")),
    "extended-unit": ops(
        ("parse", 1 + 8 * sql("SELECT 1"), b""),
        ("bind", 1 * 6 + 1, b""),
        ("describe", 1, b""),
        ("execute", 1, b""),
        ("sync", 0, b""),
    ),
    "extended-no-sync": ops(("parse", 0, b""), ("bind", 0, b""), ("execute", 0, b"")),
    "unknown-names": ops(
        ("bind", 2, b""), ("describe", 3, b""), ("close", 4, b""), ("sync", 0, b"")
    ),
    "proxy-name": ops(("parse", 3, b""), ("bind", 3, b""), ("sync", 0, b""), ("parse", 3, b"")),
    "bad-count": ops(("parse", 1, b""), ("badbind", 200, b"xy"), ("sync", 0, b"")),
    "flush-order": ops(("flush", 0, b""), ("parse", 0, b""), ("flush", 0, b""), ("sync", 0, b"")),
    "tx": ops(("query", sql("BEGIN"), b""), ("query", sql("ERROR"), b""), ("sync", 0, b"")),
    "copy-in": ops(
        ("query", sql("COPY t FROM STDIN"), b""), ("copydata", 0, b"1\n"), ("copydone", 0, b"")
    ),
    "copy-fail": ops(
        ("query", sql("COPY t FROM STDIN"), b""), ("copyfail", 0, b"no"), ("copydata", 0, b"x")
    ),
    "copydata-after-done": ops(
        ("query", sql("COPY t FROM STDIN"), b""), ("copydone", 0, b""), ("copydata", 0, b"late")
    ),
    "copy-out": ops(("query", sql("COPY t TO STDOUT"), b""), ("copydone", 0, b"")),
    "declared-2g": ops(("query", 0, b""), ("declared", 0, b"abc")),
    "half-copydata": ops(("query", 0, b""), ("declared", 7 + (5 << 4), b"xx")),
    "startup-again": ops(("startup", 1, b""), ("query", 0, b"")),
    "session-mode": ops(("query", sql("BEGIN"), b""), ("parse", 1, b""), mode=1),
    "bytewise": ops(("parse", 0, b""), ("bind", 0, b"p"), ("sync", 0, b""), read=bytes([0])),
}

# scram inputs: (op, blob) pairs, op as in targets.scram_step.
SCRAM: dict[str, list[tuple[int, bytes]]] = {
    "good-login": [(0, b""), (1, b""), (7, b"\x00")],
    "startup-mid-scram": [(0, b""), (2, b"")],
    "startup-before-final": [(0, b""), (2, b""), (1, b"")],
    "garbage-final": [(0, b""), (3, b"c=biws,r=x,p=AAAA")],
    "bad-mechanism": [(4, b"n,,n=,r=abc")],
    "ssl-mid-scram": [(0, b""), (5, b"")],
    "huge-length": [(0, b""), (6, b"")],
    "initial-twice": [(0, b""), (0, b"")],
}

SANSIO: dict[str, bytes] = {
    "startup": bytes([0]) + _startup()[4:],
    "options": bytes([1]) + b"-c a=b --c-d=e -c=",
    "parse": bytes([2]) + m.parse("a", "SELECT $1", [23])[5:],
    "describe": bytes([3]) + m.describe("S", "a")[5:],
    "sasl-initial": bytes([4]) + m.sasl_initial_response(scram.MECHANISM, b"n,,n=,r=abc")[5:],
    "error": bytes([6]) + m.error_response({"S": "ERROR", "C": "42000", "M": "x"})[5:],
    "scram-server": bytes([14]) + b"n,,n=,r=abc\nc=biws,r=abc,p=" + b"A" * 44,
    "scram-client": bytes([15]) + b"r=fuzzX,s=AAAA,i=4096",
    "verifier": bytes([16])
    + str(scram.ScramVerifier(4096, b"s" * 16, b"k" * 32, b"v" * 32)).encode(),
}


def corpus() -> dict[str, dict[str, bytes]]:
    return {
        "startup": STARTUP,
        "session": SESSION,
        "scram": {k: b"".join(bytes((op, len(b))) + b for op, b in v) for k, v in SCRAM.items()},
        "sansio": SANSIO,
    }


def main() -> None:
    for target, inputs in corpus().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.name not in inputs:
                old.unlink()
        for name, data in inputs.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
