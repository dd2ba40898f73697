"""What every store backend decides the same way: pure functions over plain values.

A backend keeps only its SQL (lock the session, look up stored event ids, insert rows,
select a position range of one session's rows); the rules that make the log an
append-only, idempotent, forkable log live here, once:

- `plan_append`: positions for a batch, idempotent event ids (also repeated within the
  batch, and stored in a fork's shared prefix), the `expected_position` check, the status;
- where a fork's events live: `lineage.py`;
- `status_of`: what a `session.status` event makes a session's status.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from corral.errors import Conflict, InvalidArgument
from corral.servers.session import lineage
from corral.servers.session.store import LeaseLost, NewEvent, SessionInfo, encode_data, new_id

STATUS_EVENT = "session.status"


def range_query(
    select: str,
    mark: str,
    owner: str,
    lo: int,
    hi: int | None,
    want: int | None,
    types: Sequence[str] | None,
    desc: bool,
) -> tuple[str, list[Any]]:
    """The SQL (with `mark` placeholders) and parameters for one owner's rows in [lo, hi): an index range scan."""
    sql = f"{select} WHERE session_id = {mark} AND position >= {mark}"
    params: list[Any] = [owner, lo]
    if hi is not None:
        sql += f" AND position < {mark}"
        params.append(hi)
    if types:
        sql += f" AND type IN ({', '.join([mark] * len(types))})"
        params.extend(types)
    sql += " ORDER BY position DESC" if desc else " ORDER BY position"
    if want is not None:
        sql += f" LIMIT {mark}"
        params.append(want)
    return sql, params


def plan_fork(
    source: SessionInfo, at: int, nodes: lineage.Nodes, select_status: lineage.SelectRange[Any]
) -> lineage.Node:
    """The lineage node of a new fork of `source` at `at`; its `base_status` is the status it starts with."""
    if not 0 <= at <= source.length:
        raise InvalidArgument(
            f"fork position {at} is out of range: session {source.session_id} has {source.length} events (0..{source.length})"
        )
    start = nodes(source.session_id)
    status = source.status if at == source.length else lineage.status_at(start, at, select_status, status_of, nodes)
    return lineage.fork(new_id("ses_"), at, start, status, nodes)


def sessions_query(
    select: str, mark: str, parent: str | None, order: str, limit: int, *, parent_column: str = "parent"
) -> tuple[str, list[Any]]:
    """The SQL and parameters listing sessions (a parent's only, if given), newest first."""
    sql, params = select, []
    if parent is not None:
        sql += f" WHERE {parent_column} = {mark}"
        params.append(parent)
    return f"{sql} ORDER BY {order} DESC LIMIT {mark}", [*params, limit]


def info_from_row(row: Sequence[Any], when: Callable[[Any], datetime]) -> SessionInfo:
    """A session row (id, metadata, parent, forked_at, created_at, length, status, lease owner, token, expiry)."""
    sid, metadata, parent, forked_at, created_at, length, status, owner, token, expires = row
    lease = None if owner is None else {"worker": owner, "token": token, "expires_at": when(expires).isoformat()}
    return SessionInfo(
        session_id=sid,
        metadata=json.loads(metadata),
        parent=parent,
        forked_at=forked_at,
        created_at=when(created_at),
        length=length,
        status=status,
        lease=lease,
    )


# -- status ------------------------------------------------------------------------------


def status_of(data: Any) -> str | None:
    """What a session.status event with `data` makes the session's status."""
    if not isinstance(data, dict):
        return None
    value = data.get("status")
    return value if value is None or isinstance(value, str) else json.dumps(value)


# -- append ------------------------------------------------------------------------------


@dataclass
class AppendPlan:
    """What an append writes: `rows` (position, event_id, type, data) at the end; `positions` for the caller."""

    positions: list[int]
    rows: list[tuple[int, str, str, str]] = field(default_factory=list)
    status: str | None = None  # the session's status once the rows are in
    length: int = 0  # the session's length once the rows are in


def encode_batch(events: Sequence[NewEvent], expected_position: int | None, limit: int) -> list[tuple[NewEvent, str]]:
    """Each event with its JSON, refusing the whole batch if any event or the position is bad."""
    if expected_position is not None and expected_position < 0:
        raise InvalidArgument(f"expected_position {expected_position} is negative")
    return [(e, encode_data(e.data, limit)) for e in events]


def lease_holder(info: SessionInfo) -> tuple[str | None, int]:
    """The session's lease as `check_lease` takes it: (owner, token); (None, 0) when nobody holds it."""
    held = info.lease
    return (None, 0) if held is None else (held["worker"], held["token"])


def check_lease(session_id: str, token: int, holder: str | None, current: int) -> None:
    """Refuse a write under lease `token` when the session's lease (`holder`, `current`) is another."""
    if holder is None or current != token:
        now = "nobody" if holder is None else f"{holder} (lease {current})"
        raise LeaseLost(f"lease {token} on session {session_id} is no longer held (now: {now}); nothing was written")


def given_ids(events: Sequence[NewEvent]) -> list[str]:
    """The idempotency keys a batch carries: the backend looks these up before planning."""
    return [e.event_id for e in events if e.event_id is not None]


def plan_append(
    session_id: str,
    encoded: Sequence[tuple[NewEvent, str]],
    prior: Mapping[str, int],
    *,
    length: int,
    status: str | None,
    expected_position: int | None,
) -> AppendPlan:
    """Plan an append of `encoded` (event, its JSON) to a session of `length` events.

    `prior` maps the batch's event ids already stored in the session's lineage to their
    positions: those are not written again. A repeat within the batch gets its first
    occurrence's position. If anything is new and `expected_position` is not the length,
    `Conflict` (the caller writes nothing).
    """
    positions = [-1] * len(encoded)
    first: dict[str, int] = {}  # event_id -> index of its first occurrence in the batch
    plan = AppendPlan(positions, status=status, length=length)
    for i, (event, data) in enumerate(encoded):
        eid = event.event_id
        if eid is not None and eid in first:
            positions[i] = positions[first[eid]]
            continue
        if eid is not None:
            first[eid] = i
            if eid in prior:
                positions[i] = prior[eid]
                continue
        positions[i] = plan.length
        plan.rows.append((plan.length, eid or new_id("evt_"), event.type, data))
        plan.length += 1
        if event.type == STATUS_EVENT:
            plan.status = status_of(event.data)
    if plan.rows and expected_position is not None and expected_position != length:
        raise Conflict(
            f"expected position {expected_position} but session {session_id} has {length} events; nothing was written"
        )
    return plan
