"""Login rate and connect latency through pgproxy: connect, log in, Terminate, over and over.

A throwaway cluster and one pgproxy (transaction mode, trust); ``--clients`` concurrent raw
protocol clients (uvloop, one process) each open a connection, send the startup packet, read
up to the first ReadyForQuery and say Terminate, for ``--seconds``.  It reports logins per
second, the latency of one login (TCP connect to ReadyForQuery: p50, p99) and pgproxy's CPU
per login (user + system, from /proc: the figure a busy shared machine moves least).

    .venv/bin/python -m bench.logins --clients 20 --seconds 10 --tls none,sslrequest,direct

``--tls`` picks how the clients connect: ``none`` (plaintext), ``sslrequest`` (SSLRequest, then
TLS, as libpq's default) or ``direct`` (TLS from the first byte with ALPN ``postgresql``, as
libpq 17's ``sslnegotiation=direct``); any TLS case runs pgproxy with ``client_tls_mode =
"prefer"`` and a throwaway certificate (``trustme``).  ``--tree DIR`` runs the pgproxy of
another checkout (to compare before/after a change on the same machine, interleaved by round).
``--quick`` (4 clients, 1 s, one round, every TLS case) is the smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._cli import run
from bench.throughput import group_cpu
from pgproxy.testing import servers
from pgproxy.testing.cluster import PgCluster

REPO = Path(__file__).resolve().parent.parent
TLS_CASES = ("none", "sslrequest", "direct")


def _startup() -> bytes:
    body = struct.pack("!i", 3 << 16) + b"user\0postgres\0database\0postgres\0\0"
    return struct.pack("!i", len(body) + 4) + body


STARTUP = _startup()
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
TERMINATE = b"X\0\0\0\4"


async def _login(port: int, tls: str, ctx: object) -> float:
    import ssl

    assert isinstance(ctx, ssl.SSLContext) or ctx is None
    began = time.perf_counter()
    if tls == "direct":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if tls == "sslrequest":
            writer.write(SSL_REQUEST)
            if await reader.readexactly(1) != b"S":
                raise RuntimeError("TLS refused")
            await writer.start_tls(ctx)  # type: ignore[arg-type]
    writer.write(STARTUP)
    while True:
        header = await reader.readexactly(5)
        body = await reader.readexactly(struct.unpack_from("!i", header, 1)[0] - 4)
        if header[:1] == b"E":
            raise RuntimeError(f"login failed: {body!r}")
        if header[:1] == b"Z":
            break
    elapsed = time.perf_counter() - began
    writer.write(TERMINATE)
    writer.close()
    return elapsed


async def _drive(port: int, tls: str, clients: int, seconds: float) -> list[float]:
    import ssl

    ctx = None
    if tls != "none":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["postgresql"])
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await _login(port, tls, ctx))

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def _client_main(port: int, tls: str, clients: int, seconds: float) -> None:
    """In a process of its own, so the clients' CPU is not counted as pgproxy's."""
    import uvloop

    began = time.perf_counter()
    latencies = uvloop.run(_drive(port, tls, clients, seconds))
    took = time.perf_counter() - began
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"{len(latencies) / took:.1f} {statistics.median(latencies) * 1e3:.3f} {p99 * 1e3:.3f}")


def _start_pgproxy(
    tmp: Path, tree: Path, pg_port: int, tls: bool
) -> tuple[subprocess.Popen[bytes], int]:
    port = servers.free_port()
    name = f"pgproxy-{tree.name}-{'tls' if tls else 'plain'}"
    settings = ""
    if tls:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(tmp / "server.crt"))
        cert.private_key_pem.write_to_path(str(tmp / "server.key"))
        settings = (
            f'client_tls_mode = "prefer"\nclient_tls_cert_file = "{tmp}/server.crt"\n'
            f'client_tls_key_file = "{tmp}/server.key"\n'
        )
    config = tmp / f"{name}.toml"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:{port}"\npool_mode = "transaction"\n'
        f'default_pool_size = 10\nmax_client_conn = 10000\nlog_level = "warning"\n{settings}'
        f'\n[databases."*"]\nurl = "postgresql://127.0.0.1:{pg_port}"\n'
    )
    cmd = [sys.executable, "-m", "pgproxy", "--config", str(config)]
    env = {**servers.clean_env(), "PYTHONPATH": str(tree)}  # that tree's pgproxy, not ours
    return servers.start_server(name, cmd, port, tmp / f"{name}.log", tree, env=env), port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", default="none", help=f"comma-separated: {', '.join(TLS_CASES)}")
    parser.add_argument("--quick", action="store_true", help="a few seconds: the smoke test")
    parser.add_argument("--tree", action="append", type=Path, default=[],
                        help="a checkout to measure (repeatable; default: this one)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.rounds, args.tls = 4, 1.0, 1, ",".join(TLS_CASES)
    cases = args.tls.split(",")
    if any(case not in TLS_CASES for case in cases):
        parser.error(f"--tls: one or more of {', '.join(TLS_CASES)}")
    trees = [t.resolve() for t in args.tree] or [REPO]
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir, PgCluster() as pg:
        tmp = Path(tmp_dir)
        for rnd in range(args.rounds):
            order = trees[rnd % len(trees) :] + trees[: rnd % len(trees)]
            for tree in order:
                for case in cases:
                    proc, port = _start_pgproxy(tmp, tree, pg.port, case != "none")
                    cpu_before = group_cpu(proc.pid)
                    try:
                        out = subprocess.run(
                            [sys.executable, "-c", "import sys; from bench.logins import "
                             "_client_main as m; m(int(sys.argv[1]), sys.argv[2], "
                             "int(sys.argv[3]), float(sys.argv[4]))",
                             str(port), case, str(args.clients), str(args.seconds)],
                            cwd=REPO, check=True, capture_output=True, text=True,
                        ).stdout.split()  # fmt: skip
                        cpu = group_cpu(proc.pid) - cpu_before
                    finally:
                        servers.stop_server(proc)
                    rate, p50, p99 = (float(x) for x in out)
                    per_login = cpu / (rate * args.seconds) * 1e6  # µs
                    results.setdefault((str(tree), case), []).append((rate, p50, p99, per_login))
                    print(f"round {rnd + 1} {tree} {case}: {rate:.0f} logins/s "
                          f"p50 {p50:.2f} ms p99 {p99:.2f} ms, pgproxy CPU {per_login:.0f} µs "
                          "per login", flush=True)  # fmt: skip
    print(f"\nmedians over {args.rounds} rounds, {args.clients} clients:")
    for (tree, case), samples in results.items():
        rate = statistics.median(s[0] for s in samples)
        p50 = statistics.median(s[1] for s in samples)
        p99 = statistics.median(s[2] for s in samples)
        cpu = statistics.median(s[3] for s in samples)
        print(f"{tree} {case:>10}: {rate:8.0f} logins/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
              f"pgproxy CPU {cpu:5.0f} µs/login")  # fmt: skip
    return 0


if __name__ == "__main__":
    run(main)
