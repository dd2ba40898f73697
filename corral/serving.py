"""The machinery behind `corral up`: build the servers, bind the port, serve, report health.

Kept apart from `corral/up.py` so that `corral --help` does not pay for importing the
MCP SDK and uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import shlex
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx2
import uvicorn
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer

from corral import mcp_config
from corral.auth import token_path
from corral.errors import InvalidArgument, Unavailable
from corral.servers import SERVER_MODULES
from corral.servers.http_limits import uvicorn_limits

if TYPE_CHECKING:
    from corral.servers.sandbox.config import SandboxSettings
    from corral.servers.session import EventStore

__all__ = ["Built", "bind", "build_servers", "serve_until_stopped"]

HEALTH_TIMEOUT_S = 20
GRACEFUL_S = 5


# -- the servers ---------------------------------------------------------------------


@dataclass
class Built:
    servers: dict[str, MCPServer] = field(default_factory=dict)
    max_file_bytes: int | None = None  # the sandbox's largest write_file: the HTTP body cap follows it
    store: EventStore | None = (
        None  # the session store, shared with the viewer; the session server's lifespan closes it
    )
    closers: list[Callable[[], Any]] = field(default_factory=list)  # what has no lifespan yet: the git gateway

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def _build_session(built: Built) -> MCPServer:
    from corral.servers.session.config import SessionSettings
    from corral.servers.session.server import build_server

    built.store = SessionSettings().open_store()
    return build_server(built.store, owns_store=True)  # its lifespan closes it, after the viewer's last request


def _build_sandbox(built: Built) -> MCPServer:
    from corral.servers.sandbox.config import SandboxSettings
    from corral.servers.sandbox.server import build_server

    settings = SandboxSettings()
    if "credentials" in built.servers:  # the git gateway runs in this process: sandboxes get its socket
        settings = with_git_gateway(settings)
    server, _service = build_server(settings)
    built.max_file_bytes = settings.sandbox_max_file_bytes
    return server


def with_git_gateway(settings: SandboxSettings) -> SandboxSettings:
    """Sandbox settings that also mount the git gateway's directory at /run/corral (bubblewrap only;
    a Docker or E2B sandbox has no host mounts), unless the operator already mounts something there."""
    from corral.servers.credentials.gateway import SANDBOX_DIR
    from corral.servers.sandbox.config import ExtraBind
    from corral.vault.config import VaultSettings

    if settings.sandbox_backend != "bubblewrap" or any(b.dest == SANDBOX_DIR for b in settings.sandbox_extra_binds):
        return settings
    gateway = ExtraBind(source=VaultSettings().git_socket_path().parent, dest=SANDBOX_DIR)
    return settings.model_copy(update={"sandbox_extra_binds": [*settings.sandbox_extra_binds, gateway]})


def _build_credentials(built: Built) -> MCPServer:
    from corral.servers.credentials.server import assemble

    return assemble(logging.getLogger().handlers)  # its lifespan opens and closes the vault and git gateway


BUILDERS: dict[str, Callable[[Built], MCPServer]] = {
    "session": _build_session,
    "credentials": _build_credentials,
    "sandbox": _build_sandbox,
}


def build_servers() -> Built:
    """Every server with its embedded defaults; a failure is one actionable error."""
    built = Built()
    for name in BUILDERS:  # credentials before sandbox: the sandboxes mount its git gateway
        try:
            built.servers[name] = BUILDERS[name](built)
        except BaseException:
            built.close()
            raise
    built.servers = {
        name: built.servers[name] for name in SERVER_MODULES if name in built.servers
    }  # listed in the usual order
    return built


# -- the socket -----------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """Bind before anything starts, so a busy port is one clear line, not a uvicorn log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise Unavailable(
                f"port {port} on {host} is already in use (another `corral up`?)",
                hint=f"stop whatever holds it (ss -ltnp 'sport = :{port}'), or pick another port: corral up --port {port + 1}",
            ) from err
        if err.errno == errno.EADDRNOTAVAIL:
            raise InvalidArgument(f"{host} is not an address of this machine", hint="use --host 127.0.0.1") from err
        if err.errno == errno.EACCES:
            raise InvalidArgument(
                f"not allowed to listen on port {port}", hint="use a port above 1023, e.g. --port 8750"
            ) from err
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


# -- serving --------------------------------------------------------------------------


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """uvicorn ends a failed start-up with sys.exit(3); inside a task that would escape the loop."""
    with contextlib.suppress(SystemExit):
        await server.serve(sockets=[sock])


class _QuietOnce(logging.Filter):
    """Drops uvicorn's log records once the app recorded a start-up error of ours."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(self.app, "startup_error", None) is None


class _Uvicorn(uvicorn.Server):
    """uvicorn, but a signal ends it with exit 0 instead of being re-raised afterwards."""

    stopped_by: str | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(sig: int, _frame: Any) -> None:
            self.stopped_by = signal.Signals(sig).name
            if self.should_exit:  # a second Ctrl-C: stop waiting for connections
                self.force_exit = True
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def _health(base: str, name: str, token: str) -> str:
    """One line: does the server answer `tools/list` over HTTP with the token?"""
    url = f"{base}/{name}/mcp"
    started = time.monotonic()
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_S):
            auth = {"Authorization": f"Bearer {token}"}
            async with (
                httpx2.AsyncClient(headers=auth, timeout=HEALTH_TIMEOUT_S) as http,
                Client(streamable_http_client(url, http_client=http)) as client,
            ):
                tools = await client.list_tools()
    except Exception as err:  # a health line reports any failure; the other servers keep running
        return f"  ✗ {name:<12} {url:<40} not answering: {type(err).__name__}: {err}"
    ms = (time.monotonic() - started) * 1000
    return f"  ✓ {name:<12} {url:<40} ok, {len(tools.tools)} tools ({ms:.0f} ms)"


def _banner(built: Built, base: str, token: str, home: Path, health: list[str]) -> str:
    lines = [f"Corral is up: open {base}/sessions?token={token} to watch sessions  (data dir {home})", *health]
    lines.append(f"  ✓ {'viewer':<12} {base}/sessions  (the link above signs the browser in)")
    lines.append(f"token: {token_path(home)} (send 'Authorization: Bearer <token>')")
    entries = mcp_config.http_entries(base, token, built.servers)
    lines.append("\nClaude Code:")
    lines += ["  " + shlex.join(c) for c in mcp_config.claude_code_commands(entries, "user", home)]
    lines.append("Any MCP client (streamable HTTP):")
    lines.append(json.dumps({"mcpServers": entries}, indent=2))
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


async def serve_until_stopped(
    app: Any, sock: socket.socket, built: Built, base: str, token: str, home: Path
) -> str | None:
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_S, lifespan="on", **uvicorn_limits()
    )
    server = _Uvicorn(config)
    quiet = _QuietOnce(app)  # uvicorn would log a start-up error as a traceback; it is ours to report
    logging.getLogger("uvicorn.error").addFilter(quiet)
    task = asyncio.create_task(_serve(server, sock))
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if task.done():  # startup failed: surface it as our one line
            await task
            raise getattr(app, "startup_error", None) or Unavailable(
                "the HTTP server stopped during start-up", hint="run again with CORRAL_LOG_LEVEL=INFO for details"
            )
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    health = await asyncio.gather(*(_health(base, name, token) for name in built.servers))  # in parallel: start-up time
    print(_banner(built, base, token, home, health), flush=True)
    await task
    return server.stopped_by
