"""``tls-server-end-point`` channel binding data (RFC 5929 section 4) for SCRAM-SHA-256-PLUS.

The data is a hash of the proxy's own certificate, so a client that checks it knows that the
TLS connection it authenticated over ends at the holder of that certificate (no relay in the
middle can reuse its proof). The hash function is the one the certificate is signed with, except
that MD5 and SHA-1 are replaced by SHA-256, as in Postgres' ``be_tls_get_certificate_hash``.

Python's ``ssl`` does not expose the local certificate of a connection, so the hash is computed
from the configured certificate file (its first PEM block, the leaf, as ``load_cert_chain``
requires). Only the signature algorithm OID is needed from the DER, read with a minimal parser.
Certificates whose signature names no hash (Ed25519, RSA-PSS) get no channel binding: then
SCRAM-SHA-256-PLUS is simply not offered (Postgres offers it and then fails).
"""

from __future__ import annotations

import hashlib
import re
import ssl

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)

# Signature algorithm OID -> hash for the binding (MD5/SHA-1 upgraded to SHA-256).
_HASHES = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10040.4.3": "sha256",  # dsa-with-sha1
    "2.16.840.1.101.3.4.3.1": "sha224",  # dsa-with-sha224
    "2.16.840.1.101.3.4.3.2": "sha256",  # dsa-with-sha256
}


class _Der:
    """Just enough DER to walk SEQUENCEs: (tag, content start, content end) at a position."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def item(self, pos: int, end: int) -> tuple[int, int, int]:
        data = self.data
        if pos + 2 > end:
            raise ValueError("truncated DER")
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + n > end:
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > end:
            raise ValueError("DER length beyond its container")
        return tag, pos, pos + length


def _oid(body: bytes) -> str:
    if not body:
        raise ValueError("empty OID")
    arcs = [body[0] // 40, body[0] % 40] if body[0] < 80 else [2, body[0] - 80]
    value = 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(map(str, arcs))


def signature_algorithm(der: bytes) -> str:
    """The dotted OID of a DER certificate's ``signatureAlgorithm``."""
    d = _Der(der)
    tag, start, end = d.item(0, len(der))  # Certificate ::= SEQUENCE {
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, tbs_end = d.item(start, end)  # tbsCertificate SEQUENCE, skipped
    tag, alg_start, alg_end = d.item(tbs_end, end)  # signatureAlgorithm SEQUENCE {
    tag, oid_start, oid_end = d.item(alg_start, alg_end)  # algorithm OBJECT IDENTIFIER
    if tag != 0x06:
        raise ValueError("signature algorithm is not an OID")
    return _oid(der[oid_start:oid_end])


def certificate_hash(der: bytes) -> bytes | None:
    """The ``tls-server-end-point`` data for a DER certificate, or None if it has none."""
    try:
        name = _HASHES.get(signature_algorithm(der))
    except ValueError:
        return None
    return None if name is None else hashlib.new(name, der).digest()


def certificate_file_hash(path: str) -> bytes | None:
    """:func:`certificate_hash` of the first certificate in a PEM file (None if unreadable)."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            match = _PEM_CERT.search(f.read())
        if match is None:
            return None
        der = ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return certificate_hash(der)
