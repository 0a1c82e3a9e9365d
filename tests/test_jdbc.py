"""pgjdbc through the proxy (Debian's libpostgresql-jdbc-java; scripts/test installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.proxy_runner import ProxyThread

JAR = Path("/usr/share/java/postgresql.jar")
SOURCE = Path(__file__).parent / "jdbc" / "ListenJdbc.java"


@pytest.fixture(scope="module")
def jdbc_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not JAR.exists() or shutil.which("javac") is None:
        pytest.fail("pgjdbc or javac missing: run scripts/test, which installs them")
    out = tmp_path_factory.mktemp("jdbc")
    subprocess.run(["javac", "-cp", str(JAR), "-d", str(out), str(SOURCE)], check=True, timeout=120)
    return out


def test_jdbc_listen_with_autocommit_off_and_prepared_statements(
    proxy: ProxyThread, jdbc_classes: Path
) -> None:
    url = f"jdbc:postgresql://127.0.0.1:{proxy.port}/postgres?user=postgres&prepareThreshold=1"
    out = subprocess.run(
        ["java", "-cp", f"{jdbc_classes}:{JAR}", "ListenJdbc", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == [
        "jdbc_chan:n0:false",
        "jdbc_chan:n1:false",
        "jdbc_chan:n2:false",
        "jdbc_chan:self:true",  # its own NOTIFY carries the PID pgjdbc was given
    ]
