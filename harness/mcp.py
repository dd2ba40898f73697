"""`MCPTools`: one MCP server as a `Toolset` (stdio subprocess or streamable HTTP).

Results keep the server's `structured_content` and, for errors, the error kind (Corral
servers answer ``"<kind>: <message> (<hint>)"``), so wrappers read fields, not text.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TextIO

import anyio
from anyio.abc import TaskGroup

from corral.errors import KINDS, InvalidArgument, Unavailable
from corral.harness.tools import ToolDef, ToolOutcome, cap

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

__all__ = ["MCPTools", "error_kind"]

log = logging.getLogger("corral.harness")


# Corral servers answer ``"<kind>: <message> (<hint>)"``; the SDK may put its own
# "Error executing tool NAME: " in front. The kind is the first word, or none.
_KIND = re.compile(r"(?:Error executing tool [^:\s]+: )?([a-z_]+): ")


def error_kind(text: str) -> str | None:
    """The kind of a tool error (`corral.errors.KINDS`), read from the start of its text only."""
    match = _KIND.match(text)
    return match.group(1) if match and match.group(1) in KINDS else None


def _outcome(result: Any) -> ToolOutcome:
    parts = []
    for block in result.content or []:
        parts.append(
            block.text if getattr(block, "type", "") == "text" else f"[{getattr(block, 'type', 'content')} omitted]"
        )
    structured = result.structured_content if isinstance(result.structured_content, dict) else None
    if not parts and structured is not None:
        parts.append(json.dumps(structured))
    text = "\n".join(parts)
    is_error = bool(result.is_error)
    return ToolOutcome(cap(text), is_error=is_error, kind=error_kind(text) if is_error else None, structured=structured)


class MCPTools:
    """One MCP server. The connection lives in its own task (the SDK's transports are
    task-bound); a call that finds it broken ends that task, and the next use reconnects.

    `target` is a URL (streamable HTTP), an argv (a stdio subprocess) or an `MCPServer`
    object (in memory: a server embedded in the same process, and tests)."""

    def __init__(
        self,
        name: str,
        target: str | list[str] | MCPServer,
        *,
        task_group: TaskGroup,
        env: dict[str, str] | None = None,
        connect_timeout_s: float = 60.0,
        errlog: TextIO | None = None,
        token: str = "",
        meta: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        # Sent with every call: e.g. the session id, so the sandbox server binds this session's default
        # sandbox, and the checkpoint the log says it is at. A callable is asked at each call.
        self._meta = meta
        self.target = target
        self._tg = task_group
        self._env = env
        self._connect_timeout_s = connect_timeout_s
        self._errlog = errlog
        self._token = token
        self._client: Any = None
        self._ready: anyio.Event | None = None
        self._done = anyio.Event()
        self._failure: BaseException | None = None
        self._listed: list[ToolDef] | None = None

    def _transport(self) -> Any:
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client

        if not isinstance(self.target, (str, list)):
            return self.target  # an MCPServer: the client talks to it in memory
        if isinstance(self.target, str):
            if not self._token:
                return streamable_http_client(self.target)
            import httpx2

            http = httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {self._token}"}, timeout=httpx2.Timeout(30.0, read=300.0)
            )
            return streamable_http_client(self.target, http_client=http)
        params = StdioServerParameters(command=self.target[0], args=self.target[1:], env=self._env)
        return stdio_client(params, errlog=self._errlog) if self._errlog else stdio_client(params)

    async def _own(self, ready: anyio.Event, done: anyio.Event) -> None:
        from mcp.client import Client

        client = None
        try:
            async with AsyncExitStack() as stack:
                client = self._client = await stack.enter_async_context(Client(self._transport(), cache=None))
                ready.set()
                await done.wait()
        except Exception as err:  # boundary: any transport failure means "unavailable; reconnect on next use"
            log.info("MCP server %s connection ended: %r", self.name, err)
            self._failure = err
        finally:
            if self._client is client:  # a newer connection may have replaced this one already
                self._client = None
            ready.set()

    async def client(self) -> Any:
        if self._ready is None or (self._ready.is_set() and self._client is None):
            self._ready, self._done, self._failure = anyio.Event(), anyio.Event(), None
            self._tg.start_soon(self._own, self._ready, self._done)
        with anyio.move_on_after(self._connect_timeout_s):
            await self._ready.wait()
        if self._client is None:
            self.drop()
            why = f": {self._failure!r}" if self._failure else f" within {self._connect_timeout_s:g}s"
            raise Unavailable(
                f"cannot connect to the {self.name} MCP server{why}",
                hint="it is restarted on the next call; check `corral serve` for that server",
            )
        return self._client

    def drop(self) -> None:
        """End the current connection (its task exits); the next use reconnects."""
        self._done.set()
        self._ready = None

    async def tools(self) -> list[ToolDef]:
        if self._listed is None:
            client = await self.client()
            try:
                listed = await client.list_tools()
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as err:  # boundary: a broken link or a misbehaving server while listing
                self.drop()
                raise Unavailable(
                    f"cannot list the tools of the {self.name} MCP server: {type(err).__name__}: {err}"
                ) from err
            self._listed = [
                ToolDef(
                    t.name,
                    t.description or "",
                    t.input_schema
                    if isinstance(t.input_schema, dict)
                    else t.input_schema.model_dump(by_alias=True, exclude_none=True),
                    read_only=bool(t.annotations and t.annotations.read_only_hint),
                    idempotent=bool(t.annotations and t.annotations.idempotent_hint),
                    destructive=bool(t.annotations and t.annotations.destructive_hint),
                )
                for t in listed.tools
            ]
        return self._listed

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        try:
            client = await self.client()
            result = await client.call_tool(name, args, meta=self._meta() if callable(self._meta) else self._meta)
        except Unavailable as err:
            return ToolOutcome.error(err)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as err:  # boundary: the connection broke mid-call (server died, stream closed)
            from mcp.shared.exceptions import MCPError

            if isinstance(err, MCPError) and err.error.code not in (
                -32000,
                -32001,
            ):  # a protocol answer, not a dead link
                return ToolOutcome.error(
                    InvalidArgument(f"{name} was refused by the {self.name} server: {err.error.message}", hint="")
                )
            self.drop()
            return ToolOutcome.error(
                Unavailable(
                    f"the {self.name} MCP server went away during {name} ({type(err).__name__}: {err}); the outcome is unknown",
                    hint="it is being reconnected; check the state before retrying an action that changes things",
                )
            )
        return _outcome(result)
