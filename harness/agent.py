"""The loop: `run()` settles what a crash left open, then `step()`s until the model ends its turn.

    step() = compact if near the budget -> query() the model (one write-ahead append)
             -> execute() its tool calls (one append per result)

A result that waits for a checkpoint (`harness/checkpoints.py`) is appended with it; for the
response's last call that wait overlaps the next model request (`respond_flushing`), whose
response is appended only after the result.

Only a whole response is ever written or acted on (`model.py` judges that); each failed
attempt is one non-fatal `session.error` and the same request is sent again. What each
stop_reason does:
    end_turn, stop_sequence   the turn ends (session idle)
    tool_use                  the tool calls run, then the model is asked again
    max_tokens                a cut tool call never arrives here (model.py retries it with a larger
                              max_tokens); a cut text answer is recorded and REPORTED: the session
                              goes idle with the reason and how to continue
    refusal                   the text is recorded, no tool call runs, the session goes idle saying so
    pause_turn                recorded, then the model is asked again to continue its own turn
    model_context_window_exceeded   a failed attempt: compact, then ask again
    anything else             a fatal `session.error` (what arrived) and status failed; nothing acted on

Everything the loop knows comes from the `SessionLog`; killed at any instant, a new
Agent over the same log carries on (see `settle()`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio

from corral.errors import CorralError
from corral.harness import events as E
from corral.harness.config import HarnessSettings
from corral.harness.context import (
    SUMMARY_PROMPT,
    build_messages,
    compaction_cut,
    estimate_tokens,
    system_blocks,
    todo_at,
    with_cache_breakpoints,
)
from corral.harness.events import SessionLog, WriterLost, ev
from corral.harness.model import (
    ContextWindowExceeded,
    ModelClient,
    ModelRequest,
    ModelResponse,
    ModelUnavailable,
    RetryingModel,
)
from corral.harness.tools import ToolDef, Toolset
from corral.harness.view import NullView, View
from corral.servers.session import Event

INTERRUPTED = (
    "interrupted: the harness stopped while {name} was running, so its outcome is unknown: it may or may not "
    "have taken effect. Check the current state before retrying it."
)


def _default(name: str) -> Any:
    return HarnessSettings.model_fields[name].default


@dataclass
class AgentConfig:
    """The loop's knobs. Their defaults are `HarnessSettings`' (one copy); `of()` takes them from settings."""

    model: str = _default("model")
    max_tokens: int = _default("max_tokens")
    context_budget_tokens: int = _default("context_budget_tokens")
    max_turns: int = _default("max_turns")
    retries: int = _default("model_retries")
    retry_base_s: float = _default("retry_base_s")
    checkpoints: str = _default("checkpoints")

    @classmethod
    def of(cls, settings: HarnessSettings) -> AgentConfig:
        return cls(
            model=settings.model,
            max_tokens=settings.max_tokens,
            context_budget_tokens=settings.context_budget_tokens,
            max_turns=settings.max_turns,
            retries=settings.model_retries,
            retry_base_s=settings.retry_base_s,
            checkpoints=settings.checkpoints,
        )


@dataclass
class Agent:
    log: SessionLog
    model: ModelClient
    tools: Toolset
    config: AgentConfig = field(default_factory=AgentConfig)
    view: View = field(default_factory=NullView)
    system: str = ""
    _defs: list[ToolDef] | None = field(default=None, init=False)
    # The last tool result of a response, waiting for its checkpoint (ToolOutcome.later): appended
    # with it while the next model request runs (see `flush`).
    _pending: tuple[list[Any], Callable[[], Awaitable[list[Any]]]] | None = field(default=None, init=False)
    _flushed: anyio.Event | None = field(default=None, init=False)

    # -- the loop -------------------------------------------------------------------

    async def run(self, task: str | None = None, reason: str = "run") -> str:
        """Run until the model ends its turn; return its last text."""
        self.log.claim(reason)
        if task:
            self.log.append([ev(E.USER_MESSAGE, text=task)])
        try:
            await self.ensure_tools()
            await self.settle()
            if not self.needs_model():
                self.view.note(
                    f'the model has ended its turn; nothing to resume (`corral run "..." --session {self.log.session_id}` adds a message)'
                )
            for _ in range(self.config.max_turns):
                if not self.needs_model():
                    break
                await self.step()
            else:
                await self.flush()
                self.log.append(
                    [
                        ev(
                            E.STATUS,
                            status="idle",
                            writer=self.log.writer,
                            reason=f"stopped after {self.config.max_turns} turns; `corral wake` continues",
                        )
                    ]
                )
                return self.last_text()
        except WriterLost:
            raise
        except CorralError as err:
            await self.flush()  # a finished tool's result is kept even when the model failed after it
            self.log.append(
                [
                    ev(E.ERROR, kind=err.kind, message=str(err), fatal=True, **_fault(err)),
                    ev(E.STATUS, status="failed", writer=self.log.writer, reason=str(err)),
                ]
            )
            raise
        self.log.append([ev(E.STATUS, status="idle", writer=self.log.writer, reason=self.end_reason())])
        return self.last_text()

    async def step(self) -> None:
        messages = build_messages(self.log.compaction, [*self.log.tail, *self.pending_events()])
        if self.over_budget(messages):
            await self.flush()  # compaction reads the log: the pending result goes in first
            if await self.compact():
                messages = build_messages(self.log.compaction, self.log.tail)
        try:
            response = await self.query(messages)
        except ContextWindowExceeded as err:
            await self.record_retry(err, 1, 0.0)
            if not await self.compact():
                raise
            return  # the next step asks again, with the compacted context
        await self.execute(response.tool_uses())

    # -- the moves ------------------------------------------------------------------

    async def query(self, messages: list[dict[str, Any]]) -> ModelResponse:
        request = self.request(messages)
        response = await self.respond_flushing(request)
        self.view.response_done()
        if response.stop_reason == "refusal":  # nothing it started is acted on
            response.content = [b for b in response.content if b["type"] != "tool_use"]
        written: list[Any] = [
            ev(E.AGENT_MESSAGE, message_id=response.message_id, text=b["text"])
            for b in response.content
            if b["type"] == "text"
        ]
        written += [
            ev(E.TOOL_USE, message_id=response.message_id, id=b["id"], name=b["name"], input=b["input"])
            for b in response.tool_uses()
        ]
        if not written:  # an empty answer still ends the turn (else the loop would ask again and again)
            written = [ev(E.AGENT_MESSAGE, message_id=response.message_id, text="")]
        # Write-ahead: the response and its tool calls are durable before any tool runs.
        self.log.append([*written, self.span(response, "turn")])
        if response.stop_reason in ("max_tokens", "refusal"):
            self.view.error(self.end_reason())
        return response

    async def execute(self, uses: list[dict[str, Any]]) -> None:
        batches = _batches(uses)
        for i, batch in enumerate(batches):
            if len(batch) == 1:
                # The last call's checkpoint may overlap the next model request; an earlier one's
                # must be taken before the next call changes the sandbox again.
                await self.run_tool(batch[0], defer=i == len(batches) - 1)
                continue
            async with anyio.create_task_group() as tg:  # siblings (subagents) run in parallel
                for use in batch:
                    tg.start_soon(self.run_tool, use)

    async def run_tool(self, use: dict[str, Any], defer: bool = False) -> None:
        self.view.tool_start(use["name"], use["input"])
        started = time.perf_counter()
        outcome = await self.tools.call(use["name"], use["input"], call_id=use["id"])
        duration = outcome.data.pop("duration_ms", round((time.perf_counter() - started) * 1000, 1))
        self.view.tool_end(use["name"], outcome, duration)
        written = [
            ev(
                E.TOOL_RESULT,
                tool_use_id=use["id"],
                name=use["name"],
                content=[{"type": "text", "text": outcome.text or "(no output)"}],
                is_error=outcome.is_error,
                duration_ms=duration,
                **outcome.data,
            ),
            *outcome.events,
        ]
        if outcome.later is None:
            self.log.append(written)
        elif defer:
            self._pending = (written, outcome.later)
        else:
            self.log.append([*written, *await outcome.later()])

    # -- a tool result that waits for its checkpoint ------------------------------------

    def pending_events(self) -> list[Event]:
        """The pending tool result as the events it will be (the next request already carries it)."""
        if self._pending is None:
            return []
        now = datetime.now(UTC)
        return [
            Event(
                session_id=self.log.session_id,
                position=self.log.length + i,
                event_id="",
                type=e.type,
                data=e.data,
                created_at=now,
            )
            for i, e in enumerate(self._pending[0])
        ]

    async def flush(self) -> None:
        """Append the pending tool result with the events it waited for, in ONE append; a caller
        that finds it under way waits for it. Shielded: a failed model request does not lose it."""
        pending, self._pending = self._pending, None
        if pending is None:
            if self._flushed is not None:
                await self._flushed.wait()
            return
        done = self._flushed = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                written, later = pending
                self.log.append([*written, *await later()])
        finally:
            done.set()

    async def respond_flushing(self, request: ModelRequest) -> ModelResponse:
        """The model request, with the pending result's checkpoint taken and appended meanwhile:
        the response is appended only after it (write-ahead order), so a step costs the longer
        of the two, not their sum."""
        if self._pending is None:
            return await self.retrying().respond(request, self.view.text)
        flush_failed: list[Exception] = []
        response: ModelResponse | Exception

        async def flush_in_background() -> None:
            try:
                await self.flush()
            except Exception as err:  # raised below as itself, not inside an ExceptionGroup
                flush_failed.append(err)
                tg.cancel_scope.cancel()  # no use waiting for an answer the log cannot follow

        async with anyio.create_task_group() as tg:
            tg.start_soon(flush_in_background)
            try:
                response = await self.retrying().respond(request, self.view.text)
            except Exception as err:  # raised once the (shielded) flush is done
                response = err
        if flush_failed:  # the log could not take the tool result: that comes first (WriterLost stops)
            raise flush_failed[0]
        if isinstance(response, Exception):
            raise response
        return response

    def over_budget(self, messages: list[dict[str, Any]]) -> bool:
        return (
            estimate_tokens(self.system, [t.api() for t in self.defs()], messages) >= self.config.context_budget_tokens
        )

    async def compact(self) -> bool:
        """Summarise everything before the latest exchange into a `context.compacted` event."""
        cut = compaction_cut(self.log.tail)
        if cut is None:
            return False
        before = build_messages(self.log.compaction, [e for e in self.log.tail if e.position < cut])
        before.append({"role": "user", "content": [{"type": "text", "text": SUMMARY_PROMPT}]})
        if len(before) > 1 and before[-2]["role"] == "user":  # keep roles alternating
            before[-2]["content"].extend(before.pop()["content"])
        self.view.note("compacting the context")
        response = await self.retrying().respond(self.request(before, tool_choice={"type": "none"}), lambda _: None)
        start = self.log.compaction.data["start"] if self.log.compaction else 0
        todo = todo_at(self.log.compaction, self.log.tail, cut)
        self.log.append(
            [
                ev(E.COMPACTED, start=start, end=cut, summary=response.text(), todo=todo),
                self.span(response, "compaction"),
            ]
        )
        return True

    # -- waking ---------------------------------------------------------------------

    async def settle(self) -> None:
        """Give every tool_use the log left without a result exactly one result:
        re-run it when that is safe (read-only or idempotent), else record it interrupted."""
        done = {e.data["tool_use_id"] for e in self.log.tail if e.type == E.TOOL_RESULT}
        pending = [e.data for e in self.log.tail if e.type == E.TOOL_USE and e.data["id"] not in done]
        defs = {t.name: t for t in self.defs()}
        for use in pending:
            tool = defs.get(use["name"])
            if tool is not None and tool.safe_to_rerun:
                self.view.note(f"re-running {use['name']} (safe to repeat)")
                await self.run_tool(use)
            else:
                self.view.note(f"{use['name']} was interrupted; the model will be told")
                self.log.append(
                    [
                        ev(
                            E.TOOL_RESULT,
                            tool_use_id=use["id"],
                            name=use["name"],
                            is_error=True,
                            interrupted=True,
                            content=[{"type": "text", "text": INTERRUPTED.format(name=use["name"])}],
                        )
                    ]
                )

    def needs_model(self) -> bool:
        if self._pending is not None:
            return True  # a tool result waits for its checkpoint: the model is next
        for e in reversed(self.log.tail):
            if e.type == E.SPAN and e.data.get("purpose") == "turn" and e.data.get("stop_reason") == "pause_turn":
                return True  # the API paused a long turn: sending it back lets the model continue it
            if e.type in (E.USER_MESSAGE, E.TOOL_RESULT):
                return True
            if e.type in (E.AGENT_MESSAGE, E.TOOL_USE):
                return False
        return self.log.compaction is not None

    # -- helpers --------------------------------------------------------------------

    async def ensure_tools(self) -> None:
        """The tool definitions the model sees: the recorded ones if the log has them (a wake
        need not wait for the servers), else listed now and recorded."""
        if self.log.tools is not None:
            self.system = self.log.tools.data.get("system", self.system)
            self._defs = [ToolDef.from_record(t) for t in self.log.tools.data["tools"]]
            return
        self._defs = await self.tools.tools()
        self.log.append([ev(E.TOOLS, tools=[t.record() for t in self._defs], system=self.system)])

    def defs(self) -> list[ToolDef]:
        assert self._defs is not None, "ensure_tools() runs first"
        return self._defs

    def request(self, messages: list[dict[str, Any]], tool_choice: dict[str, Any] | None = None) -> ModelRequest:
        return ModelRequest(
            model=self.config.model,
            system=system_blocks(self.system),
            tools=[t.api() for t in self.defs()],
            messages=with_cache_breakpoints(messages),
            max_tokens=self.config.max_tokens,
            tool_choice=tool_choice,
        )

    def retrying(self) -> RetryingModel:
        return RetryingModel(self.model, self.config.retries, self.config.retry_base_s, self.record_retry)

    async def record_retry(self, err: ModelUnavailable | ContextWindowExceeded, attempt: int, delay: float) -> None:
        """One failed attempt: shown as failed, recorded (never as a response), then retried."""
        self.view.attempt_failed(attempt, err.message, delay)
        await self.flush()  # the tool result it answers comes first in the log
        self.log.append(
            [
                ev(
                    E.ERROR,
                    kind=err.kind,
                    message=err.message,
                    status=getattr(err, "status", None),
                    attempt=attempt,
                    retry_in_s=delay,
                    fatal=False,
                    **_fault(err),
                )
            ]
        )

    def end_reason(self) -> str:
        """Why the turn ended, as the idle status says it: what the last response's stop_reason means."""
        stop = next(
            (
                e.data.get("stop_reason")
                for e in reversed(self.log.tail)
                if e.type == E.SPAN and e.data.get("purpose") == "turn"
            ),
            None,
        )
        again = f'`corral run "continue" --session {self.log.session_id}`'
        if stop == "max_tokens":
            return f"max_tokens: the answer was cut at {self.config.max_tokens} tokens; raise CORRAL_MAX_TOKENS, then {again}"
        if stop == "refusal":
            return (
                f"refusal: the model declined to go on; its tool calls were not run; {again} with a different request"
            )
        return stop or "end_turn"

    def span(self, response: ModelResponse, purpose: str) -> Any:
        return ev(
            E.SPAN,
            message_id=response.message_id,
            purpose=purpose,
            model=self.config.model,
            latency_ms=response.latency_ms,
            ttft_ms=response.ttft_ms,
            attempts=response.attempts,
            stop_reason=response.stop_reason,
            usage=response.usage,
            cache_hit_rate=response.cache_hit_rate(),
        )

    def last_text(self) -> str:
        for e in reversed(self.log.tail):
            if e.type == E.AGENT_MESSAGE:
                return e.data["text"]
        return ""


def _fault(err: BaseException) -> dict[str, Any]:
    """What a failed attempt's error event says beyond kind and message: which fault, what arrived."""
    out: dict[str, Any] = {}
    for key in ("fault", "arrived"):
        if getattr(err, key, None) is not None:
            out[key] = getattr(err, key)
    return out


def _batches(uses: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive subagent spawns form one parallel batch; every other call runs alone, in order."""
    out: list[list[dict[str, Any]]] = []
    for use in uses:
        if use["name"] == "spawn_subagent" and out and out[-1][0]["name"] == "spawn_subagent":
            out[-1].append(use)
        else:
            out.append([use])
    return out
