"""The fuzz targets: each takes one input (bytes) and raises only when a property fails.

* ``startup``: raw bytes from the moment a client connects (startup packets, SSL/GSS requests,
  cancel requests, whatever follows), fed in reads of a size the first byte picks.
* ``session``: a trust login, then messages decoded by :func:`tests.fuzz.vocab.decode`
  (extended protocol in any order, COPY, bad names and counts, huge declared lengths, a
  second startup packet); the last byte picks transaction or session pooling.
* ``scram``: a SCRAM login driven step by step: the right client-first and client-final
  messages, fuzzed ones, a second StartupMessage mid-exchange, an SSLRequest, huge lengths.
* ``sansio``: the parsers alone (``messages``, ``params.parse_options``, SCRAM's both sides):
  only ``ProtocolError``/``PgError`` may come out.

The session targets check :meth:`tests.fuzz.harness.Rig.check` (including tracemalloc's peak).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from pgproxy import params
from pgproxy.auth import scram
from pgproxy.auth.scram_client import ScramClient
from pgproxy.auth.scram_server import ScramServer
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PgError
from tests.fuzz import vocab
from tests.fuzz.harness import PASSWORD, VERIFIER, Rig, run_session

_measuring = True  # off while warming up


def startup(data: bytes) -> None:
    size = (data[0] % 48 + 1) if data else 1
    asyncio.run(run_session(vocab.chunked(data[1:], size), measure=_measuring))


def session(data: bytes) -> None:
    messages, size = vocab.decode(data)
    mode = "session" if data and data[-1] & 1 else "transaction"

    async def run() -> None:
        async with Rig(pool_mode=mode) as rig:
            await rig.feed([vocab.STARTUP])
            await rig.feed(vocab.chunked(b"".join(messages), size), measure=_measuring)
            await rig.hang_up()
            rig.check()

    asyncio.run(run())


def _sasl_continue(sent: bytes) -> bytes | None:
    """The server-first-message in what the proxy sent, if it has come."""
    pos = 0
    while pos + 5 <= len(sent):
        length = int.from_bytes(sent[pos + 1 : pos + 5], "big")
        body = sent[pos + 5 : pos + 1 + length]
        if sent[pos] == m.AUTHENTICATION and body[:4] == struct.pack("!i", m.AUTH_SASL_CONTINUE):
            return body[4:]
        pos += 1 + length
    return None


MECHANISMS = (scram.MECHANISM, scram.MECHANISM_PLUS, "", "SCRAM-SHA-1")


def scram_step(op: int, blob: bytes, client: ScramClient, rig: Rig) -> bytes:
    if op == 0:
        return m.sasl_initial_response(scram.MECHANISM, client.client_first())
    if op == 1:
        first = _sasl_continue(bytes(rig.sent))
        if first is None:
            return m.password_message(blob)
        try:
            return m.password_message(client.handle_server_first(first))
        except (PgError, RuntimeError):
            return m.password_message(blob)
    if op == 2:
        return vocab.STARTUP  # CVE class: a second StartupMessage in the middle of SCRAM
    if op == 3:
        return m.password_message(blob)
    if op == 4:
        return m.sasl_initial_response(MECHANISMS[len(blob) % len(MECHANISMS)], blob)
    if op == 5:
        return m.ssl_request()
    if op == 6:
        return b"p" + struct.pack("!i", vocab.LENGTHS[len(blob) % len(vocab.LENGTHS)]) + blob
    return vocab.build(len(blob) % vocab.OPS, blob[0] if blob else 0, blob)


def scram_login(data: bytes) -> None:
    async def run() -> None:
        async with Rig("scram-sha-256") as rig:
            await rig.feed([vocab.STARTUP])
            client = ScramClient(PASSWORD)
            pos = 0
            while pos + 2 <= len(data):
                op, size = data[pos] % 8, data[pos + 1] % 40
                blob = data[pos + 2 : pos + 2 + size]
                pos += 2 + size
                if op == 0:  # each SASLInitialResponse from a fresh client (a new nonce)
                    client = ScramClient(PASSWORD)
                await rig.feed([scram_step(op, blob, client, rig)], measure=_measuring)
            await rig.hang_up()
            rig.check()

    asyncio.run(run())


def _startup_packet(body: bytes) -> object:
    return m.parse_startup_packet(body)


def _options(body: bytes) -> object:
    return params.parse_options(body.decode("utf-8", "surrogateescape"))


def _scram_server(body: bytes) -> object:
    first, _, final = body.partition(b"\n")
    server = ScramServer(VERIFIER)
    server.handle_client_first(first)
    return server.handle_client_final(final)


def _scram_client(body: bytes) -> object:
    client = ScramClient(PASSWORD, nonce=b"fuzz")
    client.client_first()
    return client.read_server_first(body)  # not the PBKDF2 after it: i= is the fuzzer's


def _verifier(body: bytes) -> object:
    return scram.ScramVerifier.parse(body.decode("utf-8", "surrogateescape"))


PARSERS: tuple[Callable[[bytes], object], ...] = (
    _startup_packet,
    _options,
    m.parse_parse,
    m.parse_describe_or_close,
    m.parse_sasl_initial_response,
    m.parse_password,
    m.parse_error_fields,
    m.parse_authentication,
    m.parse_sasl_mechanisms,
    m.parse_backend_key_data,
    m.parse_parameter_status,
    m.parse_notification,
    m.parse_query,
    m.parse_command_complete,
    _scram_server,
    _scram_client,
    _verifier,
)


def sansio(data: bytes) -> None:
    if not data:
        return
    try:
        PARSERS[data[0] % len(PARSERS)](data[1:])
    except (m.ProtocolError, PgError):
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "startup": startup,
    "session": session,
    "scram": scram_login,
    "sansio": sansio,
}


def warm_up(only: str | None = None) -> None:
    """Run each seed once unmeasured: what the first use of a path imports or caches
    (the admin console's modules, SCRAM keys) is not allocation an input caused. A seed
    that fails here fails again, reported, when it is run for real."""
    from tests.fuzz.seeds import corpus

    global _measuring
    _measuring = False
    try:
        for target, inputs in corpus().items():
            for data in inputs.values() if only in (None, target) else ():
                try:
                    TARGETS[target](data)
                except AssertionError:
                    pass
    finally:
        _measuring = True
