"""`corral serve credentials`: list_credentials, http_request and git_access over MCP.

The tools are thin shells over `Proxy` (and `GitGateway`); errors are Corral error kinds,
already redacted, turned into tool errors by `servers.mcp_shell.tool`.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from corral.config import CoreSettings
from corral.errors import CorralError
from corral.servers.credentials.gateway import GitGateway
from corral.servers.credentials.proxy import LIST_LIMIT, LIST_LIMIT_MAX, Proxy
from corral.servers.mcp_shell import serve, tool
from corral.vault import open_vault
from corral.vault.config import VaultSettings
from corral.vault.redact import RedactingFilter

__all__ = ["build_server", "install_redaction", "run"]

INSTRUCTIONS = (
    "Make HTTP requests that need a secret without ever seeing it: call list_credentials, then "
    "http_request with a credential name; the proxy adds the secret for the credential's allowed hosts "
    "and methods only. Secret values never appear in results (they read [REDACTED]). For git inside a "
    "sandbox, git_access gives a short-lived, repository-scoped remote URL."
)
# Loggers whose records may carry request details (httpcore traces request headers at DEBUG).
# A logger's filter does not see its children's records, so children are named too.
REDACTED_LOGGERS = (
    "corral.credentials", "corral.servers", "httpx", "httpcore", "httpcore.connection", "httpcore.connection_pool",
    "httpcore.http11", "httpcore.http2", "httpcore.proxy", "uvicorn", "uvicorn.error", "uvicorn.access", "mcp",
)


class _Redactors:
    """Every live proxy's redactor, applied in turn (one filter per logger however many proxies run)."""

    def __init__(self) -> None:
        self.proxies: weakref.WeakSet[Proxy] = weakref.WeakSet()

    def __call__(self) -> Chain:
        return Chain([p.redactor() for p in list(self.proxies)])


class Chain:
    def __init__(self, redactors: list) -> None:
        self.redactors = redactors

    def text(self, text: str) -> str:
        for redactor in self.redactors:
            text = redactor.text(text)
        return text


_SOURCES = _Redactors()
_FILTER = RedactingFilter(_SOURCES)


def install_redaction(proxy: Proxy, handlers: list[logging.Handler] | None = None) -> None:
    """Redact at every logger under the names we know (records are rewritten before any handler) and at given handlers."""
    _SOURCES.proxies.add(proxy)
    try:
        proxy.snapshot_sync()  # load the secrets now, so even the first log line is redacted
    except CorralError as err:  # the keyring is unusable: every request will say so; the server still starts
        logging.getLogger("corral.credentials").warning("vault not readable at start: %s", err)
    filt = _FILTER
    existing = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in {"corral", "httpx", "httpcore", "uvicorn", "mcp"}]
    for name in {*REDACTED_LOGGERS, *existing}:
        logging.getLogger(name).addFilter(filt)
    for handler in handlers or []:
        handler.addFilter(filt)


def client_name(ctx: Context | None) -> str:
    """Who is asking, for the audit line: the MCP client's self-declared name/version."""
    try:
        info = ctx.session.client_params.client_info  # type: ignore[union-attr]
        return f"{info.name}/{info.version}"
    except (AttributeError, LookupError, ValueError):  # no context, no session, or no client info sent
        return "unknown"


def build_server(proxy: Proxy, gateway: GitGateway | None = None) -> MCPServer:
    server = MCPServer("corral-credentials", instructions=INSTRUCTIONS)

    @tool(server, read_only=True)
    async def list_credentials(
        limit: int = Field(LIST_LIMIT, description=f"most credentials to return (1-{LIST_LIMIT_MAX})"),
        cursor: str | None = Field(None, description="next_cursor of the previous page, to continue after it"),
    ) -> dict[str, Any]:
        """List the credentials you may use: name, kind, allowed hosts, methods, ports and description (never a value).

        Sorted by name, one page at a time: pass `next_cursor` back as `cursor` while it is set.
        """
        return await proxy.list_credentials(limit, cursor)

    @tool(server, open_world=True, destructive=True)  # it can POST/PUT/DELETE to the world
    async def http_request(
        credential: str = Field(description="credential name from list_credentials"),
        method: str = Field(description="HTTP method, e.g. GET or POST; must be allowed by the credential"),
        url: str = Field(description="absolute http(s) URL on one of the credential's allowed hosts"),
        headers: dict[str, str] | None = Field(None, description="extra request headers; the credential's own header is set by the proxy"),
        body: str | None = Field(None, description="request body as text"),
        json: Any = Field(None, description="request body as JSON (instead of body)"),
        timeout_s: float | None = Field(None, description="upstream timeout in seconds (default 30)"),
        ctx: Context | None = None,
    ) -> dict[str, Any]:
        """Send an HTTP request with a stored credential added by the proxy; redirects are returned, not followed."""
        return await proxy.http_request(credential, method, url, headers, body, json, timeout_s, who=client_name(ctx))

    if gateway is not None:

        @tool(server)
        async def git_access(
            credential: str = Field(description="a credential of kind git"),
            repo_url: str = Field(description="the repository's http(s) URL, e.g. https://git.example.com/org/repo.git"),
            access: Literal["read", "write"] = Field("read", description="read = clone/fetch; write = also push"),
            ttl_s: int | None = Field(None, description="lifetime of the capability in seconds (default 900)"),
        ) -> dict[str, Any]:
            """Get a short-lived git remote URL for a sandbox: it works only through the proxy, for that repository."""
            return await gateway.grant(credential, repo_url, access, ttl_s)

    return server


def assemble(handlers: list[logging.Handler] | None = None) -> tuple[MCPServer, Callable[[], None]]:
    """The credentials server as `corral serve credentials` and `corral up` run it.

    Opens the vault, installs redaction (on the loggers and on `handlers`) and starts the
    git gateway; returns the server and the function that stops the gateway.
    """
    settings = VaultSettings()
    vault, choice = open_vault(settings, os.environ.get("DBUS_SESSION_BUS_ADDRESS"))
    proxy = Proxy(vault, settings)
    install_redaction(proxy, handlers)
    logging.getLogger("corral.credentials").info("vault backend %s (%s)", choice.name, choice.why)
    gateway_proxy = Proxy(vault, settings, snapshots=proxy.snapshots)  # its own Proxy (own loop), the same vault snapshot
    install_redaction(gateway_proxy)
    gateway = GitGateway(gateway_proxy, settings)
    gateway.start()
    return build_server(proxy, gateway), gateway.stop


def run(http: str | None = None, token: str | None = None, stdio: str = "pipes") -> None:
    handler = logging.StreamHandler()  # stderr: stdout is the MCP stdio channel
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=CoreSettings().log_level.upper(), handlers=[handler], force=True)
    server, stop = assemble([handler])
    try:
        serve(server, http, token=token, stdio=stdio)
    finally:
        stop()
