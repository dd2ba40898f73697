"""bubblewrap specifics: server-side extra binds (the credential proxy's socket), settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mcp.client import Client

from corral.servers.sandbox.config import ExtraBind, SandboxSettings

from .conftest import Harness, call

pytestmark = pytest.mark.anyio


def test_extra_binds_are_parsed_where_they_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_SANDBOX_EXTRA_BINDS", "/run/x.sock:/run/corral/git.sock, /data:/data:rw")
    binds = SandboxSettings(home=tmp_path).sandbox_extra_binds
    assert [(str(b.source), b.dest, b.writable) for b in binds] == [
        ("/run/x.sock", "/run/corral/git.sock", False),
        ("/data", "/data", True),
    ]
    for bad in ("relative:/x", "/x:relative", "/x:/y:maybe"):
        env = {**os.environ, "CORRAL_HOME": str(tmp_path), "CORRAL_SANDBOX_EXTRA_BINDS": bad}
        out = subprocess.run(
            [sys.executable, "-m", "corral.cli", "serve", "sandbox"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 1, out.stderr
        assert out.stderr.startswith("corral: invalid_argument:") and "CORRAL_SANDBOX_EXTRA_BINDS" in out.stderr, (
            out.stderr
        )
        assert bad.split(":")[0] in out.stderr and "Traceback" not in out.stderr


@pytest.mark.requires("bwrap")
async def test_extra_bind_socket_reachable_without_network(settings, sandbox_root: Path) -> None:
    """A unix socket bound in by the server works inside a `network: none` sandbox."""
    sock_dir = sandbox_root.parent / f"sock-{os.getpid()}"
    sock_dir.mkdir(mode=0o711, exist_ok=True)
    path = sock_dir / "gw.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o666)
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"via-socket")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    settings.sandbox_extra_binds = ExtraBind.parse(f"{path}:/run/corral/git.sock")
    try:
        h = Harness("bubblewrap", settings)
        async with h.client() as c:
            probe = "python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('/run/corral/git.sock'); print(s.recv(99).decode())\""
            # The socket is the server's, bound read-only (the dir around it may be the sandbox's own layer).
            r = await call(c, "execute", command=probe + "; touch /run/corral/git.sock 2>/dev/null || echo read-only")
            assert r["stdout"].splitlines() == ["via-socket", "read-only"], r
    finally:
        srv.close()
        path.unlink()
        sock_dir.rmdir()


def test_heavy_sdks_are_imported_only_when_used() -> None:
    code = (
        "import sys; from corral.servers.sandbox.server import build_server, backend_config; "
        "from corral.servers.sandbox.config import SandboxSettings; "
        "backend_config(SandboxSettings()); "
        "print('e2b' in sys.modules, 'corral.servers.sandbox.docker' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.requires("bwrap")
async def test_bwrap_setup_failure_is_unavailable_not_a_command_result(settings, sandbox_root: Path) -> None:
    settings.sandbox_extra_binds = ExtraBind.parse(f"{sandbox_root.parent}/does-not-exist:/run/x")
    h = Harness("bubblewrap", settings)
    from .conftest import fail

    async with h.client() as c:
        text = await fail(c, "execute", "unavailable", command="echo hi")
        assert "does-not-exist" in text


@pytest.mark.requires("bwrap")
async def test_the_server_closes_its_backend_and_registry_when_it_stops(settings) -> None:
    """Resources live as long as the server's MCP lifespan: closed when the last transport ends."""
    from corral.servers.sandbox.bubblewrap import BubblewrapBackend
    from corral.servers.sandbox.server import backend_config, build_server

    class Observed(BubblewrapBackend):  # the real backend, counting its close() calls
        closed = 0

        async def close(self) -> None:
            type(self).closed += 1
            await super().close()

    server, service = build_server(settings, Observed(backend_config(settings)), reap=False)
    wal = service.registry.path.with_name(service.registry.path.name + "-wal")
    async with Client(server) as c:
        await call(c, "list_sandboxes")
        assert wal.exists() and Observed.closed == 0  # open while serving
    assert Observed.closed == 1
    assert not wal.exists()  # SQLite removes the WAL when its last connection closes: the registry is closed
    async with Client(server) as c:  # served again (an in-process server runs once per client): reopened
        assert (await call(c, "list_sandboxes"))["sandboxes"] == []
    assert Observed.closed == 2
