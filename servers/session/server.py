"""`corral serve session`: the event log as MCP tools.

The logic is the store's; this module is the thin shell: typed parameters with
descriptions, honest annotations, results as pydantic models.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel, Field

from corral.errors import InvalidArgument
from corral.servers.mcp_shell import serve, tool
from corral.servers.session.store import Event, EventStore, SessionInfo
from corral.servers.session.workspace import Workspace, workspace_at, workspace_note

MAX_PAGE = 1000
MAX_POSITION = 2**63 - 1  # positions are 64-bit integers in both stores (and `after + 1` must be one)
INSTRUCTIONS = """\
The session log: an append-only event log that outlives any context window.
Read history with get_events (paging forward or backward), slice (a position range)
or rewind (the events just before a position or event id). Append with emit_event;
pass expected_position for optimistic concurrency and event_id for idempotency.
Nothing is ever edited or deleted: to branch, fork."""

SessionId = Annotated[str, Field(description="the session's id (from create_session or list_sessions)")]


class Created(BaseModel):
    session_id: str


class Forked(BaseModel):
    session_id: str
    workspace: Workspace | None = Field(
        description="the checkpoint the child's default sandbox is restored from; null: a fresh sandbox"
    )
    note: str = Field(description="the same, said for a person")


class Emitted(BaseModel):
    position: int = Field(description="the event's position (its original one if event_id was already stored)")


class EventsPage(BaseModel):
    events: list[Event]
    next_after: int | None = Field(
        description="pass as `after` to read the next page; null when nothing was returned and no cursor was given"
    )


class Sessions(BaseModel):
    sessions: list[SessionInfo]


def _check_limit(limit: int) -> int:
    if not 0 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"limit {limit} is out of range 0..{MAX_PAGE}")
    return limit


def build_server(store: EventStore, *, owns_store: bool = False) -> MCPServer:
    """The server over `store`; with `owns_store`, the server's lifespan closes the store when it stops.

    The store is opened by the caller, not in the lifespan: `corral up` shares it with the
    viewer, and a bad store URL is one error line before anything is served.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            if owns_store:
                store.close()

    server = MCPServer("corral-session", instructions=INSTRUCTIONS, lifespan=lifespan)
    # Every tool is a plain function: the SDK runs it in a worker thread, so a read that waits
    # (on the store lock behind a write, or on a PostgreSQL round trip) never stalls the event
    # loop that `corral up` shares with the other servers.

    @tool(server, idempotent=False)
    def create_session(
        metadata: Annotated[
            dict[str, Any] | None, Field(description="free-form JSON object kept with the session (title, task, ...)")
        ] = None,
        parent: Annotated[
            str | None, Field(description="id of the session this one belongs to (e.g. a subagent's parent)")
        ] = None,
    ) -> Created:
        """Create a new, empty session."""
        return Created(session_id=store.create(metadata, parent).session_id)

    @tool(server)
    def emit_event(
        session_id: SessionId,
        type: Annotated[str, Field(description="{domain}.{action}, e.g. user.message, agent.tool_result")],
        data: Annotated[Any, Field(description="the event's payload: any JSON value")] = None,
        expected_position: Annotated[
            int | None,
            Field(
                description="the position this event must get (the session's current length); a mismatch is a conflict and nothing is written"
            ),
        ] = None,
        event_id: Annotated[
            str | None,
            Field(description="idempotency key: re-sending an event_id already stored returns its original position"),
        ] = None,
    ) -> Emitted:
        """Append one event to a session."""
        return Emitted(
            position=store.append_one(session_id, type, data, expected_position=expected_position, event_id=event_id)
        )

    @tool(server, read_only=True, structured=False)
    def get_events(
        session_id: SessionId,
        after: Annotated[
            int | None,
            Field(description="cursor: with order=asc, events after this position; with order=desc, events before it"),
        ] = None,
        limit: Annotated[int, Field(description=f"at most this many events (0..{MAX_PAGE})")] = 100,
        types: Annotated[list[str] | None, Field(description="only events of these types")] = None,
        order: Annotated[Literal["asc", "desc"], Field(description="asc: oldest first; desc: newest first")] = "asc",
    ) -> EventsPage:
        """Read a page of a session's events."""
        _check_limit(limit)
        if after is not None and after < -1:
            raise InvalidArgument(f"after {after} is out of range (use -1 or omit it to start at the beginning)")
        if after is not None and after >= MAX_POSITION:
            raise InvalidArgument(
                f"after {after} is out of range: positions are below {MAX_POSITION}",
                hint="pass next_after from the previous page",
            )
        if order == "asc":
            events = store.select(session_id, gte=None if after is None else after + 1, types=types, limit=limit)
        else:
            events = store.select(session_id, lt=after, types=types, desc=True, limit=limit)
        return EventsPage(events=events, next_after=events[-1].position if events else after)

    @tool(server, read_only=True, name="slice", structured=False)
    def slice_(
        session_id: SessionId,
        start: Annotated[int, Field(description="first position (inclusive)")],
        end: Annotated[int, Field(description=f"last position (exclusive); at most {MAX_PAGE} events per call")],
    ) -> EventsPage:
        """The events with start <= position < end."""
        if start < 0 or end < start:
            raise InvalidArgument(f"bad range [{start}, {end}): need 0 <= start <= end")
        if end - start > MAX_PAGE:
            raise InvalidArgument(
                f"range [{start}, {end}) spans {end - start} events, over {MAX_PAGE}", hint="read it in pages"
            )
        length = store.length(session_id)
        if start > length:
            raise InvalidArgument(f"start {start} is past the end of session {session_id} ({length} events)")
        events = store.select(session_id, gte=start, lt=end)
        return EventsPage(events=events, next_after=events[-1].position if events else None)

    @tool(server, read_only=True, structured=False)
    def rewind(
        session_id: SessionId,
        before: Annotated[int | str, Field(description="a position, or an event_id, to look back from (exclusive)")],
        count: Annotated[int, Field(description=f"how many events to return (1..{MAX_PAGE})")] = 10,
    ) -> EventsPage:
        """Look back: the `count` events just before a position or event id, oldest first. Read-only."""
        if not 1 <= count <= MAX_PAGE:
            raise InvalidArgument(f"count {count} is out of range 1..{MAX_PAGE}")
        if isinstance(before, str):
            position = store.find_event(session_id, before).position
        else:
            position = before
            length = store.length(session_id)
            if not 0 <= position <= length:
                raise InvalidArgument(f"position {position} is out of range 0..{length} for session {session_id}")
        events = list(reversed(store.select(session_id, lt=position, desc=True, limit=count)))
        return EventsPage(events=events, next_after=events[-1].position if events else None)

    @tool(server)
    def fork(
        session_id: SessionId,
        at: Annotated[int, Field(description="the new session shares the events below this position (0..length)")],
    ) -> Forked:
        """Branch a session: a new session sharing its first `at` events (copy-on-write). Its sandbox
        files are those of the latest checkpoint before `at` (restored at its first sandbox call), said in the result."""
        child = store.fork(session_id, at).session_id
        workspace = workspace_at(store, child, at)
        return Forked(session_id=child, workspace=workspace, note=workspace_note(at, workspace))

    @tool(server, read_only=True)
    def get_session(session_id: SessionId) -> SessionInfo:
        """One session's metadata, length, status and parent."""
        return store.get(session_id)

    @tool(server, read_only=True)
    def list_sessions(
        limit: Annotated[int, Field(description=f"at most this many, newest first (0..{MAX_PAGE})")] = 50,
        parent: Annotated[str | None, Field(description="only the children of this session")] = None,
    ) -> Sessions:
        """Sessions, newest first."""
        return Sessions(sessions=store.sessions(_check_limit(limit), parent))

    return server


def run(http: str | None = None, token: str | None = None, stdio: str = "pipes") -> None:
    from corral.servers.session.config import SessionSettings

    serve(build_server(SessionSettings().open_store(), owns_store=True), http, token=token, stdio=stdio)
