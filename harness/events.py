"""What the harness writes to the session log, and the one-writer log it writes through.

Event vocabulary (`data` shapes). Every event the harness needs to resume is here; the
log is its only memory.

    type                  data
    session.status        {status: running|idle|stopped|failed, writer, reason?}
    session.tools         {tools: [{name, description, input_schema, annotations}], system}
                          annotations: {read_only, idempotent, destructive}; recorded so a wake can
                          send its first request while the MCP servers are still connecting
    user.message          {text}
    agent.message         {message_id, text}                    one per text block of a response
    agent.tool_use        {message_id, id, name, input}         one per tool_use block of a response
    agent.tool_result     {tool_use_id, name, content: [{type: text, text}], is_error,
                           duration_ms?, interrupted?, todo?}   exactly one per tool_use
    agent.subagent        {tool_use_id, session_id, task}       a child session, written before it runs
    context.compacted     {start, end, summary, todo}           summary of positions [start, end)
    sandbox.provisioned   {sandbox_id, tool_use_id, via, backend?, isolation?, expires_at?}
                          the first result naming a sandbox (explicit or lazy); same append as it
    sandbox.lost          {sandbox_id, tool_use_id, message}    a call answered sandbox_lost
    sandbox.checkpoint    {sandbox_id, checkpoint_id, at, tool_use_id, default}   the sandbox's files after a
                          call that may change them (same append as its result); default: the caller's
                          default sandbox, whose latest checkpoint a wake or a fork child restores
    span.model_request    {message_id?, purpose: turn|compaction, model, latency_ms, ttft_ms, attempts,
                           stop_reason, usage: {input_tokens, output_tokens, cache_read_input_tokens,
                           cache_creation_input_tokens}, cache_hit_rate}
    session.error         {kind, message, fatal, status?, attempt?, retry_in_s?, fault?, arrived?}
                          fatal: false is one failed attempt, retried (never an agent.* event); fault:
                          status|connection|stream_error|dropped|stalled|no_message_stop|unclosed_block|
                          no_stop_reason|invalid_tool_input|max_tokens_in_tool_use|context_window_exceeded|
                          unknown_stop_reason; arrived: {events, message_id, text, text_chars, tool_uses,
                          open_blocks, stop_reason, message_stop} of the response before it broke

Write-ahead: a model response is ONE append (its agent.message/agent.tool_use events and
its span.model_request) before any tool runs; each tool result is its own append after.

One writer: every append carries `expected_position` (the length this harness last saw).
A second harness on the same session makes the other's next append fail with `Conflict`;
the loser raises `WriterLost` and stops without writing anything.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from corral.errors import Conflict
from corral.servers.session import Event, EventStore, NewEvent, new_id

__all__ = ["SessionLog", "WriterLost", "KillAfterAppends", "ev"]

# The event types, in one place: the table above and README's are tested against EVENT_TYPES.
# The conversation:
USER_MESSAGE = "user.message"
AGENT_MESSAGE = "agent.message"
TOOL_USE = "agent.tool_use"
TOOL_RESULT = "agent.tool_result"
SUBAGENT = "agent.subagent"
COMPACTED = "context.compacted"
# Bookkeeping:
TOOLS = "session.tools"
STATUS = "session.status"
ERROR = "session.error"
SPAN = "span.model_request"
SANDBOX_PROVISIONED = "sandbox.provisioned"
SANDBOX_LOST = "sandbox.lost"
SANDBOX_CHECKPOINT = "sandbox.checkpoint"
EVENT_TYPES = (
    STATUS,
    TOOLS,
    USER_MESSAGE,
    AGENT_MESSAGE,
    TOOL_USE,
    TOOL_RESULT,
    SUBAGENT,
    COMPACTED,
    SANDBOX_PROVISIONED,
    SANDBOX_LOST,
    SANDBOX_CHECKPOINT,
    SPAN,
    ERROR,
)


class WriterLost(Conflict):
    """Another harness appended to this session: this one must stop."""

    default_hint = "another `corral run`/`corral wake` owns this session now; let it finish, or wake it again later"


def ev(type: str, **data: Any) -> NewEvent:
    return NewEvent(type=type, data=data)


class SessionLog:
    """One session's log as this harness sees it: the context tail in memory, appends guarded.

    Loading reads only what the context needs: the latest compaction, the latest tool
    definitions and the events after the compaction, so a long session wakes fast.
    """

    def __init__(
        self,
        store: EventStore,
        session_id: str,
        *,
        length: int,
        tail: list[Event],
        compaction: Event | None,
        tools: Event | None,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.length = length
        self.tail = tail
        self.compaction = compaction
        self.tools = tools
        self.writer = new_id("hrn_")

    @classmethod
    def load(cls, store: EventStore, session_id: str) -> SessionLog:
        length = store.get(session_id).length
        last = store.select(session_id, types=[COMPACTED], desc=True, limit=1)
        compaction = last[0] if last else None
        tools = store.select(session_id, types=[TOOLS], desc=True, limit=1)
        start = compaction.data["end"] if compaction else 0
        tail = store.select(session_id, gte=start, lt=length)
        return cls(
            store, session_id, length=length, tail=tail, compaction=compaction, tools=tools[0] if tools else None
        )

    @classmethod
    def create(
        cls, store: EventStore, *, metadata: dict[str, Any] | None = None, parent: str | None = None
    ) -> SessionLog:
        info = store.create(metadata or {}, parent)
        return cls(store, info.session_id, length=0, tail=[], compaction=None, tools=None)

    def append(self, events: Sequence[NewEvent]) -> list[Event]:
        try:
            positions = self.store.append(self.session_id, events, expected_position=self.length)
        except Conflict as err:
            raise WriterLost(
                f"session {self.session_id} was written by another harness (expected position {self.length}); this one stops without writing"
            ) from err
        now = datetime.now(UTC)
        written = [
            Event(
                session_id=self.session_id,
                position=p,
                event_id=e.event_id or "",
                type=e.type,
                data=e.data,
                created_at=now,
            )
            for p, e in zip(positions, events, strict=True)
        ]
        self.length = max(self.length, positions[-1] + 1)
        for event in written:
            self._remember(event)
        return written

    def _remember(self, event: Event) -> None:
        if event.type == COMPACTED:
            self.compaction = event
            self.tail = [e for e in self.tail if e.position >= event.data["end"]]
        elif event.type == TOOLS:
            self.tools = event
        self.tail.append(event)

    def claim(self, reason: str) -> None:
        """Become the session's one writer (a racing harness makes this, or a later append, fail)."""
        self.append([ev(STATUS, status="running", writer=self.writer, reason=reason)])


class KillAfterAppends:
    """Test hook (CORRAL_KILL_AFTER_APPENDS): SIGKILL this process right after its Nth append
    of progress (a claim, `session.status`, does not count: a woken harness must get past it).

    Crash tests use it to die at every event boundary; it wraps the store so the loop
    carries no test code.
    """

    def __init__(self, store: EventStore, n: int) -> None:
        self._store = store
        self._left = n

    def append(self, session_id: str, events: Sequence[NewEvent], expected_position: int | None = None) -> list[int]:
        positions = self._store.append(session_id, events, expected_position)
        if all(e.type == STATUS for e in events):
            return positions
        self._left -= 1
        if self._left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return positions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
