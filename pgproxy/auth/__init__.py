"""Authentication in both directions.

``frontend``: clients log in to the proxy (trust, md5, SCRAM-SHA-256). ``upstream``: the proxy
logs in to a Postgres server (cleartext, md5, SCRAM-SHA-256). ``scram``: the sans-IO SCRAM
exchanges both use. Both run over a :class:`MessageChannel`.
"""

from pgproxy.auth.channel import MessageChannel
from pgproxy.auth.frontend import ClientAuthResult, authenticate_client
from pgproxy.auth.upstream import authenticate_upstream

__all__ = ["ClientAuthResult", "MessageChannel", "authenticate_client", "authenticate_upstream"]
