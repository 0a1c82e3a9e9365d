"""Which build the suite runs against: scripts/test runs it twice, pure Python and then the
mypyc build in build/compiled (with PGPROXY_EXPECT_COMPILED=1), and each pass must really be
the build it claims to test."""

from __future__ import annotations

import os

import pgproxy
from pgproxy import backend, wire
from pgproxy.client import session, stream


def test_the_build_under_test_is_the_one_asked_for() -> None:
    expected = os.environ.get("PGPROXY_EXPECT_COMPILED", "0") == "1"
    assert pgproxy.compiled() is expected, (
        "scripts/test sets PGPROXY_EXPECT_COMPILED=1 for its compiled pass; "
        f"backend is {backend.__file__}"
    )
    for module in (backend, session, stream, wire):  # all hot modules come from the same build
        assert (module.__file__ or "").endswith(".so") is expected
