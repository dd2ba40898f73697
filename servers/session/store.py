"""The event store: a few verbs over an append-only log of sessions.

    append(session_id, events, expected_position=None) -> positions
    select(session_id, gte=, lt=, types=, desc=, limit=)  -> events
    create(metadata, parent) / fork(session_id, at) / get(session_id) / sessions()

Positions are dense per session and start at 0. Nothing is updated or deleted.
A fork shares its parent's events below `at` without copying them: a read of the
child finds where each position lives from its lineage (`lineage.py`), at a cost that
does not grow with the depth of the fork.

Backends: `sqlite.py` (default), `postgres.py`. Both pass `tests/session/contract.py`.
They keep only their SQL; the rules (the append plan, status) are `rules.py`'s and
the lineage `lineage.py`'s, pure functions written once.
"""

from __future__ import annotations

import json
import math
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from corral.errors import Conflict, InvalidArgument

__all__ = ["Event", "NewEvent", "SessionInfo", "Lease", "LeaseLost", "EventStore", "encode_data", "new_id"]

DEFAULT_MAX_EVENT_BYTES = 1 << 20
TYPE_PATTERN = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$"


class NewEvent(BaseModel):
    """An event to append."""

    type: str = Field(pattern=TYPE_PATTERN, max_length=200, description="{domain}.{action}, e.g. user.message")
    data: Any = Field(default_factory=dict, description="any JSON value")
    event_id: str | None = Field(
        None, min_length=1, max_length=200, description="idempotency key; generated when omitted"
    )


class Event(BaseModel):
    session_id: str
    position: int
    event_id: str
    type: str
    data: Any
    created_at: datetime


class SessionInfo(BaseModel):
    session_id: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = Field(
        None, description="session this one was started from (a subagent's parent, or a fork's source)"
    )
    forked_at: int | None = Field(None, description="for a fork: it shares the parent's events below this position")
    created_at: datetime
    length: int = 0
    status: str | None = Field(
        None, description="the data.status of the latest session.status event (a non-string one as its JSON text)"
    )
    lease: dict[str, Any] | None = None


class Lease(BaseModel):
    """A worker's hold on a session. `token` grows on every acquisition: it fences writes.

    An append made with `lease=token` is refused (`Conflict`, nothing written) once the
    lease was released or acquired by anyone else, so a worker that stalled and lost its
    session can never write into it again, whatever the job queue believes.
    """

    session_id: str
    owner: str
    token: int
    expires_at: datetime


class LeaseLost(Conflict):
    """An append (or renewal) under a lease that was released or taken over: nothing was written."""

    default_hint = "another worker owns this session now; stop working on it"


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex


def encode_data(data: Any, limit: int) -> str:
    """JSON-encode an event's data, refusing what is not JSON or is over `limit` bytes."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"event data is not JSON: {err}") from err
    size = len(text.encode())
    if size > limit:
        raise InvalidArgument(
            f"event data is {size} bytes, over the {limit}-byte limit",
            hint="store large content elsewhere (e.g. a sandbox file) and emit a reference to it",
        )
    return text


def check_range(gte: int | None, lt: int | None, limit: int | None) -> None:
    if gte is not None and gte < 0:
        raise InvalidArgument(f"start position {gte} is negative")
    if lt is not None and lt < 0:
        raise InvalidArgument(f"end position {lt} is negative")
    if gte is not None and lt is not None and gte > lt:
        raise InvalidArgument(f"start {gte} is after end {lt}")
    if limit is not None and limit < 0:
        raise InvalidArgument(f"limit {limit} is negative")
    if limit is not None and math.isinf(limit):  # pragma: no cover - defends against float limits from JSON
        raise InvalidArgument("limit must be finite")


class EventStore(ABC):
    """An append-only log of sessions. Thread-safe; one instance per process is enough."""

    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES

    @abstractmethod
    def create(
        self, metadata: dict[str, Any] | None = None, parent: str | None = None, session_id: str | None = None
    ) -> SessionInfo:
        """A new, empty session (linked to `parent` if given, sharing none of its events)."""

    @abstractmethod
    def fork(self, session_id: str, at: int, metadata: dict[str, Any] | None = None) -> SessionInfo:
        """A new session whose first `at` events are `session_id`'s (shared, not copied)."""

    @abstractmethod
    def get(self, session_id: str) -> SessionInfo:
        """One session's metadata, length and status; `NotFound` if unknown."""

    @abstractmethod
    def sessions(self, limit: int = 100, parent: str | None = None) -> list[SessionInfo]:
        """Sessions, newest first."""

    @abstractmethod
    def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_position: int | None = None,
        *,
        lease: int | None = None,
    ) -> list[int]:
        """Append `events` atomically; return their positions.

        `expected_position` is the position the first new event must get (the session's
        length); on a mismatch nothing is written and `Conflict` is raised. An event whose
        `event_id` is already stored is not written again: its original position is returned.
        `lease` is a `Lease.token`: if it is no longer the session's current lease, nothing is
        written and `Conflict` is raised.
        """

    @abstractmethod
    def select(
        self,
        session_id: str,
        *,
        gte: int | None = None,
        lt: int | None = None,
        types: Sequence[str] | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> list[Event]:
        """Events with gte <= position < lt (and type in `types`), ordered by position."""

    @abstractmethod
    def find_event(self, session_id: str, event_id: str) -> Event:
        """The event with `event_id` in this session's lineage; `NotFound` if none."""

    @abstractmethod
    def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> Lease:
        """Hold `session_id` for `ttl_s` seconds with a new token; `Conflict` if another owner's lease is live."""

    @abstractmethod
    def renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease:
        """Extend a held lease; `Conflict` if it was released or taken over."""

    @abstractmethod
    def release_lease(self, session_id: str, token: int) -> bool:
        """Give the session up; False (and nothing changed) if `token` is no longer current."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release connections."""

    # Conveniences built on the verbs ------------------------------------------------

    def append_one(
        self,
        session_id: str,
        type: str,
        data: Any = None,
        *,
        expected_position: int | None = None,
        event_id: str | None = None,
        lease: int | None = None,
    ) -> int:
        event = NewEvent(type=type, data={} if data is None else data, event_id=event_id)
        return self.append(session_id, [event], expected_position, lease=lease)[0]

    def length(self, session_id: str) -> int:
        return self.get(session_id).length
