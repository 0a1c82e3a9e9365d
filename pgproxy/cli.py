"""Command-line entry point.

Only argument parsing and configuration loading live here; serving is delegated to
``pgproxy.serve.run``, imported lazily so ``--check``/``--version`` work without pulling
in the event loop and protocol machinery.
"""

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import get_args

from pgproxy import version
from pgproxy.config import Config, ConfigError, PoolMode, as_workers, env_table, load_config
from pgproxy.workers.role import WORKER_FLAG, WorkerRole, per_worker

__all__ = ["build_arg_parser", "config_from_args", "main"]


def _worker_role(text: str) -> WorkerRole:  # a named function: argparse errors name it
    return WorkerRole.parse(text)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgproxy",
        description="PostgreSQL wire-protocol pooling proxy. "
        "`pgproxy demo` shows what it is for (`pgproxy demo --help`).",
        epilog=(
            "Precedence: built-in defaults < config file < environment "
            "(PGPROXY_CONFIG, DATABASE_URL, DATABASE_URLS, PGPROXY_LISTEN and PGPROXY_<SETTING> "
            "for every [proxy] setting: see --env-table) < command-line options."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="TOML config file (default: $PGPROXY_CONFIG, else built-in defaults)",
    )
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="address to accept clients on (e.g. [::1]:6432)"
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help='postgresql:// URL for the "*" database (every database name not configured)',
    )
    parser.add_argument("--pool-mode", choices=get_args(PoolMode), help="override proxy.pool_mode")
    parser.add_argument(
        "--workers",
        metavar="N|auto",
        help="processes sharing the listen port (override proxy.workers; auto = one per CPU)",
    )
    parser.add_argument(WORKER_FLAG, type=_worker_role, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument(
        "--env-table",
        action="store_true",
        help="print the environment variables, their types and defaults (Markdown) and exit",
    )
    parser.add_argument("--version", action="version", version=f"pgproxy {version()}")
    return parser


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """Load the config the parsed arguments describe; ``env`` defaults to os.environ.

    A worker (``--worker``) gets its share of the sizes (``pgproxy.workers.role.per_worker``)."""
    config = load_config(
        args.config,
        listen=args.listen,
        upstream=args.upstream,
        pool_mode=args.pool_mode,
        env=env,
    )
    if getattr(args, "workers", None) is not None:  # PGPROXY_WORKERS is load_config's
        text = args.workers.strip()
        value = as_workers(int(text) if text.isdigit() else text, "--workers")
        config = dataclasses.replace(config, proxy=dataclasses.replace(config.proxy, workers=value))
    role: WorkerRole | None = getattr(args, "worker", None)
    if role is None:
        return config
    return per_worker(config, role.count)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # `pgproxy demo`: the seed incident, with the demo extra
        from pgproxy.demo.command import main as demo

        return demo(argv[1:])
    args = build_arg_parser().parse_args(argv)
    if args.env_table:
        print(env_table(), end="")
        return 0
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"pgproxy: config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        where = str(config.source) if config.source is not None else "built-in defaults"
        print(f"pgproxy: configuration OK ({where})")
        return 0
    if args.worker is None and config.proxy.workers > 1:
        from pgproxy.workers.supervisor import supervise

        def load(path: Path | None) -> Config:
            if path is None:
                return config_from_args(args)
            return config_from_args(argparse.Namespace(**{**vars(args), "config": path}))

        return supervise(config, argv, load)
    # Imported here so that --check and --version never load the event-loop machinery.
    from pgproxy.serve import run

    return run(config, reload=lambda: config_from_args(args), role=args.worker)
