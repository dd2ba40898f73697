"""bubblewrap specifics: server-side extra binds (the credential proxy's socket), settings."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from corral.errors import InvalidArgument
from corral.servers.sandbox.server import parse_binds

from .conftest import Harness, call

pytestmark = pytest.mark.anyio


def test_parse_binds() -> None:
    binds = parse_binds("/run/x.sock:/run/corral/git.sock, /data:/data:rw")
    assert [(str(b.source), b.dest, b.writable) for b in binds] == [
        ("/run/x.sock", "/run/corral/git.sock", False),
        ("/data", "/data", True),
    ]
    for bad in ("relative:/x", "/x:relative", "/x:/y:maybe"):
        with pytest.raises(InvalidArgument):
            parse_binds(bad)


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
    settings.sandbox_extra_binds = f"{path}:/run/corral/git.sock"
    try:
        h = Harness("bubblewrap", settings)
        async with h.client() as c:
            probe = "python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('/run/corral/git.sock'); print(s.recv(99).decode())\""
            r = await call(c, "execute", command=probe + "; touch /run/corral/x 2>/dev/null || echo read-only")
            assert r["stdout"].splitlines() == ["via-socket", "read-only"], r
    finally:
        srv.close()
        path.unlink()
        sock_dir.rmdir()


def test_heavy_sdks_are_imported_only_when_used() -> None:
    import subprocess
    import sys

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
    settings.sandbox_extra_binds = f"{sandbox_root.parent}/does-not-exist:/run/x"
    h = Harness("bubblewrap", settings)
    from .conftest import fail

    async with h.client() as c:
        text = await fail(c, "execute", "unavailable", command="echo hi")
        assert "does-not-exist" in text
