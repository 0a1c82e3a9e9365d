"""The before/after summary of the seed incident: one table, the direct run beside the run
through pgproxy, then one verdict per run. As aligned text (``pgproxy demo``) or as markdown
(``bench.seed_incident``), from the same rows.

Rule: every cell and verdict is computed here from a :class:`~pgproxy.demo.incident.Phase`
alone (the pass/fail rule is ``incident.proxy_clean``); the renderers only lay them out.
"""

from __future__ import annotations

from collections.abc import Callable

from pgproxy.demo.incident import Fleet, Phase, proxy_clean

OK_LINE = "pgproxy: every job ran once and every worker got every notification exactly once"
TITLES = {"direct": "direct to PostgreSQL", "pgproxy": "through pgproxy"}


def _state(error: str) -> str:
    """The SQLSTATE (or exception name) a classified error starts with."""
    return error.split()[0].rstrip(":") if error else "?"


def _refused(p: Phase, _f: Fleet) -> str:
    if not p.refused:
        return "0"
    return f"{p.refused} ({', '.join(sorted({_state(r) for r in p.connect_errors}))})"


def _probe(p: Phase, _f: Fleet) -> str:
    return "ok" if p.probe == "ok" else f"refused ({_state(p.probe)})"


def _jobs(p: Phase, f: Fleet) -> str:
    dup = f", {p.jobs_duplicated} ran twice" if p.jobs_duplicated else ", each once"
    return f"{p.jobs_done_in_db} of {f.jobs}{dup}"


def _notes(p: Phase, f: Fleet) -> str:
    want = p.connected * f.per_worker
    if p.exact == p.connected:
        return f"all {want:,}, exactly once"
    return (
        f"{p.deliveries:,} of {want:,}: {p.missing:,} missing, {p.duplicates:,} duplicated, "
        f"{p.unexpected:,} unexpected"
    )


def _errors(p: Phase, _f: Fleet) -> str:
    return ", ".join(f"{c} x {r}" for r, c in p.run_errors.items()) or "none"


def _backends(p: Phase, _f: Fleet) -> str:
    if p.target == "pgproxy":
        return f"{p.peak.get('listener', 0)} listener + {p.peak.get('fleet', 0)} pooled"
    return f"{p.peak.get('all', 0)}, one per connection"


ROWS: list[tuple[str, Callable[[Phase, Fleet], str]]] = [
    ("workers connected and LISTENing", lambda p, _f: f"{p.connected} of {p.workers}"),
    ("workers refused", _refused),
    ("a new connection (the web app)", _probe),
    ("jobs run", _jobs),
    ("notifications delivered", _notes),
    ("errors while running", _errors),
    ("PostgreSQL backends (peak)", _backends),
    ("enqueue -> last notification", lambda p, _f: f"{p.seconds:.2f} s"),
]


def failures(p: Phase, f: Fleet) -> list[str]:
    """What kept a run through pgproxy from being clean (empty when it was)."""
    found = []
    if p.connected < p.workers:
        found.append(f"{p.workers - p.connected} workers could not connect")
    if p.exact < p.connected:
        found.append(f"{p.connected - p.exact} workers did not get every notification once")
    if p.jobs_done_in_db < f.jobs or p.jobs_run < f.jobs or p.jobs_duplicated:
        found.append("jobs not run exactly once")
    if p.run_errors:
        found.append("errors while running")
    if p.peak.get("listener") != 1:
        found.append(f"{p.peak.get('listener', 0)} listener backends, not 1")
    if p.peak.get("fleet", 0) > f.pool_size:
        found.append(f"{p.peak.get('fleet', 0)} pooled backends, over the pool size")
    return found


def verdicts(phases: list[Phase], f: Fleet) -> list[str]:
    lines = []
    for p in phases:
        if p.target == "direct":
            fell = p.connected < p.workers or p.probe != "ok"
            lines.append(
                "direct: the fleet "
                + ("FELL OVER: " if fell else "fit in max_connections: ")
                + f"{p.workers - p.connected} of {p.workers} workers refused"
                + (", new connections refused" if p.probe != "ok" else "")
                + "."
            )
            for i, (reason, count) in enumerate(p.connect_errors.most_common(3)):
                lines.append(f"  {'refused with:' if i == 0 else '':13} {count} x {reason}")
        elif proxy_clean(p, f):
            lines.append(
                f"{OK_LINE}, using {p.peak['listener']} listener + {p.peak['fleet']} pooled "
                f"backends (pool size {f.pool_size})."
            )
        else:
            lines.append("pgproxy: FAILED: " + "; ".join(failures(p, f) or ["see the table"]))
        if p.log:
            lines.append(f"pgproxy log: {len(p.log)} warning/error line(s), first: {p.log[0]}")
    return lines


def _cells(phases: list[Phase], f: Fleet) -> tuple[list[str], list[list[str]]]:
    head = ["", *(TITLES.get(p.target, p.target) for p in phases)]
    return head, [[label, *(cell(p, f) for p in phases)] for label, cell in ROWS]


def text(phases: list[Phase], f: Fleet) -> str:
    """The table as aligned columns, then the verdicts."""
    head, rows = _cells(phases, f)
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *rows]
    ]
    return "\n".join([*lines, "", *verdicts(phases, f)]) + "\n"


def markdown(phases: list[Phase], f: Fleet) -> str:
    """The table in markdown (failed connections in bold), then the verdicts."""
    head, rows = _cells(phases, f)
    for row in rows:
        if row[0] in ("workers refused", "a new connection (the web app)"):
            row[1:] = [c if c in ("0", "ok") else f"**{c}**" for c in row[1:]]
    lines = [f"| {' | '.join(head)} |".replace("|  |", "| |"), "|---|" + "---|" * len(phases)]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join([*lines, "", *verdicts(phases, f)]) + "\n"


def clean(phases: list[Phase], f: Fleet) -> bool:
    """The incident's outcome: the last run went through pgproxy and was clean."""
    return bool(phases) and proxy_clean(phases[-1], f)
