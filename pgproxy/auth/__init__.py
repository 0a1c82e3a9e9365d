"""Authentication in both directions.

``frontend``: clients log in to the proxy (trust, md5, SCRAM-SHA-256[-PLUS]). ``upstream``: the
proxy logs in to a Postgres server (cleartext, md5, SCRAM-SHA-256, with a password or
pass-through credentials). Both run over a :class:`MessageChannel`, with the sans-IO SCRAM
exchanges ``scram_server`` and ``scram_client``, which share ``scram`` (verifiers and keys).
Around them: ``hba`` (access rules: who may log in, and how), ``query`` (auth_query lookups),
``credentials`` (what pass-through learns from logins) and ``cbind`` (channel binding data of
the proxy's certificate).
"""

from pgproxy.auth.channel import MessageChannel
from pgproxy.auth.frontend import ClientAuthResult, authenticate_client
from pgproxy.auth.upstream import authenticate_upstream

__all__ = ["ClientAuthResult", "MessageChannel", "authenticate_client", "authenticate_upstream"]
