"""The git gateway: git smart HTTP for sandboxes, with the secret added outside them.

A sandbox gets only a capability: a random token in a remote URL, scoped to one credential
and one repository, read or write, expiring. The gateway listens on a unix socket (mode
0700 directory) that the sandbox has bind-mounted; inside the sandbox, `git_forwarder.py`
relays 127.0.0.1:8417 to that socket (a `--unshare-net` sandbox has its own loopback).
For each request the gateway maps the token to the repository URL, allows only the smart
HTTP endpoints (`info/refs`, `git-upload-pack`, and `git-receive-pack` for write grants),
and forwards through the proxy's checks (host, method, address, no redirects) with the
secret injected.

What the sandbox gets back goes through the proxy's redactor, except packfiles:
- response headers: always redacted;
- info/refs, error pages, any non-2xx response, and a 2xx POST whose content type is not
  git's (`application/x-git-*`): read whole (up to CORRAL_PROXY_DRAIN_BYTES, else 502),
  decoded (gzip/deflate; any other encoding is withheld), redacted, sent uncompressed. If
  redaction changes a ref advertisement its pkt-line framing breaks and git fails: closed;
- NOT redacted: the 2xx result stream of git-upload-pack / git-receive-pack
  (`application/x-git-upload-pack-result` / `-receive-pack-result`). It carries the packfile
  (binary: redacting it would corrupt it) and, multiplexed into it, the server's sideband
  progress and error messages and receive-pack's report-status. A server that writes a
  secret into those reaches the sandbox. Request bodies (what the sandbox pushes) pass as sent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.errors import CorralError, InvalidArgument, NotFound, Unavailable
from corral.servers.credentials.netguard import check_policy, parse_target
from corral.servers.credentials.proxy import Proxy, Snapshot, read_redacted
from corral.servers.credentials.results import GitGrant
from corral.servers.credentials.transport import pinned
from corral.vault.config import VaultSettings

__all__ = ["FORWARDER", "SANDBOX_DIR", "SANDBOX_PORT", "GitGateway", "Grant"]

SANDBOX_PORT = 8417  # where git_forwarder.py listens inside the sandbox
SANDBOX_DIR = "/run/corral"  # where the sandbox mounts the gateway's directory (socket + forwarder)
FORWARDER = Path(__file__).with_name("git_forwarder.py")
ENDPOINTS = {"info/refs", "git-upload-pack", "git-receive-pack"}
PASS_REQUEST = ("content-type", "content-encoding", "accept", "accept-encoding", "git-protocol", "user-agent")
PASS_RESPONSE = ("content-type", "content-encoding", "cache-control", "expires", "pragma", "location")


@dataclass(frozen=True)
class Grant:
    credential: str
    repo_url: str  # no trailing slash
    write: bool
    expires_at: float  # time.time()


class GitGateway:
    def __init__(self, proxy: Proxy, settings: VaultSettings, socket_path: Path | None = None) -> None:
        self.proxy = proxy
        self.settings = settings
        self.socket_path = socket_path or settings.git_socket_path()
        self.grants: dict[str, Grant] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- grants (called from the MCP server's loop) ---------------------------------
    async def grant(self, credential: str, repo_url: str, access: str, ttl_s: int | None) -> GitGrant:
        snap = await self.proxy.snapshot()
        cred = snap.credentials.get(credential)
        if cred is None:
            raise NotFound(f"no credential named {credential!r}", hint="list_credentials shows them")
        if cred.kind != "git":
            raise InvalidArgument(f"credential {credential!r} is of kind {cred.kind}, not git")
        target = parse_target(repo_url.rstrip("/"))
        if target.url.query:
            raise InvalidArgument("the repository URL may not have a query")
        for method in ("GET", "POST"):
            check_policy(cred, target, method)
        ttl = ttl_s or self.settings.git_grant_ttl_s
        if not 0 < ttl <= 86400:
            raise InvalidArgument("ttl_s must be between 1 and 86400")
        token = secrets.token_urlsafe(32)
        self._expire()
        expires_at = time.time() + ttl
        self.grants[token] = Grant(cred.name, str(target.url), access == "write", expires_at)
        name = target.path.rstrip("/").rsplit("/", 1)[-1] or "repo"
        return GitGrant(
            remote_url=f"http://127.0.0.1:{SANDBOX_PORT}/{token}/{name}",
            expires_at=datetime.fromtimestamp(expires_at, UTC).isoformat(timespec="seconds"),
            access="write" if access == "write" else "read",
            gateway_dir=str(self.socket_path.parent),
            run_git_with=self.forwarder_command(),
            how=f"inside a sandbox that mounts {self.socket_path.parent} at {SANDBOX_DIR}, run e.g. "
            f"`{self.forwarder_command()} git clone <remote_url>`; the forwarder relays 127.0.0.1:{SANDBOX_PORT} to the proxy",
        )

    def forwarder_command(self) -> str:
        return f"python3 {SANDBOX_DIR}/git_forwarder.py --socket {SANDBOX_DIR}/{self.socket_path.name} --"

    def revoke(self, token: str) -> None:
        self.grants.pop(token, None)

    def _expire(self) -> None:
        now = time.time()
        for token in [t for t, g in self.grants.items() if g.expires_at <= now]:
            del self.grants[token]

    # -- the HTTP side (runs on the gateway's own loop) -------------------------------
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{token}/{repo}/{rest:path}", self.forward, methods=["GET", "POST"])])

    async def forward(self, request: Request) -> Response:
        grant = self.grants.get(request.path_params["token"])
        if grant is None or grant.expires_at <= time.time():
            return PlainTextResponse(
                "corral: this git capability is unknown or expired; ask for a new one with git_access\n",
                status_code=403,
            )
        rest = request.path_params["rest"]
        service = request.query_params.get("service")
        if rest not in ENDPOINTS or (rest == "info/refs" and service not in ("git-upload-pack", "git-receive-pack")):
            return PlainTextResponse("corral: only git smart HTTP endpoints are forwarded\n", status_code=404)
        if not grant.write and "git-receive-pack" in (rest, service):
            return PlainTextResponse(
                "corral: this capability is read-only (clone/fetch); ask git_access for write\n", status_code=403
            )
        method = "GET" if rest == "info/refs" else "POST"
        if request.method != method:
            return PlainTextResponse("corral: wrong method for this endpoint\n", status_code=405)
        url = f"{grant.repo_url}/{rest}" + (f"?service={service}" if rest == "info/refs" else "")
        headers = {k: v for k, v in request.headers.items() if k in PASS_REQUEST and k != "accept-encoding"}
        return await self._send(grant, method, url, headers, request)

    async def _send(self, grant: Grant, method: str, url: str, headers: dict[str, str], request: Request) -> Response:
        start = time.monotonic()
        snap = await self.proxy.snapshot()
        audit: dict[str, Any] = {
            "who": "git-gateway",
            "credential": grant.credential,
            "method": method,
            "host": None,
            "path": None,
            "status": None,
            "bytes": 0,
            "via": "git",
        }
        try:
            cred, target, ip, send_url, out_headers = await self.proxy.prepare(
                snap, audit, grant.credential, method, url, headers
            )
            if method == "POST":  # git's own negotiation for packfiles; a GET (info/refs) is decoded and redacted
                out_headers.pop("Accept-Encoding", None)
                if "accept-encoding" in request.headers:
                    out_headers["Accept-Encoding"] = request.headers["accept-encoding"]
            client = self.proxy.client(cred)
            content = request.stream() if method == "POST" else None
            upstream = client.build_request(
                method, send_url, headers=out_headers, content=content, timeout=httpx.Timeout(60.0)
            )
            with pinned(target.pin_host, target.port, ip):
                resp = await client.send(upstream, stream=True)
        except CorralError as err:
            self.proxy.audit_line(snap, audit, start, "denied" if err.kind != "unavailable" else "error", err.kind)
            return PlainTextResponse(
                f"corral: {snap.redactor.text(str(err))}\n", status_code=403 if err.kind == "policy_denied" else 502
            )
        except httpx.HTTPError as err:
            self.proxy.audit_line(snap, audit, start, "error", "unavailable")
            return PlainTextResponse(
                f"corral: upstream failed: {snap.redactor.text(type(err).__name__)}\n", status_code=502
            )
        audit["status"] = resp.status_code
        out = {k: snap.redactor.text(v) for k, v in resp.headers.items() if k.lower() in PASS_RESPONSE}
        if not is_pack(method, resp):
            return await self._redacted(resp, out, snap, audit, start)

        async def body():
            async for chunk in resp.aiter_raw():
                audit["bytes"] += len(chunk)
                yield chunk

        async def done() -> None:
            await resp.aclose()
            self.proxy.audit_line(snap, audit, start, "ok", None)

        return StreamingResponse(body(), status_code=resp.status_code, headers=out, background=BackgroundTask(done))

    async def _redacted(
        self, resp: httpx.Response, headers: dict[str, str], snap: Snapshot, audit: dict[str, Any], start: float
    ) -> Response:
        """A response that is not a packfile: whole, decoded and redacted like http_request's."""
        try:
            body = await read_redacted(resp, snap.redactor, self.settings.proxy_drain_bytes)
        except CorralError as err:
            self.proxy.audit_line(snap, audit, start, "error", err.kind)
            return PlainTextResponse(f"corral: {snap.redactor.text(err.message)}\n", status_code=502)
        except httpx.HTTPError as err:
            self.proxy.audit_line(snap, audit, start, "error", "unavailable")
            return PlainTextResponse(f"corral: upstream failed: {type(err).__name__}\n", status_code=502)
        finally:
            await resp.aclose()
        audit["bytes"] = len(body)
        self.proxy.audit_line(snap, audit, start, "ok", None)
        headers.pop("content-encoding", None)  # decoded above
        return Response(body, status_code=resp.status_code, headers=headers)

    # -- lifecycle -------------------------------------------------------------------
    def _claim_socket(self) -> None:
        """Take the socket path unless a live gateway (another proxy process) holds it; then use our own."""
        if self.socket_path.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(self.socket_path))
                self.socket_path = self.socket_path.with_name(f"git-{os.getpid()}.sock")
            except OSError:
                pass  # stale: its process is gone
            finally:
                probe.close()
        self.socket_path.unlink(missing_ok=True)

    def start(self) -> None:
        """Serve on the unix socket from a daemon thread with its own event loop."""
        # uvicorn makes the socket 0666: a new directory is 0700, or 0711 as root so the sandboxes'
        # unprivileged uid can reach the socket (an existing one is the operator's choice); the
        # capability tokens guard the rest.
        mode = 0o711 if os.geteuid() == 0 else 0o700
        if not self.socket_path.parent.exists():
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            self.socket_path.parent.chmod(mode)  # mkdir's mode is cut by the umask
        self._claim_socket()
        forwarder = self.socket_path.parent / "git_forwarder.py"  # the sandbox gets it with the socket
        forwarder.write_bytes(FORWARDER.read_bytes())
        forwarder.chmod(0o644)
        config = uvicorn.Config(
            self.app(), uds=str(self.socket_path), log_level="warning", lifespan="off", access_log=False
        )
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve()), name="corral-git-gateway", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise Unavailable(f"the git gateway did not start on {self.socket_path}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.socket_path.unlink(missing_ok=True)


def is_pack(method: str, resp: httpx.Response) -> bool:
    """A git result stream (packfile): the one thing passed unredacted."""
    return (
        method == "POST"
        and 200 <= resp.status_code < 300
        and resp.headers.get("content-type", "").startswith("application/x-git-")
    )
