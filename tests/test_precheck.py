"""The cheap pre-check that decides whether a query is parsed at all (pgproxy.precheck).

Its cache is keyed by the text with every digit read as 0, so queries with inlined numbers
share one entry: these tests pin that the cached verdict is always the uncached one.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy import precheck

KEYWORDS = ["listen", "NOTIFY", "set ", "reset ", "Temp", "savepoint", "hold", "prepare"]


def _uncached(text: bytes) -> bool:
    return precheck._precheck(text.decode("latin-1"))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([*KEYWORDS, "0", "7", "42", ";", "\n", "/", " ", "x", "5et"]),
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;\n_", max_size=12),
        ),
        max_size=10,
    )
)
def test_cached_verdict_equals_the_uncached_one(parts: list[str]) -> None:
    text = "".join(parts).encode()
    assert precheck.might_matter(text) == _uncached(text)
    assert precheck.might_matter(text) == _uncached(text)  # a second time: from the cache


def test_texts_differing_in_digits_share_a_verdict_and_an_entry() -> None:
    precheck._PRECHECKED.clear()
    for aid in (101, 234, 567, 890):  # as pgbench -S: mostly the same number of digits
        query = f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};".encode()
        assert precheck.might_matter(query) is False
    assert len(precheck._PRECHECKED) == 1
    assert precheck.might_matter(b"SELECT 1; SET search_path = s1") is True
    assert precheck.might_matter(b"SELECT 2; SET search_path = s2") is True
    assert precheck.might_matter(b"select pg_advisory_lock(9)") is True
