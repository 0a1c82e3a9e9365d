"""The whole proxy, whichever worker is asked: every worker's snapshot, every worker acting.

With ``workers = N`` a console client or a /metrics scrape reaches one worker, chosen by the
kernel. That worker answers for all of them: :func:`gather` asks every other worker for its
snapshot at once (over ``pgproxy.workers.peers``) and merges them with its own
(``snapshot.merge``); :func:`everywhere` runs a console control command on every worker at
once and answers when all have (PAUSE when every worker has paused); :func:`here` is what
each worker runs of it.

Rules: a worker that does not answer a snapshot request within ``GATHER_TIMEOUT`` is left
out, never waited for: the merged snapshot's ``processes`` counts the workers that answered
(``workers`` how many there are) and the worker is logged. A control command succeeds if it
did on every worker, or on some and the others do not know its object (the database or client
lives in another worker); a worker that failed or did not answer makes it fail, naming the
workers, after all have answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Final, Protocol

from pgproxy.admin import commands
from pgproxy.admin.commands import Operations, Result
from pgproxy.admin.snapshot import Snapshot, merge
from pgproxy.protocol import errors
from pgproxy.protocol.errors import PgError
from pgproxy.wire import log

__all__ = ["GATHER_TIMEOUT", "Siblings", "everywhere", "gather", "here"]

GATHER_TIMEOUT: Final = 2.0  # seconds a worker has to send its snapshot
COMMAND_TIMEOUT: Final = 5.0  # ... to run a control command that does not wait
# What a worker that does not have the command's object answers: someone else has it.
_NOT_HERE: Final = frozenset((errors.INVALID_CATALOG_NAME, errors.UNDEFINED_OBJECT))


class Siblings(Protocol):
    """The other workers (``pgproxy.workers.peers.Peers``)."""

    @property
    def index(self) -> int: ...

    def snapshots(self, timeout: float) -> Awaitable[dict[int, Snapshot | Exception]]: ...

    def perform(
        self, verb: str, arg: str, timeout: float | None
    ) -> Awaitable[dict[int, str | Exception]]: ...


async def gather(own: Snapshot, siblings: Siblings) -> Snapshot:
    """``own`` merged with the snapshots of the siblings that answer within GATHER_TIMEOUT."""
    answers = await siblings.snapshots(GATHER_TIMEOUT)
    found = [own]
    for index, answer in sorted(answers.items()):
        if isinstance(answer, Exception):
            log.warning("worker %d left out of the whole proxy's figures: %s", index,
                        _reason(answer))  # fmt: skip
        else:
            found.append(answer)
    try:
        return merge(found)
    except (KeyError, TypeError, ValueError):  # a sibling running other code than this one
        log.exception("the workers' snapshots do not merge; showing this worker's alone")
        return own


async def here(ops: Operations, verb: str, arg: str) -> str:
    """Run a control command in this process: its tag (PgError if it failed)."""
    outcome = commands.perform(ops, verb, arg)
    result = outcome if isinstance(outcome, Result) else await outcome
    return result.tag


async def everywhere(ops: Operations, siblings: Siblings, verb: str, arg: str) -> Result:
    """Run a control command here and on every sibling at once; its result once all have."""
    timeout = None if verb in commands.WAITING else COMMAND_TIMEOUT
    mine, theirs = await asyncio.gather(
        _outcome(here(ops, verb, arg)), siblings.perform(verb, arg, timeout)
    )
    outcomes = {siblings.index: mine, **theirs}
    done = sorted(i for i, o in outcomes.items() if isinstance(o, str))
    failed = {
        i: o
        for i, o in sorted(outcomes.items())
        if isinstance(o, Exception) and not (isinstance(o, PgError) and o.sqlstate in _NOT_HERE)
    }
    if failed:
        first = next(iter(failed.values()))
        sqlstate = first.sqlstate if isinstance(first, PgError) else errors.INTERNAL_ERROR
        where = "; ".join(f"worker {i}: {_reason(o)}" for i, o in failed.items())
        ran = f" (it ran on worker {', '.join(map(str, done))})" if done else ""
        raise PgError(sqlstate, f"{verb.upper()} failed on {where}{ran}")
    if not done:
        assert isinstance(mine, PgError)
        raise mine  # no worker has its object: as one process would say
    return Result(str(outcomes[done[0]]))


async def _outcome(run: Awaitable[str]) -> str | Exception:
    try:
        return await run
    except PgError as exc:
        return exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, PgError):
        return exc.message
    return str(exc) or type(exc).__name__
