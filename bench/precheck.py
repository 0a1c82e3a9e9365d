"""Cost per query of LISTEN detection: the byte pre-check every Query pays vs. a pglast parse.

Run: python -m bench.precheck
"""

from __future__ import annotations

import timeit

import pglast

from pgproxy.precheck import _precheck, might_matter
from pgproxy.protocol import messages as m

QUERIES = {
    "pgbench select": "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    "typical ORM insert": (
        "INSERT INTO jobs (queue, payload, run_at, attempts) VALUES ($1, $2, now(), 0)"
        " RETURNING id, queue, run_at"
    ),
    "2 kB report query": "SELECT " + ", ".join(f"sum(c{i}) AS s{i}" for i in range(150)),
    "LISTEN (pre-check hit)": 'LISTEN "jobs_ready"',
}


def main() -> None:
    print("| query | bytes | pre-check ns (first time) | repeated text ns | pglast parse ns |")
    print("|---|---:|---:|---:|---:|")
    for name, sql in QUERIES.items():
        body = m.query(sql)[5:]
        n = 200_000
        # First sight of a text: decode, lower, scan. Repeats hit a bounded cache.
        cold = min(timeit.repeat(lambda b=body: _precheck(b.decode("latin-1")), number=n, repeat=3))
        warm = min(timeit.repeat(lambda b=body: might_matter(b), number=n, repeat=3))
        k = 2_000
        parse = min(timeit.repeat(lambda s=sql: pglast.parse_sql(s), number=k, repeat=3)) / k * 1e9
        print(
            f"| {name} | {len(body)} | {cold / n * 1e9:.0f} | {warm / n * 1e9:.0f} | {parse:.0f} |"
        )


if __name__ == "__main__":
    main()
