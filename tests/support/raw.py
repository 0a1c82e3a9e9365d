"""A minimal blocking wire-protocol client for tests that need to see exact bytes."""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping

from pgproxy.protocol import messages as m


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def read_byte(self) -> bytes:
        assert self._fill(1), "connection closed"
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_message(self) -> tuple[str, bytes] | None:
        """(type char, body), or None at EOF."""
        if not self._fill(5):
            return None
        type_ = chr(self.buf[0])
        (length,) = struct.unpack_from("!i", self.buf, 1)
        if not self._fill(1 + length):
            return None
        body = self.buf[5 : 1 + length]
        self.buf = self.buf[1 + length :]
        return type_, body

    def read_until_ready(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            msg = self.read_message()
            assert msg is not None, f"EOF before ReadyForQuery; got {out}"
            out.append(msg)
            if msg[0] == "Z":
                return out

    def read_all(self) -> list[tuple[str, bytes]]:
        """Every message until the proxy closes the connection."""
        out = []
        while (msg := self.read_message()) is not None:
            out.append(msg)
        return out

    def startup(self, user: str = "postgres", database: str = "postgres", **params: str) -> None:
        self.send(m.startup_message({"user": user, "database": database, **params}))

    def login(self, user: str = "postgres", database: str = "postgres", **params: str) -> dict:
        """Trust login; returns {'params': ..., 'pid': ..., 'secret': ...}."""
        self.startup(user, database, **params)
        info: dict = {"params": {}}
        for type_, body in self.read_until_ready():
            if type_ == "S":
                k, v = m.parse_parameter_status(body)
                info["params"][k] = v
            elif type_ == "K":
                info["pid"], info["secret"] = m.parse_backend_key_data(body)
            elif type_ == "E":
                raise AssertionError(f"login failed: {m.parse_error_fields(body)}")
        return info

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.send(m.query(sql))
        return self.read_until_ready()


def error_of(messages: list[tuple[str, bytes]]) -> Mapping[str, str] | None:
    for type_, body in messages:
        if type_ == "E":
            return m.parse_error_fields(body)
    return None


def rows_of(messages: list[tuple[str, bytes]]) -> list[list[str | None]]:
    rows = []
    for type_, body in messages:
        if type_ == "D":
            (n,) = struct.unpack_from("!h", body, 0)
            pos = 2
            row: list[str | None] = []
            for _ in range(n):
                (ln,) = struct.unpack_from("!i", body, pos)
                pos += 4
                if ln < 0:
                    row.append(None)
                else:
                    row.append(body[pos : pos + ln].decode())
                    pos += ln
            rows.append(row)
    return rows
