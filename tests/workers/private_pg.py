"""A private PostgreSQL cluster the fault tests may restart and stop.

The shared server (`CORRAL_TEST_POSTGRES_URL`) serves every other test at once, so it must
never go down; these tests start their own with the binaries beside it: `initdb` into a
tmp dir (as the `postgres` OS user when run as root: initdb refuses root), then
`pg_ctl start/restart -m fast/stop -m fast`, listening on loopback at a free port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(os.environ.get("CORRAL_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.dir = root / "pgdata"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        root.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(root, "postgres")
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(BIN / tool), *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def _ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(
            "pg_ctl", "-D", str(self.dir), "-o", opts, "-l", str(self.dir / "server.log"), "-w", "-t", "60", *args
        )

    def start(self) -> float:
        self._ctl("start")
        return time.time()

    def restart(self) -> float:
        """`pg_ctl restart -m fast`: every connection is cut, the server is back when this returns."""
        self._ctl("restart", "-m", "fast")
        return time.time()

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def down_for(self, seconds: float) -> float:
        self.stop()
        time.sleep(seconds)  # the outage itself is the point: nothing to wait for instead
        return self.start()

    def running(self) -> bool:
        return (
            subprocess.run(
                [*self._as, str(BIN / "pg_ctl"), "-D", str(self.dir), "status"], capture_output=True, check=False
            ).returncode
            == 0
        )


@pytest.fixture(scope="module")
def private_pg(needs_postgres):
    """A cluster of the tests' own (module-wide: initdb takes seconds); stopped at the end.

    Its directory is a fresh one under /tmp, not pytest's tmp_path: that one is private to
    root, and the server runs as `postgres`.
    """
    if not (BIN / "initdb").exists():
        pytest.skip(f"no initdb in {BIN} (set CORRAL_TEST_PG_BIN)")
    root = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    cluster = Cluster(root)
    cluster.start()
    yield cluster
    if cluster.running():
        cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
