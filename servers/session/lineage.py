"""Where a fork's events live, found in O(log depth) row lookups: pure functions.

A fork shares its parent's events below `forked_at` without copying them. In a session's
view, position p is stored under the first session, walking down from it, whose own rows
start at or below p. The walk goes down a chain of `below` links: `below` of a session is
the session that owns, in its parent's view, the position just under its fork point. Keys
(`forked_at`) strictly fall along the chain, and the chains of all sessions form a tree.

Each session's row keeps, written once when it is created: its `below`, a `jump` pointer
further down the chain, and its `rank` on the chain. The jump pointers are the skew-binary
ones of Myers ("An applicative random-access stack", 1983): from any session, the first
session down the chain with key <= p is found in O(log depth) steps. So a read, an append
and a fork cost the same at fork depth 1 and 1,000: a few row lookups more, never a walk.

The backends supply `node(session_id) -> Node` (one primary-key lookup) and the SQL that
reads one session's rows; everything else is here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")
SelectRange = Callable[
    [str, int, "int | None", "int | None"], Iterable[T]
]  # (owner, lo, hi, want) -> its rows in [lo, hi)


class Node(NamedTuple):
    """A session's place in the lineage tree (the columns its row keeps)."""

    session_id: str
    key: int  # where its own rows start: forked_at, or 0
    below: str | None  # the session owning position key-1 in its view; None when key is 0
    jump: str  # a skip pointer down the chain (itself at the bottom)
    rank: int  # sessions under it on the chain
    base_status: str | None  # the status it started with (its parent's at the fork point)


class NodeCache:
    """A node never changes once written (only new sessions are added), so a process keeps
    the recent ones: after the first call on a fork chain, its lookups cost no round trip."""

    def __init__(self, size: int = 65_536) -> None:
        self._size = size
        self._nodes: OrderedDict[str, Node] = OrderedDict()
        self._lock = threading.Lock()

    def nodes(self, lookup: Callable[[str], Node]) -> Nodes:
        """A `Nodes` for one call that asks `lookup` (the database) only for what this process has not seen."""

        def cached(session_id: str) -> Node:
            with self._lock:
                found = self._nodes.get(session_id)
                if found is not None:
                    self._nodes.move_to_end(session_id)
                    return found
            found = lookup(session_id)  # NotFound is not kept: the session may be created later
            with self._lock:
                self._nodes[session_id] = found
                if len(self._nodes) > self._size:
                    self._nodes.popitem(last=False)
            return found

        return Nodes(cached)


class Nodes:
    """`node(session_id)` with memory, for one call: each row is looked up at most once."""

    def __init__(self, lookup: Callable[[str], Node]) -> None:
        self._lookup = lookup
        self._seen: dict[str, Node] = {}

    def remember(self, node: Node) -> Node:
        self._seen[node.session_id] = node
        return node

    def __call__(self, session_id: str) -> Node:
        found = self._seen.get(session_id)
        if found is None:
            found = self._seen[session_id] = self._lookup(session_id)
        return found


def root(session_id: str) -> Node:
    """A session that shares nothing (a new one, or a fork at 0)."""
    return Node(session_id, 0, None, session_id, 0, None)


def link(session_id: str, key: int, below: Node | None, base_status: str | None, node: Callable[[str], Node]) -> Node:
    """A new session whose rows start at `key`, over `below` (Myers' jump pointer rule)."""
    if below is None:
        return Node(session_id, key, None, session_id, 0, base_status)
    j = node(below.jump)
    jj = node(j.jump)
    jump = jj.session_id if below.rank - j.rank == j.rank - jj.rank else below.session_id
    return Node(session_id, key, below.session_id, jump, below.rank + 1, base_status)


def above(start: Node, x: int, node: Callable[[str], Node]) -> Node | None:
    """The last session down the chain from `start` whose own rows start above position `x`.

    None when `start`'s own rows hold `x`. O(log depth): a jump is taken whenever it
    lands on a session still above `x` (every session it skips is above `x` too).
    """
    if start.key <= x:
        return None
    v = start
    while True:
        j = node(v.jump)
        if j.key > x and j.session_id != v.session_id:
            v = j
            continue
        assert v.below is not None  # key > x >= 0: something is under it
        b = node(v.below)
        if b.key <= x:
            return v
        v = b


def owner(start: Node, x: int, node: Callable[[str], Node]) -> Node:
    """The session whose rows hold position `x` in `start`'s view."""
    top = above(start, x, node)
    return start if top is None or top.below is None else node(top.below)


def spans(
    start: Node, gte: int, lt: int | None, desc: bool, node: Callable[[str], Node]
) -> Iterator[tuple[str, int, int | None]]:
    """(owner, lo, hi) of [gte, lt) in read order, found one at a time (a read that stops early looks no further)."""
    if lt is not None and lt <= gte:
        return
    if desc:
        v = start if lt is None or lt > start.key else owner(start, lt - 1, node)
        hi = lt
        while True:
            yield v.session_id, max(gte, v.key), hi
            if v.key <= gte or v.below is None:
                return
            hi, v = v.key, node(v.below)
    x = gte
    while lt is None or x < lt:
        top = above(start, x, node)
        if top is None or top.below is None:
            yield start.session_id, x, lt
            return
        yield top.below, x, top.key if lt is None else min(top.key, lt)
        x = top.key


def read(
    start: Node,
    gte: int,
    lt: int | None,
    desc: bool,
    limit: int | None,
    select_range: SelectRange[T],
    node: Callable[[str], Node],
) -> list[T]:
    """Up to `limit` items of [gte, lt) of `start`'s view in read order, one `select_range` per span."""
    out: list[T] = []
    for owner_id, lo, hi in spans(start, gte, lt, desc, node):
        want = None if limit is None else limit - len(out)
        if want is not None and want <= 0:
            break
        out.extend(select_range(owner_id, lo, hi, want))
    return out


def visible(start: Node, rows: Iterable[tuple[Any, ...]], node: Callable[[str], Node]) -> dict[str, tuple[Any, ...]]:
    """event_id -> row, for rows `(owner, position, event_id, ...)` that `start`'s view shows.

    A fork hides what its parent wrote after the fork point, and a sibling's rows.
    """
    found: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        if row[2] not in found and owner(start, row[1], node).session_id == row[0]:
            found[row[2]] = row
    return found


def status_at(
    start: Node,
    at: int,
    select_status: SelectRange[Any],
    status_of: Callable[[Any], str | None],
    node: Callable[[str], Node],
) -> str | None:
    """The status of `start`'s view below position `at`, from one range read.

    `select_status` reads session.status events, newest first. Only the owner of position
    at-1 is read: under its own rows, its view's status is the one it started with.
    """
    if at <= 0:
        return None
    holder = owner(start, at - 1, node)
    last = list(select_status(holder.session_id, holder.key, at, 1))
    return status_of(last[0].data) if last else holder.base_status


def fork(session_id: str, at: int, source: Node, status: str | None, node: Callable[[str], Node]) -> Node:
    """The node of a fork of `source` at `at` (0 <= at <= the source's length), starting with `status`."""
    below = owner(source, at - 1, node) if at > 0 else None
    return link(session_id, at, below, status, node)


def backfill(
    rows: Iterable[tuple[str, str | None, int | None]],
    select_status: SelectRange[Any],
    status_of: Callable[[Any], str | None],
    nodes: Nodes,
) -> Iterator[Node]:
    """The node of each row (session_id, parent, forked_at), for a database made before nodes were kept.

    `rows` in creation order: a parent is always created before its forks, so each
    fork's source is known (remembered) by the time it is reached.
    """
    for sid, parent, forked_at in rows:
        if parent is None or not forked_at:
            yield nodes.remember(root(sid))
            continue
        source = nodes(parent)
        yield nodes.remember(
            fork(sid, forked_at, source, status_at(source, forked_at, select_status, status_of, nodes), nodes)
        )
