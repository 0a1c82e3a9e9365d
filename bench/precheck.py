"""Cost per query of LISTEN detection: the byte pre-check every Query pays vs. a pglast parse.

Run: python -m bench.precheck
"""

from __future__ import annotations

import timeit

import pglast

from pgproxy.protocol import messages as m
from pgproxy.sql import might_matter

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
    print("| query | bytes | pre-check ns | pglast parse ns | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, sql in QUERIES.items():
        body = m.query(sql)[5:]
        n = 200_000
        pre = min(timeit.repeat(lambda b=body: might_matter(b), number=n, repeat=3)) / n * 1e9
        k = 2_000
        parse = min(timeit.repeat(lambda s=sql: pglast.parse_sql(s), number=k, repeat=3)) / k * 1e9
        print(f"| {name} | {len(body)} | {pre:.0f} | {parse:.0f} | {parse / pre:.0f}x |")


if __name__ == "__main__":
    main()
