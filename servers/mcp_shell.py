"""The thin MCP shell every Corral server shares.

- `tool(server, ...)` registers a plain function as a tool with honest annotations and
  translates Corral errors into `ToolError` at the boundary, so the client reads
  ``"<kind>: <message> (<hint>)"`` instead of the SDK's opaque "Error executing tool".
  It also stamps the server's `serverInfo.version` with Corral's version (every Corral
  server registers its tools through it, so none is left with the SDK's empty default).
- `serve(server, http=...)` runs a server over stdio (what Claude Desktop/Code launch)
  or streamable HTTP with DNS-rebinding protection configured explicitly.
- `http_app(mounts, ...)` is the HTTP side `corral up` shares: several servers under one
  Starlette app (`/NAME/mcp` each), behind a bearer token and Host/Origin checks
  (`servers/http_guard.py`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from corral import __version__
from corral.errors import CorralError, InvalidArgument
from corral.servers.http_guard import HTTPGuard, viewer_cookie
from corral.servers.schema import lean
from corral.servers.stdio_pipes import serve_stdio

__all__ = ["http_app", "parse_host_port", "serve", "tool", "transport_security"]

log = logging.getLogger("corral.servers")
F = TypeVar("F", bound=Callable[..., Any])


def _problems(err: ValidationError) -> str:
    """Pydantic's report as one line: each argument, what is wrong with it, what came (shortened)."""
    said = []
    for e in err.errors(include_url=False):
        where = ".".join(map(str, e["loc"])) or "value"
        if e["type"] == "missing":
            said.append(f"{where} is missing")
        else:
            got = repr(e.get("input"))
            said.append(f"{where}: {e['msg']} (got {got if len(got) <= 40 else got[:37] + '...'})")
    return "; ".join(said)


def _translate(name: str, err: Exception) -> ToolError:
    if isinstance(err, CorralError):
        return ToolError(str(err))
    if isinstance(err, ValidationError):  # our own models refusing a value the schema let through
        return ToolError(str(InvalidArgument(_problems(err))))
    if isinstance(err, OverflowError):  # a number past what the store or the OS can hold: the caller's
        return ToolError(str(InvalidArgument(f"a number is out of range ({err})")))
    # An unexpected failure: keep the traceback for the operator, give the client a kind.
    log.exception("tool %s failed unexpectedly", name)
    return ToolError(f"unavailable: {name} failed unexpectedly ({type(err).__name__}); the server log has details")


def tool(
    server: MCPServer,
    *,
    read_only: bool = False,
    destructive: bool = False,
    idempotent: bool = False,
    open_world: bool = False,
    name: str | None = None,
    structured: bool | None = None,
    description: str | None = None,
) -> Callable[[F], F]:
    """Register `fn` as a tool of `server`; Corral errors become `ToolError`s.

    `description` replaces the docstring where the text depends on the server (its workdir, limits).
    `structured=False` leaves out the output schema: the result is its JSON text only. Worth
    it for results whose payload is free-form JSON anyway (session events), because a
    client validates structured results against the schema on every call (several ms).
    """

    annotations = ToolAnnotations(
        readOnlyHint=read_only,
        destructiveHint=destructive,
        idempotentHint=idempotent or read_only,
        openWorldHint=open_world,
    )

    stamp_version(server)

    def register(fn: F) -> F:
        tool_name = name or fn.__name__
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def wrapped(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except ToolError:
                    raise
                except Exception as err:
                    raise _translate(tool_name, err) from err

        else:

            @functools.wraps(fn)
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                try:
                    return fn(*args, **kwargs)
                except ToolError:
                    raise
                except Exception as err:
                    raise _translate(tool_name, err) from err

        server.tool(name=tool_name, annotations=annotations, structured_output=structured, description=description)(
            wrapped
        )
        # The advertised schema only (arguments are validated against the pydantic model):
        # the SDK offers no hook between building a tool and listing it.
        registered = server._tool_manager.get_tool(tool_name)
        assert registered is not None
        registered.parameters = lean(registered.parameters)
        _translate_argument_errors(server)
        return fn

    return register


def _translate_argument_errors(server: MCPServer) -> None:
    """Arguments the input schema refuses (a wrong type, a missing one) are the SDK's to check,
    before our wrapper runs; its report is pydantic's multi-line text with a link. Make it
    ``invalid_argument: <what> (<what to do>)`` like every other error. Installed once per server."""
    if "call_tool" in vars(server):
        return
    sdk_call_tool = server.call_tool

    async def call_tool(name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await sdk_call_tool(name, arguments, context)
        except ToolError as err:
            cause = err.__cause__
            if isinstance(err, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            refused = InvalidArgument(
                _problems(cause), hint=f"call {name} with the arguments its input schema describes"
            )
            raise ToolError(f"Error executing tool {name}: {refused}") from cause

    server.call_tool = call_tool  # type: ignore[method-assign]


def stamp_version(server: MCPServer) -> None:
    """`serverInfo.version` is the package version unless the server was given one."""
    lowlevel = server._lowlevel_server  # the SDK offers `version` only as a constructor argument
    if not lowlevel.version:
        lowlevel.version = __version__


def parse_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def transport_security(host: str, port: int, extra_origins: list[str] | None = None) -> TransportSecuritySettings:
    """DNS-rebinding protection, on and explicit: only our own Host and Origin values pass."""
    names = {host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost", "::1") else {host}
    hosts = [f"{n}:{port}" for n in sorted(names)] + [f"[::1]:{port}"]
    origins = [f"http://{h}" for h in hosts] + list(extra_origins or [])
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def http_app(
    mounts: dict[str, MCPServer],
    *,
    host: str,
    port: int,
    token: str | None,
    routes: Sequence[BaseRoute] = (),
    open_paths: Sequence[str] = ("/healthz",),
    cookie_paths: Sequence[str] = (),
    max_file_bytes: int | None = None,
) -> Starlette:
    """One ASGI app serving each server in `mounts` at `/NAME/mcp` (or `/mcp` for NAME "").

    Every request first passes the Host/Origin check (421/403), then the bearer token
    (401) unless its path is in `open_paths`; `cookie_paths` (the read-only viewer) also
    accept a viewer session cookie (`corral_viewer_PORT`, set by `?token=`; see http_guard). The servers' session managers run in
    the app's lifespan, which the SDK would not do for mounted sub-apps.
    """
    from corral.servers.http_limits import request_bytes_for  # uvicorn: only when serving HTTP
    from corral.servers.sandbox.config import SandboxSettings

    # Bodies as large as the sandbox's largest write_file (`max_file_bytes`, default the setting's default).
    body = request_bytes_for(max_file_bytes or SandboxSettings.model_fields["sandbox_max_file_bytes"].default)
    security = transport_security(host, port)
    children: list[BaseRoute] = []
    for name, server in mounts.items():
        sub = server.streamable_http_app(
            streamable_http_path="/mcp", transport_security=security, host=host, max_request_body_size=body
        )
        children.append(Mount(f"/{name}", app=sub) if name else Mount("/", app=sub))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                for server in mounts.values():
                    await stack.enter_async_context(server.session_manager.run())
            except CorralError as err:  # e.g. a vault that cannot open: the caller reports it as one line
                guard.startup_error = err
                raise
            yield

    app = Starlette(routes=[*routes, Route("/healthz", _healthz), *children], lifespan=lifespan)
    guard = HTTPGuard(
        app,
        security=security,
        token=token,
        open_paths=open_paths,
        cookie_paths=cookie_paths,
        cookie_name=viewer_cookie(port),
    )
    return guard  # type: ignore[return-value]


async def _healthz(_: Request) -> Response:
    return PlainTextResponse("ok\n")


def serve(server: MCPServer, http: str | None = None, *, token: str | None = None, stdio: str = "pipes") -> None:
    """Run `server` over stdio, or over streamable HTTP at `http` ("HOST:PORT") at `/mcp`.

    Over HTTP, requests must carry `Authorization: Bearer <token>` when `token` is given.
    Over stdio, `stdio="sdk"` uses the SDK's own transport instead of `stdio_pipes`.
    """
    if http is None:
        if stdio == "pipes":
            serve_stdio(server)
        else:
            server.run("stdio")
        return
    import uvicorn

    from corral.servers.http_limits import uvicorn_limits

    host, port = parse_host_port(http)
    app = http_app({"": server}, host=host, port=port, token=token)
    if token is None:  # say it where the operator looks: stdout is free over HTTP, stderr is the log
        print(
            f"{server.name}: serving http://{host}:{port}/mcp WITHOUT a token: any local process can call it "
            "(`corral up` serves all three behind a bearer token)",
            file=sys.stderr,
            flush=True,
        )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5, **uvicorn_limits())
