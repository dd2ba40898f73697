"""`corral serve credentials`: list_credentials, http_request and git_access over MCP.

The tools are thin shells over `Proxy` (and `GitGateway`); errors are Corral error kinds,
already redacted, turned into tool errors by `servers.mcp_shell.tool`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, cast

import anyio
from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from corral.errors import CorralError, Unavailable
from corral.servers.credentials.gateway import GitGateway
from corral.servers.credentials.proxy import LIST_LIMIT, LIST_LIMIT_MAX, Proxy
from corral.servers.credentials.results import CredentialPage, GitGrant, HttpResult
from corral.servers.mcp_shell import serve, tool
from corral.vault import open_vault
from corral.vault.config import VaultSettings
from corral.vault.redact import RedactingFilter, Redactor

__all__ = ["Redaction", "Running", "assemble", "build_server", "run"]

INSTRUCTIONS = (
    "Make HTTP requests that need a secret without ever seeing it: call list_credentials, then "
    "http_request with a credential name; the proxy adds the secret for the credential's allowed hosts "
    "and methods only. Secret values never appear in results (they read [REDACTED]). For git inside a "
    "sandbox, git_access gives a short-lived, repository-scoped remote URL."
)
# Loggers whose records may carry request details (httpcore traces request headers at DEBUG).
# A logger's filter does not see its children's records, so children are named too.
REDACTED_LOGGERS = (
    "corral.credentials",
    "corral.servers",
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.connection_pool",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "mcp",
)


class Chain:
    """Several redactors applied in turn (the proxies of one server share theirs: each applies once)."""

    def __init__(self, redactors: list[Redactor]) -> None:
        self.redactors = list({id(r): r for r in redactors}.values())

    def text(self, text: str) -> str:
        for redactor in self.redactors:
            text = redactor.text(text)
        return text


class Redaction:
    """The log redaction one server owns: one filter on every logger (and given handler) whose
    records may carry request details, applying the current redactor of each proxy it runs.
    Records are rewritten before any handler sees them."""

    def __init__(self) -> None:
        self.proxies: list[Proxy] = []
        self.filter = RedactingFilter(self.chain)
        self._attached: list[logging.Filterer] = []

    def chain(self) -> Chain:
        return Chain([p.redactor() for p in self.proxies])

    def add(self, proxy: Proxy) -> None:
        self.proxies.append(proxy)
        try:
            proxy.snapshot_sync()  # load the secrets now, so even the first log line is redacted
        except CorralError as err:  # the keyring is unusable: every request will say so; the server still starts
            logging.getLogger("corral.credentials").warning("vault not readable at start: %s", err)

    def install(self, handlers: list[logging.Handler] | None = None) -> Redaction:
        existing = [
            n
            for n in logging.root.manager.loggerDict
            if n.split(".")[0] in {"corral", "httpx", "httpcore", "uvicorn", "mcp"}
        ]
        targets: list[logging.Filterer] = [logging.getLogger(name) for name in {*REDACTED_LOGGERS, *existing}]
        for target in [*targets, *(handlers or [])]:
            target.addFilter(self.filter)
            self._attached.append(target)
        return self

    def remove(self) -> None:
        for target in self._attached:
            target.removeFilter(self.filter)
        self._attached.clear()


@dataclass
class Running:
    """What the server holds while it runs (its MCP lifespan's context)."""

    proxy: Proxy
    gateway: GitGateway | None = None


def client_name(ctx: Context | None) -> str:
    """Who is asking, for the audit line: the MCP client's self-declared name/version."""
    try:
        info = ctx.session.client_params.client_info  # type: ignore[union-attr]
        return f"{info.name}/{info.version}"
    except (AttributeError, LookupError, ValueError):  # no context, no session, or no client info sent
        return "unknown"


def build_server(
    proxy: Proxy | None = None,
    gateway: GitGateway | None = None,
    *,
    lifespan: Callable[[MCPServer], AbstractAsyncContextManager[Running]] | None = None,
) -> MCPServer:
    """The tools over `proxy` (and `gateway`: git_access), or, with `lifespan`, over the `Running`
    it opens when the server starts (what `assemble` does; git_access is then always there)."""
    server = MCPServer("corral-credentials", instructions=INSTRUCTIONS, lifespan=lifespan)

    def running(ctx: Context | None) -> Running:
        if proxy is not None:
            return Running(proxy, gateway)
        assert ctx is not None, (
            "without a proxy the tools run in a server whose lifespan opened one, and it passes a Context"
        )
        # a bare Context types its lifespan_context as a dict; here it is what `lifespan` yielded
        return cast(Running, ctx.request_context.lifespan_context)

    @tool(server, read_only=True)
    async def list_credentials(
        limit: int = Field(LIST_LIMIT, description=f"most credentials to return (1-{LIST_LIMIT_MAX})"),
        cursor: str | None = Field(None, description="next_cursor of the previous page, to continue after it"),
        ctx: Context | None = None,
    ) -> CredentialPage:
        """List the credentials you may use: name, kind, allowed hosts, methods, ports and description (never a value).

        Sorted by name, one page at a time: pass `next_cursor` back as `cursor` while it is set.
        """
        return await running(ctx).proxy.list_credentials(limit, cursor)

    @tool(server, open_world=True, destructive=True)  # it can POST/PUT/DELETE to the world
    async def http_request(
        credential: str = Field(description="credential name from list_credentials"),
        method: str = Field(description="HTTP method, e.g. GET or POST; must be allowed by the credential"),
        url: str = Field(description="absolute http(s) URL on one of the credential's allowed hosts"),
        headers: dict[str, str] | None = Field(
            None, description="extra request headers; the credential's own header is set by the proxy"
        ),
        body: str | None = Field(None, description="request body as text"),
        json: Any = Field(None, description="request body as JSON (instead of body)"),
        timeout_s: float | None = Field(None, description="upstream timeout in seconds (default 30)"),
        ctx: Context | None = None,
    ) -> HttpResult:
        """Send an HTTP request with a stored credential added by the proxy; redirects are returned, not followed."""
        return await running(ctx).proxy.http_request(
            credential, method, url, headers, body, json, timeout_s, who=client_name(ctx)
        )

    if gateway is not None or lifespan is not None:

        @tool(server)
        async def git_access(
            credential: str = Field(description="a credential of kind git"),
            repo_url: str = Field(
                description="the repository's http(s) URL, e.g. https://git.example.com/org/repo.git"
            ),
            access: Literal["read", "write"] = Field("read", description="read = clone/fetch; write = also push"),
            ttl_s: int | None = Field(None, description="lifetime of the capability in seconds (default 900)"),
            ctx: Context | None = None,
        ) -> GitGrant:
            """Get a short-lived git remote URL for a sandbox: it works only through the proxy, for that repository."""
            git = running(ctx).gateway
            if git is None:
                raise Unavailable("this server runs no git gateway")
            return await git.grant(credential, repo_url, access, ttl_s)

    return server


def assemble(handlers: list[logging.Handler] | None = None) -> MCPServer:
    """The credentials server as `corral serve credentials` and `corral up` run it.

    Nothing is opened here: when the server starts, its lifespan opens the vault (read once),
    installs log redaction (on the loggers and on `handlers`) and starts the git gateway; when
    it stops, it closes them in reverse.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[Running]:
        redaction = Redaction().install(handlers)
        opened: list[Running] = []
        try:
            # keyring probes, the vault read and the gateway's start all block: off the event loop
            running = await anyio.to_thread.run_sync(_open, redaction)
            opened.append(running)
            yield running
        finally:
            for running in opened:
                if running.gateway is not None:
                    await anyio.to_thread.run_sync(running.gateway.stop)  # its proxy's pools die with its loop
                await running.proxy.aclose()
            redaction.remove()

    return build_server(lifespan=lifespan)


def _open(redaction: Redaction) -> Running:
    settings = VaultSettings()
    vault, choice = open_vault(settings, os.environ.get("DBUS_SESSION_BUS_ADDRESS"))
    proxy = Proxy(vault, settings)
    redaction.add(proxy)
    logging.getLogger("corral.credentials").info("vault backend %s (%s)", choice.name, choice.why)
    gateway_proxy = Proxy(
        vault, settings, snapshots=proxy.snapshots
    )  # its own Proxy (own loop), the same vault snapshot
    redaction.add(gateway_proxy)
    gateway = GitGateway(gateway_proxy, settings)
    gateway.start()
    return Running(proxy, gateway)


def run(http: str | None = None, token: str | None = None, stdio: str = "pipes") -> None:
    handler = logging.StreamHandler()  # stderr: stdout is the MCP stdio channel
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler], force=True)  # the level is CORRAL_LOG_LEVEL's, set by `corral` once
    serve(assemble([handler]), http, token=token, stdio=stdio)
