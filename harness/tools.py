"""The tool seam: toolsets the model can call, and thin wrappers that add behaviour.

    Toolset (Protocol)   tools() -> [ToolDef];  call(name, args) -> ToolOutcome
     ├── MCPTools        one MCP server (stdio subprocess or streamable HTTP), connected
     │                   on first use, reconnected after it dies (`harness/mcp.py`)
     ├── Wrapper         delegates everything to an inner toolset; its subclasses:
     │    ├── Prefixed          names tools `<server>__<tool>`
     │    ├── Filtered          keeps the tools a predicate accepts (`read_only(...)`: the
     │    │                     model reads its session, never writes it)
     │    ├── TimeLimited       a per-call timeout becomes a `timeout` tool error
     │    ├── SandboxLifecycle  records sandbox.provisioned / sandbox.lost events
     │    ├── Checkpointing     checkpoints a sandbox after a call that may change it and records
     │    │                     sandbox.checkpoint (`harness/checkpoints.py`)
     │    └── CachedListing     answers tools() from the last run's saved listing
     └── Router          the union of toolsets, dispatching by name (a name offered twice is refused)

Failures the model can act on (a dead server, a timeout, an unknown tool) come back as
`ToolOutcome(is_error=True)` with the error kind first, never as an exception.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from corral.errors import CorralError, InvalidArgument, NotFound, SandboxLost, Timeout
from corral.harness.events import SANDBOX_LOST, SANDBOX_PROVISIONED, ev

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
        return {
            **self.api(),
            "annotations": {
                "read_only": self.read_only,
                "idempotent": self.idempotent,
                "destructive": self.destructive,
            },
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> ToolDef:
        ann = data.get("annotations", {})
        return cls(
            data["name"],
            data.get("description", ""),
            data["input_schema"],
            ann.get("read_only", False),
            ann.get("idempotent", False),
            ann.get("destructive", False),
        )

    @property
    def safe_to_rerun(self) -> bool:
        return self.read_only or self.idempotent


@dataclass
class ToolOutcome:
    text: str
    is_error: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # extra fields recorded with the result
    events: list[Any] = field(default_factory=list)  # further NewEvents appended with the result (same append)
    kind: str | None = None  # an error's kind (`corral.errors.KINDS`), when it has one
    structured: dict[str, Any] | None = None  # the server's structured result, when it sent one
    # Further events still being made (a checkpoint after the call): awaited before the result is
    # appended, and never raising; the agent may overlap that wait with its next model request.
    later: Callable[[], Awaitable[list[Any]]] | None = None

    @classmethod
    def error(cls, err: CorralError) -> ToolOutcome:
        return cls(str(err), is_error=True, kind=err.kind)


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


class Wrapper:
    """A toolset around another: delegates everything, so a wrapper overrides only what it changes."""

    def __init__(self, inner: Toolset) -> None:
        self.inner = inner

    async def tools(self) -> list[ToolDef]:
        return await self.inner.tools()

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        return await self.inner.call(name, args, call_id)


class Prefixed(Wrapper):
    def __init__(self, inner: Toolset, prefix: str, sep: str = "__") -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.sep = sep

    async def tools(self) -> list[ToolDef]:
        return [replace(t, name=f"{self.prefix}{self.sep}{t.name}") for t in await self.inner.tools()]

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        return await self.inner.call(name.removeprefix(f"{self.prefix}{self.sep}"), args, call_id)


class Filtered(Wrapper):
    """Only the tools `keep` accepts are listed or callable."""

    def __init__(self, inner: Toolset, keep: Callable[[ToolDef], bool]) -> None:
        super().__init__(inner)
        self.keep = keep

    async def tools(self) -> list[ToolDef]:
        return [t for t in await self.inner.tools() if self.keep(t)]

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        if name not in {t.name for t in await self.tools()}:
            return ToolOutcome.error(NotFound(f"tool {name} is not available here"))
        return await self.inner.call(name, args, call_id)


def read_only(inner: Toolset) -> Filtered:
    return Filtered(inner, lambda t: t.read_only)


class TimeLimited(Wrapper):
    def __init__(self, inner: Toolset, seconds: float) -> None:
        super().__init__(inner)
        self.seconds = seconds

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        with anyio.move_on_after(self.seconds) as scope:
            return await self.inner.call(name, args, call_id)
        assert scope.cancelled_caught
        return ToolOutcome.error(
            Timeout(
                f"{name} did not finish within {self.seconds:g}s; its outcome is unknown",
                hint="check the state, then retry with a smaller step or a longer timeout",
            )
        )


class SandboxLifecycle(Wrapper):
    """Records `sandbox.provisioned` the first time a sandbox id shows up in a result (an
    explicit provision or a lazy one behind execute) and `sandbox.lost` when a call fails
    with the `sandbox_lost` kind. Reads the result's structured content, never its text."""

    def __init__(self, inner: Toolset, known: set[str] | None = None) -> None:
        super().__init__(inner)
        self.known = set() if known is None else known

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        outcome = await self.inner.call(name, args, call_id)
        if outcome.is_error:
            if outcome.kind == SandboxLost.kind:
                outcome.events.append(
                    ev(SANDBOX_LOST, sandbox_id=args.get("sandbox_id"), tool_use_id=call_id, message=outcome.text[:500])
                )
            return outcome
        result = outcome.structured or {}
        sid = result.get("sandbox_id")
        if isinstance(sid, str) and sid not in self.known:
            self.known.add(sid)
            outcome.events.insert(  # first: before a checkpoint of the sandbox it names
                0,
                ev(
                    SANDBOX_PROVISIONED,
                    sandbox_id=sid,
                    tool_use_id=call_id,
                    via=name,
                    **{k: result[k] for k in ("backend", "isolation", "expires_at") if k in result},
                ),
            )
        return outcome


class CachedListing(Wrapper):
    """Answers `tools()` from the listing saved at `path` by an earlier run, so a new session's
    first request need not wait for the MCP servers to start; the real listing is fetched once
    `ready` is set (after that request went out) and saved for the next run. A definition that
    went stale meanwhile costs one tool error: the router re-lists on an unknown name."""

    def __init__(self, inner: Router, path: Path, task_group: TaskGroup, ready: anyio.Event) -> None:
        super().__init__(inner)
        self.router, self.path, self._tg, self._ready = inner, path, task_group, ready
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
        if self.router.problems:
            return  # a server was down: keep the last complete listing
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")  # several harnesses may save at once
        try:
            tmp.write_text(json.dumps([t.record() for t in listed]))
            tmp.replace(self.path)
        except OSError as err:  # only a cache: the next run lists the servers itself
            log.warning("cannot save the tool listing to %s: %s", self.path, err)
            tmp.unlink(missing_ok=True)


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
        owner: dict[str, Toolset] = {}
        for ts, listed in zip(self.toolsets, results, strict=True):
            if isinstance(listed, CorralError):
                self.problems.append(str(listed))
                continue
            for t in listed:
                if owner.setdefault(t.name, ts) is not ts:  # which one would the model reach? refuse to guess
                    raise InvalidArgument(
                        f"two toolsets offer a tool named {t.name!r}", hint="give each MCP server its own name (prefix)"
                    )
                out.append(t)
        self._owner.update(owner)
        return out

    async def call(self, name: str, args: dict[str, Any], call_id: str = "") -> ToolOutcome:
        if name not in self._owner:
            await self.tools()
        owner = self._owner.get(name)
        if owner is None:
            return ToolOutcome.error(
                NotFound(f"there is no tool named {name!r}", hint="use one of the tools listed in this request")
            )
        started = time.perf_counter()
        outcome = await owner.call(name, args, call_id)
        outcome.data.setdefault("duration_ms", round((time.perf_counter() - started) * 1000, 1))
        return outcome
