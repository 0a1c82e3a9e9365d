"""Drives a built pgproxy image: ``python -m tests.support.image_check IMAGE`` (scripts/test-image).

Owns the checks on the image as users run it: configured by its environment alone, then by a
mounted ConfigMap-like directory that changes under it; queried with psql, LISTEN/NOTIFY with
psycopg; its UID, its read-only root filesystem, its probes and HEALTHCHECK, and SIGTERM's
drain. The rule:
everything is real (podman with runc and host networking as the project's shared/CONTAINERS-HERE.md
describes, a throwaway cluster from pgproxy.testing), each check is reported by name, a failed
one does not stop the others, and the last line is the count CI reads:
``image: N passed, M failed`` (exit status 1 if any failed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from pgproxy.testing.cluster import PgCluster, find_bindir
from tests.support.configmap import publish
from tests.support.process import free_port

UID = 10001
STOP_TIMEOUT = 30  # seconds SIGTERM has to end the container
# As Kubernetes runs it (deploy/kubernetes): read-only root, no capabilities, no escalation.
HARDENED = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"]


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:2])}: exit {result.returncode}: {result.stderr.strip()[-500:]}"
        )
    return result


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, body: Callable[[], object]) -> bool:
        try:
            body()
        except Exception as exc:  # every failure is reported, and the next check runs
            self.failed += 1
            print(f"FAILED  {name}: {exc}", flush=True)
            if not isinstance(exc, AssertionError):
                traceback.print_exc()
            return False
        self.passed += 1
        print(f"ok      {name}", flush=True)
        return True


class Container:
    """A detached container of the image, on the host network, listening on ``port``."""

    def __init__(self, image: str, name: str, port: int, *options: str) -> None:
        self.name, self.port = name, port
        podman("rm", "-f", name, check=False)
        podman(
            "run",
            "-d",
            "--name",
            name,
            "--runtime",
            "runc",
            "--network",
            "host",
            *HARDENED,
            "-e",
            f"PGPROXY_LISTEN_PORT={port}",
            *options,
            image,
        )

    def dsn(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def inspect(self) -> dict[str, object]:
        found: list[dict[str, object]] = json.loads(podman("inspect", self.name).stdout)
        return found[0]

    def wait_serving(self, dbname: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not serves(self.dsn(dbname)):
            state = podman("inspect", "-f", "{{.State.Status}}", self.name, check=False)
            if state.stdout.strip() != "running" or time.monotonic() > deadline:
                raise AssertionError(f"not serving ({state.stdout.strip()}):\n{self.logs()}")
            time.sleep(0.2)

    def stop_with_sigterm(self) -> None:
        podman("kill", "--signal", "TERM", self.name)
        code = podman("wait", self.name, timeout=STOP_TIMEOUT).stdout.strip()
        assert code == "0", f"exit code {code}:\n{self.logs()[-2000:]}"

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


def serves(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def http_status(port: int, path: str) -> int:
    """The status of ``GET path`` on the container's HTTP listener (0: no answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@contextmanager
def containers() -> Iterator[list[Container]]:
    made: list[Container] = []
    try:
        yield made
    finally:
        for container in made:
            container.remove()


def check_image(report: Report, image: str) -> None:
    def metadata() -> None:
        text = podman("image", "inspect", image).stdout
        config = json.loads(text)[0]["Config"]
        assert config.get("User") == f"{UID}:{UID}", config.get("User")
        assert {"6432/tcp", "9127/tcp"} <= set(config.get("ExposedPorts") or {}), config
        assert config.get("StopSignal") == "SIGTERM", config.get("StopSignal")
        assert "pgproxy.healthcheck" in text, "no HEALTHCHECK (build with --format docker)"

    report.check(
        "image: user 10001, ports 6432 and 9127, STOPSIGNAL SIGTERM, HEALTHCHECK", metadata
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return podman(
            "run", "--rm", "--runtime", "runc", "--network", "host", *HARDENED, *args, check=False
        )

    def check_ok() -> None:
        result = run("-e", "DATABASE_URL=postgresql://db.internal:5432", image, "--check")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "pgproxy: configuration OK (/etc/pgproxy/pgproxy.toml)\n", result

    report.check("--check finds the image's /etc/pgproxy/pgproxy.toml", check_ok)

    def bad_variable() -> None:
        result = run("-e", "PGPROXY_DEFAULT_POOL_SIZE=0", image, "--check")
        assert result.returncode == 2, result
        assert "config error: PGPROXY_DEFAULT_POOL_SIZE: must be >= 1 (got 0)" in result.stderr

    report.check("an invalid variable is refused, naming it", bad_variable)


def check_environment_only(
    report: Report, image: str, pg: PgCluster, made: list[Container]
) -> None:
    port, metrics = free_port(), free_port()
    box = Container(
        image,
        f"pgproxy-image-env-{os.getpid()}",
        port,
        "-e",
        f"DATABASE_URL=postgresql://127.0.0.1:{pg.port}",
        "-e",
        f"PGPROXY_METRICS_LISTEN=0.0.0.0:{metrics}",
    )
    made.append(box)
    if not report.check(
        "starts with environment-only configuration", lambda: box.wait_serving("postgres")
    ):
        return

    def startup_line() -> None:
        logs = box.logs()
        assert f"listening on 0.0.0.0:{port} (transaction mode, compiled)" in logs, logs

    report.check("listens on 0.0.0.0, runs the compiled build", startup_line)

    def psql() -> None:
        out = subprocess.run(
            [
                str(find_bindir() / "psql"),
                "-XAtc",
                "select current_database(), 6 * 7",
                box.dsn("postgres"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert out == "postgres|42\n", out

    report.check("psql runs a query through it", psql)

    def listen_notify() -> None:
        with (
            psycopg.connect(box.dsn("postgres"), autocommit=True) as listener,
            psycopg.connect(box.dsn("postgres"), autocommit=True) as notifier,
        ):
            listener.execute("LISTEN image_check")
            notifier.execute("NOTIFY image_check, 'through the image'")
            got = next(listener.notifies(timeout=10))
            assert (got.channel, got.payload) == ("image_check", "through the image"), got

    report.check("LISTEN/NOTIFY through it (psycopg)", listen_notify)

    def uid() -> None:
        pid = box.inspect()["State"]["Pid"]  # type: ignore[index]
        status = Path(f"/proc/{pid}/status").read_text()
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
        assert ids["Uid"] == [str(UID)] * 4 and ids["Gid"] == [str(UID)] * 4, ids["Uid"]

    report.check("runs as UID/GID 10001", uid)

    def read_only() -> None:
        assert box.inspect()["HostConfig"]["ReadonlyRootfs"] is True  # type: ignore[index]
        write = "open('/opt/pgproxy/probe', 'w')"
        result = podman("exec", box.name, "python", "-c", write, check=False)
        assert result.returncode != 0 and "Read-only file system" in result.stderr, result

    report.check("root filesystem is read-only (and pgproxy needs no more)", read_only)

    def healthcheck() -> None:
        result = podman("healthcheck", "run", box.name, check=False)
        assert result.returncode == 0, result

    def probes() -> None:
        assert http_status(metrics, "/healthz") == 200
        eventually(lambda: http_status(metrics, "/readyz") == 200, "/readyz never answered 200")

    report.check("/healthz and /readyz answer 200 (PGPROXY_METRICS_LISTEN)", probes)
    report.check("HEALTHCHECK passes (GET /healthz)", healthcheck)

    def drain() -> None:
        with psycopg.connect(box.dsn("postgres")) as conn:
            conn.execute("select 1")  # a transaction in progress
            podman("kill", "--signal", "TERM", box.name)
            eventually(lambda: http_status(metrics, "/readyz") == 503, "/readyz stayed ready")
            assert conn.execute("select 2").fetchone() == (2,)  # the transaction goes on
            conn.commit()
            try:
                conn.execute("select 3")
                raise AssertionError("the client was not closed after its transaction")
            except psycopg.OperationalError as exc:
                assert exc.sqlstate in (None, "57P01"), exc
        code = podman("wait", box.name, timeout=STOP_TIMEOUT).stdout.strip()
        assert code == "0", f"exit code {code}:\n{box.logs()[-2000:]}"

    report.check(
        "SIGTERM drains: /readyz 503 at once, the open transaction commits, its client is "
        "closed, exit code 0",
        drain,
    )


def _toml(pg: PgCluster, name: str) -> str:
    return (
        "[proxy]\nconfig_watch_interval = 0.5\n"
        f'[databases.{name}]\nurl = "postgresql://127.0.0.1:{pg.port}/postgres"\n'
    )


def check_mounted_config(report: Report, image: str, pg: PgCluster, made: list[Container]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mount = Path(tmp)
        mount.chmod(0o755)  # readable by the container's UID
        publish(mount, {"pgproxy.toml": _toml(pg, "mounted")})
        box = Container(
            image,
            f"pgproxy-image-mount-{os.getpid()}",
            free_port(),
            "-v",
            f"{mount}:/etc/pgproxy:ro",
        )
        made.append(box)

        def found() -> None:
            box.wait_serving("mounted")
            assert not serves(box.dsn("postgres")), "the file names its databases: no '*'"

        if not report.check("a directory mounted at /etc/pgproxy configures it", found):
            return

        def reloaded() -> None:
            publish(mount, {"pgproxy.toml": _toml(pg, "renamed")})  # as the kubelet does
            eventually(lambda: serves(box.dsn("renamed")), f"not reloaded:\n{box.logs()}")
            assert not serves(box.dsn("mounted"))

        report.check("the mounted file is reloaded when it changes", reloaded)
        report.check("SIGTERM ends it with exit code 0 (mounted)", box.stop_with_sigterm)


def main(argv: list[str]) -> int:
    (image,) = argv
    started = time.monotonic()
    report = Report()
    check_image(report, image)
    with PgCluster() as pg, containers() as made:
        check_environment_only(report, image, pg, made)
        check_mounted_config(report, image, pg, made)
    print(f"checks took {time.monotonic() - started:.0f} s", flush=True)
    print(f"image: {report.passed} passed, {report.failed} failed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
