"""The tool seam: toolsets the model can call, and thin wrappers that add behaviour.

    Toolset (Protocol)   tools() -> [ToolDef];  call(name, args) -> ToolOutcome
     ├── MCPTools        one MCP server (stdio subprocess or streamable HTTP), connected
     │                   on first use, reconnected after it dies
     ├── Prefixed        names tools `<server>__<tool>`
     ├── ReadOnly        keeps only read-only tools (the model reads its session, never writes it)
     ├── TimeLimited     a per-call timeout becomes a `timeout` tool error
     └── Router          the union of toolsets, dispatching by name

Failures the model can act on (a dead server, a timeout, an unknown tool) come back as
`ToolOutcome(is_error=True)` with the error kind first, never as an exception.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import anyio
from anyio.abc import TaskGroup

from corral.errors import CorralError, NotFound, Timeout, Unavailable

log = logging.getLogger("corral.harness")

MAX_RESULT_CHARS = 60_000  # a tool result is one event; keep it far below the event size limit


@dataclass(frozen=True)
class ToolDef:
    name: str
    description: str
    input_schema: dict[str, Any]
    read_only: bool = False
    idempotent: bool = False
    destructive: bool = False

    def api(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}

    def record(self) -> dict[str, Any]:
        return {**self.api(), "annotations": {"read_only": self.read_only, "idempotent": self.idempotent, "destructive": self.destructive}}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> ToolDef:
        ann = data.get("annotations", {})
        return cls(data["name"], data.get("description", ""), data["input_schema"], ann.get("read_only", False), ann.get("idempotent", False), ann.get("destructive", False))

    @property
    def safe_to_rerun(self) -> bool:
        return self.read_only or self.idempotent


@dataclass
class ToolOutcome:
    text: str
    is_error: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # extra fields recorded with the result
    events: list[Any] = field(default_factory=list)  # further NewEvents appended with the result (same append)

    @classmethod
    def error(cls, err: CorralError) -> ToolOutcome:
        return cls(str(err), is_error=True)


class Toolset(Protocol):
    async def tools(self) -> list[ToolDef]: ...

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        """Run one tool; `call_id` is the model's tool_use id (a resumable tool keys on it)."""


def cap(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """Keep head and tail of a long result, saying how much was cut."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters cut ...]\n{text[-half:]}"


def _outcome(result: Any) -> ToolOutcome:
    parts = []
    for block in result.content or []:
        parts.append(block.text if getattr(block, "type", "") == "text" else f"[{getattr(block, 'type', 'content')} omitted]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return ToolOutcome(cap("\n".join(parts)), is_error=bool(result.is_error))


class MCPTools:
    """One MCP server. The connection lives in its own task (the SDK's transports are
    task-bound); a call that finds it broken ends that task, and the next use reconnects."""

    def __init__(self, name: str, target: str | list[str], *, task_group: TaskGroup, env: dict[str, str] | None = None,
                 connect_timeout_s: float = 60.0, errlog: IO[str] | None = None, token: str = "",
                 meta: dict[str, Any] | None = None) -> None:
        self.name = name
        self._meta = meta  # sent with every call: e.g. the session id, so the sandbox server binds this session's default sandbox
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

        if isinstance(self.target, str):
            if not self._token:
                return streamable_http_client(self.target)
            import httpx2

            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {self._token}"}, timeout=httpx2.Timeout(30.0, read=300.0))
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
            raise Unavailable(f"cannot connect to the {self.name} MCP server{why}", hint="it is restarted on the next call; check `corral serve` for that server")
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
                raise Unavailable(f"cannot list the tools of the {self.name} MCP server: {type(err).__name__}: {err}") from err
            self._listed = [
                ToolDef(
                    t.name,
                    t.description or "",
                    t.input_schema if isinstance(t.input_schema, dict) else t.input_schema.model_dump(by_alias=True, exclude_none=True),
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
            result = await client.call_tool(name, args, meta=self._meta)
        except Unavailable as err:
            return ToolOutcome.error(err)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as err:  # boundary: the connection broke mid-call (server died, stream closed)
            from mcp.shared.exceptions import MCPError

            if isinstance(err, MCPError) and err.error.code not in (-32000, -32001):  # a protocol answer, not a dead link
                return ToolOutcome(f"invalid_argument: {name} was refused by the {self.name} server: {err.error.message}", is_error=True)
            self.drop()
            return ToolOutcome.error(Unavailable(
                f"the {self.name} MCP server went away during {name} ({type(err).__name__}: {err}); the outcome is unknown",
                hint="it is being reconnected; check the state before retrying an action that changes things",
            ))
        return _outcome(result)


@dataclass
class Prefixed:
    inner: Toolset
    prefix: str
    sep: str = "__"

    async def tools(self) -> list[ToolDef]:
        return [ToolDef(f"{self.prefix}{self.sep}{t.name}", t.description, t.input_schema, t.read_only, t.idempotent, t.destructive) for t in await self.inner.tools()]

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        return await self.inner.call(name.removeprefix(f"{self.prefix}{self.sep}"), args, call_id)


@dataclass
class Filtered:
    """Only the tools `keep` accepts are listed or callable."""

    inner: Toolset
    keep: Callable[[ToolDef], bool]

    async def tools(self) -> list[ToolDef]:
        return [t for t in await self.inner.tools() if self.keep(t)]

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        if name not in {t.name for t in await self.tools()}:
            return ToolOutcome.error(NotFound(f"tool {name} is not available here"))
        return await self.inner.call(name, args, call_id)


def read_only(inner: Toolset) -> Filtered:
    return Filtered(inner, lambda t: t.read_only)


@dataclass
class TimeLimited:
    inner: Toolset
    seconds: float

    async def tools(self) -> list[ToolDef]:
        return await self.inner.tools()

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        with anyio.move_on_after(self.seconds) as scope:
            return await self.inner.call(name, args, call_id)
        assert scope.cancelled_caught
        return ToolOutcome.error(Timeout(f"{name} did not finish within {self.seconds:g}s; its outcome is unknown", hint="check the state, then retry with a smaller step or a longer timeout"))


@dataclass
class SandboxLifecycle:
    """Records `sandbox.provisioned` the first time a sandbox id shows up in a result (an
    explicit provision or a lazy one behind execute) and `sandbox.lost` when a call says so."""

    inner: Toolset
    known: set[str] = field(default_factory=set)

    async def tools(self) -> list[ToolDef]:
        return await self.inner.tools()

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        from corral.harness.events import ev

        outcome = await self.inner.call(name, args, call_id)
        if outcome.is_error:
            if "sandbox_lost" in outcome.text:
                outcome.events.append(ev("sandbox.lost", sandbox_id=args.get("sandbox_id"), tool_use_id=call_id, message=outcome.text[:500]))
            return outcome
        try:
            result = json.loads(outcome.text)
        except ValueError:
            return outcome
        sid = result.get("sandbox_id") if isinstance(result, dict) else None
        if isinstance(sid, str) and sid not in self.known:
            self.known.add(sid)
            outcome.events.append(ev("sandbox.provisioned", sandbox_id=sid, tool_use_id=call_id, via=name,
                                     **{k: result[k] for k in ("backend", "isolation", "expires_at") if k in result}))
        return outcome


class CachedListing:
    """Answers `tools()` from the listing saved at `path` by an earlier run, so a new session's
    first request need not wait for the MCP servers to start; the real listing is fetched once
    `ready` is set (after that request went out) and saved for the next run. A definition that
    went stale meanwhile costs one tool error: the router re-lists on an unknown name."""

    def __init__(self, inner: Router, path: Any, task_group: TaskGroup, ready: anyio.Event) -> None:
        self.inner, self.path, self._tg, self._ready = inner, path, task_group, ready
        self._refreshing = False

    async def tools(self) -> list[ToolDef]:
        cached = self._read()
        if cached is None:
            listed = await self.inner.tools()
            self._write(listed)
            return listed
        if not self._refreshing:
            self._refreshing = True
            self._tg.start_soon(self._refresh)
        return cached

    async def _refresh(self) -> None:
        with anyio.move_on_after(5):
            await self._ready.wait()
        self._write(await self.inner.tools())

    def _read(self) -> list[ToolDef] | None:
        try:
            return [ToolDef.from_record(t) for t in json.loads(self.path.read_text())]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no cache yet, or one we cannot read: list for real

    def _write(self, listed: list[ToolDef]) -> None:
        if self.inner.problems:
            return  # a server was down: keep the last complete listing
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")  # several harnesses may save at once
        try:
            tmp.write_text(json.dumps([t.record() for t in listed]))
            tmp.replace(self.path)
        except OSError as err:  # only a cache: the next run lists the servers itself
            log.warning("cannot save the tool listing to %s: %s", self.path, err)
            tmp.unlink(missing_ok=True)

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        return await self.inner.call(name, args, call_id)


class Router:
    """The union of toolsets; a toolset that cannot list its tools is left out (and said so)."""

    def __init__(self, toolsets: list[Toolset]) -> None:
        self.toolsets = toolsets
        self._owner: dict[str, Toolset] = {}
        self.problems: list[str] = []

    async def tools(self) -> list[ToolDef]:
        out: list[ToolDef] = []
        self.problems = []
        results: list[list[ToolDef] | CorralError] = [[] for _ in self.toolsets]

        async def list_one(i: int, ts: Toolset) -> None:
            try:
                results[i] = await ts.tools()
            except CorralError as err:
                results[i] = err

        async with anyio.create_task_group() as tg:  # servers connect in parallel
            for i, ts in enumerate(self.toolsets):
                tg.start_soon(list_one, i, ts)
        for ts, listed in zip(self.toolsets, results, strict=True):
            if isinstance(listed, CorralError):
                self.problems.append(str(listed))
                continue
            for t in listed:
                self._owner[t.name] = ts
                out.append(t)
        return out

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        if name not in self._owner:
            await self.tools()
        owner = self._owner.get(name)
        if owner is None:
            return ToolOutcome.error(NotFound(f"there is no tool named {name!r}", hint="use one of the tools listed in this request"))
        started = time.perf_counter()
        outcome = await owner.call(name, args, call_id)
        outcome.data.setdefault("duration_ms", round((time.perf_counter() - started) * 1000, 1))
        return outcome
