"""The SQLite event store: the embedded default.

WAL mode, `PRIMARY KEY (session_id, position)` so a racing append fails instead of
overwriting, `BEGIN IMMEDIATE` so concurrent writers (threads or processes) queue on
the database lock. With `synchronous=NORMAL` a committed append survives a process
crash (it is in the WAL before `append` returns); `FULL` also survives power loss.

The session row keeps the session's `length` and `status` (as the PostgreSQL store does)
and its place in the lineage tree (`lineage.py`), so no call scans events or walks a
fork's ancestry: every call costs the same at fork depth 1 and 1,000.
A database an older corral made is migrated in place when it is opened.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral.diskfull import disk_full, is_disk_full
from corral.errors import Conflict, NotFound, Unavailable
from corral.servers.session import lineage, rules
from corral.servers.session.store import (
    DEFAULT_MAX_EVENT_BYTES,
    Event,
    EventStore,
    Lease,
    NewEvent,
    SessionInfo,
    check_range,
    encode_data,
    new_id,
)

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    metadata   TEXT NOT NULL,
    parent     TEXT,
    forked_at  INTEGER,
    created_at REAL NOT NULL,
    length     INTEGER NOT NULL DEFAULT 0,
    status     TEXT,
    below      TEXT,
    jump       TEXT,
    rank       INTEGER NOT NULL DEFAULT 0,
    base_status TEXT
);
CREATE INDEX sessions_created ON sessions (created_at);
CREATE INDEX sessions_parent ON sessions (parent);
CREATE TABLE events (
    session_id TEXT NOT NULL,
    position   INTEGER NOT NULL,
    event_id   TEXT NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, position)
);
CREATE UNIQUE INDEX events_event_id ON events (event_id, session_id);
CREATE INDEX events_type ON events (session_id, type, position);
CREATE TABLE leases (
    session_id TEXT PRIMARY KEY,
    owner      TEXT,
    token      INTEGER NOT NULL,
    expires_at REAL
);
"""
# 1 -> 2: length, status and the lineage node move onto the session row (filled in by
# `_fill_rows`); event ids are indexed first, so a re-sent id is found in one seek.
ADDED_IN_2 = (
    "length INTEGER NOT NULL DEFAULT 0",
    "status TEXT",
    "below TEXT",
    "jump TEXT",
    "rank INTEGER NOT NULL DEFAULT 0",
    "base_status TEXT",
)
MIGRATE_1 = [
    *(f"ALTER TABLE sessions ADD COLUMN {column}" for column in ADDED_IN_2),
    "DROP INDEX events_event_id",
    "CREATE UNIQUE INDEX events_event_id ON events (event_id, session_id)",
]
NODE_SELECT = (
    "SELECT session_id, COALESCE(forked_at, 0), below, jump, rank, base_status FROM sessions WHERE session_id = ?"
)
COLUMNS = "session_id, position, event_id, type, data, created_at"
SESSION_SELECT = (
    "SELECT s.session_id, s.metadata, s.parent, s.forked_at, s.created_at, s.length, s.status, l.owner, l.token, l.expires_at "
    "FROM sessions s LEFT JOIN leases l ON l.session_id = s.session_id"
)


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def _event(reader: str, row: tuple[Any, ...]) -> Event:
    _, pos, eid, typ, data, created = row
    return Event(
        session_id=reader, position=pos, event_id=eid, type=typ, data=json.loads(data), created_at=_ts(created)
    )


class SQLiteEventStore(EventStore):
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        synchronous: str = "NORMAL",
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.max_event_bytes = max_event_bytes
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN ourselves (BEGIN IMMEDIATE for writes).
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            with self._write() as db:
                self._migrate(db)
        except (sqlite3.Error, OSError) as err:
            raise Unavailable(
                f"cannot open the session database {path}: {err}",
                hint="check the path and its permissions (CORRAL_SESSION_STORE / CORRAL_HOME)",
            ) from err
        self._lock = threading.RLock()
        self._nodes = lineage.NodeCache()

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from the start.

        Nothing of a transaction that failed is kept (SQLite may already have rolled it
        back; a failed COMMIT leaves it open). A full disk is named, with where to free
        space: the store goes on working once there is room again, without reopening.
        """
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException as err:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if is_disk_full(err):
                raise disk_full(self.path.resolve().parent) from err
            raise

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Create the schema, or bring one an older corral made up to date (under the write lock)."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise Unavailable(
                f"the session database {self.path} has schema version {version}, newer than this corral ({SCHEMA_VERSION})",
                hint="upgrade corral",
            )
        fresh = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'sessions'").fetchone()[0] == 0
        if fresh:
            for statement in SCHEMA.split(";"):
                db.execute(statement)
        elif version < 2:
            for statement in MIGRATE_1:
                db.execute(statement)
            self._fill_rows(db)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _fill_rows(self, db: sqlite3.Connection) -> None:
        """Version 1 kept no length, status or lineage node on the row: compute them once, oldest session first."""
        rows = db.execute("SELECT session_id, parent, forked_at FROM sessions ORDER BY rowid").fetchall()
        nodes = lineage.Nodes(self._node)  # rows are mid-update: no process cache
        statuses = self._range("", [rules.STATUS_EVENT], True)
        for node in lineage.backfill(rows, statuses, rules.status_of, nodes):
            top = db.execute("SELECT MAX(position) FROM events WHERE session_id = ?", (node.session_id,)).fetchone()[0]
            length = node.key if top is None else top + 1
            status = lineage.status_at(node, length, statuses, rules.status_of, nodes)
            db.execute(
                "UPDATE sessions SET length = ?, status = ?, below = ?, jump = ?, rank = ?, base_status = ? WHERE session_id = ?",
                (length, status, node.below, node.jump, node.rank, node.base_status, node.session_id),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _info(self, session_id: str) -> SessionInfo:
        row = self._db.execute(f"{SESSION_SELECT} WHERE s.session_id = ?", (session_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {session_id!r} not found", hint="list_sessions shows the sessions there are")
        return rules.info_from_row(row, _ts)

    def _node(self, session_id: str) -> lineage.Node:
        row = self._db.execute(NODE_SELECT, (session_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {session_id!r} not found", hint="list_sessions shows the sessions there are")
        return lineage.Node(*row)

    def _range(
        self, reader: str, types: Sequence[str] | None, desc: bool
    ) -> Callable[[str, int, int | None, int | None], list[Event]]:
        """SELECT one owner's rows in [lo, hi), shown as `reader`'s events."""

        def select_range(owner: str, lo: int, hi: int | None, want: int | None) -> list[Event]:
            query, params = rules.range_query(f"SELECT {COLUMNS} FROM events", "?", owner, lo, hi, want, types, desc)
            return [_event(reader, row) for row in self._db.execute(query, params)]

        return select_range

    def _stored_ids(self, session_id: str, event_ids: list[str]) -> dict[str, tuple[Any, ...]]:
        """event_id -> row, for those of `event_ids` this session's view shows (one index seek per id)."""
        rows = self._db.execute(
            f"SELECT {COLUMNS} FROM events WHERE event_id IN (SELECT value FROM json_each(?))", (json.dumps(event_ids),)
        ).fetchall()
        nodes = self._nodes.nodes(self._node)
        start = nodes(session_id)  # NotFound for an unknown session, found ids or not
        return lineage.visible(start, rows, nodes)

    # -- the verbs --------------------------------------------------------------------

    def create(
        self, metadata: dict[str, Any] | None = None, parent: str | None = None, session_id: str | None = None
    ) -> SessionInfo:
        meta = encode_data(metadata or {}, self.max_event_bytes)
        sid = session_id or new_id("ses_")
        with self._lock, self._write() as db:
            if parent is not None:
                self._info(parent)
            try:
                db.execute(
                    "INSERT INTO sessions (session_id, metadata, parent, created_at, jump) VALUES (?, ?, ?, ?, ?)",
                    (sid, meta, parent, time.time(), sid),
                )
            except sqlite3.IntegrityError as err:
                raise Conflict(f"session {sid!r} already exists") from err
            return self._info(sid)

    def fork(self, session_id: str, at: int, metadata: dict[str, Any] | None = None) -> SessionInfo:
        meta = encode_data(metadata or {}, self.max_event_bytes)
        with self._lock, self._write() as db:
            source = self._info(session_id)
            node = rules.plan_fork(
                source, at, self._nodes.nodes(self._node), self._range("", [rules.STATUS_EVENT], True)
            )
            db.execute(
                "INSERT INTO sessions (session_id, metadata, parent, forked_at, created_at, length, status, below, jump, rank, base_status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    node.session_id,
                    meta,
                    session_id,
                    at,
                    time.time(),
                    at,
                    node.base_status,
                    node.below,
                    node.jump,
                    node.rank,
                    node.base_status,
                ),
            )
            return self._info(node.session_id)

    def get(self, session_id: str) -> SessionInfo:
        with self._lock:
            return self._info(session_id)

    def sessions(self, limit: int = 100, parent: str | None = None) -> list[SessionInfo]:
        check_range(None, None, limit)
        query, params = rules.sessions_query(
            SESSION_SELECT, "?", parent, "s.created_at", limit, parent_column="s.parent"
        )
        with self._lock:
            return [rules.info_from_row(r, _ts) for r in self._db.execute(query, params).fetchall()]

    def append(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        expected_position: int | None = None,
        *,
        lease: int | None = None,
    ) -> list[int]:
        encoded = rules.encode_batch(events, expected_position, self.max_event_bytes)
        now = time.time()
        with self._lock, self._write() as db:
            info = self._info(session_id)
            if lease is not None:
                rules.check_lease(session_id, lease, *rules.lease_holder(info))
            given = rules.given_ids(events)
            prior = {eid: row[1] for eid, row in self._stored_ids(session_id, given).items()} if given else {}
            plan = rules.plan_append(
                session_id, encoded, prior, length=info.length, status=info.status, expected_position=expected_position
            )
            if not plan.rows:
                return plan.positions
            try:
                db.executemany(
                    f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    [(session_id, *row, now) for row in plan.rows],
                )
            except sqlite3.IntegrityError as err:  # defends against a writer that bypassed the lock
                raise Conflict(f"concurrent append to session {session_id}; nothing was written") from err
            db.execute(
                "UPDATE sessions SET length = ?, status = ? WHERE session_id = ?",
                (plan.length, plan.status, session_id),
            )
            return plan.positions

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
        check_range(gte, lt, limit)
        with self._lock:
            nodes = self._nodes.nodes(self._node)
            start = nodes(session_id)
            if limit == 0:
                return []
            return lineage.read(start, gte or 0, lt, desc, limit, self._range(session_id, types, desc), nodes)

    def find_event(self, session_id: str, event_id: str) -> Event:
        with self._lock:
            found = self._stored_ids(session_id, [event_id]).get(event_id)
        if found is None:
            raise NotFound(f"no event {event_id!r} in session {session_id}")
        return _event(session_id, found)

    # -- leases (fencing tokens for the worker pool) --------------------------------------

    def _lease(self, session_id: str) -> tuple[str | None, int, float | None]:
        row = self._db.execute(
            "SELECT owner, token, expires_at FROM leases WHERE session_id = ?", (session_id,)
        ).fetchone()
        return row or (None, 0, None)

    def acquire_lease(self, session_id: str, owner: str, ttl_s: float) -> Lease:
        with self._lock, self._write() as db:
            self._info(session_id)
            held_by, token, expires = self._lease(session_id)
            now = time.time()
            if held_by is not None and held_by != owner and expires is not None and expires > now:
                raise Conflict(
                    f"session {session_id} is leased to {held_by} until {_ts(expires).isoformat()}",
                    hint="wait for the lease to expire or be released",
                )
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)", (session_id, owner, token + 1, now + ttl_s))
            return Lease(session_id=session_id, owner=owner, token=token + 1, expires_at=_ts(now + ttl_s))

    def renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease:
        with self._lock, self._write() as db:
            held_by, current = rules.lease_holder(self._info(session_id))
            rules.check_lease(session_id, token, held_by, current)
            expires = time.time() + ttl_s
            db.execute("UPDATE leases SET expires_at = ? WHERE session_id = ?", (expires, session_id))
            return Lease(session_id=session_id, owner=held_by, token=token, expires_at=_ts(expires))

    def release_lease(self, session_id: str, token: int) -> bool:
        with self._lock, self._write() as db:
            return (
                db.execute(
                    "UPDATE leases SET owner = NULL, expires_at = NULL WHERE session_id = ? AND token = ?",
                    (session_id, token),
                ).rowcount
                == 1
            )
